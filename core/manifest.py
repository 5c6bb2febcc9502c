"""The manifest of a store entry (manifest.json): the one owner of its fields. Torch-free.

    {"format": 2, "key": {...StoreKey fields...}, "digest": "<32 hex>",
     "document": {"name", "kind", "chars", "page_starts", "files"},
     "model": {"spec", "identity", "layers", "q_heads", "kv_heads", "head_dim"},
     "n_tokens": P, "prefill_s": s, "chunk_size": c,
     "positions": {"scheme": "exact", "keys": "post-rope"}          # inside the model's window
               or {"scheme": "remap-...", "keys": "pre-rope", ...}   # past it (RemapScheme fields)
     "created": unix time,
     "files": {"keys.npy": {"bytes", "chunks"}, ...},   # every other file's size and checksums (core/checksum.py)
     "checksum": "<16 hex>"}                            # xxh3 of this JSON without "checksum" (format >= 2)

`Manifest.read` checks the manifest's own checksum, that every field is there with the right type
and no unknown one, and raises StoreError naming the entry otherwise; the engine, `ra cache` and the benchmarks all write
manifests through `Manifest.write`, so every entry reads back the same way.
"""
from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from .errors import StoreError
from .settings import RemapScheme


@dataclass(frozen=True)
class DocumentInfo:
    name: str
    kind: str                  # text | pdf | code
    chars: int
    page_starts: list | None = None
    files: list | None = None


@dataclass(frozen=True)
class ModelInfo:
    spec: str
    identity: str
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Manifest:
    format: int
    key: dict
    digest: str
    document: DocumentInfo
    model: ModelInfo
    n_tokens: int
    prefill_s: float
    chunk_size: int
    positions: dict
    created: float
    files: dict | None = None   # None only in format 1 (before checksums): such entries are rebuilt
    checksum: str = ""

    FILE = "manifest.json"

    @property
    def remapped(self) -> bool:
        """A document past the model's window: keys stored pre-RoPE (core/longctx.py)."""
        return self.positions["scheme"] != "exact"

    @property
    def scheme(self) -> RemapScheme | None:
        """The remap scheme the entry was prefilled with (None inside the window)."""
        return RemapScheme.parse(self.positions["scheme"]) if self.remapped else None

    def to_json(self) -> dict:
        return asdict(self)

    def write(self, directory: Path) -> None:
        """Write manifest.json into `directory` (a staging directory: the manifest is its last file)."""
        raw = self.to_json()
        raw["checksum"] = _self_checksum(raw)
        tmp = Path(directory) / f".{self.FILE}.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(raw, indent=1))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, Path(directory) / self.FILE)

    @classmethod
    def read(cls, directory: Path) -> "Manifest":
        path = Path(directory) / cls.FILE
        where = f"cache entry {Path(directory).name[:12]}"
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreError(f"{where}: manifest.json is damaged ({type(e).__name__})") from None
        if isinstance(raw, dict) and raw.get("checksum", "") and raw["checksum"] != _self_checksum(raw):
            raise StoreError(f"{where}: manifest.json is damaged (its checksum does not match)")
        return cls.from_json(raw, where)

    @classmethod
    def from_json(cls, raw: dict, where: str = "manifest") -> "Manifest":
        def build(klass, data, name):
            if not isinstance(data, dict):
                raise StoreError(f"{where}: manifest field {name!r} is not an object")
            names = {f.name for f in fields(klass)}
            unknown = sorted(set(data) - names)
            if unknown:
                raise StoreError(f"{where}: manifest has unknown field(s) {', '.join(map(repr, unknown))} "
                                 f"(written by a newer ra?)")
            missing = sorted(f.name for f in fields(klass) if f.name not in data and f.default is MISSING)
            if missing:
                raise StoreError(f"{where}: manifest lacks field(s) {', '.join(map(repr, missing))}")
            return data

        top = dict(build(cls, raw, "manifest"))
        top["document"] = DocumentInfo(**build(DocumentInfo, raw["document"], "document"))
        top["model"] = ModelInfo(**build(ModelInfo, raw["model"], "model"))
        for name, typ in (("n_tokens", int), ("chunk_size", int), ("format", int), ("digest", str)):
            if not isinstance(top[name], typ):
                raise StoreError(f"{where}: manifest field {name!r} is not {typ.__name__}")
        pos = top["positions"]
        if not isinstance(pos, dict) or "scheme" not in pos:
            raise StoreError(f"{where}: manifest field 'positions' has no scheme")
        if pos["scheme"] != "exact":
            try:
                RemapScheme.parse(pos["scheme"])
            except ValueError as e:
                raise StoreError(f"{where}: {e}") from None
        if top["format"] >= 2 and not (top.get("checksum") and isinstance(top.get("files"), dict)):
            raise StoreError(f"{where}: manifest.json lacks its checksums")
        return cls(**top)


def _self_checksum(raw: dict) -> str:
    import xxhash

    body = {k: v for k, v in raw.items() if k != "checksum"}
    return xxhash.xxh3_64(json.dumps(body, sort_keys=True).encode()).hexdigest()
