"""A document opened for questions: the model loaded once, the document prefilled or read from
the store. Shared by `ra ask`, `ra index` and `ra repl`; imports torch (through core.engine)
only when a Session is created."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field


from core.errors import UsageError  # noqa: F401  (the CLI's usage errors are core's)


@dataclass
class WalkOptions:
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    max_file_size: str = "256K"


def parse_size(text: str) -> int:
    """'2G', '500M', '256K', '1024' -> bytes (powers of 1024)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise UsageError(f"not a size: {text!r} (examples: 500M, 2G)") from None


class Progress:
    """rich progress bars on stderr for the engine's progress(stage, done, total) callback."""

    LABELS = {"prefill": "prefill (tokens)", "index": "index (layers)", "convert": "convert model (MiB)"}

    def __init__(self, console, enabled: bool):
        self.console, self.enabled, self.bars, self.tasks = console, enabled, None, {}

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
                                 TextColumn("eta"), TimeRemainingColumn(), console=self.console)
            self.bars.start()
        if stage not in self.tasks:
            self.tasks[stage] = self.bars.add_task(self.LABELS.get(stage, stage), total=total)
        self.bars.update(self.tasks[stage], completed=done, total=total)

    def stop(self) -> None:
        if self.bars is not None:
            self.bars.stop()
            self.bars, self.tasks = None, {}  # the next document gets new bars (`ra index a b`, `ra serve`)


def read_document(target: str, walk: WalkOptions):
    from core.documents import load_document

    return load_document(target, include=walk.include, exclude=walk.exclude,
                         max_file_bytes=parse_size(walk.max_file_size))


class Session:
    """Loads the model (once) and opens documents with it."""

    def __init__(self, home, settings, console, quiet: bool, yes: bool = False):
        """settings: a checked core.settings.Settings (the CLI's options); yes: no confirmation prompts."""
        self.console, self.quiet, self.yes = console, quiet, yes
        self.progress = Progress(console, enabled=not quiet)
        if quiet:
            _silence_libraries()
        self.say("loading model...")
        from core.engine import Engine

        self.engine = Engine(home, settings, progress=self.progress, notice=self.say, confirm=self.confirm)

    def confirm(self, question: str) -> bool:
        """Ask on a terminal; piped input needs --yes."""
        if self.yes:
            return True
        if not sys.stdin.isatty():
            raise UsageError(f"{question[:1].upper()}{question[1:-1]} needs a yes: add --yes (stdin is not a terminal)")
        import typer

        self.progress.stop()
        return typer.confirm(f"ra: {question}", err=True)

    def say(self, msg: str) -> None:
        if not self.quiet:
            self.console.print(f"[dim]ra:[/dim] {msg}")

    def open(self, doc, settings=None):
        """-> Prepared: the document's cache entry, built first if it is missing (settings: other
        than the engine's, e.g. another answer length)."""
        from core.errors import DocumentTooLong

        try:
            prepared = self.engine.prepare(doc, settings)
        except DocumentTooLong as e:
            if doc.kind == "code":
                raise DocumentTooLong(f"{e}; narrow it with --include/--exclude") from None
            raise
        finally:
            self.progress.stop()
        n, s = prepared.entry.n_tokens, prepared.settings
        if prepared.cache_hit:
            self.say(f"cache hit: reused {n:,} document tokens from the store, no prefill")
        else:
            self.say(f"prefilled {n:,} tokens in {prepared.prefill_s:.1f} s "
                     f"({n / max(prepared.prefill_s, 1e-9):,.0f} tokens/s); cached for next time")
        a, b = prepared.split
        if s.attention == "retrieval":
            how = "every one attended: exact" if prepared.index_kind == "exact" else f"{prepared.index_kind} index, top-{s.top_k}"
            self.say(f"retrieval attention: {n - (b - a):,} static tokens on {self.engine.device}, {b - a:,} "
                     f"offloaded ({how})")
        return prepared


def _silence_libraries() -> None:
    """-q: nothing on stderr but errors, the libraries' own progress bars and warnings included."""
    import os
    import warnings

    os.environ["TQDM_DISABLE"] = "1"  # read when tqdm is imported: the GGUF conversion's own bar
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def write_answer(pieces, markdown: bool) -> str:
    """Stream answer pieces to stdout: rendered Markdown on a terminal, raw text otherwise.
    Returns the text (what was written so far, if interrupted)."""
    text = ""
    if markdown:
        from rich.console import Console
        from rich.live import Live
        from rich.markdown import Markdown

        with Live(Markdown(""), console=Console(), refresh_per_second=8, vertical_overflow="visible") as live:
            for piece in pieces:
                text += piece
                live.update(Markdown(text))
        return text
    out = sys.stdout
    try:
        for piece in pieces:
            text += piece
            out.write(piece)
            out.flush()
    except BaseException:  # interrupted (Ctrl-C) or failed: end a started line, then let it go
        if text:
            out.write("\n")
            out.flush()
        raise
    out.write("\n")
    out.flush()
    return text


SHOWN_SOURCES = 3   # passages `--sources` and `/sources` show; `--json` lists JSON_SOURCES
JSON_SOURCES = 5


def show_sources(records: list[dict], console, plain: bool = False) -> None:
    """Print source records (core/citations.Source.record): location, score and snippet, the
    evidence words in bold (plain: no styling, e.g. to a pipe)."""
    import re

    from rich.markup import escape

    from core.citations import label

    if not records:
        console.print("sources: none (the answer attended to no document passage)")
        return
    console.print("sources (the passages the answer attended to most):")
    for i, r in enumerate(records[:SHOWN_SOURCES], 1):
        snippet = r["snippet"] if "page" in r or "\n" not in r["snippet"] else "\n".join(
            "     " + line for line in r["snippet"].splitlines())
        text = escape(snippet)
        if not plain and r.get("evidence"):
            words = sorted({re.escape(escape(w)) for w in r["evidence"] if w.strip()}, key=len, reverse=True)
            text = re.sub(r"\b(" + "|".join(words) + r")\b", r"[bold yellow]\1[/bold yellow]", text)
        sep = "\n" if snippet.startswith("     ") else "  "
        console.print(f"  {i}. [cyan]{escape(label(r))}[/cyan] ({r['score']:.0%}){sep}{text}", highlight=False)


def answer_record(question: str, answer: str, doc, prepared, stats, engine) -> dict:
    """The --json object for one answer."""
    tps = stats.answer_tokens / stats.answer_s if stats.answer_s else 0.0
    document = {"path": doc.name, "kind": doc.kind, "sha256": doc.sha256, "entry": prepared.entry.path.name}
    if doc.files:
        document["files"] = doc.files
    return {
        "question": question,
        "answer": answer,
        "document": document,
        "model": engine.ref.spec,
        "tokens": {"document": prepared.entry.n_tokens, "question": stats.question_tokens,
                   "answer": stats.answer_tokens},
        "cache_hit": prepared.cache_hit,
        "positions": "remapped" if prepared.entry.remapped else "exact",  # past the model's window or not
        "attention": prepared.settings.attention,
        "index": prepared.index_kind,
        "timings": {"load_s": round(engine.load_s + prepared.load_s, 3),
                    "prefill_s": round(prepared.prefill_s + prepared.index_s, 3),
                    "first_token_s": round(stats.first_token_s, 3), "answer_s": round(stats.answer_s, 3),
                    "tokens_per_s": round(tps, 2)},
        "quotes": doc.quoted(answer),
        **({"sources": [src.record() for src in stats.sources]} if stats.sources is not None else {}),
    }
