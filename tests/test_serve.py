"""`ra serve` with real clients: the `openai` package streaming and not, a restart that finds the
stored document, 8 concurrent clients over 2 new documents, a client that leaves mid-answer."""
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from openai import OpenAI

from conftest import ROOT, book_text

QUESTION = "Who did Alice follow?"


class Server:
    """`ra serve --port 0` in its own process; stderr collected by a thread."""

    def __init__(self, home: Path, *args):
        env = dict(os.environ, RA_HOME=str(home))
        self.p = subprocess.Popen([sys.executable, "-m", "ra_cli.main", "serve", "--port", "0", *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        self.log, ready = [], threading.Event()
        self.address = None

        def drain():
            for line in self.p.stderr:
                self.log.append(line)
                m = re.search(r"serving \S+ on (http://[\d.]+:\d+)", line)
                if m:
                    self.address = m.group(1)
                    ready.set()
            ready.set()
        threading.Thread(target=drain, daemon=True).start()
        assert ready.wait(300) and self.address, "".join(self.log)
        self.client = OpenAI(base_url=f"{self.address}/v1", api_key="unused", max_retries=0, timeout=300)

    def stop(self) -> int:
        self.p.send_signal(signal.SIGTERM)
        return self.p.wait(60)

    def text(self) -> str:
        return "".join(self.log)


def chat(client, document, question, stream, max_tokens=12):
    msgs = [{"role": "system", "content": document}, {"role": "user", "content": question}]
    if not stream:
        r = client.chat.completions.create(model="ra", messages=msgs, max_tokens=max_tokens)
        return r.choices[0].message.content, r.model_extra["ra"]
    pieces, info = [], None
    for chunk in client.chat.completions.create(model="ra", messages=msgs, max_tokens=max_tokens, stream=True):
        info = info or (chunk.model_extra or {}).get("ra")
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    return "".join(pieces).strip(), info


def test_openai_client_gets_ra_asks_answer_and_a_restart_needs_no_prefill(ra_home, smol):
    text = book_text(3000)
    book = ra_home / "part.txt"
    book.write_text(text, encoding="utf-8")
    server = Server(ra_home, "-n", "12")
    try:
        assert [m.id for m in server.client.models.list()] == ["smollm2"]
        answer, info = chat(server.client, text, QUESTION, stream=True)
        assert info["cache_hit"] is False and "Rabbit" in answer
        assert "prefilled and stored" in server.text()
    finally:
        assert server.stop() == 0
    r = subprocess.run([sys.executable, "-m", "ra_cli.main", "ask", "--json", "-n", "12", str(book), QUESTION],
                       capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, RA_HOME=str(ra_home)), timeout=300)
    rec = json.loads(r.stdout)
    assert rec["cache_hit"] and rec["answer"] == answer  # the server's entry, and the same answer
    server = Server(ra_home, "-n", "12")
    try:
        again, info = chat(server.client, text, QUESTION, stream=False)
        assert info["cache_hit"] is True and again == answer and "open, no prefill" in server.text()
        # `ra ask` finds the server through the data directory's socket: same record, no torch (nor numpy) imported
        code = ("import sys\nfrom ra_cli.main import main\n"
                f"sys.argv = ['ra', 'ask', '--json', '-n', '12', {str(book)!r}, {QUESTION!r}]\n"
                "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
                "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
                "assert 'numpy' not in sys.modules, 'numpy imported'\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           env=dict(os.environ, RA_HOME=str(ra_home)), timeout=120)
        assert r.returncode == 0, r.stderr
        via = json.loads(r.stdout)
        assert "answered by `ra serve`" in r.stderr and via["answer"] == answer and via["cache_hit"]
        assert {k: via[k] for k in ("document", "tokens", "index")} == {k: rec[k] for k in ("document", "tokens", "index")}
        r = subprocess.run([sys.executable, "-m", "ra_cli.main", "ask", "--no-server", "-n", "12", str(book), QUESTION],
                           capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, RA_HOME=str(ra_home)), timeout=300)
        assert r.returncode == 0 and "answered by" not in r.stderr and r.stdout.strip() == answer
    finally:
        server.stop()
    assert not (ra_home / "serve.sock").exists()


def test_eight_clients_two_new_documents_and_one_that_leaves(ra_home, smol):
    from core.documents import Document
    from core.engine import Engine, Settings

    docs = [book_text(2500), book_text(2500, start_marker="CHAPTER II.")]
    questions = [QUESTION, "What did Alice drink?", "Where did Alice fall?", "What was in the pool?"]
    server = Server(ra_home, "-n", "10")
    try:
        def client_run(i):
            return [(i % 2, q, *chat(server.client, docs[i % 2], q, stream=bool(i % 3))) for q in questions]
        with ThreadPoolExecutor(8) as pool:
            results = [r for rs in pool.map(client_run, range(8)) for r in rs]
        assert len(results) == 32
        assert sorted(info["cache_hit"] for _, _, _, info in results).count(False) == 2  # one prefill per document
        assert len({info["entry"] for _, _, _, info in results}) == 2
        # a client that disconnects mid-answer: the server cancels it and keeps serving
        conn = http.client.HTTPConnection(server.address.split("//")[1], timeout=120)
        conn.request("POST", "/v1/chat/completions", json.dumps({
            "model": "ra", "stream": True, "max_tokens": 200,
            "messages": [{"role": "system", "content": docs[0]}, {"role": "user", "content": "Tell the story."}]}),
            {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        resp.close()  # the client leaves (the response holds the socket: Connection: close)
        conn.close()
        after, _ = chat(server.client, docs[1], QUESTION, stream=False)
        assert "a client left: its answer was cancelled" in server.text()
        rss = int(re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{server.p.pid}/status").read_text()).group(1)) << 10
        assert rss < 3 << 30, rss  # bounded: the model, two open documents, no growth per request
        # errors are JSON with the right codes
        conn = http.client.HTTPConnection(server.address.split("//")[1], timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
        r = conn.getresponse()
        assert r.status == 400 and "first message, with role 'system'" in json.loads(r.read())["error"]["message"]
        assert r.getheader("Connection") == "close"  # an error never leaves an unread body on a kept connection
        conn = http.client.HTTPConnection(server.address.split("//")[1], timeout=60)
        conn.request("GET", "/nowhere")
        assert conn.getresponse().status == 404
    finally:
        server.stop()
    engine = Engine(ra_home, Settings(max_tokens=12), loaded=smol)  # the requests ask for 12 (server default 10)
    expected = {}
    for d, text in enumerate(docs):
        prepared = engine.prepare(Document(text=text, name="chat", kind="text"))
        assert prepared.cache_hit
        expected.update({(d, q): "".join(engine.ask(prepared, q)).strip() for q in questions})
    wrong = [(d, q, answer, expected[(d, q)]) for d, q, answer, _ in results if answer != expected[(d, q)]]
    assert not wrong, wrong
    assert after == expected[(1, QUESTION)]


def test_beyond_loopback_needs_a_token(ra_home):
    r = subprocess.run([sys.executable, "-m", "ra_cli.main", "serve", "--host", "0.0.0.0"], capture_output=True,
                       text=True, cwd=ROOT, env=dict(os.environ, RA_HOME=str(ra_home)), timeout=120)
    assert r.returncode == 2 and "give --token" in r.stderr and "loading model" not in r.stderr


def test_a_token_guards_every_endpoint(ra_home, smol):
    server = Server(ra_home, "--token", "s3cret")
    try:
        for header, status in ((None, 401), ("Bearer nope", 401), ("Bearer s3cret", 200)):
            conn = http.client.HTTPConnection(server.address.split("//")[1], timeout=60)
            conn.request("GET", "/v1/models", headers={"Authorization": header} if header else {})
            assert conn.getresponse().status == status, header
    finally:
        server.stop()


def test_allowed_path_only_inside_allow_dirs(tmp_path):
    """What a request may name as its document ("ra": {"path"}): inside an --allow-dir directory,
    symlinks resolved first; nothing at all without one; no existence test outside them."""
    import pytest

    from ra_cli.serve import ApiError, allow_dirs, allowed_path

    inside, outside = tmp_path / "docs", tmp_path / "private"
    (inside / "sub").mkdir(parents=True)
    outside.mkdir()
    (inside / "sub" / "a.txt").write_text("x")
    (outside / "secret.txt").write_text("y")
    (inside / "link.txt").symlink_to(outside / "secret.txt")
    dirs = allow_dirs([str(inside)])
    assert allowed_path(str(inside / "sub" / "a.txt"), dirs) == (inside / "sub" / "a.txt").resolve()
    assert allowed_path(str(inside), dirs) == inside.resolve()  # a codebase: the whole directory
    for path, status in ((outside / "secret.txt", 403), (inside / "link.txt", 403), (inside / ".." / "private", 403),
                         (outside / "missing.txt", 403), (inside / "missing.txt", 404)):
        with pytest.raises(ApiError) as e:
            allowed_path(str(path), dirs)
        assert e.value.status == status, path
    with pytest.raises(ApiError) as e:
        allowed_path(str(inside / "sub" / "a.txt"), ())
    assert e.value.status == 403 and "--allow-dir" in str(e.value)
    for bad in ("sub/a.txt", str(inside / "a\0.txt")):  # relative; a NUL byte (an error, not a traceback)
        with pytest.raises(ApiError) as e:
            allowed_path(bad, dirs)
        assert e.value.status == 400, bad


def test_a_request_names_its_document_by_path_inside_allow_dir(ra_home, smol, tmp_path):
    """With --allow-dir, an OpenAI client sends only the question and names the document; the
    server reads it (as `ra ask` would), answers from the same store entry as the CLI's, and
    refuses a path outside the directory with 403, before reading anything."""
    import openai
    import pytest

    docs = tmp_path / "docs"
    docs.mkdir()
    book = docs / "alice.txt"
    book.write_text(book_text(3000), encoding="utf-8")
    (tmp_path / "secret.txt").write_text("the passcode is 1234", encoding="utf-8")
    env = dict(os.environ, RA_HOME=str(ra_home))
    ask = subprocess.run([sys.executable, "-m", "ra_cli.main", "ask", "-q", "--no-server", "-n", "12", "--json",
                          str(book), QUESTION], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert ask.returncode == 0, ask.stderr
    cli = json.loads(ask.stdout)
    server = Server(ra_home, "--allow-dir", str(docs))
    try:
        msgs = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": QUESTION}]
        r = server.client.chat.completions.create(model="ra", messages=msgs, max_tokens=12,
                                                  extra_body={"ra": {"path": str(book)}})
        info = r.model_extra["ra"]
        assert info["cache_hit"] and info["entry"] == cli["document"]["entry"]  # the CLI's entry, no prefill
        assert r.choices[0].message.content == cli["answer"]
        with pytest.raises(openai.PermissionDeniedError):
            server.client.chat.completions.create(model="ra", messages=msgs, max_tokens=4,
                                                  extra_body={"ra": {"path": str(tmp_path / "secret.txt")}})
    finally:
        assert server.stop() == 0
    assert "documents by path from: " + str(docs.resolve()) in server.text()


def test_index_and_repl_go_through_the_server_with_the_same_output(ra_home, smol, tmp_path):
    """`ra index` and `ra repl` find a running server as `ra ask` does: the index line and the
    conversation's answers are what they are in process (--no-server), the server did the work."""
    book = tmp_path / "alice.txt"
    book.write_text(book_text(3000), encoding="utf-8")
    env = dict(os.environ, RA_HOME=str(ra_home))

    def ra(*args, stdin=None):
        r = subprocess.run([sys.executable, "-m", "ra_cli.main", *args], input=stdin, capture_output=True, text=True,
                           cwd=ROOT, env=env, timeout=600)
        assert r.returncode == 0, r.stderr
        return r

    turns = "Who did Alice follow?\nWhat did it take out of its pocket?\n/stats\n"
    server = Server(ra_home)
    try:
        indexed = ra("index", str(book))
        assert "indexed by `ra serve`" in indexed.stderr and ", indexed in " in indexed.stdout
        again = ra("index", str(book))
        assert "already cached" in again.stdout and "indexed by `ra serve`" in again.stderr
        served = ra("repl", "-n", "12", str(book), stdin=turns)
        # the client side of `ra index`, in this process: the server's prefill progress comes back
        from core.documents import Document
        from core.settings import Settings
        from ra_cli.client import find_server, index

        seen = []
        done = index(find_server(ra_home), Document(text=book_text(2000), name="other", kind="text"), Settings(),
                     progress=lambda *a: seen.append(a))
        assert not done["cache_hit"] and done["document_tokens"] > 0
        prefill = [a for a in seen if a[0] == "prefill"]
        assert prefill and prefill[-1][1] == prefill[-1][2] == done["document_tokens"]
    finally:
        assert server.stop() == 0
    assert "answering through `ra serve`" in served.stderr and "cache hit, no prefill" in served.stderr
    assert "in `ra serve`" in served.stderr  # /stats says who answered
    assert "prefilled and stored" in server.text()  # the server's prefill, for `ra index`
    local = ra("repl", "-n", "12", "--no-server", str(book), stdin=turns)
    assert "loading model" in local.stderr
    assert served.stdout == local.stdout and served.stdout.count("\n") >= 2
