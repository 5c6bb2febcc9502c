"""Documents: read a file (text or PDF) or stdin into one string, remembering where pages start.

Every later stage works on `Document.text`; `page_starts` maps a character offset back to its
page, and core/prompt.py maps every document token to its character offset, so an answer can
later cite the pages (or lines) it attended to.
"""
from __future__ import annotations

import bisect
import hashlib
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path


class DocumentError(Exception):
    """A document that cannot be read; the message is shown to the user as is."""


@dataclass
class Document:
    text: str
    name: str                      # what the user gave: a path, or "-" for stdin
    kind: str                      # "text" | "pdf"
    page_starts: list[int] = field(default_factory=lambda: [0])  # char offset where each page begins

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def page_of(self, char_offset: int) -> int:
        """0-based page holding this character."""
        return max(0, bisect.bisect_right(self.page_starts, char_offset) - 1)

    def line_of(self, char_offset: int) -> int:
        """1-based line holding this character."""
        return self.text.count("\n", 0, char_offset) + 1


PAGE_SEPARATOR = "\n\n"


def load_document(source: str, stdin=None) -> Document:
    """Read `source`: a path to a text or PDF file, or "-" for standard input."""
    if source == "-":
        data = (stdin or sys.stdin.buffer).read()
        return _from_bytes(data, "-")
    path = Path(source)
    if not path.exists():
        raise DocumentError(f"no such file: {source}")
    if path.is_dir():
        raise DocumentError(f"{source} is a directory; give a file")
    data = path.read_bytes()
    return _from_bytes(data, source)


def _from_bytes(data: bytes, name: str) -> Document:
    if data.startswith(b"%PDF-"):
        return _pdf(data, name)
    if not data.strip():
        raise DocumentError(f"{name} is empty")
    if b"\x00" in data[:8192]:
        raise DocumentError(f"{name} looks like a binary file, not text or PDF")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DocumentError(f"{name} is not UTF-8 text (bad byte at offset {e.start})") from None
    return Document(text=text.replace("\r\n", "\n"), name=name, kind="text")


def _pdf(data: bytes, name: str) -> Document:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise DocumentError(f"{name} is an encrypted PDF; decrypt it first")
        pages = [page.extract_text() or "" for page in reader.pages]
    except DocumentError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError) as e:
        raise DocumentError(f"{name} is not a readable PDF ({e})") from None
    starts, parts, offset = [], [], 0
    for i, page in enumerate(pages):
        page = page.strip()
        starts.append(offset)
        parts.append(page)
        offset += len(page) + len(PAGE_SEPARATOR)
    text = PAGE_SEPARATOR.join(parts)
    if not text.strip():
        raise DocumentError(f"{name} has no text layer (a scanned PDF?); run OCR on it first")
    return Document(text=text, name=name, kind="pdf", page_starts=starts)
