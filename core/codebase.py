"""Codebases: walk a directory into one Document, each file introduced by a header line.

    ==> pkg/decoder.py <==
    ...the file's text...

Which files: everything under the directory, in sorted path order (so the same tree always gives
the same text, and the same cache entry), except what .gitignore files exclude (each .gitignore
applies below its own directory, deeper ones win), hidden and vendored directories (.git,
node_modules, vendor, __pycache__, .venv...), hidden files (.env may hold secrets), lock files,
binaries (a NUL byte, or not UTF-8) and files larger than `max_file_bytes`.

`--exclude` globs (gitignore syntax, relative to the directory) drop more files. `--include` globs
keep only the files they match, and a file they match is taken even if a default rule above
(.gitignore, hidden, lock, size) would skip it; a skipped directory is entered when an include
glob names a path inside it (`--include 'vendor/lib/**'`). Binaries are never taken.

The Document's `files` lists the relative paths and `page_starts` the offset of each file's header,
so the store's per-token `sources` (char offset, page) read as (char offset, file index) here, and
a token's line in its file is the number of newlines between its file's header and itself.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .documents import Document, DocumentError

HEADER = "==> {} <=="
VENDORED_DIRS = {"node_modules", "vendor", "third_party", "__pycache__", "site-packages", "venv", "env",
                 "dist", "build", "target", "bower_components", "Pods"}
LOCK_FILES = {"package-lock.json", "yarn.lock", "pnpm-lock.yaml", "Cargo.lock", "poetry.lock", "Pipfile.lock",
              "composer.lock", "Gemfile.lock", "go.sum", "uv.lock", "pdm.lock", "flake.lock", "bun.lockb"}
BINARY_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".ico", ".bmp", ".pdf", ".zip", ".gz", ".tgz",
                   ".bz2", ".xz", ".7z", ".jar", ".whl", ".so", ".dylib", ".dll", ".exe", ".o", ".a", ".pyc",
                   ".class", ".npy", ".npz", ".pt", ".bin", ".safetensors", ".gguf", ".woff", ".woff2", ".ttf",
                   ".mp3", ".mp4", ".mov", ".sqlite", ".db"}
MAX_FILE_BYTES = 256 * 1024


@dataclass
class Walk:
    files: list[tuple[str, Path]] = field(default_factory=list)  # (relative posix path, path), sorted
    skipped: dict[str, int] = field(default_factory=dict)         # reason -> how many files


def _spec(lines):
    import pathspec

    return pathspec.GitIgnoreSpec.from_lines(lines)


class _Ignores:
    """The .gitignore files met so far: (directory relative to the root, spec)."""

    def __init__(self):
        self.specs: list[tuple[str, object]] = []

    def add(self, rel_dir: str, gitignore: Path) -> None:
        try:
            lines = gitignore.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return
        self.specs.append((rel_dir, _spec(lines)))

    def ignored(self, rel: str, is_dir: bool) -> bool:
        verdict = False
        for base, spec in self.specs:  # shallow to deep: the deepest file with an opinion wins
            if base and not rel.startswith(base + "/"):
                continue
            sub = rel[len(base) + 1:] if base else rel
            r = spec.check_file(sub + "/" if is_dir else sub)
            if r.include is not None:
                verdict = r.include
        return verdict


def _literal_prefix(glob: str) -> str:
    cut = min([i for i, c in enumerate(glob) if c in "*?[!"] + [len(glob)])
    return glob[:cut].lstrip("/")


def _inside(path: Path, root: Path) -> bool:
    """Whether a link's target lies under `root` (links to outside are never read)."""
    try:
        path.resolve(strict=True).relative_to(root.resolve())
        return True
    except (OSError, RuntimeError, ValueError):  # broken, a loop, or elsewhere
        return False


def walk(root: Path, include=(), exclude=(), max_file_bytes: int = MAX_FILE_BYTES) -> Walk:
    """The files of a codebase to index, and how many were skipped for each reason."""
    root = Path(root)
    inc = _spec(include) if include else None
    exc = _spec(exclude) if exclude else None
    inc_prefixes = [_literal_prefix(g) for g in include]
    ignores = _Ignores()
    out = Walk()

    def skip(reason: str) -> None:
        out.skipped[reason] = out.skipped.get(reason, 0) + 1

    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir
        if ".gitignore" in filenames:
            ignores.add(rel_dir, Path(dirpath) / ".gitignore")
        keep = []
        for d in sorted(dirnames):
            rel = f"{rel_dir}/{d}" if rel_dir else d
            default_skip = d.startswith(".") or d in VENDORED_DIRS or d.endswith(".egg-info") \
                or ignores.ignored(rel, True)
            named = any(p.startswith(rel + "/") for p in inc_prefixes)
            if (default_skip and not named) or (exc is not None and exc.match_file(rel + "/")):
                continue
            keep.append(d)
        dirnames[:] = keep  # os.walk descends only into these, in this (sorted) order
        for name in sorted(filenames):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            path = Path(dirpath) / name
            if path.is_symlink() and not _inside(path, root):
                skip("link out of the directory")
                continue
            rel = rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")  # a non-UTF-8 name, shown
            if exc is not None and exc.match_file(rel):
                skip("excluded")
                continue
            if not path.is_file():  # a broken link, a socket...
                continue
            if Path(name).suffix.lower() in BINARY_SUFFIXES:
                skip("binary")
                continue
            if inc is not None:
                if not inc.match_file(rel):
                    skip("not included")
                    continue
            elif name.startswith("."):
                skip("hidden")
                continue
            elif name in LOCK_FILES or name.endswith(".lock") or name.endswith((".min.js", ".min.css", ".map")):
                skip("lock or generated")
                continue
            elif ignores.ignored(rel, False):
                skip("gitignored")
                continue
            elif path.stat().st_size > max_file_bytes:
                skip("too large")
                continue
            out.files.append((rel, path))
    out.files.sort(key=lambda f: f[0])
    return out


def _read_text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        return None
    try:
        return data.decode("utf-8-sig").replace("\r\n", "\n")
    except UnicodeDecodeError:
        return None


def load_directory(root: str, include=(), exclude=(), max_file_bytes: int = MAX_FILE_BYTES) -> Document:
    """One Document with every indexable file of the directory `root`, a header line before each."""
    w = walk(Path(root), include, exclude, max_file_bytes)
    parts, starts, files, offset = [], [], [], 0
    for rel, path in w.files:
        text = _read_text(path)
        if text is None:
            w.skipped["binary"] = w.skipped.get("binary", 0) + 1
            continue
        if text and not text.endswith("\n"):
            text += "\n"
        block = HEADER.format(rel) + "\n" + text + "\n"
        starts.append(offset)
        files.append(rel)
        parts.append(block)
        offset += len(block)
    if not files:
        why = ", ".join(f"{n} {r}" for r, n in sorted(w.skipped.items())) or "it is empty"
        raise DocumentError(f"{root}: no text files to index in this directory (skipped: {why})")
    return Document(text="".join(parts), name=root, kind="code", page_starts=starts, files=files,
                    skipped=dict(w.skipped))
