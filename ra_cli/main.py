"""The `ra` command line (Typer). Heavy imports (torch, transformers) happen inside commands that
need a model, so `ra --help` and `ra cache ...` start instantly.

stdout carries only answers; progress, notices and errors go to stderr.
Exit codes: 0 ok, 1 runtime error, 2 usage error, 130 interrupted.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Ask questions about whole books, PDFs and codebases with a local LLM.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect the document cache.")
app.add_typer(cache_app, name="cache")

_debug = False


class UsageError(Exception):
    """Bad arguments: exit code 2."""


def _err_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _home():
    from core import data_home

    return data_home()


class _Progress:
    """rich progress bars on stderr for the engine's progress(stage, done, total) callback."""

    LABELS = {"prefill": "prefill (tokens)", "index": "index (layers)"}

    def __init__(self, enabled: bool):
        self.enabled, self.bars, self.tasks = enabled, None, {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                                   TimeRemainingColumn)
        from rich.text import Text

        class Rate(ProgressColumn):
            def render(self, task):
                return Text(f"{task.speed:,.0f}/s" if task.speed else "", style="cyan")

        if self.bars is None:
            self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                                 TextColumn("eta"), TimeRemainingColumn(), console=_err_console())
            self.bars.start()
        if stage not in self.tasks:
            self.tasks[stage] = self.bars.add_task(self.LABELS.get(stage, stage), total=total)
        self.bars.update(self.tasks[stage], completed=done, total=total)

    def stop(self) -> None:
        if self.bars is not None:
            self.bars.stop()
            self.bars = None


@app.command()
def ask(
    target: str = typer.Argument(..., help="Document to ask about: a text or PDF file, or - for stdin."),
    question: str = typer.Argument(..., help="The question."),
    model: Optional[str] = typer.Option(None, "--model", "-m", envvar="RA_MODEL",
                                        help="Model: .gguf file, model directory or Hugging Face id. Default: embedded SmolLM2-135M-Instruct."),
    device: str = typer.Option("auto", envvar="RA_DEVICE", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", envvar="RA_DTYPE", help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16."),
    attention: str = typer.Option("retrieval", help="retrieval, or full (exact attention over the same cached KV)."),
    index: str = typer.Option("flat", envvar="RA_INDEX", help="Offloaded-key index: flat (exact) or hnsw."),
    top_k: int = typer.Option(100, "--top-k", "-k", min=1, help="Keys retrieved per head and step."),
    sink: int = typer.Option(128, min=0, help="First tokens of the document kept static."),
    recent: int = typer.Option(512, min=0, help="Last tokens of the document kept static."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", min=1, help="Longest answer, in tokens."),
    chunk_size: int = typer.Option(1024, min=16, help="Prefill chunk size, in tokens."),
    trust_remote_code: bool = typer.Option(False, help="Allow a model's own Python code to run."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or notices on stderr."),
):
    """Answer a question about a document (prefilled once, then answered from the cache)."""
    if not question.strip():
        raise UsageError("the question is empty")
    if attention not in ("retrieval", "full"):
        raise UsageError(f"--attention must be retrieval or full, not {attention!r}")
    if index not in ("flat", "hnsw"):
        raise UsageError(f"--index must be flat or hnsw, not {index!r}")
    console = _err_console()
    say = (lambda msg: None) if quiet else (lambda msg: console.print(f"[dim]ra:[/dim] {msg}"))

    from core.documents import load_document

    doc = load_document(target)
    progress = _Progress(enabled=not quiet)
    say("loading model...")
    from core.engine import AnswerStats, Engine, Settings

    settings = Settings(model=model, device=device, dtype=dtype, attention=attention, index=index, top_k=top_k,
                        sink=sink, recent=recent, max_tokens=max_tokens, chunk_size=chunk_size,
                        trust_remote_code=trust_remote_code)
    try:
        engine = Engine(_home(), settings, progress=progress, notice=say)
        prepared = engine.prepare(doc)
    finally:
        progress.stop()
    n = prepared.entry.n_tokens
    if prepared.cache_hit:
        say(f"cache hit: reused {n:,} document tokens from the store, no prefill")
    else:
        say(f"prefilled {n:,} tokens in {prepared.prefill_s:.1f} s ({n / max(prepared.prefill_s, 1e-9):,.0f} tokens/s); "
            f"cached for next time")
    a, b = prepared.entry.split(sink, recent)
    if attention == "retrieval":
        say(f"retrieval attention: {n - (b - a):,} static tokens on {engine.device}, {b - a:,} offloaded "
            f"({index} index, top-{top_k})")
    stats = AnswerStats()
    out = sys.stdout
    for piece in engine.ask(prepared, question, stats):
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    if stats.answer_tokens:
        say(f"{stats.answer_tokens} tokens in {stats.answer_s:.1f} s "
            f"({stats.answer_tokens / max(stats.answer_s, 1e-9):.1f} tokens/s)")


@cache_app.command("list")
def cache_list():
    """List cached documents."""
    import json

    entries = _home() / "store" / "entries"
    if not entries.exists():
        return
    for d in sorted(entries.iterdir(), key=lambda p: p.stat().st_mtime):
        m = d / "manifest.json"
        if not m.exists():
            continue
        info = json.loads(m.read_text())
        size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        typer.echo(f"{d.name}  {info['n_tokens']:>8,} tokens  {size / 2**20:>8.1f} MiB  "
                   f"{info['model']['spec']}  {info['document']['name']}")


@cache_app.command("path")
def cache_path():
    """Print the data directory (set RA_HOME to move it)."""
    typer.echo(str(_home()))


def main() -> None:
    """Entry point: run the app, turning known errors into one line on stderr."""
    global _debug
    _debug = "--debug" in sys.argv
    if _debug:
        sys.argv.remove("--debug")
    try:
        app(standalone_mode=False)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("ra: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - every error becomes one line unless --debug
        import click

        if _debug:
            raise
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            print("ra: aborted", file=sys.stderr)
            sys.exit(130)
        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        code = 2 if isinstance(e, UsageError) else 1
        msg = str(e) or type(e).__name__
        known = type(e).__name__ in ("DocumentError", "ModelError", "UsageError")
        print(f"ra: error: {msg}" + ("" if known else "  (run with --debug for a traceback)"), file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
