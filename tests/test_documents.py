"""Reading documents: text, PDF pages, stdin, and one clear error for each bad input."""
import io

import pytest

from conftest import SAMPLES
from core.documents import DocumentError, load_document


def test_text_and_stdin_agree(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes("caf\u00e9\r\nline two\n".encode())
    doc = load_document(str(p))
    assert doc.text == "caf\u00e9\nline two\n" and doc.kind == "text" and doc.page_starts == [0]
    same = load_document("-", stdin=io.BytesIO(p.read_bytes()))
    assert same.sha256 == doc.sha256
    assert doc.line_of(doc.text.index("two")) == 2


def test_pdf_pages():
    doc = load_document(str(SAMPLES / "R-intro.pdf"))
    assert doc.kind == "pdf" and len(doc.page_starts) == 113
    i = doc.text.index("Preface")
    assert 0 < doc.page_of(i) < 10
    assert doc.page_of(len(doc.text) - 1) == 112


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (b"   \n\n", "is empty"),
    (b"\x00\x01\x02binary\x00", "binary"),
    (b"caf\xe9 au lait", "not UTF-8"),
    (b"%PDF-1.4 this is not really a pdf", "not a readable PDF"),
])
def test_bad_inputs(tmp_path, content, message):
    p = tmp_path / "bad"
    p.write_bytes(content)
    with pytest.raises(DocumentError, match=message):
        load_document(str(p))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DocumentError, match="no such file"):
        load_document(str(tmp_path / "nope.txt"))
    with pytest.raises(DocumentError, match="directory"):
        load_document(str(tmp_path))


def test_pdf_without_text_layer(tmp_path):
    from pypdf import PdfWriter

    w = PdfWriter()
    w.add_blank_page(width=200, height=200)
    p = tmp_path / "scan.pdf"
    with open(p, "wb") as f:
        w.write(f)
    with pytest.raises(DocumentError, match="no text layer"):
        load_document(str(p))


def test_encrypted_pdf(tmp_path):
    from pypdf import PdfReader, PdfWriter

    w = PdfWriter()
    w.append(PdfReader(str(SAMPLES / "R-intro.pdf")), pages=(0, 1))
    w.encrypt("secret")
    p = tmp_path / "locked.pdf"
    with open(p, "wb") as f:
        w.write(f)
    with pytest.raises(DocumentError, match="encrypted"):
        load_document(str(p))
