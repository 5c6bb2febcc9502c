"""The README's table of bad inputs: each gets exactly this one line on stderr, this exit code,
nothing on stdout and no traceback (real `ra` subprocesses, run in the input's directory)."""
import os
import subprocess
import sys

import pytest

from conftest import SAMPLES, book_text


def _pdf(path, encrypt=False, blank=False):
    from pypdf import PdfReader, PdfWriter

    w = PdfWriter()
    if blank:
        w.add_blank_page(width=200, height=200)
    else:
        w.append(PdfReader(str(SAMPLES / "R-intro.pdf")), pages=(0, 1))
    if encrypt:
        w.encrypt("secret")
    with open(path, "wb") as f:
        w.write(f)


def _setup(d):
    (d / "empty.txt").write_bytes(b"")
    (d / "blob.bin").write_bytes(b"\x7fELF\x00\x01\x02")
    (d / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")
    (d / "corrupt.pdf").write_bytes(b"%PDF-1.4 truncated")
    _pdf(d / "locked.pdf", encrypt=True)
    _pdf(d / "scan.pdf", blank=True)
    (d / "ok.txt").write_text("A short document.\n")
    (d / "images").mkdir()
    (d / "images" / "logo.png").write_bytes(b"\x89PNG\r\n")


# (what, arguments, exact stderr, exit code); the README table is generated from the same runs
CASES = [
    ("missing file", ["ask", "missing.txt", "q"], "ra: error: no such file: missing.txt", 1),
    ("empty file", ["ask", "empty.txt", "q"], "ra: error: empty.txt is empty", 1),
    ("binary file", ["ask", "blob.bin", "q"], "ra: error: blob.bin looks like a binary file, not text or PDF", 1),
    ("non-UTF-8 text", ["ask", "latin1.txt", "q"],
     "ra: error: latin1.txt is not UTF-8 text (bad byte at offset 3)", 1),
    ("encrypted PDF", ["ask", "locked.pdf", "q"], "ra: error: locked.pdf is an encrypted PDF; decrypt it first", 1),
    ("corrupt PDF", ["ask", "corrupt.pdf", "q"],
     "ra: error: corrupt.pdf is not a readable PDF (Stream has ended unexpectedly)", 1),
    ("PDF with no text layer", ["ask", "scan.pdf", "q"],
     "ra: error: scan.pdf has no text layer (a scanned PDF?); run OCR on it first", 1),
    ("directory with no text file", ["ask", "images", "q"],
     "ra: error: images: no text files to index in this directory (skipped: 1 binary)", 1),
    ("empty question", ["ask", "ok.txt", "  "], "ra: error: the question is empty", 2),
    ("no question at all", ["ask", "-"], "ra: error: no question: give one as an argument, with --question/-Q, "
                                          "--questions FILE, or on stdin", 2),
    ("unknown option", ["ask", "ok.txt", "q", "--bogus"], "ra: error: No such option: --bogus", 2),
    ("unknown device", ["ask", "ok.txt", "q", "--device", "tpu"],
     "ra: error: --device must be auto, cpu or cuda, not 'tpu'", 2),  # found before the model loads
    ("unknown dtype", ["ask", "ok.txt", "q", "--dtype", "int3"],
     "ra: error: --dtype must be auto, float32, fp32, bfloat16, bf16, float16 or fp16, not 'int3'", 2),
    ("unknown model", ["ask", "ok.txt", "q", "--model", "no/such/model"],
     "ra: loading model...\n"  # the model is resolved once the document has been read
     "ra: error: unknown model 'no/such/model': give a .gguf file, a model directory or a Hugging Face id", 1),
]


def run(cwd, args, input=None):
    return subprocess.run([sys.executable, "-m", "ra_cli.main", *args], capture_output=True, text=True, cwd=cwd,
                          env=os.environ.copy(), input=input, timeout=300)


@pytest.mark.parametrize("what,args,message,code", CASES, ids=[c[0] for c in CASES])
def test_bad_input(ra_home, tmp_path, what, args, message, code):
    _setup(tmp_path)
    r = run(tmp_path, args, input="")
    assert (r.stderr, r.returncode, r.stdout) == (message + "\n", code, "")


def test_document_longer_than_a_model_without_rope_allows(smol, ra_home, tmp_path):
    """Past the window, a RoPE model remaps positions (tests/test_longctx.py); a model with learned
    absolute positions cannot, and says so."""
    from conftest import tiny_model_dir

    tiny_model_dir(tmp_path / "gpt2-tiny", smol, "gpt2", window=128)
    (tmp_path / "long.txt").write_text(book_text(2000))
    r = run(tmp_path, ["ask", "long.txt", "q", "-q", "--model", "gpt2-tiny"])
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == ("ra: error: long.txt is 584 tokens; gpt2-tiny handles at most 128 (prompt and answer "
                        "included) and has no RoPE module to remap positions with\n")
