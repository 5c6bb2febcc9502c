"""`ra repl`: one loaded model and document, many questions, a conversation.

On a terminal, lines are read with prompt_toolkit (editing, persistent history in
$RA_HOME/repl_history); piped, one question per line. Each question is answered on top of the
document's cache with the earlier turns of the conversation run again after it (Engine.ask's
`history`), so the document is never prefilled again. Ctrl-C stops the current answer (the turn
is dropped) and returns to the prompt; Ctrl-C at the prompt clears the line; Ctrl-D or /quit ends.
"""
from __future__ import annotations

import sys

HELP = """commands:
  /help    this help
  /reset   forget the conversation (the document stays loaded)
  /stats   document, model and speed figures
  /sources the passages the last answer attended to most
  /quit    leave (also /exit, Ctrl-D)
anything else is a question about the document; Ctrl-C stops an answer."""


class Repl:
    def __init__(self, session, doc, prepared, home, stdin=None):
        self.session, self.doc, self.prepared = session, doc, prepared
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
        say = self.session.say
        if self.tty:
            say(f"{self.doc.name}: {self.prepared.entry.n_tokens:,} tokens loaded; /help for commands")
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
            self.session.say("conversation cleared")
        elif cmd == "/sources":
            self.sources()
        elif cmd == "/stats":
            print(self.stats(), file=sys.stderr)
        else:
            self.session.say(f"unknown command {cmd}; /help lists them")
        return True

    def stats(self) -> str:
        p, e = self.prepared, self.session.engine
        rows = [("document", f"{self.doc.name} ({p.entry.n_tokens:,} tokens, "
                             f"{'from the cache' if p.cache_hit else f'prefilled in {p.prefill_s:.1f} s'})"),
                ("model", f"{e.ref.spec} on {e.device}, loaded once in {e.load_s:.1f} s"),
                ("attention", f"{p.settings.attention}" + (
                    "" if p.settings.attention != "retrieval" else ", every offloaded key (exact)"
                    if p.index_kind == "exact" else f", {p.index_kind} index, top-{p.settings.top_k}")),
                ("questions", f"{self.asked} answered, {self.interrupted} interrupted"),
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
            self.session.say("no answer yet: /sources shows the last answer's")
        elif self.last.sources is None:
            self.session.say("no sources: they are read from retrieval attention (this is --attention full)")
        else:
            console = Console(highlight=False, soft_wrap=True)
            show_sources([s.record() for s in self.last.sources], console, plain=not console.is_terminal)

    def answer(self, question: str) -> None:
        from core.engine import AnswerStats
        from core.errors import DocumentTooLong

        from .session import JSON_SOURCES, write_answer

        while True:
            stats = AnswerStats()
            pieces = self.session.engine.ask(self.prepared, question, stats, history=self.history,
                                             sources=JSON_SOURCES)
            try:
                write_answer(pieces, markdown=self.tty)
            except KeyboardInterrupt:
                self.interrupted += 1
                print("ra: answer stopped", file=sys.stderr, flush=True)
                return
            except DocumentTooLong:  # the conversation outgrew the model's context
                if not self.history:
                    raise
                self.history.pop(0)
                self.session.say("conversation too long: dropped its oldest turn")
                continue
            break
        self.asked += 1
        self.last = stats
        self.history.append((question, stats.answer_ids))
