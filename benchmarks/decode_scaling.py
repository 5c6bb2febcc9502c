"""Decode latency, memory and disk vs document length: full attention vs retrieval attention
with any of the index kinds (exact = every offloaded key, the default inside the window;
flat = exact top-k; cluster = the clustered index with its estimate; graph = the query-aware
graph; hnsw = hnswlib on centred keys), with the per-step split retrieval / attention / rest.

    python benchmarks/decode_scaling.py [--sizes 1024,2048,...,131072] [--steps 16]
                                        [--indexes exact,flat,cluster,graph] [--plot out.png]

The embedded model reads 8K tokens, so sizes above 8K use KV captured from real text in
consecutive 8K-token chunks of a long book (Sherlock Holmes from ../shared/data/books, else Alice
repeated), each chunk prefilled on its own (positions 0..8K) and the chunks' KV laid end to end.
Answers on such KV are not meaningful; the time per decode step, the memory and the disk are.
Every size is a real store entry opened by the real engine; the captured KV is kept in
bench_out/ so a second run skips the capture.
"""
from __future__ import annotations

import argparse
import json
import gc
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHUNK = 8000
QUERY_STRIDE = 16   # prefill queries kept every 16th position (the graph index is built from them)
QUESTION = "What is the secret passcode? Answer with the number only."


def long_text() -> str:
    p = ROOT.parent / "shared" / "data" / "books" / "pg1661.txt"
    if p.exists():
        return p.read_text(encoding="utf-8")
    return (ROOT / "sample_docs" / "alice.txt").read_text(encoding="utf-8") * 4


def capture(engine, n_total: int, out: Path, log) -> Path:
    """Prefill consecutive CHUNK-token pieces of a long book; lay their KV end to end in `out`,
    with the queries of every QUERY_STRIDE-th position."""
    from core.generation import QueryCapture, prefill

    if (out / "done.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = engine.tokenizer
    ids = np.array(tok(long_text(), add_special_tokens=False)["input_ids"], dtype=np.int32)
    while len(ids) < n_total:
        ids = np.concatenate([ids, ids])
    ids = ids[:n_total]
    shape = (engine.n_layers, engine.kv_heads, n_total, engine.head_dim)
    keys = np.lib.format.open_memmap(out / "keys.npy", mode="w+", dtype=np.float16, shape=shape)
    values = np.lib.format.open_memmap(out / "values.npy", mode="w+", dtype=np.float16, shape=shape)
    queries = np.lib.format.open_memmap(out / "queries.npy", mode="w+", dtype=np.float16,
                                        shape=(engine.n_layers, engine.q_heads, n_total // QUERY_STRIDE, engine.head_dim))
    t = time.perf_counter()
    for base in range(0, n_total, CHUNK):
        piece = ids[base:base + CHUNK]

        def write(layer, start, k, v, base=base):
            keys[layer, :, base + start:base + start + k.shape[1]] = k
            values[layer, :, base + start:base + start + v.shape[1]] = v

        def write_q(layer, slot, q, base=base):
            off = base // QUERY_STRIDE
            queries[layer, :, off + slot.start:off + slot.stop] = q

        local = np.arange(0, len(piece), QUERY_STRIDE)
        local = local[(base + local) // QUERY_STRIDE < n_total // QUERY_STRIDE]
        prefill(engine.model, piece, 1024, write, QueryCapture(local, write_q))
        done = base + len(piece)
        el = time.perf_counter() - t
        log(f"captured {done:,}/{n_total:,} tokens ({done / el:.0f} tok/s, ~{(n_total - done) * el / done / 60:.0f} min left)")
    keys.flush()
    values.flush()
    queries.flush()
    np.save(out / "tokens.npy", ids, allow_pickle=False)
    (out / "done.json").write_text(json.dumps({"tokens": n_total, "prefill_s": time.perf_counter() - t}))
    return out


def make_entry(engine, base: Path, n: int):
    """A real store entry holding the first n captured tokens; returns the Document that opens it."""
    from core.documents import Document
    from core.manifest import DocumentInfo, Manifest, ModelInfo
    from core.store import EntryWriter

    doc = Document(text=f"decode-scaling benchmark, {n} tokens of captured KV", name=f"captured-{n}", kind="text")
    key = engine.key(doc)
    if engine.store.open(key) is not None:
        return doc
    keys = np.load(base / "keys.npy", mmap_mode="r")
    values = np.load(base / "values.npy", mmap_mode="r")
    tokens = np.load(base / "tokens.npy")[:n]
    queries = np.load(base / "queries.npy", mmap_mode="r")
    # the prefill-query sample a real entry of n tokens keeps (Engine.query_count), from the capture
    have = n // QUERY_STRIDE
    slots = np.unique(np.linspace(0, have - 1, num=min(engine.query_count(n, engine.settings), have)).astype(np.int64))
    with engine.store.staging() as tmp:
        w = EntryWriter(tmp, n, engine.n_layers, engine.kv_heads, engine.q_heads, engine.head_dim, "float16",
                        slots * QUERY_STRIDE)
        for layer in range(engine.n_layers):
            w.write_kv(layer, 0, keys[layer, :, :n], values[layer, :, :n])
            w.write_queries(layer, slice(0, len(slots)), queries[layer][:, slots])
        captured = json.loads((base / "done.json").read_text())
        manifest = Manifest(
            format=key.format, key=key.__dict__, digest=key.digest,
            document=DocumentInfo(doc.name, "text", len(doc.text), page_starts=[0]),
            model=ModelInfo(engine.ref.spec, engine.ref.identity, engine.n_layers, engine.q_heads, engine.kv_heads,
                            engine.head_dim),
            n_tokens=n, prefill_s=round(captured["prefill_s"] * n / captured["tokens"], 3), chunk_size=1024,
            positions={"scheme": "exact", "keys": "post-rope"}, created=time.time())
        w.finish(manifest, tokens, np.full((n, 2), -1, dtype=np.int32), doc.text)
        engine.store.commit(tmp, engine.store.path(key))
    return doc


class Timed:
    """Wraps a Retriever (index search + K/V gather) and adds the seconds its method calls take to
    a shared counter; its attention over every offloaded key (the `exact` kind) is left to the
    attention's share."""

    def __init__(self, inner, counter: dict, name: str):
        self.inner, self.counter, self.name = inner, counter, name

    def __getattr__(self, attr):
        fn = getattr(self.inner, attr)
        if not callable(fn) or attr in ("partial", "partial_kept", "whole_step", "document_rows"):
            return fn  # attention over every offloaded key (the `exact` kind): attention, not retrieval

        def timed(*a, **kw):
            t = time.perf_counter()
            r = fn(*a, **kw)
            self.counter[self.name] += time.perf_counter() - t
            return r

        return timed


def time_decode(engine, doc, attention: str, index: str, steps: int) -> dict:
    """Median per-step latency over `steps` decode steps, with the retrieval/attention/rest split."""
    from core.generation import forward
    from core.layer import DocumentLayer

    t = time.perf_counter()
    p = engine.prepare(doc, engine.settings.but(attention=attention, index=index))
    prepare_s = time.perf_counter() - t
    counter = {"retrieval": 0.0, "attend": 0.0}
    cache = engine.build_cache(p)
    for layer in cache.layers:
        if isinstance(layer, DocumentLayer):
            if layer.retriever is not None:
                layer.retriever = Timed(layer.retriever, counter, "retrieval")
            inner = layer.attend

            def attend(*a, inner=inner, **kw):
                t0 = time.perf_counter()
                r = inner(*a, **kw)
                counter["attend"] += time.perf_counter() - t0
                return r

            layer.attend = attend
            # the fused layer's one-kernel step (core/fused.py) does not call attend: from taking
            # its row (step_rows) to recording it (stepped) is its attention
            rows_, stepped_ = layer.step_rows, layer.stepped

            def step_rows(rows_=rows_):
                counter["t0"] = time.perf_counter()
                return rows_()

            def stepped(*a, stepped_=stepped_, **kw):
                r = stepped_(*a, **kw)
                counter["attend"] += time.perf_counter() - counter["t0"]
                return r

            layer.step_rows, layer.stepped = step_rows, stepped
    from core.prompt import question_ids

    q = question_ids(engine.tokenizer, QUESTION)
    pos = p.entry.n_tokens
    logits = forward(engine.model, cache, q, pos)
    pos += len(q)
    step_model = engine.step_model(p.settings)  # as `ra ask` steps: the GGUF's blocks (full attention: fp32)
    step, split = [], []
    for _ in range(steps):
        counter["retrieval"] = counter["attend"] = 0.0
        t = time.perf_counter()
        logits = forward(step_model, cache, [int(logits.argmax())], pos)
        step.append(time.perf_counter() - t)
        split.append((counter["retrieval"], counter["attend"] - counter["retrieval"]))
        pos += 1
    for layer in cache.layers:  # the timing wrappers hold their layer (a cycle): undone, so the
        for name in ("attend", "step_rows", "stepped"):  # cache (GiBs at 128K) is freed here, not later
            layer.__dict__.pop(name, None)
    index_s = p.index_s
    del cache, p
    gc.collect()
    i = int(np.argsort(step)[len(step) // 2])
    ms = 1000 * step[i]
    retr, att = (1000 * x for x in split[i])
    if attention == "full":
        retr, att = 0.0, float("nan")
    return {"ms": ms, "retrieval_ms": retr, "attention_ms": att,
            "rest_ms": ms - retr - (att if att == att else 0.0), "prepare_s": prepare_s, "index_s": index_s}


def peak_rss(home: Path, doc_text: str, attention: str, index: str) -> float:
    """Peak RSS (MiB) of a fresh process that opens the cached entry and decodes 8 tokens.

    It calls `forward` directly, as time_decode does: `Engine.ask` rightly refuses a document
    longer than the model's window, and captured KV beyond 8K is such a document."""
    code = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from core.engine import Engine, Settings
from core.documents import Document
from core.generation import forward
from core.prompt import question_ids
e = Engine({str(home)!r}, Settings(attention={attention!r}, index={index!r}))
p = e.prepare(Document(text={doc_text!r}, name="x", kind="text"))
cache = e.build_cache(p)
q = question_ids(e.tokenizer, {QUESTION!r})
pos = p.entry.n_tokens
logits = forward(e.model, cache, q, pos)
pos += len(q)
step = e.step_model(e.settings)  # the one-token steps' model, as `ra ask` steps
for _ in range(8):
    logits = forward(step, cache, [int(logits.argmax())], pos)
    pos += 1
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child started by a big
# parent reports the parent's RSS (every mode read the same 3,270 MiB at 16K that way)
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"peak-RSS run ({attention}, {index}) failed:\n{r.stderr[-2000:]}")
    return float(r.stdout.strip().splitlines()[-1])


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1024,2048,4096,8192,16384,32768,65536,131072")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--indexes", default="flat,graph,hnsw")
    ap.add_argument("--hnsw-max", type=int, default=32768,
                    help="skip hnswlib above this size (its 90 graphs take ~10 min to build at 100K keys)")
    ap.add_argument("--graph-max", type=int, default=None,
                    help="skip the graph index above this size (its build is the slowest: ~2x the prefill)")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--capture-only", action="store_true", help="capture the KV (CPU-heavy, timing-insensitive) and stop")
    ap.add_argument("--rss-min", type=int, default=8192, help="measure peak RSS from this size up")
    ap.add_argument("--prefill-rate", type=float, default=None,
                    help="tokens/s to estimate prefill time with (default: the capture's own rate, which is "
                         "wrong if the capture ran beside other work)")
    ap.add_argument("--work", default=str(ROOT / "bench_out" / "decode_scaling"))
    ap.add_argument("--plot", default=None, help="write a PNG plot here")
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    ap.add_argument("--row-out", default=None, help=argparse.SUPPRESS)  # a child: time one size, write its row
    ap.add_argument("--capture-tokens", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    indexes = args.indexes.split(",")
    log = lambda m: print(m, file=sys.stderr, flush=True)

    from benchmarks.bench_ask import machine
    from core import data_home
    from core.engine import Engine, Settings

    work = Path(args.work)
    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "models").exists():
        (home / "models").symlink_to(data_home() / "models", target_is_directory=True)
    engine = Engine(home, Settings(max_tokens=args.steps))
    n_capture = args.capture_tokens or max(sizes)
    base = capture(engine, n_capture, work / f"captured-{n_capture}", log)
    if args.capture_only:
        return
    capture_info = json.loads((base / "done.json").read_text())
    prefill_tok_s = args.prefill_rate or capture_info["tokens"] / capture_info["prefill_s"]

    rows = []
    if args.row_out is None:
        # each size in a fresh process of its own: what one size leaves behind in this one (the
        # allocator's, the libraries') must not count against the next (twice the 128K run was
        # OOM-killed at 24 GiB after the smaller sizes, where alone it peaks at ~10 GiB)
        skip = {"--sizes", "--plot", "--json"}  # and their values: the children's are their own
        child = [a for i, a in enumerate(sys.argv[1:]) if a.split("=")[0] not in skip and sys.argv[i] not in skip]
        for n in sizes:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "row.json"
                subprocess.run([sys.executable, __file__, *child, "--sizes", str(n), "--row-out", str(out),
                                "--capture-tokens", str(n_capture), "--prefill-rate", str(prefill_tok_s)], check=True)
                rows.append(json.loads(out.read_text()))
    for n in sizes if args.row_out is not None else []:
        doc = make_entry(engine, base, n)
        row = {"tokens": n}
        log(f"{n:>7,} tokens: timing full attention")
        row["full"] = time_decode(engine, doc, "full", "flat", args.steps)
        for ix in indexes:
            if (ix == "hnsw" and n > args.hnsw_max) or (ix == "graph" and args.graph_max and n > args.graph_max):
                continue
            log(f"{n:>7,} tokens: timing {ix}")
            row[ix] = time_decode(engine, doc, "retrieval", ix, args.steps)
        entry = engine.store.open(engine.key(doc))
        row["kv_bytes"] = (entry.path / "keys.npy").stat().st_size + (entry.path / "values.npy").stat().st_size
        for ix in indexes:
            if ix in row:
                row[f"{ix}_index_bytes"] = dir_bytes(entry.index_dir(ix, 128, 512))
        row["prefill_s_est"] = n / prefill_tok_s
        if not args.no_rss and n >= args.rss_min:
            for mode, ix in [("full", "flat")] + [("retrieval", ix) for ix in indexes]:
                if mode == "full" or ix in row:
                    row[f"rss_{mode}_{ix}"] = peak_rss(home, doc.text, mode, ix)
        rows.append(row)
        Path(args.row_out).write_text(json.dumps(row))
        log(f"{n:>7,} tokens: full {row['full']['ms']:.0f} ms, " +
            ", ".join(f"{ix} {row[ix]['ms']:.0f} ms (index {row[ix]['index_s']:.1f} s)" for ix in indexes if ix in row))

    if args.row_out is not None:
        return
    print(f"machine: {machine()}")
    print(f"model: SmolLM2-135M-Instruct (embedded), CPU; steps on the GGUF's blocks as `ra ask` steps (full attention: fp32); KV beyond 8K captured in {CHUNK}-token chunks; "
          f"median of {args.steps} decode steps; k=100, sink 128, recent 512\n")
    head = "| tokens | full ms/token | " + " | ".join(f"{ix} ms/token | full / {ix}" for ix in indexes)
    others = [ix for ix in indexes if ix != "flat"] if "flat" in indexes else []  # each against flat, the reference
    head += "".join(f" | flat / {ix}" for ix in others)
    print(head + " |")
    print("|" + "---:|" * (head.count("|") - 1))
    for r in rows:
        cells = [f"{r['tokens']:,}", f"{r['full']['ms']:.0f}"]
        for ix in indexes:
            cells += [f"{r[ix]['ms']:.0f}", f"{r['full']['ms'] / r[ix]['ms']:.2f}x"] if ix in r else ["-", "-"]
        for ix in others:
            cells.append(f"{r['flat']['ms'] / r[ix]['ms']:.2f}x" if ix in r and "flat" in r else "-")
        print("| " + " | ".join(cells) + " |")
    print("\nPer-step split (ms): retrieval (index search + value gather) / attention math / rest of the model\n")
    print("| tokens | " + " | ".join(f"{ix}: retrieval / attention / rest" for ix in indexes) + " |")
    print("|---:|" + "---|" * len(indexes))
    for r in rows:
        print(f"| {r['tokens']:,} | " + " | ".join(
            f"{r[ix]['retrieval_ms']:.0f} / {r[ix]['attention_ms']:.0f} / {r[ix]['rest_ms']:.0f}" if ix in r else "-"
            for ix in indexes) + " |")
    print("\nCost: disk per document token, index build time vs prefill time, peak RSS answering from the cache\n")
    hdr = ["tokens", "fp16 K+V bytes/token"] + [f"{ix} index bytes/token" for ix in indexes] + \
          [f"{ix} build s" for ix in indexes] + [f"prefill s (at {prefill_tok_s:.0f} tok/s)", "full KV fp32 MiB"]
    if not args.no_rss:
        hdr += ["peak RSS full MiB"] + [f"peak RSS {ix} MiB" for ix in indexes]
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---:|" * len(hdr))
    for r in rows:
        n = r["tokens"]
        cells = [f"{n:,}", f"{r['kv_bytes'] / n:,.0f}"] + [
            f"{r[f'{ix}_index_bytes'] / n:,.0f}" if ix in r else "-" for ix in indexes]
        cells += [f"{r[ix]['index_s']:.1f}" if ix in r else "-" for ix in indexes] + [f"{r['prefill_s_est']:.0f}",
                                                                   f"{r['kv_bytes'] * 2 / 2**20:,.0f}"]
        if not args.no_rss:
            cells += [f"{r.get('rss_full_flat', float('nan')):,.0f}"] + [
                f"{r.get(f'rss_retrieval_{ix}', float('nan')):,.0f}" for ix in indexes]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        xs = [r["tokens"] for r in rows]
        ax.plot(xs, [r["full"]["ms"] for r in rows], "o-", label="full attention")
        for ix in indexes:
            pts = [(r["tokens"], r[ix]["ms"]) for r in rows if ix in r]
            ax.plot(*zip(*pts), "s-", label=f"retrieval attention, {ix} index" + (" (k=100)" if ix in ("flat", "graph", "hnsw") else ""))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("document tokens (KV beyond 8K captured from real text in 8K chunks)")
        ax.set_ylabel("ms per decode step")
        ax.set_title("SmolLM2-135M, CPU (2 cores): decode latency vs document length")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
