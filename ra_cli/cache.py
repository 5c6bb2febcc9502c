"""`ra cache ...` and `ra models`: what is on disk. Neither imports torch (numpy at most)."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import List

import typer

from core.errors import StoreError, UsageError

from core.units import human_size

from .session import parse_size

cache_app = typer.Typer(no_args_is_help=True, help="Inspect and prune the document cache.")


def _home() -> Path:
    from core import data_home

    return data_home()


def _store():
    from core.store import Store

    return Store(_home() / "store")


def _ago(t: float) -> str:
    s = max(0, time.time() - t)
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= n:
            return f"{s / n:.0f} {unit} ago"
    return "just now"


def _find(store, prefix: str):
    try:
        return store.find(prefix)
    except KeyError as e:
        raise StoreError(e.args[0]) from None


def _row(e) -> dict:
    m = e.manifest
    if m is None:  # its manifest cannot be read
        return {"entry": e.digest, "document": None, "size_bytes": e.size_bytes, "last_used": e.last_used,
                "damaged": e.problem}
    return {"entry": e.digest, "document": m.document.name, "kind": m.document.kind,
            "model": m.model.spec, "tokens": m.n_tokens, "size_bytes": e.size_bytes,
            "last_used": e.last_used, "created": m.created, "positions": m.positions["scheme"]}


def _name(e) -> str:
    return e.manifest.document.name if e.manifest else "(damaged manifest)"


@cache_app.command("list")
def cache_list(as_json: bool = typer.Option(False, "--json", help="One JSON object per entry.")):
    """List cached documents, least recently used first (and interrupted prefills kept for resume)."""
    store = _store()
    for e in store.infos():
        r = _row(e)
        if as_json:
            typer.echo(json.dumps(r))
        elif e.manifest is None:
            typer.echo(f"{e.digest[:12]}  damaged: {e.problem}")
        else:
            typer.echo(f"{e.digest[:12]}  {r['tokens']:>7,} tokens  {human_size(e.size_bytes):>10}  "
                       f"{_ago(e.last_used):>12}  {r['model']}  {r['document']}")
    for p in store.partials():
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        if as_json:
            typer.echo(json.dumps({"entry": p.name.split(".")[0], "partial": True, "size_bytes": size}))
        else:
            what = "prefill" if p.name.count(".") == 1 else "index build"  # <key>.partial, <key>.<index>.partial
            typer.echo(f"{p.name.split('.')[0][:12]}  interrupted {what}, {human_size(size)} kept: "
                       f"rerun the same command to resume")


@cache_app.command("info")
def cache_info(entry: str = typer.Argument(..., help="An entry key, or its first characters.")):
    """Show one cached document: source, model, tokens, files, indexes, timings."""
    e = _find(_store(), entry)
    if e.manifest is None:
        raise StoreError(f"{e.problem}; remove it with `ra cache rm {e.digest[:12]}`")
    m, doc = e.manifest, e.manifest.document
    lines = [("entry", e.digest), ("document", f"{doc.name} ({doc.kind}, {doc.chars:,} chars)"),
             ("model", f"{m.model.spec} ({m.model.identity[:24]}...)"),
             ("tokens", f"{m.n_tokens:,}"), ("size", human_size(e.size_bytes)),
             ("positions", m.positions["scheme"]),
             ("created", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.created))),
             ("last used", _ago(e.last_used)), ("prefill", f"{m.prefill_s:.1f} s"),
             ("indexes", ", ".join(sorted(p.name for p in (e.path / "indexes").glob("*"))) or "none"),
             ("path", str(e.path))]
    if doc.files:
        lines.insert(2, ("files", f"{len(doc.files)}: " + ", ".join(doc.files[:20])
                         + (" ..." if len(doc.files) > 20 else "")))
    for k, v in lines:
        typer.echo(f"{k + ':':<10} {v}")


@cache_app.command("rm")
def cache_rm(entries: List[str] = typer.Argument(..., help="Entry keys, or their first characters.")):
    """Remove cached documents."""
    store = _store()
    found = [_find(store, p) for p in entries]  # all or nothing: check every key first
    busy = []
    for e in found:
        if store.remove(e.digest):
            typer.echo(f"removed {e.digest[:12]}  {_name(e)}  ({human_size(e.size_bytes)})")
        else:
            busy.append(e)
            typer.echo(f"skipped {e.digest[:12]}  {_name(e)}: a process is answering from it", err=True)
    if busy:
        raise typer.Exit(1)


@cache_app.command("clear")
def cache_clear(yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask (needed when stdin is not a terminal).")):
    """Remove every cached document."""
    import sys

    store = _store()
    infos = store.infos()
    total = sum(e.size_bytes for e in infos)
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("ra cache clear removes every entry: add --yes")
        if not typer.confirm(f"remove {len(infos)} entries ({human_size(total)})?"):
            raise typer.Exit(1)
    removed = [e for e in infos if store.remove(e.digest)]
    for p in store.partials():  # interrupted prefills and index builds kept for resume
        digest = p.name.split(".")[0]
        # under the lock of whoever would resume it (<key>.partial: the entry's; <key>.<index>.partial: its index's)
        from filelock import Timeout

        try:
            with store.lock(digest if p.name.count(".") == 1 else f"{digest}.index").acquire(timeout=0):
                shutil.rmtree(p, ignore_errors=True)
        except Timeout:
            typer.echo(f"skipped {p.name}: a process is resuming it", err=True)
    typer.echo(f"removed {len(removed)} entries ({human_size(sum(e.size_bytes for e in removed))})")
    if len(removed) < len(infos):
        typer.echo(f"skipped {len(infos) - len(removed)} entries a process is answering from", err=True)


@cache_app.command("gc")
def cache_gc(
    max_size: str = typer.Option(..., "--max-size", envvar="RA_CACHE_MAX_SIZE", help="Keep the store under this size (e.g. 2G, 500M)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be removed."),
):
    """Evict least recently used documents until the store fits in --max-size."""
    store = _store()
    evicted, skipped = store.gc(parse_size(max_size), dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for e in evicted:
        typer.echo(f"{verb} {e.digest[:12]}  {_ago(e.last_used):>12}  {human_size(e.size_bytes):>10}  {_name(e)}")
    for e in skipped:
        typer.echo(f"skipped {e.digest[:12]}  {_name(e)}: a process is answering from it", err=True)
    left = sum(e.size_bytes for e in store.infos()) - (sum(e.size_bytes for e in evicted) if dry_run else 0)
    typer.echo(f"{verb} {len(evicted)} entries; the store holds {human_size(left)}")


@cache_app.command("verify")
def cache_verify(entries: List[str] = typer.Argument(None, help="Entry keys or their first characters (default: all).")):
    """Check every file of cached documents against its recorded size and checksums (exit 1 if any is damaged)."""
    from core.store import DamagedEntry, Entry

    store = _store()
    infos = [_find(store, p) for p in entries] if entries else store.infos()
    bad = 0
    for info in infos:
        try:
            problems = Entry(info.path, touch=False).verify()
        except DamagedEntry as e:
            problems = e.problems
        except (StoreError, ValueError, OSError) as e:
            problems = [("manifest.json", str(e))]
        if problems:
            bad += 1
            for f, why in problems:
                typer.echo(f"damaged {info.digest[:12]}  {f}: {why}")
        else:
            typer.echo(f"ok      {info.digest[:12]}  {_name(info)}")
    if bad:
        typer.echo(f"{bad} of {len(infos)} entries damaged: the next ask rebuilds them (or `ra cache rm`)", err=True)
        raise typer.Exit(1)


@cache_app.command("path")
def cache_path():
    """Print the data directory (set RA_HOME to move it)."""
    typer.echo(str(_home()))


def _hf_models() -> list[str]:
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
    p = Path(hub)
    if not p.is_dir():
        return []
    return sorted(d.name[len("models--"):].replace("--", "/") for d in p.glob("models--*")
                  if any(d.glob("snapshots/*/config.json")))


def models():
    """List the models available locally and say which one is the default."""
    from core import model as m

    from .config import read_config

    configured, source = os.environ.get("RA_MODEL"), "RA_MODEL"
    if not configured:
        configured, source = read_config(_home())[0].get("model"), "config.toml"
    rows = []
    try:
        gguf = m.embedded_gguf()
        converted = any((_home() / "models").glob(f"{gguf.stem}-*/ra-model.json"))
        rows.append((m.DEFAULT_MODEL, f"embedded SmolLM2-135M-Instruct, {gguf} "
                                      f"({'converted' if converted else 'converted on first use'})"))
    except m.ModelError as e:
        rows.append((m.DEFAULT_MODEL, f"not installed: {e}"))
    root = _home() / "models"
    for d in sorted(root.glob("*/ra-model.json")) if root.is_dir() else []:
        info = json.loads(d.read_text())
        src = info.get("source", "")
        if not src.endswith(m.EMBEDDED_FILE):
            rows.append((src, f"GGUF, converted copy ({info.get('dtype', 'float32')}) in {d.parent}"))
    rows += [(name, "Hugging Face cache") for name in _hf_models()]
    default = configured or m.DEFAULT_MODEL
    for name, what in rows:
        typer.echo(f"{'*' if name == default else ' '} {name}  {what}")
    typer.echo(f"default: {default}" + (f" (from {source})" if configured else " (built in)"))
