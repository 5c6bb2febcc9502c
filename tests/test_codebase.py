"""Walking a codebase: .gitignore, vendored/lock/binary/large/hidden files skipped, --include and
--exclude, a deterministic order, a header per file, and (file, line) for any character."""
import pytest

from core.codebase import load_directory, walk
from core.documents import DocumentError, load_document


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "proj"
    files = {
        "a.py": "import os\nprint('a')\n",
        "sub/b.py": "def b():\n    return 'planted fact'\n",
        "sub/keep.log": "kept by a deeper .gitignore\n",
        "app.log": "ignored by the root .gitignore\n",
        "build/out.py": "ignored directory\n",
        "node_modules/x.js": "vendored\n",
        ".git/config": "[core]\n",
        "__pycache__/a.cpython-311.pyc": "x",
        ".env": "SECRET=1\n",
        "package-lock.json": "{}\n",
        "big.txt": "x" * 5000 + "\n",
        "latin1.txt": "caf\xe9\n",
    }
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="latin-1" if rel == "latin1.txt" else "utf-8")
    (root / "blob.dat").write_bytes(b"\x00\x01binary")
    (root / ".gitignore").write_text("*.log\nbuild/\n")
    (root / "sub" / ".gitignore").write_text("!keep.log\n")
    return root


def test_walk_skips_what_a_codebase_reader_does_not_want(tree):
    w = walk(tree, max_file_bytes=4096)
    assert [rel for rel, _ in w.files] == ["a.py", "blob.dat", "latin1.txt", "sub/b.py", "sub/keep.log"]
    # hidden: .env and the two .gitignore files (read for their rules, not indexed)
    assert w.skipped == {"gitignored": 1, "hidden": 3, "lock or generated": 1, "too large": 1}
    doc = load_directory(str(tree), max_file_bytes=4096)  # binaries and non-UTF-8 go when read
    assert doc.files == ["a.py", "sub/b.py", "sub/keep.log"] and doc.kind == "code"
    assert doc.skipped["binary"] == 2


def test_include_and_exclude(tree):
    assert [r for r, _ in walk(tree, include=["*.py"]).files] == ["a.py", "sub/b.py"]
    assert [r for r, _ in walk(tree, exclude=["sub/", "*.txt", "*.dat"]).files] == ["a.py"]
    # an include glob that names a path inside a skipped directory opens it; a matched file is
    # taken even if it is gitignored or a lock file
    picked = [r for r, _ in walk(tree, include=["node_modules/*.js", "app.log", "package-lock.json"]).files]
    assert picked == ["app.log", "node_modules/x.js", "package-lock.json"]


def test_headers_sources_and_determinism(tree):
    doc = load_document(str(tree), max_file_bytes=4096)
    assert doc.text.startswith("==> a.py <==\nimport os\n")
    assert [doc.text[s:].split("\n", 1)[0] for s in doc.page_starts] == \
        ["==> a.py <==", "==> sub/b.py <==", "==> sub/keep.log <=="]
    i = doc.text.index("planted fact")
    assert doc.source_of(i) == "sub/b.py:2" and doc.page_of(i) == 1
    assert doc.source_of(0) == "a.py:0"  # the header line itself
    assert load_document(str(tree), max_file_bytes=4096).sha256 == doc.sha256
    assert doc.quoted("It does return 'planted fact'.") == [{"source": "sub/b.py:2", "quote": "return 'planted fact'"}]


def test_a_directory_with_nothing_to_read(tmp_path):
    (tmp_path / "img.png").write_bytes(b"\x89PNG")
    with pytest.raises(DocumentError, match=r"no text files to index in this directory \(skipped: 1 binary\)"):
        load_document(str(tmp_path))
