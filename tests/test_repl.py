"""The REPL's logic without a model (a fake engine), and the multi-turn prompt against the chat
template (the tokenizer only)."""
import io
from pathlib import Path
from types import SimpleNamespace

from ra_cli.repl import InProcess, Repl


class FakeEngine:
    """Answers "answer N"; raises KeyboardInterrupt mid-answer when the question says so."""

    def __init__(self):
        self.calls = []
        self.ref = SimpleNamespace(spec="fake")
        self.device, self.load_s = "cpu", 0.1

    def ask(self, prepared, question, stats, history=None, sources=0):
        self.calls.append((question, list(history)))
        stats.answer_ids = [len(self.calls)]
        yield "answer "
        if "interrupt" in question:
            raise KeyboardInterrupt
        stats.answer_tokens = 2
        yield str(len(self.calls))


def make(lines):
    messages = []
    session = SimpleNamespace(engine=FakeEngine(), say=messages.append)
    prepared = SimpleNamespace(entry=SimpleNamespace(n_tokens=10), cache_hit=True, prefill_s=0.0, index_kind="flat",
                               settings=SimpleNamespace(attention="retrieval", top_k=100))
    repl = Repl(InProcess(session, prepared), SimpleNamespace(name="doc.txt"), 10, messages.append,
                Path("/nonexistent"), stdin=io.StringIO(lines))
    return repl, session.engine, messages


def test_turns_interrupts_and_commands(capsys):
    repl, engine, messages = make("first\n\nplease interrupt\nsecond\n/bogus\n/reset\nthird\n/stats\n/quit\nnever\n")
    repl.run()
    out, err = capsys.readouterr()
    assert out == "answer 1\nanswer \nanswer 3\nanswer 4\n"
    assert "ra: answer stopped" in err
    # the interrupted turn is not part of the conversation; /reset empties it
    assert engine.calls == [("first", []), ("please interrupt", [("first", [1])]),
                            ("second", [("first", [1])]), ("third", [])]
    assert "unknown command /bogus; /help lists them" in messages and "conversation cleared" in messages
    assert "questions:    3 answered, 1 interrupted" in err and "conversation: 1 turns" in err


def test_followup_prompt_is_the_chat_template(smol):
    """Document prefix + turn 1 + answer + follow-up == the model's chat template over the whole
    conversation, as text (the pieces are tokenized separately, so compare decoded)."""
    from core.documents import Document
    from core.prompt import INSTRUCTION, build_prefix, followup_ids, question_ids

    _, tok, _ = smol
    doc = Document(text="Mira keeps bees.", name="d", kind="text")
    answer = tok("She keeps bees.", add_special_tokens=False)["input_ids"]
    ids = build_prefix(tok, doc).ids.tolist() + question_ids(tok, "Who?") + answer + followup_ids(tok, "Where?")
    expected = tok.apply_chat_template(
        [{"role": "user", "content": f"{INSTRUCTION}{doc.text}\n</document>\n\nQuestion: Who?"},
         {"role": "assistant", "content": "She keeps bees."}, {"role": "user", "content": "Where?"}],
        tokenize=False, add_generation_prompt=True)
    assert tok.decode(ids) == expected
