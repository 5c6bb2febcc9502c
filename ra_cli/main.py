"""The `ra` command line (Typer). Heavy imports (torch, transformers) happen inside commands that
need a model, so `ra --help`, `ra --version`, `ra models` and `ra cache ...` start instantly.

stdout carries only answers (and `index`/`cache`/`models` listings); progress, notices and errors
go to stderr. Exit codes: 0 ok, 1 runtime error, 2 usage error, 130 interrupted.
Settings: option > environment variable > $RA_HOME/config.toml > default (ra_cli/config.py).
"""
from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer

from core.errors import RaError, UsageError
from core.settings import DEFAULTS as D
from core.settings import Settings

from .cache import cache_app, models
from .session import WalkOptions

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Ask questions about whole books, PDFs and codebases with a local LLM.")

_debug = False


def _version(value: bool):
    if value:
        from importlib.metadata import version

        typer.echo(f"ra {version('ra')}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit."),
          debug: bool = typer.Option(False, "--debug", help="Show a traceback on errors (anywhere on the line).")):
    """Ask questions about whole books, PDFs and codebases with a local LLM."""


def _home():
    from core import data_home

    return data_home()


def _err_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)  # notices are never wrapped mid-line


# Options shared by ask, repl and index: their defaults are core.settings.Settings' (D).
MODEL = typer.Option(D.model, "--model", "-m", envvar="RA_MODEL",
                     help="Model: .gguf file, model directory or Hugging Face id. Default: embedded SmolLM2-135M-Instruct.")
DEVICE = typer.Option(D.device, envvar="RA_DEVICE", help="auto, cpu or cuda.")
DTYPE = typer.Option(D.dtype, envvar="RA_DTYPE", help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16.")
STEP_DTYPE = typer.Option(D.step_dtype, envvar="RA_STEP_DTYPE",
                          help="Weights of the one-token decode steps: auto (blocks for a .gguf model on the CPU, else as "
                               "--dtype), blocks (a GGUF's 4/8-bit blocks read as such: the same weights), float32, "
                               "bfloat16, float16 (a copy; the prefill and the question stay in --dtype).")
ATTENTION = typer.Option(D.attention, envvar="RA_ATTENTION",
                         help="retrieval, or full (exact attention over the same cached KV).")
INDEX = typer.Option(D.index, envvar="RA_INDEX",
                     help="Offloaded-key index: auto (exact under 16K keys, flat past the window, else graph), exact (every "
                          "key attended), flat (exact top-k), hnsw, graph, cluster (tripartite: top keys attended, the next "
                          "clusters estimated).")
TOP_K = typer.Option(D.top_k, "--top-k", "-k", envvar="RA_TOP_K", min=1, help="Keys retrieved per head and step.")
RETRIEVE = typer.Option(D.retrieve, envvar="RA_RETRIEVE", min=0.0, max=1.0,
                        help="Cluster index: least fraction of the keys (of the clusters, past 16K keys) attended exactly, and at least --top-k; past the model's window: the top-k only, every key scanned.")
ESTIMATE = typer.Option(D.estimate, envvar="RA_ESTIMATE", min=0.0, max=1.0,
                        help="Cluster index: fraction of the clusters next estimated from their centroids (0: none).")
SINK = typer.Option(D.sink, envvar="RA_SINK", min=0, help="First tokens of the document kept static.")
RECENT = typer.Option(D.recent, envvar="RA_RECENT", min=0, help="Last tokens of the document kept static.")
MAX_TOKENS = typer.Option(D.max_tokens, "--max-tokens", "-n", envvar="RA_MAX_TOKENS", min=1, help="Longest answer, in tokens.")
CHUNK = typer.Option(D.chunk_size, envvar="RA_CHUNK_SIZE", min=16, help="Prefill chunk size, in tokens.")
TRUST = typer.Option(D.trust_remote_code, help="Allow a model's own Python code to run (off: never).")
QUIET = typer.Option(False, "--quiet", "-q", help="Nothing on stderr but errors (no progress, notices or library bars).")
INCLUDE = typer.Option([], "--include", help="Directories: index only files matching this glob (repeatable).")
EXCLUDE = typer.Option([], "--exclude", help="Directories: skip files matching this glob (repeatable).")
MAX_FILE = typer.Option("256K", envvar="RA_MAX_FILE_SIZE", help="Directories: skip files larger than this.")
REBUILD = typer.Option(D.rebuild, "--rebuild/--no-rebuild",
                       help="Rebuild a damaged cache entry (--no-rebuild: exit 1 instead).")
YES = typer.Option(False, "--yes", "-y", help="Prefill a very long document without asking (needed when stdin is not a terminal).")
SOURCES = typer.Option(None, "--sources", metavar="[stderr|stdout]",
                       help="After the answer, the passages it attended to most (location, score, snippet): "
                            "on stderr, or stdout with --sources=stdout.")
NO_SERVER = typer.Option(False, "--no-server", envvar="RA_NO_SERVER",
                         help="Work in this process even when `ra serve` runs for this data directory.")
CHECKPOINT = typer.Option(D.checkpoint_s, envvar="RA_CHECKPOINT_S", min=0.0,
                          help="Seconds between prefill checkpoints (an interrupted prefill resumes from the last one).")


def _settings(model, device, dtype, attention, index, top_k, sink, recent, max_tokens, chunk_size,
              trust_remote_code, retrieve=D.retrieve, estimate=D.estimate, rebuild=D.rebuild,
              checkpoint_s=D.checkpoint_s, step_dtype=D.step_dtype) -> Settings:
    """The options as Settings, checked (a bad value is a usage error before anything loads)."""
    return Settings(model=model, device=device, dtype=dtype, attention=attention, index=index, top_k=top_k,
                    retrieve=retrieve, estimate=estimate, sink=sink, recent=recent, max_tokens=max_tokens,
                    chunk_size=chunk_size, trust_remote_code=trust_remote_code, rebuild=rebuild,
                    checkpoint_s=checkpoint_s, step_dtype=step_dtype).check()


def _questions(target: str, question: Optional[str], extra: List[str], questions_file: Optional[str]) -> list[str]:
    qs = ([question] if question is not None else []) + list(extra)
    if questions_file:
        if questions_file == "-":
            if target == "-":
                raise UsageError("stdin holds the document; give --questions a file")
            lines = sys.stdin.read().splitlines()
        else:
            try:
                lines = open(questions_file, encoding="utf-8").read().splitlines()
            except OSError as e:
                raise UsageError(f"cannot read --questions {questions_file}: {e.strerror}") from None
        qs += [line for line in lines if line.strip()]
        if not qs:
            raise UsageError(f"--questions {questions_file} holds no question")
    elif not qs:
        if target == "-" or sys.stdin.isatty():
            raise UsageError("no question: give one as an argument, with --question/-Q, --questions FILE, or on stdin")
        qs = [sys.stdin.read()]
    for q in qs:
        if not q.strip():
            raise UsageError("the question is empty")
    return [q.strip() for q in qs]


@app.command()
def ask(
    target: str = typer.Argument(..., help="A text or PDF file, a directory (a codebase), or - for stdin."),
    question: Optional[str] = typer.Argument(None, help="The question (else --question, --questions or stdin)."),
    more: List[str] = typer.Option([], "--question", "-Q", help="A question; repeat for several."),
    questions_file: Optional[str] = typer.Option(None, "--questions", help="A file with one question per line (- for stdin)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per question on stdout (JSON Lines), "
                                                       "with the sources the answer attended to."),
    sources: Optional[str] = SOURCES,
    model: Optional[str] = MODEL, device: str = DEVICE, dtype: str = DTYPE, step_dtype: str = STEP_DTYPE,
    attention: str = ATTENTION,
    index: str = INDEX, top_k: int = TOP_K, retrieve: float = RETRIEVE, estimate: float = ESTIMATE, sink: int = SINK,
    recent: int = RECENT, max_tokens: int = MAX_TOKENS, chunk_size: int = CHUNK, trust_remote_code: bool = TRUST,
    quiet: bool = QUIET, rebuild: bool = REBUILD, yes: bool = YES, checkpoint_s: float = CHECKPOINT,
    no_server: bool = NO_SERVER,
    include: List[str] = INCLUDE, exclude: List[str] = EXCLUDE, max_file_size: str = MAX_FILE,
):
    """Answer questions about a document (prefilled once, then answered from the cache)."""
    from .session import JSON_SOURCES, Session, answer_record, read_document, write_answer

    settings = _settings(model, device, dtype, attention, index, top_k, sink, recent, max_tokens, chunk_size,
                         trust_remote_code, retrieve, estimate, rebuild, checkpoint_s, step_dtype)
    if sources not in (None, "stderr", "stdout"):
        raise UsageError(f"--sources={sources}: say --sources (stderr) or --sources=stdout")
    if sources and settings.attention != "retrieval":
        raise UsageError("--sources reads retrieval attention's weights; --attention full has none to read")
    n_sources = JSON_SOURCES if (sources or as_json) and settings.attention == "retrieval" else 0
    questions = _questions(target, question, more, questions_file)
    doc = read_document(target, WalkOptions(include, exclude, max_file_size))  # before torch loads
    if not no_server and _ask_server(doc, questions, settings, as_json, quiet, n_sources, sources):
        return
    session = Session(_home(), settings, _err_console(), quiet, yes)

    from core.engine import AnswerStats

    prepared = session.open(doc)
    markdown = sys.stdout.isatty() and not as_json
    for i, q in enumerate(questions):
        if len(questions) > 1:
            session.say(f"question {i + 1}/{len(questions)}: {q}")
        stats = AnswerStats()
        pieces = session.engine.ask(prepared, q, stats, sources=n_sources)
        if as_json:
            answer = "".join(pieces)
            print(json.dumps(answer_record(q, answer.strip(), doc, prepared, stats, session.engine),
                             ensure_ascii=False), flush=True)
        else:
            if i:
                print(flush=True)
            write_answer(pieces, markdown)
        if sources and not as_json:
            _print_sources([s.record() for s in stats.sources or []], sources)
        if stats.answer_tokens:
            session.say(f"{stats.answer_tokens} tokens in {stats.answer_s:.1f} s "
                        f"({stats.answer_tokens / max(stats.answer_s, 1e-9):.1f} tokens/s)")


def _print_sources(records: list[dict], where: str) -> None:
    """--sources: on stderr (styled on a terminal), or stdout with --sources=stdout."""
    from rich.console import Console

    from .session import show_sources

    console = Console(stderr=where == "stderr", highlight=False, soft_wrap=True)
    show_sources(records, console, plain=not console.is_terminal)


def _sayer(quiet: bool):
    """say(message): `ra: message` on stderr, as Session.say; nothing with --quiet."""
    console = _err_console()
    return (lambda m: None) if quiet else (lambda m: console.print(f"[dim]ra:[/dim] {m}"))


def _open_on_server(path, doc, settings, quiet: bool, say, to_ask: bool = False):
    """The server prefills and opens `doc` (ra_cli/client.index), its progress shown in this
    terminal's bars -> its record, or None when it cannot take the document."""
    from .client import index as server_index
    from .session import Progress

    progress = Progress(_err_console(), enabled=not quiet)
    try:
        return server_index(path, doc, settings, progress, say, to_ask=to_ask)
    finally:
        progress.stop()


def _ask_server(doc, questions, settings, as_json: bool, quiet: bool, n_sources: int = 0,
                sources: str | None = None) -> bool:
    """Answer through a running `ra serve` of this data directory: the same stdout, stderr lines
    and exit codes as in process, without importing torch. False: no server (or another model)."""
    import time

    from .client import ask as server_ask
    from .client import find_server
    from .session import write_answer

    path = find_server(_home())
    if path is None:
        return False
    say = _sayer(quiet)
    markdown = sys.stdout.isatty() and not as_json
    for i, q in enumerate(questions):
        t = time.perf_counter()
        answer = server_ask(path, doc, q, settings, n_sources)
        if answer is None:
            if i:  # some questions were answered: the server stopped meanwhile
                raise RaError("the server stopped before every question was answered")
            say("the running server cannot take this question (another model or device, a document too big "
                "to send, or it stopped): answering in this process")
            return False
        st = answer.start
        if i == 0:
            say(f"answered by `ra serve` ({path}): " + ("cache hit, no prefill" if st.get("cache_hit") else
                f"prefilled {st.get('document_tokens', 0):,} tokens") +
                f"; {st.get('offloaded', 0):,} of {st.get('document_tokens', 0):,} tokens offloaded "
                f"({st.get('index')} index)")
        if len(questions) > 1:
            say(f"question {i + 1}/{len(questions)}: {q}")
        if as_json:
            "".join(answer.pieces())
            print(json.dumps(answer.record, ensure_ascii=False), flush=True)
        else:
            if i:
                print(flush=True)
            write_answer(answer.pieces(), markdown)
        if sources and not as_json:
            _print_sources((answer.record or {}).get("sources") or [], sources)
        n = (answer.record or {}).get("tokens", {}).get("answer", 0)
        if n:
            say(f"{n} tokens in {time.perf_counter() - t:.1f} s ({n / max(time.perf_counter() - t, 1e-9):.1f} tokens/s, "
                f"with the server)")
    return True


@app.command("index")
def index_cmd(
    paths: List[str] = typer.Argument(..., help="Files and directories; each becomes one cached document."),
    model: Optional[str] = MODEL, device: str = DEVICE, dtype: str = DTYPE, index: str = INDEX,
    sink: int = SINK, recent: int = RECENT, chunk_size: int = CHUNK, trust_remote_code: bool = TRUST,
    quiet: bool = QUIET, rebuild: bool = REBUILD, yes: bool = YES, checkpoint_s: float = CHECKPOINT,
    no_server: bool = NO_SERVER,
    include: List[str] = INCLUDE, exclude: List[str] = EXCLUDE, max_file_size: str = MAX_FILE,
):
    """Prefill and cache documents or codebases now, so later questions start at once."""
    import time

    from .session import Session, read_document

    settings = _settings(model, device, dtype, D.attention, index, D.top_k, sink, recent, D.max_tokens, chunk_size,
                         trust_remote_code, rebuild=rebuild, checkpoint_s=checkpoint_s)
    walk = WalkOptions(include, exclude, max_file_size)
    docs = [read_document(p, walk) for p in paths]  # every input is checked before the model loads
    if not no_server and _index_server(docs, settings, quiet):
        return
    session = Session(_home(), settings, _err_console(), quiet, yes)
    for doc in docs:
        t = time.perf_counter()
        prepared = session.open(doc)
        e = prepared.entry
        _indexed(doc, e.n_tokens, prepared.cache_hit, time.perf_counter() - t, e.size_bytes(), e.path.name)


def _indexed(doc, n_tokens: int, cache_hit: bool, seconds: float, size: int, entry: str) -> None:
    """`ra index`'s line for one document, on stdout."""
    from core.units import human_size

    what = f"{len(doc.files)} files" if doc.kind == "code" else doc.kind
    if doc.skipped:
        what += f" ({sum(doc.skipped.values())} skipped: " + \
                ", ".join(f"{n} {r}" for r, n in sorted(doc.skipped.items())) + ")"
    done = "already cached" if cache_hit else f"indexed in {seconds:.1f} s"
    typer.echo(f"{doc.name}: {what}, {n_tokens:,} tokens, {done}, {human_size(size)} in the store (entry {entry[:12]})")


def _index_server(docs, settings, quiet: bool) -> bool:
    """Index through a running `ra serve` of this data directory: the same stdout, progress on
    stderr and exit codes as in process, without importing torch. False: no server (or another
    model). Ctrl-C leaves the server's prefill running (it stores the entry)."""
    import time

    from .client import find_server

    path = find_server(_home())
    if path is None:
        return False
    say = _sayer(quiet)
    for i, doc in enumerate(docs):
        t = time.perf_counter()
        done = _open_on_server(path, doc, settings, quiet, say)
        if done is None:
            if i:  # some documents were indexed: the server stopped meanwhile
                raise RaError("the server stopped before every document was indexed")
            say("the running server cannot take this (another model or device, a document too big to send, "
                "or it stopped): indexing in this process")
            return False
        if i == 0:
            say(f"indexed by `ra serve` ({path})")
        _indexed(doc, done["document_tokens"], done["cache_hit"], time.perf_counter() - t, done["bytes"], done["entry"])
    return True


@app.command()
def repl(
    target: str = typer.Argument(..., help="A text or PDF file, or a directory (a codebase)."),
    model: Optional[str] = MODEL, device: str = DEVICE, dtype: str = DTYPE, step_dtype: str = STEP_DTYPE,
    attention: str = ATTENTION,
    index: str = INDEX, top_k: int = TOP_K, retrieve: float = RETRIEVE, estimate: float = ESTIMATE, sink: int = SINK,
    recent: int = RECENT, max_tokens: int = MAX_TOKENS, chunk_size: int = CHUNK, trust_remote_code: bool = TRUST,
    quiet: bool = QUIET, rebuild: bool = REBUILD, yes: bool = YES, checkpoint_s: float = CHECKPOINT,
    no_server: bool = NO_SERVER,
    include: List[str] = INCLUDE, exclude: List[str] = EXCLUDE, max_file_size: str = MAX_FILE,
):
    """Chat about a document: load once, then ask question after question (/help for commands)."""
    from .repl import InProcess, Repl
    from .session import Session, read_document

    if target == "-":
        raise UsageError("ra repl reads questions from stdin; give the document as a file")
    settings = _settings(model, device, dtype, attention, index, top_k, sink, recent, max_tokens, chunk_size,
                         trust_remote_code, retrieve, estimate, rebuild, checkpoint_s, step_dtype)
    doc = read_document(target, WalkOptions(include, exclude, max_file_size))
    served = None if no_server else _repl_server(doc, settings, quiet)
    if served is not None:
        Repl(served, doc, served.opened["document_tokens"], _sayer(quiet), _home()).run()
        return
    session = Session(_home(), settings, _err_console(), quiet, yes)
    prepared = session.open(doc)
    Repl(InProcess(session, prepared), doc, prepared.entry.n_tokens, session.say, _home()).run()


def _repl_server(doc, settings, quiet: bool):
    """A repl backend on a running `ra serve` of this data directory (the document opened there
    first, its progress shown here), or None: no server, or one that cannot answer with these
    settings."""
    from .client import find_server
    from .repl import Served

    path = find_server(_home())
    if path is None:
        return None
    say = _sayer(quiet)
    opened = _open_on_server(path, doc, settings, quiet, say, to_ask=True)
    if opened is None:
        say("the running server cannot take this (another model or device, a document too big to send, "
            "or it stopped): answering in this process")
        return None
    say(f"answering through `ra serve` ({path}): " + ("cache hit, no prefill" if opened["cache_hit"] else
        f"prefilled {opened['document_tokens']:,} tokens"))
    return Served(path, doc, settings, opened)


app.command("chat", hidden=True, help="Same as repl.")(repl)


@app.command("serve")
def serve_cmd(
    port: int = typer.Option(8411, envvar="RA_PORT", min=0, max=65535, help="TCP port (0: any free port, printed)."),
    host: str = typer.Option("127.0.0.1", envvar="RA_HOST", help="Address to listen on; other than loopback needs --token."),
    token: Optional[str] = typer.Option(None, envvar="RA_TOKEN", help="Bearer token every request must carry."),
    max_docs: int = typer.Option(4, "--max-docs", min=1, help="Documents kept open (least recently used closed first)."),
    allow_dir: List[str] = typer.Option([], "--allow-dir", help="A directory whose files and subdirectories requests "
                                        "may name as their document, {\"ra\": {\"path\": ...}} (repeatable; default none)."),
    model: Optional[str] = MODEL, device: str = DEVICE, dtype: str = DTYPE, step_dtype: str = STEP_DTYPE,
    attention: str = ATTENTION,
    index: str = INDEX, top_k: int = TOP_K, retrieve: float = RETRIEVE, estimate: float = ESTIMATE, sink: int = SINK,
    recent: int = RECENT, max_tokens: int = MAX_TOKENS, chunk_size: int = CHUNK, trust_remote_code: bool = TRUST,
    quiet: bool = QUIET, rebuild: bool = REBUILD, checkpoint_s: float = CHECKPOINT,
):
    """Keep the model and recent documents warm behind an OpenAI-compatible API (Ctrl-C stops)."""
    from .serve import allow_dirs, check_host, serve
    from .session import Session

    settings = _settings(model, device, dtype, attention, index, top_k, sink, recent, max_tokens, chunk_size,
                         trust_remote_code, retrieve, estimate, rebuild, checkpoint_s, step_dtype)
    check_host(host, token)
    allowed = allow_dirs(allow_dir)
    from .client import find_server

    if find_server(_home()):  # before the model loads
        raise UsageError(f"a server already runs for this data directory ({_home() / 'serve.sock'}); stop it first")
    session = Session(_home(), settings, _err_console(), quiet, yes=True)  # no prompts: nobody is at the terminal
    serve(session, _home(), host, port, token, quiet, max_docs, allowed=allowed)
@app.command()
def plan(
    model: Optional[str] = typer.Argument(None, help="config.json, model directory, .gguf, or a Hugging Face id in the "
                                          "local cache (default: the embedded model). No weights are read."),
    tokens: int = typer.Option(..., "--tokens", "-t", min=1, help="Document length in tokens."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="GPU memory to fit in, e.g. 24GiB."),
    dtype: str = typer.Option("bfloat16", help="Weights and device K/V: bfloat16, float16 or float32."),
    index: str = typer.Option("flat", help="Index while answering: flat (on a GPU, what auto picks: searched on "
                              "the device, fp8 keys there), cluster or exact (on the host)."),
    as_json: bool = typer.Option(False, "--json", help="The plan as one JSON object."),
):
    """Say what a document of N tokens needs with a model (GPU, host, disk), for retrieval and full attention."""
    from core.plan import DTYPE_BYTES, PlanInput, explain, parse_size, read_shape
    from core.plan import plan as make_plan

    if dtype not in DTYPE_BYTES:
        raise UsageError(f"--dtype must be bfloat16, float16 or float32, not {dtype!r}")
    if index not in ("cluster", "flat", "exact"):
        raise UsageError(f"--index must be cluster, flat or exact, not {index!r}")
    source, shape = read_shape(model)
    cap = parse_size(gpu_memory) if gpu_memory else None
    p = make_plan(shape, PlanInput(tokens, dtype_bytes=DTYPE_BYTES[dtype], index=index), cap)
    p["source"] = source
    if source.endswith(".gguf"):  # ra converts a GGUF once, tensor by tensor, into the dtype it runs in
        from dataclasses import asdict

        from core.gguf_convert import needs

        p["conversion"] = {"dtype": dtype, **asdict(needs(source, dtype))}
    typer.echo(json.dumps(p) if as_json else explain(p))


app.add_typer(cache_app, name="cache")
app.command()(models)


def main() -> None:
    """Entry point: run the app, turning known errors into one line on stderr."""
    global _debug
    _debug = "--debug" in sys.argv
    if _debug:
        sys.argv.remove("--debug")
    # `--sources` alone means `--sources=stderr` (click options have no optional value); not after `--`
    end = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    sys.argv[1:end] = ["--sources=stderr" if a == "--sources" else a for a in sys.argv[1:end]]
    import signal

    def _terminated(signum, frame):  # SIGTERM stops like Ctrl-C: cleanup runs, a prefill keeps its checkpoint
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminated)
    try:
        from .config import default_map, read_config

        config, path = read_config(_home())
        dm = default_map(typer.main.get_command(app), config, path) if config else None
        rc = app(standalone_mode=False, default_map=dm)  # typer returns an Exit's code (Ctrl-C: 130)
        if rc == 130:
            print("\nra: interrupted", file=sys.stderr)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("\nra: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `ra ask ... | head`: the reader left; not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        sys.exit(0)
    except Exception as e:  # noqa: BLE001 - every error becomes one line unless --debug
        if _debug:
            raise
        if isinstance(e, typer.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, typer.Abort):
            print("ra: aborted", file=sys.stderr)
            sys.exit(130)
        if isinstance(e, typer.TyperException) and hasattr(e, "format_message"):  # bad option or argument
            print(f"ra: error: {e.format_message()}", file=sys.stderr)
            sys.exit(getattr(e, "exit_code", 2))
        known = isinstance(e, RaError)
        msg = str(e) or type(e).__name__
        print(f"ra: error: {msg}" + ("" if known else "  (run with --debug for a traceback)"), file=sys.stderr)
        sys.exit(e.exit_code if known else 1)

if __name__ == "__main__":
    main()
