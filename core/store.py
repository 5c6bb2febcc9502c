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
      checksums.json               sizes and xxh3 checksums of the index's files (core/checksum.py)
  store/tmp/       entries and indexes being written; renamed into place only when complete
    <key>.partial/                 an interrupted prefill kept for resume: the files above as far as
                                   they got, progress.json (what is done, its checksums) and
                                   state-<done>-<name>.npy (what the prefill resumes from: every
                                   token's hidden state, or each layer's local window)
  store/locks/     <key>.lock: one builder per entry (two processes never prefill the same document
                   twice); <key>.lease: a shared lock held by every process answering from the
                   entry, so `ra cache rm/gc/clear` skip an entry in use instead of pulling it away

Integrity: the manifest records every file's size and checksums (per layer for keys, values and
queries) and its own checksum. Opening an entry checks every size and the small files always, and
everything when the entry is at most `Store.verify_bytes` (1 GiB: about one read of it, benchmarks/store_cost.py);
`ra cache verify` checks everything. A damaged entry is never answered from: it is rebuilt (or
refused with --no-rebuild).

Why .npy: a documented header plus raw little-endian data, so
`np.load(path, mmap_mode="c", allow_pickle=False)` maps it without reading it (a 128K-token Llama-8B entry is 16 GiB) and nothing is ever unpickled
(`allow_pickle=False` everywhere). [L, KVH, P, D] keeps each head's keys contiguous, so the rows
a query retrieves are small reads from one region.

The static / offloaded split is not baked into the entry: the static set is the first `sink` and
last `recent` rows of each head, read at load time, and indexes are kept per split.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from . import checksum
from .errors import StoreError
from .manifest import Manifest

FORMAT_VERSION = 2          # 2: checksums in the manifest (format 1 entries have another key: rebuilt)
LAYERED = ("keys.npy", "values.npy", "queries.npy")  # [L, ...] arrays, checksummed per layer


class DamagedEntry(StoreError):
    """An entry (or one of its indexes) whose files do not match their recorded sizes or checksums."""

    def __init__(self, where: str, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__(f"{where} is damaged: " + "; ".join(f"{f}: {why}" for f, why in problems[:3])
                         + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))


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


def write_durably(path: Path, write) -> None:
    """Write a file atomically and durably: write(f) into a hidden temp file beside it, fsync,
    rename over `path`. A reader (or a rerun after a crash) sees the old file or the new one."""
    tmp = path.parent / f".{path.name}.tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


class Lease:
    """A shared lock on an entry's lease file, held while a process answers from the entry.
    Released by `close` or when the process ends (the kernel drops flock locks with the file)."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_SH)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    __del__ = close


class Store:
    """The data directory's document cache."""

    def __init__(self, root: Path, verify_bytes: int = 1 << 30):
        """verify_bytes: entries up to this size are checked byte for byte each time they are opened."""
        self.root = Path(root)
        self.verify_bytes = verify_bytes
        self.entries = self.root / "entries"
        self.tmp = self.root / "tmp"
        self.locks = self.root / "locks"
        try:
            for d in (self.root.parent, self.root, self.entries, self.tmp, self.locks):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)  # private to the user
        except OSError as e:
            raise StoreError(f"cannot create the data directory {self.root.parent}: {e.strerror}; "
                             f"set RA_HOME to a writable directory") from None
        self._clean_stale_tmp()

    def check_writable(self) -> None:
        """A clear error now, rather than a failed write after a long prefill."""
        probe = self.tmp / f".probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise StoreError(f"the data directory {self.root.parent} is not writable ({e.strerror}); "
                             f"set RA_HOME to a writable directory") from None

    def _clean_stale_tmp(self) -> None:
        # a temp dir is named <pid>-<uuid>; a dead pid means a crashed writer left it behind
        # (<key>.partial directories are kept: the next prefill of that document resumes from them)
        try:
            leftovers = list(self.tmp.iterdir())
        except OSError:
            return
        for d in leftovers:
            pid = d.name.split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)

    def lock(self, name: str) -> FileLock:
        """The store's one lock helper: an inter-process file lock named `name` (an entry's digest
        while it is built or removed, `<digest>.index` while one of its indexes is built)."""
        return FileLock(str(self.locks / f"{name}.lock"))

    @contextmanager
    def locked(self, name: str, on_wait=None):
        """Hold lock `name`; if another process holds it, call on_wait() once, then wait for it."""
        from filelock import Timeout

        lock = self.lock(name)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if on_wait:
                on_wait()
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def lease(self, digest: str) -> Lease:
        """Hold the entry `digest` against removal while answering from it (see `remove`)."""
        return Lease(self.locks / f"{digest}.lease")

    def path(self, key: StoreKey) -> Path:
        return self.entries / key.digest

    def partial(self, key: StoreKey) -> Path:
        """Where an interrupted prefill of `key` is kept for resume (the caller holds the entry lock)."""
        return self.tmp / f"{key.digest}.partial"

    def partials(self) -> list[Path]:
        return sorted(self.tmp.glob("*.partial"))

    def open(self, key: StoreKey) -> "Entry | None":
        """The complete entry of `key`, checked (DamagedEntry if it does not match its manifest), or None."""
        p = self.path(key)
        if not (p / "manifest.json").exists():
            return None
        return Entry(p, verify_bytes=self.verify_bytes)

    @contextmanager
    def staging(self):
        """A fresh temp dir; the caller renames it into place. Removed on any error."""
        d = self.tmp / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        d.mkdir()
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def commit(self, staged: Path, final: Path, marker: str = "manifest.json") -> None:
        """Atomically publish a complete temp dir (same filesystem: rename is atomic). If `final`
        exists with its `marker` file, another process published the same content first: theirs
        is kept. A `final` without it (left half-removed, or damaged) is replaced. The parent must
        exist: an index is never published into an entry that was removed meanwhile."""
        _fsync_tree(staged)
        try:
            os.rename(staged, final)
        except OSError:
            if (final / marker).exists() or not final.exists():
                if not final.exists():
                    raise
                return
            trash = self.tmp / f"{os.getpid()}-rm-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(staged, final)

    def list(self) -> list["Entry"]:
        return [Entry(p) for p in sorted(self.entries.iterdir()) if (p / "manifest.json").exists()]

    def infos(self) -> list["EntryInfo"]:
        """Every complete entry, least recently used first, read from manifests only (opening an
        Entry would count as a use). An entry whose manifest cannot be read is listed as damaged."""
        out = []
        for p in self.entries.iterdir():
            try:
                out.append(EntryInfo.read(p))
            except OSError:  # removed meanwhile by another process
                continue
        return sorted(out, key=lambda e: (e.last_used, e.digest))

    def find(self, prefix: str) -> "EntryInfo":
        """The one entry whose key starts with `prefix` (KeyError with a message otherwise)."""
        hits = [e for e in self.infos() if e.digest.startswith(prefix)] if prefix else []
        if len(hits) != 1:
            raise KeyError(f"{'no' if not hits else 'more than one'} cache entry matches {prefix!r}"
                           + ("; see `ra cache list`" if not hits else "; give more characters"))
        return hits[0]

    def remove(self, digest: str, force: bool = False) -> bool:
        """Delete an entry: renamed out of `entries/` first, so no reader ever sees half of one.
        An entry a process is answering from (its lease is held) is left alone and False returned,
        unless `force` (a damaged entry being rebuilt)."""
        with self.lock(digest):
            return self.discard(digest, force)

    def discard(self, digest: str, force: bool = False) -> bool:
        """`remove` for a caller that holds the entry's lock."""
        src = self.entries / digest
        if not src.exists():
            return True
        fd = os.open(self.locks / f"{digest}.lease", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if not force:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False
            trash = self.tmp / f"{os.getpid()}-rm-{uuid.uuid4().hex[:8]}"
            os.rename(src, trash)
        finally:
            os.close(fd)
        shutil.rmtree(trash, ignore_errors=True)
        for p in self.tmp.glob(f"{digest}.*.partial"):  # interrupted index builds of the removed entry
            shutil.rmtree(p, ignore_errors=True)
        return True

    def remove_index(self, index_dir: Path) -> None:
        """Move a damaged index directory out of its entry (it is then rebuilt)."""
        trash = self.tmp / f"{os.getpid()}-rm-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(index_dir, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def gc(self, max_bytes: int, dry_run: bool = False) -> tuple[list["EntryInfo"], list["EntryInfo"]]:
        """Evict least recently used entries until the store holds at most `max_bytes`.
        -> (evicted, skipped because a process is answering from them)."""
        infos = self.infos()
        total = sum(e.size_bytes for e in infos)
        evicted, skipped = [], []
        for e in infos:
            if total <= max_bytes:
                break
            if not dry_run and not self.remove(e.digest):
                skipped.append(e)
                continue
            evicted.append(e)
            total -= e.size_bytes
        return evicted, skipped


@dataclass
class EntryInfo:
    """What `ra cache` shows about an entry, without opening its arrays. `manifest` is None (and
    `problem` says why) when the manifest itself cannot be read."""

    path: Path
    manifest: Manifest | None
    size_bytes: int
    last_used: float  # manifest.json's mtime, touched each time the entry is opened
    problem: str = ""

    @classmethod
    def read(cls, path: Path) -> "EntryInfo":
        """OSError if the entry disappears meanwhile (another process removed it)."""
        m = path / Manifest.FILE
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if not m.exists():
            return cls(path, None, size, path.stat().st_mtime, f"cache entry {path.name[:12]} has no manifest.json")
        try:
            return cls(path, Manifest.read(path), size, m.stat().st_mtime)
        except StoreError as e:
            return cls(path, None, size, m.stat().st_mtime, str(e))

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


def preallocate(path: Path) -> None:
    """Reserve a freshly created file's blocks now (a sparse file would fail later: a memory map's
    write to a full disk is a SIGBUS, not an error). ENOSPC here, before the prefill starts."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without fallocate: sparse
            raise
    finally:
        os.close(fd)


def open_rows(path: Path, dtype, shape, reuse: bool = False) -> np.memmap:
    """A writable .npy memory map: the existing file when `reuse` (a resumed prefill), else a new
    one with its blocks reserved."""
    if reuse and path.exists():
        a = np.lib.format.open_memmap(path, mode="r+")
        if a.shape == tuple(shape) and a.dtype == np.dtype(dtype):
            return a
        del a
    a = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    preallocate(path)
    return a


class _RowFile:
    """A preallocated .npy file [L, KVH, N, D] written with pwrite: the rows go to the page cache
    and the disk, not into this process's resident memory (a memory map's written pages would
    count there until the file is closed). `array` is a shared memory map of the same file, for
    readers during the prefill (core/longctx.py reads the far keys back); Linux keeps the two
    coherent."""

    def __init__(self, path: Path, dtype, shape, reuse: bool = False):
        self.array = open_rows(path, dtype, shape, reuse)
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

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None


PROGRESS = "progress.json"


class EntryWriter:
    """Fills a staging directory while the prefill runs, chunk by chunk (bounded memory).

    A layer-by-layer prefill can `checkpoint` after a layer (the layers done made durable and
    checksummed, every token's hidden state saved), a chunked one `checkpoint_tokens` after a
    chunk (the rows done, and each layer's local window), so `resumable` can pick the work up
    after a crash or an interrupt (core/engine.py)."""

    def __init__(self, d: Path, n_tokens: int, n_layers: int, kv_heads: int, q_heads: int, head_dim: int,
                 kv_dtype: str, query_positions: np.ndarray, resume: bool = False):
        self.dir = d
        shape = (n_layers, kv_heads, n_tokens, head_dim)
        self._k = _RowFile(d / "keys.npy", kv_dtype, shape, resume)
        self._v = _RowFile(d / "values.npy", kv_dtype, shape, resume)
        self.keys, self.values = self._k.array, self._v.array  # read-only use while prefilling
        self.query_positions = query_positions.astype(np.int32)
        self.queries = open_rows(d / "queries.npy", kv_dtype, (n_layers, q_heads, len(query_positions), head_dim),
                                 resume)
        self.kept = 0          # layers or tokens a checkpoint holds (0: nothing to resume from yet)
        self._chunks = {name: [] for name in LAYERED}   # per-layer checksums ("layers" checkpoints)
        self._segments = []                             # row-range checksums ("tokens" checkpoints)

    def write_kv(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """k, v: [KVH, T, D] for tokens start..start+T"""
        self._k.write(layer, start, k)
        self._v.write(layer, start, v)

    def write_queries(self, layer: int, slot: slice, q: np.ndarray) -> None:
        """q: [Hq, n, D] for query_positions[slot]"""
        self.queries[layer, :, slot] = q

    # ------------------------------------------------------------------ checkpoints (resume)
    #
    # progress.json: {"kind": "layers" | "tokens", "done": layers or tokens done, "meta": what must
    # match to resume, "state": {file: record} (arrays a resumed prefill starts from), "extra",
    # and the checksums of what is kept: "files" (per-layer chunks of keys/values/queries, for
    # "layers") or "segments" (rows [a, b) of every layer and head, for "tokens")}.

    def checkpoint(self, layers: int, hidden: np.ndarray, meta: dict) -> None:
        """Layer-by-layer prefill: layers [0, layers) are complete and `hidden` is every token's
        state after them. Made durable, so a later run resumes at layer `layers`."""
        self._sync()
        for name, chunks in self._chunks.items():  # checksums of the new layers only
            bounds = checksum.layer_bounds(self.dir / name)[:layers + 2]
            for a, b in list(zip(bounds, bounds[1:]))[len(chunks):]:
                chunks.append([a, b, checksum.digest(self.dir / name, a, b)])
        self._commit_progress("layers", layers, meta, {"hidden": hidden}, {},
                              files={n: c[:layers + 1] for n, c in self._chunks.items()})

    def checkpoint_tokens(self, end: int, state: dict, extra: dict, meta: dict) -> None:
        """Chunked prefill: tokens [0, end) of every layer are written (and the queries among
        them); `state` holds the arrays the next chunk starts from (e.g. each layer's local window)."""
        self._sync()
        q_end = int(np.searchsorted(self.query_positions, end))
        a, qa = (self._segments[-1][1], self._segments[-1][3]) if self._segments else (0, 0)
        self._segments.append([a, end, qa, q_end, checksum.rows_digest(self.keys, a, end),
                               checksum.rows_digest(self.values, a, end), checksum.rows_digest(self.queries, qa, q_end)])
        self._commit_progress("tokens", end, meta, state, extra, segments=self._segments)

    def _sync(self) -> None:
        self._k.sync()
        self._v.sync()
        self.queries.flush()

    def _commit_progress(self, kind: str, done: int, meta: dict, state: dict, extra: dict, **kept) -> None:
        records = {}
        for name, arr in state.items():
            fname = f"state-{done}-{name}.npy"
            write_durably(self.dir / fname, lambda f: np.save(f, arr, allow_pickle=False))
            records[fname] = checksum.record(self.dir / fname)
        progress = {"kind": kind, "done": done, "meta": meta, "state": records, "extra": extra, **kept}
        # the checkpoint exists from here on
        write_durably(self.dir / PROGRESS, lambda f: f.write(json.dumps(progress).encode()))
        for old in self.dir.glob("state-*.npy"):
            if old.name not in records:
                old.unlink()
        self.kept = done

    @staticmethod
    def resumable(d: Path, kind: str, meta: dict) -> tuple[int, dict, dict]:
        """(done, state arrays, extra) of an interrupted prefill of `kind` in `d`, trusting only
        what its checksums confirm; (0, {}, {}) when there is nothing to resume from."""
        try:
            p = json.loads((d / PROGRESS).read_text())
            if p["kind"] != kind or p["meta"] != meta or not isinstance(p["done"], int):
                return 0, {}, {}
            for fname, rec in p["state"].items():
                if checksum.check(d / fname, rec):
                    return 0, {}, {}
            if kind == "layers":
                for name, chunks in p["files"].items():
                    if name not in LAYERED or checksum.good_chunks(d / name, {"chunks": chunks}) < len(chunks):
                        return 0, {}, {}
            else:
                arrays = [np.load(d / n, mmap_mode="r", allow_pickle=False) for n in LAYERED]
                for a, b, qa, qb, hk, hv, hq in p["segments"]:
                    if [checksum.rows_digest(arrays[0], a, b), checksum.rows_digest(arrays[1], a, b),
                            checksum.rows_digest(arrays[2], qa, qb)] != [hk, hv, hq]:
                        return 0, {}, {}
            state = {f.split("-", 2)[2][:-4]: np.load(d / f, allow_pickle=False) for f in p["state"]}
            return p["done"], state, p["extra"]
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return 0, {}, {}

    def resume_from(self, progress_dir: Path) -> None:
        """Carry on the checksums of a checkpoint being resumed (so later checkpoints extend them)."""
        p = json.loads((progress_dir / PROGRESS).read_text())
        if p["kind"] == "layers":
            self._chunks = {n: list(c) for n, c in p["files"].items()}
        else:
            self._segments = [list(x) for x in p["segments"]]
        self.kept = p["done"]

    def finish(self, manifest: Manifest, tokens: np.ndarray, sources: np.ndarray, text: str) -> None:
        """Write the small files, drop the checkpoint, record every file's checksums in the
        manifest, and write it last: an entry without a manifest is never opened."""
        from dataclasses import replace

        self._k.close()
        self._v.close()
        self.queries.flush()
        del self.keys, self.values, self.queries, self._k, self._v
        np.save(self.dir / "tokens.npy", tokens.astype(np.int32), allow_pickle=False)
        np.save(self.dir / "sources.npy", sources.astype(np.int32), allow_pickle=False)
        np.save(self.dir / "query_positions.npy", self.query_positions, allow_pickle=False)
        (self.dir / "text.txt").write_text(text, encoding="utf-8")
        for p in self.dir.glob(".*.tmp"):  # a checkpoint write cut short
            p.unlink()
        files = checksum.record_dir(self.dir, LAYERED)
        for name in [Manifest.FILE, PROGRESS, *(n for n in files if n.startswith("state-"))]:
            files.pop(name, None)  # the checkpoint stays until the entry is published (drop_checkpoint)
        replace(manifest, files=files).write(self.dir)

    def abort(self) -> None:
        """Close the files of a prefill that failed (their descriptors would hold the disk space)."""
        for f in (getattr(self, "_k", None), getattr(self, "_v", None)):
            if f is not None and f.fd is not None:
                os.close(f.fd)
                f.fd = None

    @staticmethod
    def drop_checkpoint(entry_dir: Path) -> None:
        """After publishing: the checkpoint files are not part of the entry."""
        for p in [entry_dir / PROGRESS, *entry_dir.glob("state-*.npy")]:
            p.unlink(missing_ok=True)


class IndexCheckpoint:
    """Resume for an index build: after a layer (at most every `checkpoint_s` seconds) the layers
    done are fsynced and checksummed into index-progress.json (per-layer chunks of the [L, ...]
    .npy files, and the per-layer files such as hnswlib's l<layer>h<head>.hnsw)."""

    FILE = "index-progress.json"

    def __init__(self, d: Path, meta: dict, kept: int, checkpoint_s: float):
        self.dir, self.meta, self.kept, self.every = d, meta, kept, checkpoint_s
        self.last = time.perf_counter()

    def after_layer(self, done: int) -> None:
        if done >= self.meta["layers"] or time.perf_counter() - self.last < self.every:
            return
        files = {}
        for p in sorted(self.dir.iterdir()):
            if p.name.endswith(".npy"):
                with open(p, "rb+") as f:
                    os.fsync(f.fileno())  # the kinds write through memory maps: make those pages durable
                rec = checksum.record(p, layered=True)
                files[p.name] = {"chunks": rec["chunks"][:done + 1]}
            elif re.fullmatch(r"l(\d{3})h\d{2}\.hnsw", p.name) and int(p.name[1:4]) < done:
                files[p.name] = checksum.record(p)
        progress = {"meta": self.meta, "done": done, "files": files}
        write_durably(self.dir / self.FILE, lambda f: f.write(json.dumps(progress).encode()))
        self.kept, self.last = done, time.perf_counter()

    @classmethod
    def resumable(cls, d: Path, meta: dict) -> int:
        """Layers an interrupted build in `d` kept (0: start over)."""
        try:
            p = json.loads((d / cls.FILE).read_text())
            if p["meta"] != meta:
                return 0
            for name, rec in p["files"].items():
                ok = checksum.good_chunks(d / name, rec) == len(rec["chunks"]) if "bytes" not in rec \
                    else checksum.check(d / name, rec) is None
                if not ok:
                    return 0
            return int(p["done"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0


class Entry:
    """An opened cache entry. Arrays are memory-mapped copy-on-write: nothing is read until used,
    and torch can wrap them without copying (writes, if any, never reach the file).

    Opening checks every file's size and the small files' checksums, and all checksums when the
    entry is at most `verify_bytes` (None: sizes and small files only); DamagedEntry otherwise."""

    def __init__(self, path: Path, verify_bytes: int | None = None, touch: bool = True):
        """touch: count the opening as a use (the LRU order of `ra cache gc`; not for `verify`)."""
        self.path = Path(path)
        where = f"cache entry {self.path.name[:12]}"
        try:
            self.manifest = Manifest.read(self.path)
        except StoreError as e:
            raise DamagedEntry(where, [(Manifest.FILE, str(e).split(": ", 1)[-1])]) from None
        files = self.manifest.files
        if files is None:
            raise StoreError(f"{where} has an older format (no checksums); remove it with `ra cache rm`")
        full = verify_bytes is not None and sum(r["bytes"] for r in files.values()) <= verify_bytes
        # the big arrays' .npy headers (chunk 0) always: a damaged header would misread the shape
        problems = [(name, why) for name, rec in files.items()
                    if (why := checksum.check(self.path / name, rec if full or name not in LAYERED
                                              else {**rec, "chunks": rec["chunks"][:1]}))]
        if problems:
            raise DamagedEntry(where, problems)
        try:
            self.tokens = self._load("tokens.npy")
            self.keys = self._load("keys.npy")      # [L, KVH, P, D]
            self.values = self._load("values.npy")
        except ValueError as e:
            raise DamagedEntry(where, [("keys.npy / values.npy / tokens.npy", f"unreadable ({e})")]) from None
        self.n_layers, self.kv_heads, self.n_tokens, self.head_dim = self.keys.shape
        m = self.manifest
        if (self.n_tokens, self.n_layers, self.kv_heads) != (m.n_tokens, m.model.layers, m.model.kv_heads) \
                or self.values.shape != self.keys.shape:
            raise DamagedEntry(where, [("keys.npy", f"shape {self.keys.shape} does not match the manifest")])
        if touch:
            try:
                os.utime(self.path / "manifest.json")  # "last used", for LRU eviction
            except OSError:
                pass

    def verify(self) -> list[tuple[str, str]]:
        """(file, problem) for every file of the entry and its indexes that does not match (reads all)."""
        out = checksum.check_dir(self.path, self.manifest.files, full=True)
        for d in sorted((self.path / "indexes").glob("*")):
            out += [(f"indexes/{d.name}/{f}", why) for f, why in checksum.check_index(d, full=True)]
        return out

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

    def ensure_index(self, store: Store, kind: str, sink: int, recent: int, progress=None, rebuild: bool = True,
                     notice=None, checkpoint_s: float = 30.0) -> Path:
        """The index for this split, checked (sizes always, checksums when the entry is small enough
        to be verified at open); built if it is missing, rebuilt if it is damaged (DamagedEntry
        instead when not `rebuild`). Built atomically, under the entry's index lock, layer by layer
        with a checkpoint at most every `checkpoint_s` seconds: an interrupted build resumes."""
        from .index import kind as index_kind

        final = self.index_dir(kind, sink, recent)
        full = self.manifest.files is not None and \
            sum(r["bytes"] for r in self.manifest.files.values()) <= store.verify_bytes
        wait = (lambda: notice("another ra process is building this index; waiting for it")) if notice else None
        with store.locked(f"{self.path.name}.index", wait):
            if (final / "index.json").exists():
                problems = checksum.check_index(final, full)
                if not problems:
                    return final
                damaged = DamagedEntry(f"the {kind} index of cache entry {self.path.name[:12]}", problems)
                if not rebuild:
                    raise damaged
                if notice:
                    notice(f"{damaged}; rebuilding it")
                store.remove_index(final)
            partial = store.tmp / f"{self.path.name}.{final.name}.partial"  # kept for resume
            meta = {"kind": kind, "n_tokens": self.n_tokens, "layers": self.n_layers, "split": [sink, recent],
                    "entry": self.manifest.checksum}  # the same entry, not one rebuilt since
            start = IndexCheckpoint.resumable(partial, meta)
            if start:
                (notice or (lambda m: None))(f"resuming an interrupted {kind} index build from layer {start} "
                                             f"of {self.n_layers}")
            else:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir()
            ckpt = IndexCheckpoint(partial, meta, start, checkpoint_s)

            def report(done: int, total: int) -> None:
                ckpt.after_layer(done)
                if progress:
                    progress(done, total)
            try:
                a, b = self.split(sink, recent)
                index_kind(kind).build(lambda layer: self.keys[layer, :, a:b], lambda layer: self.values[layer, :, a:b],
                                       self.build_queries, self.n_layers, partial, report, start_layer=start)
                (partial / IndexCheckpoint.FILE).unlink(missing_ok=True)
                checksum.seal_index(partial)
                final.parent.mkdir(exist_ok=True)  # FileNotFoundError if the entry was removed meanwhile
                store.commit(partial, final, marker="index.json")
            except BaseException as e:
                full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
                if ckpt.kept and not full and not isinstance(e, OSError):
                    (notice or (lambda m: None))(f"stopped: {ckpt.kept} of {self.n_layers} layers of the {kind} index "
                                                 f"are kept; the same command resumes from there")
                else:
                    shutil.rmtree(partial, ignore_errors=True)
                if isinstance(e, OSError) and not isinstance(e, StoreError):
                    why = "the disk is full" if full else e.strerror or str(e)
                    raise StoreError(f"cannot write the {kind} index of cache entry {self.path.name[:12]} in "
                                     f"{store.root}: {why}") from None
                raise
        return final
