"""Which index finds the keys a query attends to, touching the fewest keys? (issue 5)

    python benchmarks/index_recall.py [--keys 102400] [--layers all] [--json] [--plot out.png]

Real Q/K, not random vectors: SmolLM2-135M (the embedded model) prefills consecutive 8,000-token
chunks of Sherlock Holmes (../shared/data/books/pg1661.txt; each chunk at positions 0..8K, the
model's window) and the chunks' post-RoPE keys are laid end to end: --keys keys per KV head.
Queries are captured at every 4th position. The indexes are built from the queries at positions
= 0 mod 8 (the "prefill queries" a store entry keeps) and evaluated on queries they never saw:

  decode   the queries of a real question and the model's greedy answer, generated after the last
           chunk (what `ra ask` searches with),
  heldout  prefill queries at positions = 4 mod 8 (random sample), to have many more of them.

For every index and search width: recall of the exact top-100 (flat search over all keys is the
truth), fraction of the keys scored, and search time per decode step (all layers, all 9 query
heads, one token). One process, one machine, all indexes in the same run.

The capture is kept in bench_out/index_recall/ so later runs skip it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHUNK = 8000
QUERY_STRIDE = 4
QUESTION = "Who is the woman that outwitted Sherlock Holmes, and how did she do it?"
ANSWER_TOKENS = 24


def book_ids(tokenizer, n: int) -> np.ndarray:
    book = ROOT.parent / "shared" / "data" / "books" / "pg1661.txt"
    # a clone without ../shared (CI) falls back to the Alice shipped in sample_docs/
    text = (book if book.exists() else ROOT / "sample_docs" / "alice.txt").read_text(encoding="utf-8")
    ids = np.array(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    while len(ids) < n:
        ids = np.concatenate([ids, ids])
    return ids[:n]


class Grab:
    """ra_capture hook: keeps queries at chosen offsets of the current forward pass."""

    def __init__(self, sink):
        self.sink, self.offsets = sink, None

    def record(self, layer: int, q) -> None:  # q: [1, Hq, T, D]
        sel = q[0] if self.offsets is None else q[0][:, self.offsets]
        self.sink(layer, sel.float().cpu().numpy())


def capture(n_keys: int, out: Path, log) -> Path:
    """keys.npy, values.npy fp16 [L, KVH, N, D]; queries.npy fp16 [L, Hq, N/4, D]; decode_queries.npy fp32
    [L, Hq, T, D]. A capture of at least n_keys tokens with values is reused."""
    import torch
    from transformers import DynamicCache

    from core import data_home
    from core import model as models
    from core.prompt import question_ids

    if (out / "done.json").exists():
        done = json.loads((out / "done.json").read_text())
        if done["keys"] >= n_keys and done.get("values"):
            return out
    out.mkdir(parents=True, exist_ok=True)
    model, tok = models.load(models.resolve(None), data_home() / "models", notice=log)
    cfg = model.config
    L, Hq, KVH = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // Hq
    ids = book_ids(tok, n_keys)
    keys = np.lib.format.open_memmap(out / "keys.npy", mode="w+", dtype=np.float16, shape=(L, KVH, n_keys, D))
    values = np.lib.format.open_memmap(out / "values.npy", mode="w+", dtype=np.float16, shape=(L, KVH, n_keys, D))
    queries = np.lib.format.open_memmap(out / "queries.npy", mode="w+", dtype=np.float16,
                                        shape=(L, Hq, n_keys // QUERY_STRIDE, D))
    t0 = time.perf_counter()
    body = model.base_model
    with torch.inference_mode():
        for base in range(0, n_keys, CHUNK):
            piece = ids[base:base + CHUNK]
            cache = DynamicCache(config=cfg)
            for start in range(0, len(piece), 1000):
                end = min(start + 1000, len(piece))
                g0 = base + start  # global index of this slice's first token
                first = (-g0) % QUERY_STRIDE
                offs = torch.arange(first, end - start, QUERY_STRIDE)
                slot = slice((g0 + first) // QUERY_STRIDE, (g0 + first) // QUERY_STRIDE + len(offs))
                grab = Grab(lambda layer, q, slot=slot: queries.__setitem__((layer, slice(None), slot), q))
                grab.offsets = offs
                x = torch.from_numpy(piece[start:end])[None]
                body(input_ids=x, cache=cache, position_ids=torch.arange(start, end)[None], use_cache=True,
                     ra_capture=grab)
            for layer, cl in enumerate(cache.layers):
                keys[layer, :, base:base + len(piece)] = cl.keys[0].numpy()
                values[layer, :, base:base + len(piece)] = cl.values[0].numpy()
            done = base + len(piece)
            el = time.perf_counter() - t0
            log(f"captured {done:,}/{n_keys:,} tokens ({done / el:.0f} tok/s, ~{(n_keys - done) * el / done / 60:.1f} min left)")
        # decode-time queries: a question and the greedy answer after the last chunk
        q_ids = question_ids(tok, QUESTION)
        dec = []
        grab = Grab(lambda layer, q: dec.append((layer, q)))
        pos, feed = len(piece), q_ids
        answer = []
        for _ in range(ANSWER_TOKENS):
            out_ = model(input_ids=torch.tensor([feed]), cache=cache, use_cache=True, logits_to_keep=1,
                         position_ids=torch.arange(pos, pos + len(feed))[None], ra_capture=grab)
            pos += len(feed)
            feed = [int(out_.logits[0, -1].argmax())]
            answer += feed
    per_layer = [np.concatenate([q for l_, q in dec if l_ == layer], axis=1) for layer in range(L)]
    np.save(out / "decode_queries.npy", np.stack(per_layer).astype(np.float32), allow_pickle=False)
    keys.flush()
    values.flush()
    queries.flush()
    info = {"keys": n_keys, "values": True, "capture_s": round(time.perf_counter() - t0, 1), "question": QUESTION,
            "answer": tok.decode(answer), "layers": L, "q_heads": Hq, "kv_heads": KVH, "head_dim": D}
    (out / "done.json").write_text(json.dumps(info))
    log(f"capture done in {info['capture_s']:.0f} s; answer: {info['answer']!r}")
    return out


# ----------------------------------------------------------------------------- evaluation

def out_error(o, ref) -> float:
    """Mean relative L2 error of attention outputs o against ref, both [..., D]."""
    return float(((o - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)).mean())


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's true top-k found. ids/truth: [Q, k]."""
    return float(np.mean([len(np.intersect1d(a, b)) / truth.shape[1] for a, b in zip(ids, truth)]))


def evaluate(work: Path, n_keys: int, layers: list[int], build_positions: int, heldout: int, efs: list[int],
             hnsw_efs: list[int], log, graph_kw: dict, indexes=("graph", "hnsw-raw", "hnsw-centred"), n_probe: int = 3,
             coarse_probe: int = 4, cluster_budgets=((0.018, 0.0), (0.018, 0.232))) -> list[dict]:
    import hnswlib
    import torch

    from core.attention import attention_from_scores, merge
    from core.cluster import ClusterLayerIndex, cluster_keys, estimated_attention, head_tables, n_clusters
    from core.graph import GraphLayerIndex, build_head, exact_topk, hnsw_level0
    from core.index import HNSW_EF_CONSTRUCTION, HNSW_M, FlatLayerIndex

    # the first n_keys captured keys, and the queries of those positions (a bigger capture is reused)
    K = np.load(work / "keys.npy", mmap_mode="r")[:, :, :n_keys]
    V = np.load(work / "values.npy", mmap_mode="r")[:, :, :n_keys]
    Q = np.load(work / "queries.npy", mmap_mode="r")[:, :, :n_keys // QUERY_STRIDE]
    DQ = np.load(work / "decode_queries.npy")
    L, KVH, N, D = K.shape
    Hq = Q.shape[1]
    G = Hq // KVH
    n_q = Q.shape[2]
    # build queries: positions 0 mod 8 (even slots of the stride-4 capture), evenly thinned
    even = np.arange(0, n_q, 2)
    build_slots = even[np.linspace(0, len(even) - 1, min(build_positions, len(even))).astype(int)]
    rng = np.random.default_rng(0)
    held_slots = np.sort(rng.choice(np.arange(1, n_q, 2), size=heldout, replace=False))
    acc: dict = {}

    def add(index, setting, layer, kind, **kw):
        r = acc.setdefault((index, setting), {"index": index, "setting": setting, "keys_per_head": N,
                                              "layers": 0, "recall": {}, "scanned": 0, "searched": 0,
                                              "step_s": 0.0, "build_s": 0.0, "bytes_per_key": 0.0})
        for name, v in kw.items():
            if name == "recall":
                r["recall"].setdefault(kind, []).append(v)
            else:
                r[name] += v

    for li, layer in enumerate(layers):
        t_layer = time.perf_counter()
        keys16 = np.ascontiguousarray(K[layer])  # [KVH, N, D]
        keys32 = torch.from_numpy(keys16.astype(np.float32))
        qsets = {
            "decode": torch.from_numpy(DQ[layer]).reshape(KVH, G, -1, D),          # [KVH, G, T, D]
            "heldout": torch.from_numpy(np.asarray(Q[layer][:, held_slots], np.float32)).reshape(KVH, G, -1, D),
        }
        truth = {name: torch.stack([exact_topk(q[h].reshape(-1, D), keys32[h], 100) for h in range(KVH)]).numpy()
                 for name, q in qsets.items()}  # [KVH, G*T, 100]
        # each decode query's attention weights over all keys (scale 1/sqrt(D)), for mass recall
        probs = torch.softmax(torch.bmm(qsets["decode"].reshape(KVH, -1, D), keys32.transpose(1, 2)) / D ** 0.5, -1)
        truth_mass = torch.gather(probs, 2, torch.from_numpy(truth["decode"]).long()).sum(-1)  # [KVH, G*T]

        def run(index, setting, search, step_timer=True):
            """search(q [KVH, G, D] one token) -> ids [KVH, G, 100]; timed per token (= one decode step)."""
            for name, q in qsets.items():
                T = q.shape[2]
                ids = np.empty((KVH, G, T, 100), np.int64)
                t = time.perf_counter()
                for i in range(T):
                    ids[:, :, i] = search(q[:, :, i])
                el = time.perf_counter() - t
                ids = ids.reshape(KVH, G * T, 100)
                rec = np.mean([recall(ids[h], truth[name][h]) for h in range(KVH)])
                add(index, setting, layer, name, recall=rec)
                if name == "decode":
                    got = torch.gather(probs, 2, torch.from_numpy(ids).long()).sum(-1)
                    add(index, setting, layer, "mass", recall=float((got / truth_mass).mean()))
                    add(index, setting, layer, name, step_s=el / T, layers=1)

        # flat: exact, scores every key
        flat = FlatLayerIndex(keys32)
        run("flat", "exact", lambda q: flat.search(q, 100)[0].numpy())
        add("flat", "exact", layer, "", scanned=1, searched=1)
        # the attention output over all N keys, and flat top-100's error against it (decode queries)
        values32 = torch.from_numpy(np.asarray(V[layer], np.float32))
        o_full = torch.bmm(probs, values32)                                   # [KVH, G*T, D]
        qd = qsets["decode"].reshape(KVH, -1, D)
        ids, sc = flat.search(qd, 100)
        heads = torch.arange(KVH)[:, None, None]
        add("flat", "exact", layer, "out_err", recall=out_error(attention_from_scores(sc, values32[heads, ids], D ** -0.5)[0], o_full))

        # the clustered index (core/cluster.py): each budget's retrieved members, and the output
        # with and without the estimated zone
        if "cluster" in indexes:
            t = time.perf_counter()
            tabs = [head_tables(keys16[h], V[layer, h], cluster_keys(keys16[h]), n_clusters(N)) for h in range(KVH)]
            build_s = time.perf_counter() - t
            tables = {name: np.stack([tb[i] for tb in tabs])
                      for i, name in enumerate(("centroids", "sizes", "vsums", "order", "offsets"))}
            size = sum(a.nbytes for a in tables.values()) / (KVH * N)
            for r_frac, e_frac in cluster_budgets:
                ix = ClusterLayerIndex(tables, keys16, retrieve=r_frac, estimate=e_frac)
                setting = f"r={r_frac} e={e_frac}"
                T = qsets["decode"].shape[2]
                zs, el = [], 0.0
                for i in range(T):  # one decode step: retrieval + gathering values + the two partials
                    q1 = qsets["decode"][:, :, i]
                    t = time.perf_counter()
                    z = ix.zones(q1, 100, D ** -0.5)  # timed: the search (as for the other indexes)
                    el += time.perf_counter() - t
                    vals = values32[heads, z.ids.clamp_min(0)]
                    parts = [attention_from_scores(z.scores, vals, D ** -0.5)]
                    if z.estimate is not None:
                        parts.append(estimated_attention(z.estimate, D ** -0.5, vals))
                    o = merge(parts)[0]
                    zs.append((z, o, parts[0][0]))
                ids = [z.ids for z, _, _ in zs]  # per step [KVH, G, K_i]
                rec = np.mean([len(np.intersect1d(ids[i][h, g].numpy(), truth["decode"][h, g * T + i])) / 100
                               for i in range(T) for h in range(KVH) for g in range(G)])
                mass = np.mean([float(probs[h, g * T + i, ids[i][h, g][ids[i][h, g] >= 0]].sum() / truth_mass[h, g * T + i])
                                for i in range(T) for h in range(KVH) for g in range(G)])
                o_all = torch.stack([o for _, o, _ in zs], 2).reshape(KVH, -1, D)    # [KVH, G*T, D]
                o_ret = torch.stack([o for _, _, o in zs], 2).reshape(KVH, -1, D)
                scanned = np.mean([(ix.c + float((z.ids >= 0).sum()) / (KVH * G)) / N for z, _, _ in zs])
                add("cluster", setting, layer, "decode", recall=rec, step_s=el / T, layers=1)
                add("cluster", setting, layer, "heldout", recall=float("nan"))
                add("cluster", setting, layer, "mass", recall=mass)
                add("cluster", setting, layer, "out_err", recall=out_error(o_all, o_full))
                add("cluster", setting, layer, "out_err_retrieved", recall=out_error(o_ret, o_full))
                add("cluster", setting, layer, "", scanned=scanned, searched=1, build_s=build_s, bytes_per_key=size)

        # the query-aware graph
        qb = np.asarray(Q[layer][:, build_slots], np.float32).reshape(KVH, G * len(build_slots), D)
        t = time.perf_counter()
        parts = [build_head(keys16[h], qb[h], **graph_kw) for h in range(KVH)]
        build_s = time.perf_counter() - t
        g, c, e, co, b = (np.stack([p[i] for p in parts]) for i in range(5))
        # as stored (core/graph.py build_graph_dir): ids in 3 bytes, directions fp32
        size = 3 * g.size + 3 * e.size + c.nbytes + co.nbytes + b.nbytes
        GraphLayerIndex(keys16, g, c, e, co, b).search(qsets["decode"][:, :, 0], 100)  # compile (cached) before timing
        for ef in efs:
            ix = GraphLayerIndex(keys16, g, c, e, co, b, ef=ef, n_probe=n_probe, coarse_probe=coarse_probe)
            run("graph", f"ef={ef}", lambda q: ix.search(q.reshape(KVH, G, D), 100)[0].numpy())
            add("graph", f"ef={ef}", layer, "", scanned=ix.scanned / N, searched=ix.searched,
                build_s=build_s, bytes_per_key=size / (KVH * N))

        # hnswlib on raw and on mean-centred keys (time: hnswlib's own search; scanned: the same
        # best-first search run by our kernel over hnswlib's level-0 graph from its entry point)
        for variant in [v for v in ("raw", "centred") if f"hnsw-{v}" in indexes]:
            mu = keys32.mean(dim=1, keepdim=True) if variant == "centred" else torch.zeros(KVH, 1, D)
            graphs, level0 = [], []
            t = time.perf_counter()
            for h in range(KVH):
                hx = hnswlib.Index(space="ip", dim=D)
                hx.init_index(max_elements=N, M=HNSW_M, ef_construction=HNSW_EF_CONSTRUCTION, random_seed=0)  # as shipped
                hx.set_num_threads(os.cpu_count() or 1)
                hx.add_items((keys32[h] - mu[h]).numpy(), np.arange(N))
                graphs.append(hx)
            hb = time.perf_counter() - t
            for h, hx in enumerate(graphs):
                f = work / f"tmp-{variant}-{h}.hnsw"
                hx.save_index(str(f))
                level0.append(hnsw_level0(f, N))
                f.unlink()
            size = sum(hx.index_file_size() for hx in graphs) / (KVH * N)
            lg = np.stack([lv[0] for lv in level0])
            lent = np.array([[[lv[1]]] for lv in level0], np.int32)  # [KVH, 1, 1]
            for ef in hnsw_efs:
                for hx in graphs:
                    hx.set_ef(ef)
                    hx.set_num_threads(1)

                def search(q, graphs=graphs):
                    return np.stack([hx.knn_query(q[h].numpy(), k=100)[0] for h, hx in enumerate(graphs)])

                run(f"hnsw-{variant}", f"ef={ef}", search)
                counter = GraphLayerIndex(keys16, lg, np.zeros((KVH, 1, D), np.float32), lent, ef=ef, n_probe=1,
                                          positional=False)
                counter.search(qsets["decode"].reshape(KVH, -1, D), 100)
                add(f"hnsw-{variant}", f"ef={ef}", layer, "", scanned=counter.scanned / N, searched=counter.searched,
                    build_s=hb, bytes_per_key=size)
        log(f"layer {layer} done ({li + 1}/{len(layers)}, {time.perf_counter() - t_layer:.0f} s)")

    rows = []
    for r in acc.values():
        n_layers = len(layers)
        rows.append({
            "index": r["index"], "setting": r["setting"], "keys_per_head": N,
            "recall_at_100": round(float(np.mean(r["recall"]["decode"])), 4),
            "recall_heldout": round(float(np.mean(r["recall"]["heldout"])), 4),
            # relative L2 error of the attention output against attention over all N keys (decode)
            "out_err": round(float(np.mean(r["recall"].get("out_err", [float("nan")]))), 4),
            "out_err_retrieved_only": round(float(np.mean(r["recall"].get("out_err_retrieved", [float("nan")]))), 4),
            # softmax mass of the retrieved keys / mass of the exact top-100 (decode queries)
            "mass_recall": round(float(np.mean(r["recall"]["mass"])), 4),
            "scanned_fraction": round(r["scanned"] / max(r["searched"], 1), 5),
            # per decode step: all layers, 9 query heads, one token (measured layers scaled to all L)
            "step_ms": round(1000 * r["step_s"] / max(r["layers"], 1) * L, 2),
            "build_s_all_heads": round(r["build_s"] / n_layers * L, 1),
            "index_bytes_per_key_head": round(r["bytes_per_key"] / n_layers, 1),
            "layers_measured": n_layers,
        })
    return rows


def main() -> None:
    from core import graph as gr

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=102_400, help="keys per KV head (captured tokens)")
    ap.add_argument("--work", default=str(ROOT / "bench_out" / "index_recall"))
    ap.add_argument("--capture-only", action="store_true")
    ap.add_argument("--layers", default="0,6,12,18,24,29", help="layers to measure ('all' for every layer)")
    ap.add_argument("--build-positions", type=int, default=4096,
                    help="prefill positions whose queries build the graph (4%%, as a store keeps)")
    ap.add_argument("--heldout", type=int, default=64, help="held-out prefill positions to evaluate on")
    ap.add_argument("--ef", default="100,150,175,200,300", help="graph search widths")
    ap.add_argument("--hnsw-ef", default="100,200,400,800", help="hnswlib search widths")
    ap.add_argument("--degree", type=int, default=gr.DEGREE)
    ap.add_argument("--fan", type=int, default=gr.FAN)
    ap.add_argument("--clusters", type=int, default=None,
                    help="query directions (default: core.graph.n_clusters_for: 1,024 at 100K keys)")
    ap.add_argument("--coarse", type=int, default=gr.N_COARSE, help="groups of directions")
    ap.add_argument("--entries", type=int, default=gr.N_ENTRY, help="entry keys per direction")
    ap.add_argument("--no-hub-norm", dest="hub_norm", action="store_false",
                    help="do not divide co-attention weights by sqrt(partner's list count)")
    ap.add_argument("--probe", type=int, default=gr.N_PROBE, help="clusters whose entry keys seed a search")
    ap.add_argument("--coarse-probe", type=int, default=gr.COARSE_PROBE, help="groups whose directions a query scores")
    ap.add_argument("--key-degree", type=int, default=gr.KEY_DEGREE, help="graph slots given to key-key neighbours")
    ap.add_argument("--indexes", default="graph,hnsw-raw,hnsw-centred,cluster", help="besides flat, always measured")
    ap.add_argument("--cluster-budgets", default="0.018:0,0.018:0.232",
                    help="cluster index budgets, retrieve:estimate fractions, comma-separated")
    ap.add_argument("--json", action="store_true", help="one JSON object per (index, setting) on stdout")
    ap.add_argument("--save", default=None, help="also write the JSON rows to this file")
    ap.add_argument("--plot", default=None, help="write a recall-vs-scanned PNG here")
    args = ap.parse_args()
    log = lambda m: print(m, file=sys.stderr, flush=True)
    work = capture(args.keys, Path(args.work), log)
    if args.capture_only:
        return
    info = json.loads((work / "done.json").read_text())
    L = info["layers"]
    layers = list(range(L)) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    from core.graph import set_threads

    set_threads()
    rows = evaluate(work, args.keys, layers, args.build_positions, args.heldout, [int(x) for x in args.ef.split(",")],
                    [int(x) for x in args.hnsw_ef.split(",")], log,
                    dict(degree=args.degree, fan=args.fan, n_clusters=args.clusters, n_entry=args.entries,
                         key_degree=args.key_degree, tmp=work, hub_norm=args.hub_norm, n_coarse=args.coarse),
                    args.indexes.split(","), args.probe, args.coarse_probe,
                    [tuple(float(x) for x in b.split(":")) for b in args.cluster_budgets.split(",")])
    if args.save:
        Path(args.save).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    from benchmarks.bench_ask import machine

    print(f"machine: {machine()}")
    print(f"SmolLM2-135M keys, {args.keys:,} per KV head ({-(-args.keys // CHUNK)} chunks of {CHUNK}); "
          f"layers {args.layers}; graph built from {args.build_positions} prefill positions x {info['q_heads'] // info['kv_heads']} "
          f"query heads per KV head (degree {args.degree} of which {args.key_degree} key-key, fan {args.fan}, {args.clusters or 'auto'} "
          f"directions in {args.coarse} groups x {args.entries} entries, probe {args.probe} of {args.coarse_probe} groups); decode queries: {info['question']!r} + answer")
    print(f"prefill of the same {info['keys']:,} tokens (the capture): {info['capture_s']:.0f} s; fp16 K+V: "
          f"{4 * info['head_dim']} bytes/key/head\n")
    print("| index | setting | recall@100 decode | recall@100 held-out prefill | attention mass vs exact top-100 | output error vs all keys | keys scored | step ms (all layers) | vs flat | build s (all heads) | build / prefill | index bytes/key/head |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    flat_ms = next(r["step_ms"] for r in rows if r["index"] == "flat")
    for r in rows:
        print(f"| {r['index']} | {r['setting']} | {r['recall_at_100']:.3f} | {r['recall_heldout']:.3f} | {r['mass_recall']:.4f} | "
              f"{r['out_err']:.4f} | {100 * r['scanned_fraction']:.2f}% | {r['step_ms']:.1f} | {flat_ms / r['step_ms']:.1f}x | "
              f"{r['build_s_all_heads']:.0f} | {r['build_s_all_heads'] / info['capture_s']:.2f} | {r['index_bytes_per_key_head']:.0f} |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in dict.fromkeys(r["index"] for r in rows):
            pts = [(100 * r["scanned_fraction"], r["recall_at_100"]) for r in rows if r["index"] == name]
            ax.plot(*zip(*pts), "o-" if len(pts) > 1 else "s", label=name)
        ax.set_xscale("log")
        ax.axhline(0.95, color="grey", lw=0.8, ls="--")
        ax.axvline(2.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("keys scored per query (% of all keys, log)")
        ax.set_ylabel("recall of the exact top-100")
        ax.set_title(f"SmolLM2-135M, {args.keys:,} real keys per head: recall vs keys scored")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
