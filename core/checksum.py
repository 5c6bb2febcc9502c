"""Sizes and checksums of store files (xxh3-64, the `xxhash` package: benchmarks/store_cost.py
measured checking a whole entry at about the cost of reading it once). Torch-free.

A file's record, kept in the entry's manifest (core/manifest.py) or an index's checksums.json:

    {"bytes": size, "chunks": [[start, end, "<16 hex>"], ...]}

The per-layer arrays ([L, ...] .npy: keys, values, queries) are chunked at layer boundaries (the
.npy header is chunk 0), so `verify` streams, names the damaged layer, and a resumed prefill
(core/engine.py) trusts exactly the layers whose chunks match. Other files are one chunk.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import xxhash

BLOCK = 8 << 20  # bytes read at a time
INDEX_FILE = "checksums.json"


def digest(path: Path, start: int, end: int) -> str:
    """xxh3-64 of bytes [start, end) of the file (hex)."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            buf = f.read(min(BLOCK, left))
            if not buf:
                break
            h.update(buf)
            left -= len(buf)
    return h.hexdigest()


def rows_digest(array: np.ndarray, a: int, b: int) -> str:
    """xxh3-64 of rows [a, b) of axis -2 of an [..., N, D] array, over every leading index in order."""
    h = xxhash.xxh3_64()
    for idx in np.ndindex(*array.shape[:-2]):
        h.update(np.ascontiguousarray(array[idx][a:b]).data)
    return h.hexdigest()


def layer_bounds(path: Path) -> list[int]:
    """Chunk boundaries of an [L, ...] .npy file: 0, the data offset, then one per layer."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)  # the documented header; never unpickles
        offset = f.tell()
    layer = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    return [0, offset] + [offset + layer * (i + 1) for i in range(shape[0])]


def record(path: Path, layered: bool = False) -> dict:
    size = os.path.getsize(path)
    bounds = layer_bounds(path) if layered else [0, size]
    return {"bytes": size, "chunks": [[a, b, digest(path, a, b)] for a, b in zip(bounds, bounds[1:])]}


def check(path: Path, rec: dict, full: bool = True) -> str | None:
    """What is wrong with `path` against its record (None: nothing). full=False: only its size."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return "missing"
    if size != rec["bytes"]:
        return f"{size:,} bytes, expected {rec['bytes']:,}"
    if full:
        for a, b, h in rec["chunks"]:
            if digest(path, a, b) != h:
                return f"damaged (bytes {a:,}-{b:,} differ)"
    return None


def good_chunks(path: Path, rec: dict) -> int:
    """How many leading chunks of `path` match the record (a resumed prefill keeps those layers)."""
    n = 0
    for a, b, h in rec["chunks"]:
        if os.path.getsize(path) < b or digest(path, a, b) != h:
            break
        n += 1
    return n


def record_dir(directory: Path, layered: tuple = ()) -> dict:
    """Records of every file under `directory` (relative POSIX paths), the names in `layered`
    chunked per layer."""
    d = Path(directory)
    return {p.relative_to(d).as_posix(): record(p, p.name in layered)
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != INDEX_FILE}


def check_dir(directory: Path, records: dict, full: bool = True) -> list[tuple[str, str]]:
    """(file, problem) for every recorded file that is missing, of the wrong size or (full) damaged."""
    out = []
    for name, rec in records.items():
        why = check(Path(directory) / name, rec, full)
        if why:
            out.append((name, why))
    return out


def seal_index(directory: Path) -> None:
    """Write checksums.json for a finished index directory (before it is published)."""
    (Path(directory) / INDEX_FILE).write_text(json.dumps(record_dir(directory)))


def check_index(directory: Path, full: bool = True) -> list[tuple[str, str]]:
    """(file, problem) of an index directory; one without readable checksums is damaged."""
    try:
        records = json.loads((Path(directory) / INDEX_FILE).read_text())
        if not isinstance(records, dict):
            raise ValueError
    except (OSError, ValueError):
        return [(INDEX_FILE, "missing or unreadable")]
    return check_dir(directory, records, full)
