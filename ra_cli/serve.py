"""`ra serve`: one warm process with the model loaded and recent documents open, behind an
OpenAI-compatible HTTP API on 127.0.0.1 (and a Unix socket in the data directory).

    POST /v1/chat/completions   the first system message is the document, the last user message
                                the question, the turns between them the conversation; `stream`
                                for server-sent events. The document is prefilled once and stored
                                like any entry (keyed by its text and the model), so the same
                                document from any client, after any restart, is answered without
                                prefill. An extra "ra" object says which entry and whether it hit.
                                Or the request names a file or directory instead, as
                                {"ra": {"path": "/abs/path"}}: read by the server, only inside a
                                directory given with --allow-dir (off by default); then every
                                message is the conversation (a system message is ignored).
    GET  /v1/models             the one loaded model
    GET  /health                {"status": "ok", ...}

Threads: one per connection (stdlib ThreadingHTTPServer) parse requests and stream replies; the
main thread is the worker that runs every model job in arrival order (a FIFO queue: fair, and two
requests for the same new document cause one prefill, the second finding it open). The model runs
in the main thread because some of torch's CPU kernels do not (a bf16 matrix-vector product run
from another thread used one core of two here: BENCHMARKS.md, "The decode step's weights"). A
client that disconnects cancels its answer at the next token. Errors are OpenAI-style JSON with 4xx/5xx codes.
"""
from __future__ import annotations

import json
import os
import queue
import socketserver
import sys
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from core.errors import DocumentTooLong, RaError, UsageError

MAX_BODY = 64 << 20      # bytes of one request
MAX_QUEUE = 64           # requests waiting for the model before new ones get 503
SOCKET = "serve.sock"    # in the data directory


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


@dataclass
class Job:
    """One model task: run(job) in the worker; what it puts on job.events the request's thread sends."""

    run: object
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    follow: bool = False  # relay the engine's progress and notices to the client (`ra index`)


class Worker:
    """The model's one thread (`run`, in the main thread): jobs in arrival order; recently used
    documents kept open (LRU)."""

    def __init__(self, session, max_docs: int = 4):
        self.session, self.engine = session, session.engine
        self.open: OrderedDict = OrderedDict()  # (entry digest, Settings) -> Prepared
        self.max_docs = max_docs
        self.jobs: queue.Queue = queue.Queue(MAX_QUEUE)
        self.current: Job | None = None  # the job running now
        # the engine reports progress and notices to the server's stderr (the session's callbacks)
        # and, while a job that follows them runs, to its client as well
        self.engine.progress = self._relayed(self.engine.progress, lambda *a: {"progress": list(a)})
        self.engine.notice = self._relayed(self.engine.notice, lambda msg: {"notice": msg})

    def _relayed(self, callback, line):
        """callback, and then line(*args) sent to the running job's client if it follows progress."""
        def both(*args):
            callback(*args)
            job = self.current
            if job is not None and job.follow:
                job.events.put(("line", line(*args)))
        return both

    def submit(self, job: Job) -> Job:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(503, f"the server is busy ({MAX_QUEUE} requests waiting); retry later", "server_busy")
        return job

    def run(self) -> None:
        """Run jobs until KeyboardInterrupt (Ctrl-C, or SIGTERM as the CLI maps it)."""
        while True:
            try:  # a bounded wait: a SIGTERM the kernel hands to an HTTP thread must still reach this
                job = self.jobs.get(timeout=0.5)  # one promptly (Python runs handlers in the main thread)
            except queue.Empty:
                continue
            try:
                if not job.cancelled.is_set():
                    self.current = job
                    job.run(job)
            except ApiError as e:
                job.events.put(("error", e))
            except RaError as e:  # DocumentTooLong by name: `ra repl` drops its oldest turn and asks again
                kind = "document_too_long" if isinstance(e, DocumentTooLong) else "invalid_request_error"
                job.events.put(("error", ApiError(400 if e.exit_code == 2 else 422, str(e), kind)))
            except Exception as e:  # noqa: BLE001 - a bug: the server stays up, logs it, the client hears of it
                import traceback

                traceback.print_exc()
                job.events.put(("error", ApiError(500, f"{type(e).__name__}: {e}", "server_error")))
            finally:
                self.current = None
                job.events.put(("end", None))

    def prepare(self, doc, settings=None):
        """The document opened with `settings` (default the server's; LRU; prefilled and stored
        first if it is new). Worker thread only."""
        settings = settings or self.engine.settings
        key = (self.engine.key(doc).digest, settings)
        if key in self.open:
            self.open.move_to_end(key)
            return self.open[key], True
        prepared = self.session.open(doc, settings)
        self.open[key] = prepared
        while len(self.open) > self.max_docs:
            self.open.popitem(last=False)  # its lease goes with it
        return prepared, prepared.cache_hit


def _text(content) -> str:
    """An OpenAI message content: a string or a list of parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise ApiError(400, "message content must be a string or a list of text parts")


def named_path(body: dict) -> str | None:
    """The document path a request names ({"ra": {"path": ...}}), or None."""
    ra = body.get("ra")
    if ra is None:
        return None
    if not isinstance(ra, dict) or not isinstance(ra.get("path"), str) or not ra["path"]:
        raise ApiError(400, "'ra' must be an object with a 'path': the absolute path of a file or directory")
    return ra["path"]


def allowed_path(path: str, allow_dirs: tuple) -> Path:
    """A path a client named, resolved (symlinks followed), if it lies inside one of `allow_dirs`
    (resolved directories, from --allow-dir); else 403. Nothing is said about what exists outside."""
    if not allow_dirs:
        raise ApiError(403, "this server reads no documents by path: start it with --allow-dir DIR", "permission_denied")
    p = Path(path)
    if not p.is_absolute():
        raise ApiError(400, f"'ra.path' must be absolute, not {path!r}")
    try:
        p = p.resolve()
        inside = any(p == d or d in p.parents for d in allow_dirs)
        if inside and not p.exists():
            raise ApiError(404, f"no such file or directory: {path}", "not_found")
    except (OSError, RuntimeError, ValueError) as e:  # a NUL byte, a symlink loop, no permission
        raise ApiError(400, f"cannot use 'ra.path' {path!r}: {e}") from None
    if not inside:
        raise ApiError(403, f"{path} is outside the directories this server may read (--allow-dir)", "permission_denied")
    return p


def parse_chat(body: dict, named: bool = False):
    """-> (document text or None, question, history [(question, answer text)], max_tokens, stream).
    named: the request names its document ("ra": {"path"}): no system message holds it (one sent
    anyway is dropped) and the document text returned is None."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise ApiError(400, "'messages' must be a non-empty list of messages")
    if named:
        document, msgs = None, [m for m in msgs if m.get("role") != "system"]
    else:
        if msgs[0].get("role") != "system" or not _text(msgs[0].get("content")).strip():
            raise ApiError(400, "ra answers about a document: send it as the first message, with role 'system', "
                                "or name it as \"ra\": {\"path\": ...}")
        document, msgs = _text(msgs[0]["content"]), msgs[1:]
    turns = [(m.get("role"), _text(m.get("content"))) for m in msgs]
    if not turns or turns[-1][0] != "user" or not turns[-1][1].strip():
        raise ApiError(400, "the last message must be the question, with role 'user'")
    history, pending = [], None
    for role, text in turns[:-1]:
        if role == "user":
            pending = text
        elif role == "assistant" and pending is not None:
            history.append((pending.strip(), text))  # tokenized in the worker (the tokenizer is its)
            pending = None
        else:
            raise ApiError(400, f"unexpected {role!r} message: after the system message, user and assistant alternate")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ApiError(400, "'max_tokens' must be a positive integer")
    return document, turns[-1][1].strip(), history, max_tokens, bool(body.get("stream", False))


class Handler(BaseHTTPRequestHandler):
    server_version = "ra"
    protocol_version = "HTTP/1.1"

    # ------------------------------------------------------------------ plumbing
    def log_message(self, fmt, *args):  # one line per request on the server's stderr
        if not self.server.app.quiet:  # (a malformed request line has no command or path yet)
            print(f"ra serve: {getattr(self, 'command', '-')} {getattr(self, 'path', '-')} {fmt % args}",
                  file=sys.stderr, flush=True)

    def _json(self, status: int, obj: dict, close: bool = False) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: ApiError) -> None:
        # the request's body may be unread: the connection is not reused
        self._json(e.status, {"error": {"message": str(e), "type": e.kind, "code": e.status}}, close=True)

    def _authorised(self) -> bool:
        """The bearer token, on TCP; the Unix socket (0600, in the user's private data directory) is
        the CLI's and needs none."""
        token = self.server.app.token
        return token is None or self.client_address[0] == "unix" or \
            self.headers.get("Authorization", "") == f"Bearer {token}"

    def _body(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(411, "send the body with a Content-Length, not chunked")
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ApiError(400, "Content-Length is not a number") from None
        if n < 0:
            raise ApiError(400, "Content-Length is negative")
        if n > MAX_BODY:
            raise ApiError(413, f"request body over {MAX_BODY >> 20} MiB")
        try:
            body = json.loads(self.rfile.read(n) or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    # ------------------------------------------------------------------ endpoints
    def do_GET(self):
        try:
            self._get()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _get(self):
        app = self.server.app
        if not self._authorised():
            return self._error(ApiError(401, "missing or wrong bearer token", "authentication_error"))
        if self.path == "/health":
            return self._json(200, {"status": "ok", "model": app.model_name, "pid": os.getpid(),
                                    "open_documents": len(app.worker.open)})
        if self.path == "/v1/models":
            return self._json(200, {"object": "list", "data": [{"id": app.model_name, "object": "model",
                                                                 "created": int(app.started), "owned_by": "ra"}]})
        self._error(ApiError(404, f"no such endpoint: GET {self.path}", "not_found"))

    def do_POST(self):
        try:
            if not self._authorised():
                raise ApiError(401, "missing or wrong bearer token", "authentication_error")
            if self.path == "/v1/chat/completions":
                self._chat(self._body())
            elif self.path == "/ra/v1/ask":
                self._ra_ask(self._body())
            elif self.path == "/ra/v1/index":
                self._ra_index(self._body())
            else:
                raise ApiError(404, f"no such endpoint: POST {self.path}", "not_found")
        except ApiError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _chat(self, body: dict) -> None:
        app = self.server.app
        engine = app.worker.engine
        named = named_path(body)
        if named is not None:
            allowed_path(named, app.allow_dirs)  # refused here, before the request waits in the queue
        document, question, turns, max_tokens, stream = parse_chat(body, named=named is not None)

        def run(job: Job) -> None:
            from core.documents import Document
            from core.engine import AnswerStats

            from .session import WalkOptions, read_document

            s = engine.settings if max_tokens is None else engine.settings.but(max_tokens=max_tokens)
            if named is None:
                doc = Document(text=document, name="chat", kind="text")
            else:  # checked again now: the path may have changed while the request waited
                try:
                    doc = read_document(str(allowed_path(named, app.allow_dirs)), WalkOptions())
                except OSError as e:
                    raise ApiError(422, f"cannot read {named}: {e.strerror or e}") from None
            prepared, hit = app.worker.prepare(doc, s)
            app.say(f"entry {prepared.entry.path.name[:12]}: " + ("open, no prefill" if hit else "prefilled and stored"))
            stats = AnswerStats()
            history = [(q, engine.tokenizer.encode(a, add_special_tokens=False)) for q, a in turns]
            job.events.put(("start", {"entry": prepared.entry.path.name, "cache_hit": hit,
                                      "document_tokens": prepared.entry.n_tokens}))
            for piece in engine.ask(prepared, question, stats, history=history):
                if job.cancelled.is_set():
                    app.say(f"a client left: its answer was cancelled after {stats.answer_tokens} tokens")
                    return
                job.events.put(("piece", piece))
            finish = "length" if stats.answer_tokens >= prepared.settings.max_tokens else "stop"
            job.events.put(("done", {"finish_reason": finish, "usage": {
                "prompt_tokens": prepared.entry.n_tokens + stats.question_tokens,
                "completion_tokens": stats.answer_tokens,
                "total_tokens": prepared.entry.n_tokens + stats.question_tokens + stats.answer_tokens}}))

        job = app.worker.submit(Job(run))
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": cid, "created": created, "model": app.model_name}
        try:
            self._relay(job, stream, base)
        except (BrokenPipeError, ConnectionResetError):
            job.cancelled.set()  # the client left: stop generating at the next token
            raise

    def _ra_ask(self, body: dict) -> None:
        """The CLI's endpoint (ra_cli/client.py): a whole Document, one question, the CLI's
        settings. Streams JSON lines: {"start": {...}}, {"piece": text}..., {"done": the --json
        record, with "answer_ids" beside it}, or {"error": {"message", "exit_code"}}. 409 when the
        settings name another model. "history": earlier turns [[question, answer ids], ...] (`ra repl`)."""
        from core.engine import AnswerStats

        app = self.server.app
        engine = app.worker.engine
        doc, s = self._cli_request(body)
        try:
            question = body["question"]
            n_sources = min(50, max(0, int(body.get("sources") or 0)))
            history = [(str(q), [int(t) for t in ids]) for q, ids in body.get("history") or []]
        except (KeyError, TypeError, ValueError) as e:
            raise ApiError(400, f"bad request: {e}") from None
        vocab = len(engine.tokenizer)
        if any(not 0 <= t < vocab for _, ids in history for t in ids):
            raise ApiError(400, f"bad request: a token id in 'history' is outside the vocabulary (0..{vocab - 1})")

        def run(job: Job) -> None:
            from .session import answer_record

            prepared, hit = app.worker.prepare(doc, s)
            stats = AnswerStats()
            a, b = prepared.split
            job.events.put(("line", {"start": {"cache_hit": hit, "document_tokens": prepared.entry.n_tokens,
                                               "offloaded": b - a, "index": prepared.index_kind,
                                               "device": engine.device}}))
            pieces = []
            for piece in engine.ask(prepared, question, stats, sources=n_sources, history=history):
                if job.cancelled.is_set():
                    app.say(f"a client left: its answer was cancelled after {stats.answer_tokens} tokens")
                    return
                pieces.append(piece)
                job.events.put(("line", {"piece": piece}))
            job.events.put(("line", {"done": answer_record(question, "".join(pieces).strip(), doc, prepared, stats,
                                                           engine), "answer_ids": stats.answer_ids}))

        self._stream_lines(app.worker.submit(Job(run)))

    def _ra_index(self, body: dict) -> None:
        """The CLI's `ra index` (ra_cli/client.py): a whole Document and the CLI's settings; the
        document is prefilled and stored if it is new, and kept open (`ra repl` asks next: "to_ask"
        says so, and then the settings must suit answering too). Streams JSON lines: {"progress": [stage,
        done, total]} and {"notice": text} while it works, then {"done": {entry, cache_hit,
        document_tokens, bytes}} or {"error": ...}."""
        app = self.server.app
        doc, s = self._cli_request(body, ignore=() if body.get("to_ask") else ("step_dtype",))

        def run(job: Job) -> None:
            prepared, hit = app.worker.prepare(doc, s)
            e = prepared.entry
            app.say(f"entry {e.path.name[:12]}: " + ("open, no prefill" if hit else "prefilled and stored"))
            job.events.put(("line", {"done": {"entry": e.path.name, "cache_hit": hit, "document_tokens": e.n_tokens,
                                              "bytes": e.size_bytes()}}))

        self._stream_lines(app.worker.submit(Job(run, follow=True)))

    def _cli_request(self, body: dict, ignore: tuple = ()):
        """The Document and Settings a CLI request sends; 409 when they name another model (fields
        in `ignore` may differ: the step dtype does not matter to a prefill)."""
        from dataclasses import fields

        from core.documents import Document
        from core.engine import MODEL_FIELDS
        from core.settings import Settings

        engine = self.server.app.worker.engine
        try:
            doc = Document(**body["document"])
            names = {f.name for f in fields(Settings)} - {"remap"}
            s = Settings(**{k: v for k, v in body.get("settings", {}).items() if k in names}).check()
        except (KeyError, TypeError, ValueError, RaError) as e:
            raise ApiError(400, f"bad request: {e}") from None
        if any(getattr(s, f) != getattr(engine.settings, f) for f in MODEL_FIELDS if f not in ignore):
            raise ApiError(409, "this server runs another model or device", "model_mismatch")
        return doc, s.but(remap=engine.settings.remap, **{f: getattr(engine.settings, f) for f in ignore})

    def _stream_lines(self, job: Job) -> None:
        """A CLI job's events as JSON lines, until it ends; a client that leaves cancels it."""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            while True:
                kind, value = job.events.get()
                if kind == "end":
                    return
                if kind == "error":
                    value = {"error": {"message": str(value), "exit_code": 2 if value.status == 400 else 1,
                                       "type": value.kind}}
                self.wfile.write(json.dumps(value, ensure_ascii=False).encode() + b"\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            job.cancelled.set()
            raise

    def _relay(self, job: Job, stream: bool, base: dict) -> None:
        text, info, started = "", {}, False
        while True:
            kind, value = job.events.get()
            if kind == "end":
                return
            if kind == "error":
                if started:  # headers are out: end the stream with the error as its last event
                    self._event({"error": {"message": str(value), "type": value.kind, "code": value.status}})
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                    self.close_connection = True
                else:
                    self._error(value)
                continue
            if kind == "start":
                info = {"ra": value}
                if stream:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Cache-Control", "no-cache")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.close_connection = True
                    started = True
                    self._event({**base, "object": "chat.completion.chunk", **info, "choices": [
                        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
            elif kind == "piece":
                text += value
                if stream:
                    self._event({**base, "object": "chat.completion.chunk", "choices": [
                        {"index": 0, "delta": {"content": value}, "finish_reason": None}]})
            elif kind == "done":
                if stream:
                    self._event({**base, "object": "chat.completion.chunk", "usage": value["usage"], "choices": [
                        {"index": 0, "delta": {}, "finish_reason": value["finish_reason"]}]})
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                else:
                    self._json(200, {**base, "object": "chat.completion", **info, "usage": value["usage"],
                                     "choices": [{"index": 0, "finish_reason": value["finish_reason"],
                                                  "message": {"role": "assistant", "content": text.strip()}}]})

    def _event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")
        self.wfile.flush()


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):  # BaseHTTPRequestHandler expects a (host, port) client address
        sock, _ = super().get_request()
        return sock, ("unix", 0)


@dataclass
class App:
    worker: Worker
    model_name: str
    token: str | None
    quiet: bool
    allow_dirs: tuple = ()  # resolved directories a request may name documents in ("ra": {"path"})
    started: float = field(default_factory=time.time)

    def say(self, msg: str) -> None:
        self.worker.session.say(msg)


def check_host(host: str, token: str | None) -> None:
    """Loopback only, unless a bearer token guards the server."""
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        raise UsageError(f"--host {host} listens beyond this machine: give --token (clients send it as a bearer token)")


def allow_dirs(paths) -> tuple:
    """--allow-dir values -> resolved directories; one that is not a directory is a usage error."""
    out = []
    for p in paths:
        d = Path(p).expanduser().resolve()
        if not d.is_dir():
            raise UsageError(f"--allow-dir {p}: not a directory")
        out.append(d)
    return tuple(out)


def serve(session, home: Path, host: str, port: int, token: str | None, quiet: bool, max_docs: int,
          ready=None, allowed: tuple = ()) -> None:
    """Run until SIGTERM / Ctrl-C. ready(address) is called once listening (tests, the CLI);
    allowed: directories (from allow_dirs) whose files a request may name."""
    from .client import find_server

    check_host(host, token)
    sock_path = Path(home) / SOCKET
    if find_server(home):
        raise UsageError(f"a server already runs for this data directory ({sock_path}); stop it first")
    app = App(Worker(session, max_docs), session.engine.ref.spec, token, quiet, allowed)
    try:
        tcp = ThreadingHTTPServer((host, port), Handler)
        sock_path.unlink(missing_ok=True)  # a stale socket (its server is gone: find_server said so)
        unix = _UnixServer(str(sock_path), Handler)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port} or {sock_path}: {e.strerror or e}") from None
    tcp.daemon_threads = True
    os.chmod(sock_path, 0o600)
    ours = sock_path.stat().st_ino
    for s in (tcp, unix):
        s.app = app
        threading.Thread(target=s.serve_forever, daemon=True, name="ra-http").start()
    address = f"http://{tcp.server_address[0]}:{tcp.server_address[1]}"
    session.say(f"serving {app.model_name} on {address} and {sock_path} (Ctrl-C to stop)")
    if allowed:
        session.say("documents by path from: " + ", ".join(map(str, allowed)))
    if ready:
        ready(address)
    try:
        app.worker.run()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: a normal stop (in-flight answers end with the process)
        pass
    finally:
        unix.shutdown()
        tcp.shutdown()
        tcp.server_close()
        unix.server_close()
        try:
            if sock_path.stat().st_ino == ours:  # not one another server made since
                sock_path.unlink()
        except OSError:
            pass
        session.say("stopped")
