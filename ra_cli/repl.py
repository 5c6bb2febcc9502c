"""`ra repl`: one loaded model and document, many questions, a conversation.

On a terminal, lines are read with prompt_toolkit (editing, persistent history in
$RA_HOME/repl_history); piped, one question per line. Each question is answered on top of the
document's cache with the earlier turns of the conversation run again after it (Engine.ask's
`history`), so the document is never prefilled again. Ctrl-C stops the current answer (the turn
is dropped) and returns to the prompt; Ctrl-C at the prompt clears the line; Ctrl-D or /quit ends.

Who answers is a backend: `InProcess` (this process's engine and opened document) or `Served`
(a running `ra serve` of the same data directory, through ra_cli/client.py: no torch here). Both
stream an answer's pieces from `ask(question, history)` and leave its figures in `turn`.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

HELP = """commands:
  /help    this help
  /reset   forget the conversation (the document stays loaded)
  /stats   document, model and speed figures
  /sources the passages the last answer attended to most
  /quit    leave (also /exit, Ctrl-D)
anything else is a question about the document; Ctrl-C stops an answer."""


@dataclass
class Turn:
    """One answer's figures: its token ids (the conversation's history), speed, sources."""

    answer_ids: list
    answer_tokens: int
    answer_s: float
    first_token_s: float
    sources: list | None  # passage records (core/citations Source.record()), None for full attention


def too_long(e: Exception) -> bool:
    """The conversation outgrew the model's context (in process, or as the server says it)."""
    from core.errors import DocumentTooLong

    return isinstance(e, DocumentTooLong) or getattr(e, "kind", "") == "document_too_long"


class InProcess:
    """Answers with this process's engine over the opened document."""

    def __init__(self, session, prepared):
        self.session, self.prepared = session, prepared
        self.turn: Turn | None = None

    def ask(self, question: str, history: list):
        from core.engine import AnswerStats

        from .session import JSON_SOURCES

        stats = AnswerStats()
        yield from self.session.engine.ask(self.prepared, question, stats, history=history, sources=JSON_SOURCES)
        self.turn = Turn(stats.answer_ids, stats.answer_tokens, stats.answer_s, stats.first_token_s,
                         None if stats.sources is None else [src.record() for src in stats.sources])

    def facts(self) -> list:
        p, e = self.prepared, self.session.engine
        return [("document", f"{p.entry.n_tokens:,} tokens, " +
                 ("from the cache" if p.cache_hit else f"prefilled in {p.prefill_s:.1f} s")),
                ("model", f"{e.ref.spec} on {e.device}, loaded once in {e.load_s:.1f} s"),
                ("attention", attention_line(p.settings.attention, p.index_kind, p.settings.top_k))]


class Served:
    """Answers through a running `ra serve` (`opened`: what its index endpoint said of the document)."""

    def __init__(self, path, doc, settings, opened: dict):
        self.path, self.doc, self.settings, self.opened = path, doc, settings, opened
        self.turn: Turn | None = None
        self.start: dict = {}
        self.record: dict = {}

    def ask(self, question: str, history: list):
        from core.errors import RaError

        from .client import ask
        from .session import JSON_SOURCES

        sources = JSON_SOURCES if self.settings.attention == "retrieval" else 0
        t = time.perf_counter()
        answer = ask(self.path, self.doc, question, self.settings, sources, history)
        if answer is None:
            raise RaError("the server stopped (or now runs another model): leave and start ra repl again")
        self.start = answer.start
        yield from answer.pieces()
        self.record = answer.record or {}
        timings = self.record.get("timings", {})
        self.turn = Turn(answer.answer_ids, self.record.get("tokens", {}).get("answer", 0),
                         timings.get("answer_s", time.perf_counter() - t), timings.get("first_token_s", 0.0),
                         self.record.get("sources"))

    def facts(self) -> list:
        o = self.opened
        return [("document", f"{o['document_tokens']:,} tokens, " + ("from the cache" if o["cache_hit"] else "prefilled")),
                ("model", f"{self.record.get('model', '?')}, in `ra serve` ({self.path})"),
                ("attention", attention_line(self.settings.attention, self.start.get("index"), self.settings.top_k))]


def attention_line(attention: str, index_kind, top_k: int) -> str:
    if attention != "retrieval":
        return attention
    return "retrieval, every offloaded key (exact)" if index_kind == "exact" else \
        f"retrieval, {index_kind} index, top-{top_k}"


class Repl:
    def __init__(self, backend, doc, n_tokens: int, say, home, stdin=None):
        """backend: InProcess or Served; doc: its name is shown; say(message) on stderr."""
        self.backend, self.doc, self.n_tokens, self.say = backend, doc, n_tokens, say
        self.stdin = stdin or sys.stdin
        self.history: list[tuple[str, list[int]]] = []  # (question, answer token ids)
        self.asked = self.interrupted = 0
        self.last = None
        self.tty = self.stdin.isatty() and sys.stdout.isatty()
        self.history_file = home / "repl_history"

    def lines(self):
        """Questions as typed (terminal) or read (pipe); stops at end of input."""
        if not self.tty:
            for line in self.stdin:
                yield line.strip()
            return
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory

        self.history_file.parent.mkdir(parents=True, exist_ok=True)
        prompt = PromptSession(history=FileHistory(str(self.history_file)))
        while True:
            try:
                yield prompt.prompt("ra> ").strip()
            except KeyboardInterrupt:  # clears the line, like a shell
                continue
            except EOFError:
                return

    def run(self) -> None:
        say = self.say
        if self.tty:
            say(f"{self.doc.name}: {self.n_tokens:,} tokens loaded; /help for commands")
        for line in self.lines():
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            self.answer(line)

    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        cmd = line.split()[0].lower()
        if cmd in ("/quit", "/exit", "/q"):
            return False
        if cmd == "/help":
            print(HELP, file=sys.stderr)
        elif cmd == "/reset":
            self.history.clear()
            self.say("conversation cleared")
        elif cmd == "/sources":
            self.sources()
        elif cmd == "/stats":
            print(self.stats(), file=sys.stderr)
        else:
            self.say(f"unknown command {cmd}; /help lists them")
        return True

    def stats(self) -> str:
        facts = self.backend.facts()
        facts[0] = (facts[0][0], f"{self.doc.name} ({facts[0][1]})")
        rows = facts + [("questions", f"{self.asked} answered, {self.interrupted} interrupted"),
                        ("conversation", f"{len(self.history)} turns")]
        if self.last:
            rows.append(("last answer", f"{self.last.answer_tokens} tokens in {self.last.answer_s:.1f} s "
                                        f"({self.last.answer_tokens / max(self.last.answer_s, 1e-9):.1f} tokens/s, "
                                        f"first after {self.last.first_token_s:.2f} s)"))
        return "\n".join(f"{k + ':':<14}{v}" for k, v in rows)

    def sources(self) -> None:
        from rich.console import Console

        from .session import show_sources

        if self.last is None:
            self.say("no answer yet: /sources shows the last answer's")
        elif self.last.sources is None:
            self.say("no sources: they are read from retrieval attention (this is --attention full)")
        else:
            console = Console(highlight=False, soft_wrap=True)
            show_sources(self.last.sources, console, plain=not console.is_terminal)

    def answer(self, question: str) -> None:
        from .session import write_answer

        while True:
            pieces = self.backend.ask(question, self.history)
            try:
                write_answer(pieces, markdown=self.tty)
            except KeyboardInterrupt:
                self.interrupted += 1
                print("ra: answer stopped", file=sys.stderr, flush=True)
                return
            except Exception as e:
                if not too_long(e) or not self.history:  # the conversation outgrew the model's context
                    raise
                self.history.pop(0)
                self.say("conversation too long: dropped its oldest turn")
                continue
            break
        self.asked += 1
        self.last = self.backend.turn
        self.history.append((question, self.last.answer_ids))
