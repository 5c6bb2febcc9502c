"""The CLI's side of `ra serve`: find a running server for this data directory (its Unix socket,
$RA_HOME/serve.sock) and ask it. Imports neither torch nor transformers: with a server, `ra ask`
starts answering as soon as Python and typer are up.
"""
from __future__ import annotations

import http.client
import json
import socket
from dataclasses import asdict
from pathlib import Path

from core.errors import RaError

SOCKET = "serve.sock"  # ra_cli/serve.py listens here


class ServerError(RaError):
    """An error the server reported for this request (its exit code is the one `ra ask` would give)."""

    def __init__(self, message: str, exit_code: int = 1, kind: str = ""):
        super().__init__(message)
        self.exit_code, self.kind = exit_code, kind  # kind "document_too_long": the conversation outgrew the model


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float | None):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = str(path)

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.socket_path)
        self.sock = s


def find_server(home: Path) -> Path | None:
    """The socket of a live server for this data directory, or None (no socket, or a stale one)."""
    path = Path(home) / SOCKET
    if not path.exists():
        return None
    try:
        conn = _UnixConnection(path, timeout=1.0)
        conn.request("GET", "/health")
        ok = conn.getresponse().status == 200
        conn.close()
        return path if ok else None
    except OSError:
        return None


def _post(path: Path, endpoint: str, doc, settings, **fields):
    """POST a CLI request (the whole Document, the CLI's settings, more fields) -> (conn, response)
    streaming JSON lines, or None when this server cannot take it (another model: 409; a document
    too big to send: 413) or has stopped. Other refusals raise ServerError."""
    s = {k: v for k, v in asdict(settings).items() if k != "remap"}
    body = json.dumps({"document": asdict(doc), "settings": s, **fields}, ensure_ascii=False).encode()
    conn = _UnixConnection(path, timeout=None)
    try:
        conn.request("POST", endpoint, body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            try:
                message = json.loads(resp.read() or b"{}").get("error", {}).get("message")
            except ValueError:
                message = None
            conn.close()
            if resp.status in (404, 409, 413):  # an older server without this endpoint, another model,
                return None                     # or a document too big to send: the caller works in process
            raise ServerError(message or f"the server answered {resp.status}", 2 if resp.status == 400 else 1)
        return conn, resp
    except OSError:  # the server stopped between find_server and now
        conn.close()
        return None


def _event(resp) -> dict:
    """The next JSON line of a CLI response; an {"error"} line raises ServerError."""
    try:
        line = resp.readline()
        event = json.loads(line) if line else None
    except (OSError, ValueError):
        event = None
    if event is None:
        raise ServerError("the server closed the connection mid-answer (it stopped?)")
    if "error" in event:
        raise ServerError(event["error"]["message"], event["error"].get("exit_code", 1), event["error"].get("type", ""))
    return event


def ask(path: Path, doc, question: str, settings, sources: int = 0, history=()) -> "Answer | None":
    """Send one question about `doc` (a core.documents.Document) with the CLI's settings;
    sources: how many cited passages the record should carry (0: none); history: earlier turns
    [(question, answer ids)] of a conversation (`ra repl`)."""
    sent = _post(path, "/ra/v1/ask", doc, settings, question=question, sources=sources,
                 history=[[q, list(ids)] for q, ids in history])
    return Answer(*sent) if sent else None


def index(path: Path, doc, settings, progress=None, notice=None, to_ask: bool = False) -> dict | None:
    """Have the server prefill and store `doc` (if new) and keep it open: its progress(stage,
    done, total) and notice(text) relayed as they come; -> {entry, cache_hit, document_tokens,
    bytes}, or None when this server cannot take it (to_ask: nor answer about it with these
    settings, e.g. another step dtype, which a prefill alone does not mind)."""
    sent = _post(path, "/ra/v1/index", doc, settings, to_ask=to_ask)
    if sent is None:
        return None
    conn, resp = sent
    try:
        while True:
            event = _event(resp)
            if "progress" in event and progress:
                progress(*event["progress"])
            elif "notice" in event and notice:
                notice(event["notice"])
            elif "done" in event:
                return event["done"]
    finally:
        conn.close()  # also when interrupted: the server's prefill goes on (a checkpointed, stored entry)


class Answer:
    """A streamed answer: `start` (cache hit, tokens...), then `pieces()`, then `record` (the
    `--json` object)."""

    def __init__(self, conn, resp):
        self.conn, self.resp = conn, resp
        self.record, self.answer_ids = None, []
        self.start = self._next().get("start", {})

    def _next(self) -> dict:
        return _event(self.resp)

    def pieces(self):
        try:
            while True:
                event = self._next()
                if "piece" in event:
                    yield event["piece"]
                elif "done" in event:
                    self.record, self.answer_ids = event["done"], event.get("answer_ids", [])
                    return
        finally:
            self.conn.close()  # also when interrupted: the server cancels the answer
