"""Bad input of every kind: arbitrary bytes as a .txt, a .pdf and a manifest.json (hypothesis),
directory walks with links, loops and odd names, degenerate text, and no pickle anywhere the store
or a model is read."""
import os
import re
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import ROOT, SAMPLES
from core.documents import Document, load_document
from core.errors import DocumentError, RaError, StoreError
from core.manifest import Manifest
from ra_cli.main import app

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PDF = (SAMPLES / "R-intro.pdf").read_bytes()


def _load(tmp_path: Path, name: str, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    try:
        doc = load_document(str(p))
    except DocumentError as e:  # the documented one-line error
        assert "\n" not in str(e) and str(e)
        return None
    assert isinstance(doc, Document) and doc.text.strip()
    return doc


@FUZZ
@given(data=st.binary(max_size=4096))
@example(data=b"\x1c")  # whitespace to str.strip, not to bytes.strip: was accepted as a document of nothing
@example(data=b"\xef\xbb\xbf \n")  # a BOM and whitespace
def test_arbitrary_bytes_as_text(tmp_path, data):
    _load(tmp_path, "x.txt", data)


@FUZZ
@given(cut=st.integers(0, 200_000), flips=st.lists(st.tuples(st.integers(0, 199_999), st.integers(1, 255)), max_size=8),
       junk=st.binary(max_size=512))
def test_damaged_pdfs(tmp_path, cut, flips, junk):
    """A real PDF cut short, with bytes flipped, or with junk appended: a Document or one line."""
    data = bytearray(PDF[:cut])
    for at, x in flips:
        if at < len(data):
            data[at] ^= x
    _load(tmp_path, "x.pdf", bytes(data) + junk)


@FUZZ
@given(data=st.one_of(st.binary(max_size=2048),
                      st.dictionaries(st.text(max_size=12), st.one_of(st.integers(), st.text(max_size=8), st.none()),
                                      max_size=12).map(lambda d: repr(d).replace("'", '"').encode())))
def test_arbitrary_manifest(tmp_path, data):
    """manifest.json of arbitrary bytes (or JSON-ish objects): Manifest.read raises only StoreError,
    and `ra cache list / info / verify` exit 0 or 1, never with another exception."""
    entry = tmp_path / "home" / "store" / "entries" / ("ab" * 16)
    entry.mkdir(parents=True, exist_ok=True)
    (entry / "manifest.json").write_bytes(data)
    try:
        Manifest.read(entry)
    except StoreError as e:
        assert "\n" not in str(e)
    runner = CliRunner()
    for args in (["cache", "list"], ["cache", "info", "abab"], ["cache", "verify"]):
        r = runner.invoke(app, args, env={"RA_HOME": str(tmp_path / "home")})
        assert r.exit_code in (0, 1), (args, r.output)
        assert r.exception is None or isinstance(r.exception, (SystemExit, RaError)), (args, repr(r.exception))


def test_walk_links_loops_and_odd_names(tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("the launch code is 1234\n")
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("x = 1\n")
    (root / "pkg" / "leak.py").symlink_to(outside)            # a file link out of the root: skipped
    (root / "pkg" / "same.py").symlink_to(root / "pkg" / "a.py")  # a link inside it: read
    (root / "pkg" / "loop").symlink_to(root, target_is_directory=True)  # a directory loop: not followed
    (root / "up").symlink_to(tmp_path, target_is_directory=True)
    bad = os.fsencode(str(root / "pkg")) + b"/caf\xe9.py"  # a Latin-1 (non-UTF-8) file name
    with open(bad, "wb") as f:
        f.write(b"y = 2\n")
    (root / "pkg" / ("long" * 60 + ".py")).write_text("z = 3\n")
    doc = load_document(str(root))
    assert "1234" not in doc.text and "leak.py" not in doc.files
    assert {"pkg/a.py", "pkg/same.py", "pkg/caf\ufffd.py", "pkg/" + "long" * 60 + ".py"} <= set(doc.files)
    assert doc.text.encode("utf-8")  # every name is valid text for the tokenizer and text.txt


def test_degenerate_text_tokenizes_in_linear_time(smol):
    """One repeated character, one huge line: the tokenizer finishes (a one-off timing here saw
    0.17 s per 400K characters of either, linear; no limit added with this tokenizer)."""
    from core.prompt import build_prefix

    for text in ("a" * 1_000_000, ("word " * 200_000).replace(" ", "")[:1_000_000], "x y " * 250_000):
        p = build_prefix(smol[1], Document(text=text, name="d.txt", kind="text"))
        assert len(p.ids) > 1000


def test_nothing_unpickles_and_remote_code_stays_off():
    """No pickle loading in code that reads the store or models: np.load always with
    allow_pickle=False, torch.load only with weights_only=True, no pickle module, and
    trust_remote_code passed only from the setting."""
    sources = [p for d in ("core", "ra_cli") for p in (ROOT / d).rglob("*.py")]
    assert len(sources) > 20
    for p in sources:
        src = p.read_text(encoding="utf-8")
        where = p.relative_to(ROOT)
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", src, re.M), where
        for call in re.findall(r"np\.load\([^)]*\)", src):
            assert "allow_pickle=False" in call, (where, call)
        for call in re.findall(r"torch\.load\([^)]*\)", src):
            assert "weights_only=True" in call, (where, call)
        assert "allow_pickle=True" not in src and "weights_only=False" not in src, where
        assert not re.search(r"trust_remote_code\s*=\s*True", src), where
