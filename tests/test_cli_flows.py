"""`ra index`, `ra ask` and `ra repl` running the embedded model in real subprocesses: a planted
fact found in a real codebase, shell pipelines, several questions on one loaded store, the REPL
fed through a pipe and driven through a pseudo-terminal with Ctrl-C. Documents are small (the
CPU is slow and shared) and answers short."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import ROOT

RA = [sys.executable, "-m", "ra_cli.main"]
FACT = "# Maintainer note: the release codename of this scanner is PELICAN-7.\n"
STORY = ("Mira kept bees on the roof of the old library. Every spring she carried the hives down the "
         "fire escape to the orchard by the river, where the apple trees bloomed white. Her brother Tomas "
         "painted the hives blue so that the bees could find their way home.\n") * 3


def ra(*args, input=None, cwd=ROOT):
    return subprocess.run([*RA, *args], capture_output=True, text=True, cwd=cwd, env=os.environ.copy(),
                          input=input, timeout=900)


@pytest.fixture
def jsonpkg(tmp_path):
    """Two modules of the stdlib's json package, a fact planted in one, plus files to skip."""
    root = tmp_path / "jsonpkg"
    root.mkdir()
    src = os.path.dirname(json.__file__)
    shutil.copy(os.path.join(src, "tool.py"), root / "tool.py")
    lines = open(os.path.join(src, "scanner.py"), encoding="utf-8").read().splitlines(keepends=True)
    (root / "scanner.py").write_text("".join(lines[:40] + [FACT] + lines[40:]))
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "scanner.cpython-311.pyc").write_bytes(b"\x00" * 64)
    (root / ".gitignore").write_text("*.log\n")
    (root / "debug.log").write_text("not indexed\n")
    return root


def test_index_a_codebase_then_ask_it(smol, ra_home, jsonpkg):
    first = ra("index", str(jsonpkg))
    assert first.returncode == 0, first.stderr
    summary = first.stdout.strip()
    assert summary.startswith(f"{jsonpkg}: 2 files (2 skipped: 1 gitignored, 1 hidden), ")
    assert "indexed in" in summary and "MiB in the store" in summary
    assert ra("index", str(jsonpkg), "-q").stdout.strip().split(", ")[3] == "already cached"

    r = ra("ask", str(jsonpkg), "What is the release codename of the scanner?", "-n", "16", "--json")
    assert r.returncode == 0, r.stderr
    assert "cache hit" in r.stderr  # no prefill
    first = json.loads(r.stdout)
    assert "PELICAN-7" in first["answer"]
    assert first["document"]["files"] == ["scanner.py", "tool.py"] and first["document"]["kind"] == "code"
    assert first["quotes"][0]["source"] == "scanner.py:41"  # the planted line
    assert first["cache_hit"] and first["timings"]["prefill_s"] < 1
    assert first["tokens"]["document"] > 1000 and 0 < first["tokens"]["answer"] <= 16
    assert set(first["timings"]) == {"load_s", "prefill_s", "first_token_s", "answer_s", "tokens_per_s"}
    entry = first["document"]["entry"]
    info = ra("cache", "info", entry[:8]).stdout
    assert "files:     2: scanner.py, tool.py" in info


def test_shell_pipelines(smol, ra_home, tmp_path):
    doc = tmp_path / "bees.txt"
    doc.write_text(STORY)
    check = "import json,sys; d=json.load(sys.stdin); assert d['answer'] and not d['cache_hit'], d; print(d['answer'])"
    r = subprocess.run(f'cat {doc} | {sys.executable} -m ra_cli.main ask - "What color are the hives?" --json -n 8 '
                       f'| {sys.executable} -c "{check}"', shell=True, capture_output=True, text=True, cwd=ROOT,
                       timeout=900)
    assert r.returncode == 0, r.stderr
    # questions on stdin, one per line, the document as a file: the same cache entry (from stdin
    # before), one model load for both, stdout nothing but one JSON object per question
    r = ra("ask", str(doc), "--questions", "-", "--json", "-n", "8", "-q",
           input="What color are the hives?\n\nWhere does Mira keep bees?\n")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["question"] for x in records] == ["What color are the hives?", "Where does Mira keep bees?"]
    assert all(x["cache_hit"] and x["answer"] for x in records)
    assert records[0]["document"]["sha256"] == records[1]["document"]["sha256"]


def test_repl_over_a_pipe_answers_two_questions_with_one_load(smol, ra_home, tmp_path):
    doc = tmp_path / "bees.txt"
    doc.write_text(STORY)
    r = ra("repl", str(doc), "-n", "8", input="What color are the hives?\n\n/stats\nAnd who painted them?\n"
                                               "/stats\n/quit\nnever asked\n")
    assert r.returncode == 0, r.stderr
    answers = r.stdout.strip().splitlines()
    assert len(answers) == 2 and all(a.strip() for a in answers)
    assert r.stderr.count("loading model") == 1 and r.stderr.count("ra: prefilled") == 1
    assert "questions:    1 answered" in r.stderr and "questions:    2 answered" in r.stderr
    assert "conversation: 2 turns" in r.stderr


def test_repl_on_a_terminal_ctrl_c_stops_the_answer_not_the_session(smol, ra_home, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    doc = tmp_path / "bees.txt"
    doc.write_text(STORY)
    env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1")  # pexpect does not answer cursor-position queries
    child = pexpect.spawn(RA[0], [*RA[1:], "repl", str(doc), "-n", "200"], cwd=str(ROOT), env=env,
                          encoding="utf-8", timeout=300, dimensions=(40, 120),
                          # a background job of a script ignores SIGINT, and exec keeps that: restore it
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        child.expect("ra>")
        child.sendline("Write a long poem about the bees, the river and the orchard.")
        # Ctrl-C must land mid-answer, so wait for the answer to start instead of sleeping (a fixed
        # sleep was too short under load and too long on a quiet machine): prompt_toolkit turns
        # bracketed paste off when it hands the line over, then rich's Live draws the first words.
        child.expect_exact("\x1b[?2004l")
        child.expect(r"\x1b\[2K[A-Za-z]")
        child.sendintr()                  # Ctrl-C: SIGINT to the foreground process, as a user would
        child.expect("answer stopped")
        child.expect("ra>")               # back at the prompt, same process, model still loaded
        child.sendline("/stats")
        child.expect("0 answered, 1 interrupted")
        child.expect("ra>")
        child.sendline("What color are the hives?")
        child.sendline("/stats")          # typed ahead: read at the prompt once the answer is done
        child.expect("1 answered, 1 interrupted")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    history = (ra_home / "repl_history").read_text()
    assert "What color are the hives?" in history and "/stats" in history


def test_ask_past_the_model_window_remaps_positions_and_caches(smol, ra_home, tmp_path):
    """A document longer than the model's window (a tiny random Llama with a 256-token window) is
    prefilled with remapped positions, says so on stderr, and the second question is a cache hit."""
    from conftest import book_text, tiny_model_dir

    model = tiny_model_dir(tmp_path / "llama-tiny", smol, "llama", window=256)
    (tmp_path / "long.txt").write_text(book_text(12000))  # ~3.3K tokens: past the 2,048-token local window too
    r = ra("ask", "long.txt", "Who is late?", "--json", "--model", str(model), "--max-tokens", "4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    err = " ".join(r.stderr.split())  # rich wraps long lines
    assert "past the model's 256-token window: prefilling in chunks with remapped positions" in err
    assert re.search(r"2,\d{3} static tokens on cpu, [1-9][\d,]* offloaded", err), err
    rec = json.loads(r.stdout)
    assert rec["positions"] == "remapped" and rec["tokens"]["document"] > 256 and not rec["cache_hit"]
    r2 = ra("ask", "long.txt", "Who is late?", "--json", "--model", str(model), "--max-tokens", "4", cwd=tmp_path)
    rec2 = json.loads(r2.stdout)
    assert rec2["cache_hit"] and rec2["answer"] == rec["answer"]
