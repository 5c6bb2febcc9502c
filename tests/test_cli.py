"""The `ra` command through real subprocesses: the needle test answered from the store in a new
process, snappy startup, and one-line errors with the right exit codes."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, SAMPLES


def ra(*args, env=None, input=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "ra_cli.main", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env or os.environ.copy(), input=input, timeout=timeout)


def haystack_with_needle(code: str, n_chars: int = 24000) -> str:
    """~6.5K SmolLM2 tokens of Alice with a passcode sentence at a third of its length."""
    text = (SAMPLES / "alice.txt").read_text(encoding="utf-8")
    start = text.index("CHAPTER I.")
    hay = text[start:start + n_chars]
    cut = hay.index("\n\n", len(hay) // 3)
    return hay[:cut] + f"\n\nThe secret passcode is {code}. Remember it: the passcode is {code}.\n\n" + hay[cut:]


def test_needle_found_from_the_persisted_store_in_a_new_process(smol, ra_home, tmp_path):
    doc = tmp_path / "haystack.txt"
    doc.write_text(haystack_with_needle("48213"))
    q = "What is the secret passcode?"
    # exact top-100 (flat) finds this needle; full attention itself does not (it repeats "The Secret
    # Passcode:"), and neither does the default clustered index, which answers as full attention does
    first = ra("ask", str(doc), q, "--index", "flat", "--top-k", "100", "-n", "24")
    assert first.returncode == 0, first.stderr
    assert "prefilled" in first.stderr and "cache hit" not in first.stderr
    n_tokens = int(first.stderr.split("prefilled ")[1].split(" tokens")[0].replace(",", ""))
    assert 5500 < n_tokens < 7500
    assert "48213" in first.stdout
    second = ra("ask", str(doc), q, "--index", "flat", "--top-k", "100", "-n", "24")  # a new process
    assert second.returncode == 0, second.stderr
    assert f"cache hit: reused {n_tokens:,} document tokens" in second.stderr
    assert "prefilled" not in second.stderr
    assert second.stdout == first.stdout


def test_help_does_not_import_torch():
    code = ("import sys, runpy; sys.argv=['ra','--help']\n"
            "try:\n    runpy.run_module('ra_cli.main', run_name='__main__')\nexcept SystemExit: pass\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "ask" in r.stdout


def test_cache_commands_do_not_import_torch(ra_home):
    code = ("import sys, runpy; sys.argv=['ra','cache','path']\n"
            "try:\n    runpy.run_module('ra_cli.main', run_name='__main__')\nexcept SystemExit: pass\n"
            "assert 'torch' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(ra_home)


@pytest.mark.parametrize("args,code,message", [
    (["ask", "does-not-exist.txt", "q"], 1, "ra: error: no such file: does-not-exist.txt"),
    (["ask", str(SAMPLES / "alice.txt"), "   "], 2, "ra: error: the question is empty"),
    (["ask", str(SAMPLES / "alice.txt"), "q", "--attention", "fast"], 2, "--attention must be retrieval or full"),
    (["ask", str(SAMPLES / "alice.txt"), "q", "--model", "no/such-model-dir/x"], 1, "ra: error: unknown model"),
])
def test_errors_are_one_line(ra_home, args, code, message):
    r = ra(*args)
    assert r.returncode == code
    assert message in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_stdin_document(smol, ra_home):
    r = ra("ask", "-", "Who is in the story?", "-n", "8", "-q", input="Alice met a white rabbit in the garden.\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and r.stderr == ""
