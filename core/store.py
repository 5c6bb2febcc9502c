"""The persisted document cache: one directory per (document text, model, KV settings).

Layout under the data directory ($RA_HOME, default the platform's user cache dir):

  store/entries/<key>/             one prefilled document; <key> = sha256 of `StoreKey` (hex, 32)
    manifest.json                  format version, key fields, shapes, source document, timings (core/manifest.py)
    tokens.npy     int32 [P]       the cached prefix tokens (chat template head + document + ...)
    sources.npy    int32 [P, 2]    per token: char offset in text.txt, page (0-based); -1 = template
    text.txt                       the extracted document text (UTF-8), what `sources` points into
    keys.npy       fp16 [L, KVH, P, D]   post-RoPE keys of every prefix token (pre-RoPE for a document
                                         past the model's window: manifest "positions", core/longctx.py)
    values.npy     fp16 [L, KVH, P, D]   values
    queries.npy    fp16 [L, Hq, Q, D]    a strided sample of prefill queries (for query-aware indexes;
                                         rotated to the global distance for a long document)
    query_positions.npy int32 [Q]
    indexes/<kind>[.vN]-s<sink>-r<recent>/  index over the offloaded range (see core/index.py)
  store/tmp/       entries and indexes being written; renamed into place only when complete
  store/locks/     one file lock per key, so two processes never build the same entry twice

Why .npy: a documented header plus raw little-endian data, so `np.load(mmap_mode=...)` maps it
without reading it (a 128K-token Llama-8B entry is 16 GiB) and nothing is ever unpickled
(`allow_pickle=False` everywhere). [L, KVH, P, D] keeps each head's keys contiguous, so the rows
a query retrieves are small reads from one region.

The static / offloaded split is not baked into the entry: the static set is the first `sink` and
last `recent` rows of each head, read at load time, and indexes are kept per split.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from .manifest import Manifest

FORMAT_VERSION = 1


@dataclass(frozen=True)
class StoreKey:
    """Everything that changes the cached tokens or KV values."""

    text_sha256: str
    model: str          # model identity (core/model.py), e.g. "gguf:<sha256>"
    prompt: int         # prompt format version (core/prompt.py)
    compute_dtype: str  # dtype the prefill ran in
    kv_dtype: str       # dtype the KV is stored in
    positions: str = "exact"  # how documents past the model's window are prefilled (core/longctx.py SCHEME)
    format: int = FORMAT_VERSION

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """The data directory's document cache."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.entries = self.root / "entries"
        self.tmp = self.root / "tmp"
        self.locks = self.root / "locks"
        for d in (self.entries, self.tmp, self.locks):
            d.mkdir(parents=True, exist_ok=True)
        self._clean_stale_tmp()

    def _clean_stale_tmp(self) -> None:
        # a temp dir is named <pid>-<uuid>; a dead pid means a crashed writer left it behind
        for d in self.tmp.iterdir():
            pid = d.name.split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)

    def lock(self, name: str) -> FileLock:
        """The store's one lock helper: an inter-process file lock named `name` (an entry's digest
        while it is built or removed, `<digest>.index` while one of its indexes is built)."""
        return FileLock(str(self.locks / f"{name}.lock"))

    def path(self, key: StoreKey) -> Path:
        return self.entries / key.digest

    def open(self, key: StoreKey) -> "Entry | None":
        p = self.path(key)
        return Entry(p) if (p / "manifest.json").exists() else None

    @contextmanager
    def staging(self):
        """A fresh temp dir; the caller renames it into place. Removed on any error."""
        d = self.tmp / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        d.mkdir()
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def commit(self, staged: Path, final: Path) -> None:
        """Atomically publish a complete temp dir (same filesystem: rename is atomic)."""
        _fsync_tree(staged)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staged, final)
        except OSError:
            if not final.exists():
                raise  # else another process published the same content first: keep theirs

    def list(self) -> list["Entry"]:
        return [Entry(p) for p in sorted(self.entries.iterdir()) if (p / "manifest.json").exists()]

    def infos(self) -> list["EntryInfo"]:
        """Every complete entry, least recently used first, read from manifests only (opening an
        Entry would count as a use)."""
        out = [EntryInfo.read(p) for p in self.entries.iterdir() if (p / "manifest.json").exists()]
        return sorted(out, key=lambda e: (e.last_used, e.digest))

    def find(self, prefix: str) -> "EntryInfo":
        """The one entry whose key starts with `prefix` (KeyError with a message otherwise)."""
        hits = [e for e in self.infos() if e.digest.startswith(prefix)] if prefix else []
        if len(hits) != 1:
            raise KeyError(f"{'no' if not hits else 'more than one'} cache entry matches {prefix!r}"
                           + ("; see `ra cache list`" if not hits else "; give more characters"))
        return hits[0]

    def remove(self, digest: str) -> None:
        """Delete an entry: renamed out of `entries/` first, so no reader ever sees half of one.
        A process that has it open keeps its memory maps until it exits."""
        src = self.entries / digest
        with self.lock(digest):
            if not src.exists():
                return
            trash = self.tmp / f"{os.getpid()}-rm-{uuid.uuid4().hex[:8]}"
            os.rename(src, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def gc(self, max_bytes: int, dry_run: bool = False) -> list["EntryInfo"]:
        """Evict least recently used entries until the store holds at most `max_bytes`."""
        infos = self.infos()
        total = sum(e.size_bytes for e in infos)
        evicted = []
        for e in infos:
            if total <= max_bytes:
                break
            if not dry_run:
                self.remove(e.digest)
            evicted.append(e)
            total -= e.size_bytes
        return evicted


@dataclass
class EntryInfo:
    """What `ra cache` shows about an entry, without opening its arrays."""

    path: Path
    manifest: Manifest
    size_bytes: int
    last_used: float  # manifest.json's mtime, touched each time the entry is opened

    @classmethod
    def read(cls, path: Path) -> "EntryInfo":
        m = path / Manifest.FILE
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return cls(path, Manifest.read(path), size, m.stat().st_mtime)

    @property
    def digest(self) -> str:
        return self.path.name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _RowFile:
    """A preallocated .npy file [L, KVH, N, D] written with pwrite: the rows go to the page cache
    and the disk, not into this process's resident memory (a memory map's written pages would
    count there until the file is closed). `array` is a shared memory map of the same file, for
    readers during the prefill (core/longctx.py reads the far keys back); Linux keeps the two
    coherent."""

    def __init__(self, path: Path, dtype, shape):
        self.array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        self.fd = os.open(path, os.O_WRONLY)

    def write(self, layer: int, start: int, rows: np.ndarray) -> None:
        """rows: [KVH, T, D] for tokens start..start+T of `layer`."""
        a = self.array
        _, KVH, N, D = a.shape
        rows = np.ascontiguousarray(rows, a.dtype)
        for h in range(KVH):
            buf = rows[h].data.cast("B")
            at = a.offset + ((layer * KVH + h) * N + start) * D * a.itemsize
            while buf:  # pwrite may write less than asked
                done = os.pwrite(self.fd, buf, at)
                buf, at = buf[done:], at + done

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


class EntryWriter:
    """Fills a staging directory while the prefill runs, chunk by chunk (bounded memory)."""

    def __init__(self, d: Path, n_tokens: int, n_layers: int, kv_heads: int, q_heads: int, head_dim: int,
                 kv_dtype: str, query_positions: np.ndarray):
        self.dir = d
        shape = (n_layers, kv_heads, n_tokens, head_dim)
        self._k = _RowFile(d / "keys.npy", kv_dtype, shape)
        self._v = _RowFile(d / "values.npy", kv_dtype, shape)
        self.keys, self.values = self._k.array, self._v.array  # read-only use while prefilling
        self.query_positions = query_positions.astype(np.int32)
        self.queries = np.lib.format.open_memmap(
            d / "queries.npy", mode="w+", dtype=kv_dtype, shape=(n_layers, q_heads, len(query_positions), head_dim))

    def write_kv(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """k, v: [KVH, T, D] for tokens start..start+T"""
        self._k.write(layer, start, k)
        self._v.write(layer, start, v)

    def write_queries(self, layer: int, slot: slice, q: np.ndarray) -> None:
        """q: [Hq, n, D] for query_positions[slot]"""
        self.queries[layer, :, slot] = q

    def finish(self, manifest: Manifest, tokens: np.ndarray, sources: np.ndarray, text: str) -> None:
        self._k.close()
        self._v.close()
        self.queries.flush()
        del self.keys, self.values, self.queries, self._k, self._v
        np.save(self.dir / "tokens.npy", tokens.astype(np.int32), allow_pickle=False)
        np.save(self.dir / "sources.npy", sources.astype(np.int32), allow_pickle=False)
        np.save(self.dir / "query_positions.npy", self.query_positions, allow_pickle=False)
        (self.dir / "text.txt").write_text(text, encoding="utf-8")
        manifest.write(self.dir)  # last: an entry without a manifest is never opened


class Entry:
    """An opened cache entry. Arrays are memory-mapped copy-on-write: nothing is read until used,
    and torch can wrap them without copying (writes, if any, never reach the file)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.manifest = Manifest.read(self.path)
        self.tokens = self._load("tokens.npy")
        self.keys = self._load("keys.npy")      # [L, KVH, P, D]
        self.values = self._load("values.npy")
        self.n_layers, self.kv_heads, self.n_tokens, self.head_dim = self.keys.shape
        try:
            os.utime(self.path / "manifest.json")  # "last used", for LRU eviction
        except OSError:
            pass

    @property
    def remapped(self) -> bool:
        """A document past the model's window: keys are stored pre-RoPE (core/longctx.py)."""
        return self.manifest.remapped

    def _load(self, name: str):
        return np.load(self.path / name, mmap_mode="c", allow_pickle=False)

    @property
    def sources(self) -> np.ndarray:
        return self._load("sources.npy")

    @property
    def text(self) -> str:
        return (self.path / "text.txt").read_text(encoding="utf-8")

    def split(self, sink: int, recent: int) -> tuple[int, int]:
        """(end of the sink range, start of the recent range); offloaded = [a, b)."""
        a = min(sink, self.n_tokens)
        b = max(a, self.n_tokens - recent)
        return a, b

    def build_queries(self, layer: int) -> np.ndarray:
        """The sampled prefill queries of one layer grouped by KV head: [KVH, G * Q, D]."""
        q = self._load("queries.npy")[layer]  # [Hq, Q, D]
        return q.reshape(self.kv_heads, -1, q.shape[-1])

    def index_dir(self, kind: str, sink: int, recent: int) -> Path:
        from .index import kind as index_kind

        return self.path / "indexes" / f"{kind}{index_kind(kind).format}-s{sink}-r{recent}"

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def ensure_index(self, store: Store, kind: str, sink: int, recent: int, progress=None) -> Path:
        """Build the index for this split if it is missing (atomically, under the entry's index lock)."""
        from .index import kind as index_kind

        final = self.index_dir(kind, sink, recent)
        if (final / "index.json").exists():
            return final
        with store.lock(f"{self.path.name}.index"):
            if (final / "index.json").exists():
                return final
            with store.staging() as tmp:
                a, b = self.split(sink, recent)
                index_kind(kind).build(lambda layer: self.keys[layer, :, a:b], lambda layer: self.values[layer, :, a:b],
                                       self.build_queries, self.n_layers, tmp, progress)
                store.commit(tmp, final)
        return final

