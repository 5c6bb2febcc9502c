"""Documents: read a file (text or PDF) or stdin into one string, remembering where pages start.

Every later stage works on `Document.text`; `page_starts` maps a character offset back to its
page, and core/prompt.py maps every document token to its character offset, so an answer can
later cite the pages (or lines) it attended to. A directory is read by core/codebase.py into a
Document of kind "code", whose "pages" are its files (`files` names them).
"""
from __future__ import annotations

import bisect
import hashlib
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path


from .errors import DocumentError  # noqa: E402,F401  (raised here; importable from here as before)


@dataclass
class Document:
    text: str
    name: str                      # what the user gave: a path, or "-" for stdin
    kind: str                      # "text" | "pdf" | "code"
    page_starts: list[int] = field(default_factory=lambda: [0])  # char offset where each page (file) begins
    files: list[str] = field(default_factory=list)   # code: the relative path of each "page"
    skipped: dict[str, int] = field(default_factory=dict)  # code: files left out, by reason

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def page_of(self, char_offset: int) -> int:
        """0-based page holding this character."""
        return max(0, bisect.bisect_right(self.page_starts, char_offset) - 1)

    def line_of(self, char_offset: int) -> int:
        """1-based line holding this character."""
        return self.text.count("\n", 0, char_offset) + 1

    def source_of(self, char_offset: int) -> str:
        """Where a character comes from: "path:line" (code), "page N" (PDF) or "line N"."""
        return describe_source(self.kind, self.text, self.page_starts, self.files, char_offset)

    def quoted(self, answer: str, min_chars: int = 12, top: int = 3) -> list[dict]:
        """Where the answer repeats the document word for word: up to `top` places, longest first,
        as {"source": "path:line" | "page N" | "line N", "quote": ...}. A check the reader can
        follow, not attribution: a paraphrase has no quote and the list is then empty."""
        from difflib import SequenceMatcher

        same_len = len(self.text.lower()) == len(self.text) and len(answer.lower()) == len(answer)
        hay, needle = (self.text.lower(), answer.lower()) if same_len else (self.text, answer)
        sm = SequenceMatcher(None, hay, needle, autojunk=False)
        found, spans = [], [(0, len(needle))]
        while spans and len(found) < top:
            spans.sort(key=lambda s: s[1] - s[0])
            lo, hi = spans.pop()
            m = sm.find_longest_match(0, len(hay), lo, hi)
            quote = answer[m.b:m.b + m.size].strip()
            if len(quote) < min_chars:
                continue
            found.append({"source": self.source_of(m.a), "quote": quote})
            spans += [(lo, m.b), (m.b + m.size, hi)]
        return found


def describe_source(kind: str, text: str, page_starts: list[int], files: list[str], char_offset: int) -> str:
    """"path:line" for code (line 0 is the file's header), "page N" (1-based) for PDFs, else "line N"."""
    page = max(0, bisect.bisect_right(page_starts, char_offset) - 1)
    if kind == "code" and files:
        return f"{files[page]}:{text.count(chr(10), page_starts[page], char_offset)}"
    if kind == "pdf":
        return f"page {page + 1}"
    return f"line {text.count(chr(10), 0, char_offset) + 1}"


PAGE_SEPARATOR = "\n\n"


def load_document(source: str, stdin=None, include=(), exclude=(), max_file_bytes: int | None = None) -> Document:
    """Read `source`: a text or PDF file, a directory (a codebase: see core/codebase.py; the other
    arguments select its files), or "-" for standard input."""
    if source == "-":
        data = (stdin or sys.stdin.buffer).read()
        return _from_bytes(data, "-")
    path = Path(source)
    if not path.exists():
        raise DocumentError(f"no such file: {source}")
    if path.is_dir():
        from .codebase import MAX_FILE_BYTES, load_directory

        return load_directory(source, include, exclude, max_file_bytes or MAX_FILE_BYTES)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DocumentError(f"cannot read {source}: {e.strerror}") from None
    return _from_bytes(data, source)


def _from_bytes(data: bytes, name: str) -> Document:
    if data.startswith(b"%PDF-"):
        return _pdf(data, name)
    if b"\x00" in data[:8192]:
        raise DocumentError(f"{name} looks like a binary file, not text or PDF")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DocumentError(f"{name} is not UTF-8 text (bad byte at offset {e.start})") from None
    if not text.strip():  # as text: Unicode whitespace (\x1c-\x1f too, which bytes.strip keeps), a lone BOM
        raise DocumentError(f"{name} is empty")
    return Document(text=text.replace("\r\n", "\n"), name=name, kind="text")


def _pdf(data: bytes, name: str) -> Document:
    import logging

    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings would add lines to our one-line errors

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise DocumentError(f"{name} is an encrypted PDF; decrypt it first")
        pages = [page.extract_text() or "" for page in reader.pages]
    except DocumentError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError) as e:
        raise DocumentError(f"{name} is not a readable PDF ({e})") from None
    except RecursionError:
        raise DocumentError(f"{name} is not a readable PDF (nested too deeply)") from None
    except Exception as e:  # noqa: BLE001 - pypdf raises many kinds on damaged files; each is one line
        raise DocumentError(f"{name} is not a readable PDF ({type(e).__name__}: {e})") from None
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
