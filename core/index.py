"""Vector indexes over one layer's offloaded keys: which keys will a query attend to most?

One index per (layer, KV head); every query head of the GQA group searches its KV head's index.
`search(q [KVH, M, D], k) -> (ids, scores)`, both [KVH, M, k] on the CPU: the positions (in the
offloaded range) of each query's top-k keys and their exact logits q.k (unscaled), so attention
over the retrieved keys needs only their values.

  flat  exact: q @ K^T, then top-k. Scans every key; the reference for recall and the right
        choice for short documents (measured: 10 ms per decode step vs 27 ms for hnswlib at
        6.4K keys per head, SmolLM2, 2 cores; see ../BENCHMARKS.md). It reads the offloaded keys
        into an fp32 copy at its first search (4 bytes per key element), not when it is opened.
  hnsw  hnswlib inner-product graph over *mean-centred* keys. Subtracting one vector mu from every
        key shifts each of a query's logits by the same q.mu, so ranking and softmax are unchanged,
        but the keys become far less one-sided and the graph far easier to search (recall@100 on
        SmolLM2's real keys: 0.50 -> 0.89 at ef=100, 0.96 at ef=200).
  graph the query-aware graph of core/graph.py (built from the document's prefill queries).

  exact no index: every offloaded key is attended exactly (core/layer.Retriever.partial: a decode
        step over the stored fp16 K/V in place, core/attention_f16; a question through the fused
        kernel, as the static zone's). Where ra
        would score every key anyway (flat, the clustered index's scan) this costs less than
        scoring, selecting and gathering (BENCHMARKS.md, "exact"), and it is full attention.
        `auto` uses it for documents inside the window up to `scan_max` offloaded keys per head.
  cluster segmented spherical k-means clusters (core/cluster.py): the true top-k (up to 16K keys
        per head, a scan) or the best clusters are attended exactly, the next clusters estimated
        from their centroids and value sums (tripartite attention); the clusters are chosen by a
        dense score over N / 16 centroids.

Index kinds are a registry (`KINDS`): each has one `build(keys, values, queries, n_layers, out,
progress, start_layer)` (layer by layer, so an interrupted build resumes) and one `open(index_dir, layer, keys, **options)`, where keys(layer) / values(layer) /
keys are the store's memory-mapped [KVH, N, D] views of the offloaded range and queries(layer) the
entry's sampled prefill queries; `options` names the Settings fields a kind searches with.
A kind's `format` names its directory's layout version (core/store.py): a directory of another
layout is rebuilt beside it, never misread. This module imports torch only when an index is used.

Persisted per index directory: `index.json` (kind and parameters, written last), `means.npy`
float32 [L, KVH, D] and, for hnsw, one hnswlib file per (layer, head) named `l{layer:03d}h{head:02d}.hnsw`
(hnswlib's own binary format, not pickle); graph: see core/graph.py.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import UsageError
from .settings import INDEXES

HNSW_M = 16
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 200


def top_k(scores, k: int):
    """The k largest of each row of scores [..., N] (CPU, fp32), in no particular order -> (ids
    int64, values), by numpy's introselect (argpartition), which took less time than torch.topk
    on decode-step rows here (BENCHMARKS.md, the decode step); among equal scores at the boundary
    either may be kept."""
    import torch

    s = scores.numpy()
    ids = np.argpartition(s, s.shape[-1] - k, axis=-1)[..., s.shape[-1] - k:]
    return torch.from_numpy(ids), torch.from_numpy(np.take_along_axis(s, ids, -1))


def gather_rows(rows, ids, dtype=None):
    """rows [KVH, N, D] (any dtype, CPU; a memory map is fine), ids [KVH, M, K] (-1: a pad, read
    as row 0) -> rows[h, ids[h]] as [KVH, M, K, D] in `dtype` (default float32): one index_select
    per head into a preallocated buffer, then one conversion (faster here than one advanced-index
    gather over [KVH, M, K] and a conversion per caller: see the commit that introduced it)."""
    import torch

    KVH, M, K = ids.shape
    flat = ids.clamp_min(0).reshape(KVH, M * K)
    out = rows.new_empty(KVH, M * K, rows.shape[-1])
    for h in range(KVH):
        torch.index_select(rows[h], 0, flat[h], out=out[h])
    return out.to(dtype or torch.float32).reshape(KVH, M, K, -1)


class FlatLayerIndex:
    """Exact top-k over all offloaded keys of one layer. keys: [KVH, N, D] (any float dtype, CPU;
    a memory map is read, into an fp32 copy kept for later questions, at the first search). The
    copy is laid out [KVH, D, N]: one plain matrix product per KV head, q [M, D] x [D, N], which
    for decode-sized M beat a batched product over the [N, D] rows here (BENCHMARKS.md, the
    decode step)."""

    def __init__(self, keys):
        self.source, self.keys_t = keys, None

    def search(self, q, k: int):
        import torch

        if self.keys_t is None:
            src = self.source if isinstance(self.source, torch.Tensor) else torch.from_numpy(self.source)
            self.keys_t = src.float().transpose(1, 2).contiguous()  # [KVH, D, N] fp32
        q = q.to("cpu", torch.float32)                              # [KVH, M, D]
        scores = q.new_empty(q.shape[0], q.shape[1], self.keys_t.shape[-1])
        for h in range(q.shape[0]):
            torch.mm(q[h], self.keys_t[h], out=scores[h])           # [M, N]
        return top_k(scores, k)


class ExactLayerIndex(FlatLayerIndex):
    """The `exact` kind: nothing to search. A Retriever over it attends every offloaded key
    (`Retriever.partial`); `search` (every key's exact logit, the flat scan) serves tests and
    benchmarks that ask an index for its top-k."""

    exact = True


class HnswLayerIndex:
    """hnswlib graphs over one layer's mean-centred keys, one per KV head. means: [KVH, D]."""

    def __init__(self, graphs: list, means: np.ndarray, ef: int = HNSW_EF_SEARCH):
        self.graphs, self.means, self.ef = graphs, means, ef

    def search(self, q, k: int):
        import torch

        q = q.to("cpu", torch.float32).numpy()
        ids = np.empty((q.shape[0], q.shape[1], k), dtype=np.int64)
        scores = np.empty((q.shape[0], q.shape[1], k), dtype=np.float32)
        for h, g in enumerate(self.graphs):
            g.set_ef(max(self.ef, k))  # ef is not persisted by hnswlib and must be >= k
            labels, dist = g.knn_query(q[h], k=k)
            ids[h] = labels
            # ip space: dist = 1 - q.(key - mu), so q.key = 1 - dist + q.mu
            scores[h] = 1.0 - dist + (q[h] @ self.means[h])[:, None]
        return torch.from_numpy(ids), torch.from_numpy(scores)


def build_hnsw(keys: np.ndarray, path: Path, M: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION):
    """Build and save one graph. keys: float32 [N, D], already centred."""
    import hnswlib

    n, d = keys.shape
    g = hnswlib.Index(space="ip", dim=d)
    g.init_index(max_elements=n, M=M, ef_construction=ef_construction, random_seed=0)
    g.set_num_threads(os.cpu_count() or 1)
    g.add_items(keys, np.arange(n))
    g.save_index(str(path))


def load_hnsw(path: Path, dim: int, n: int):
    import hnswlib

    g = hnswlib.Index(space="ip", dim=dim)
    g.load_index(str(path), max_elements=n)
    g.set_num_threads(1)
    return g


# ----------------------------------------------------------------------------- the kinds

def _build_means(keys, n_layers: int, out: Path, progress, hnsw: bool, start_layer: int = 0) -> None:
    from .store import open_rows

    first = keys(0)
    means = open_rows(out / "means.npy", np.float32, (n_layers, first.shape[0], first.shape[2]), reuse=start_layer > 0)
    for layer in range(start_layer, n_layers):
        k = keys(layer)
        means[layer] = 0.0
        if k.shape[1] > 0:
            k = np.asarray(k, np.float32)
            means[layer] = k.mean(axis=1)
            for h in range(k.shape[0]) if hnsw else ():
                build_hnsw(np.ascontiguousarray(k[h] - means[layer, h]), out / f"l{layer:03d}h{h:02d}.hnsw")
        if progress:
            progress(layer + 1, n_layers)
    means.flush()


def _build_flat(keys, values, queries, n_layers, out, progress, start_layer=0):
    _build_means(keys, n_layers, out, progress, hnsw=False, start_layer=start_layer)
    (out / "index.json").write_text(json.dumps({"kind": "flat"}))


def _build_exact(keys, values, queries, n_layers, out, progress, start_layer=0):
    if progress:
        progress(n_layers, n_layers)
    (out / "index.json").write_text(json.dumps({"kind": "exact"}))


def _build_hnsw(keys, values, queries, n_layers, out, progress, start_layer=0):
    _build_means(keys, n_layers, out, progress, hnsw=True, start_layer=start_layer)
    (out / "index.json").write_text(json.dumps({"kind": "hnsw", "M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION}))


def _open_hnsw(index_dir: Path, layer: int, keys, ef: int = HNSW_EF_SEARCH):
    means = np.load(index_dir / "means.npy", allow_pickle=False)[layer]
    kvh, n, dim = keys.shape
    return HnswLayerIndex([load_hnsw(index_dir / f"l{layer:03d}h{h:02d}.hnsw", dim, n) for h in range(kvh)], means, ef)


def _build_graph(keys, values, queries, n_layers, out, progress, start_layer=0):
    from .graph import build_graph_dir

    build_graph_dir(keys, queries, n_layers, out, progress, start_layer=start_layer)


def _open_graph(index_dir: Path, layer: int, keys, **kw):
    from .graph import open_graph_layer

    return open_graph_layer(index_dir, layer, keys, **kw)


def _build_cluster(keys, values, queries, n_layers, out, progress, start_layer=0):
    from .cluster import build_cluster_dir

    build_cluster_dir(keys, values, n_layers, out, progress, start_layer=start_layer)


def _open_cluster(index_dir: Path, layer: int, keys, **kw):
    from .cluster import open_cluster_layer

    return open_cluster_layer(index_dir, layer, keys, **kw)


@dataclass(frozen=True)
class IndexKind:
    name: str
    build: Callable        # (keys(layer), values(layer), queries(layer), n_layers, out_dir, progress,
                           #  start_layer=0) -> None; progress(layers_done, n_layers) after each layer,
                           #  whose files are then written; start_layer > 0 resumes into `out`
    open: Callable         # (index_dir, layer, keys [KVH, N, D] memory map, **search options) -> index
    format: str = ""       # layout version in the directory name (bumped when the files change)
    needs_fp16: bool = False
    options: tuple = ()    # Settings fields passed to `open` as search options


KINDS: dict[str, IndexKind] = {k.name: k for k in (
    IndexKind("flat", _build_flat, lambda d, layer, keys: FlatLayerIndex(keys)),
    # every offloaded key attended exactly: no files but index.json
    IndexKind("exact", _build_exact, lambda d, layer, keys: ExactLayerIndex(keys)),
    IndexKind("hnsw", _build_hnsw, _open_hnsw),
    # .v2: grouped directions, 24-bit ids (core/graph.py)
    IndexKind("graph", _build_graph, _open_graph, format=".v2", needs_fp16=True),
    # tripartite: retrieved + estimated clusters (core/cluster.py)
    IndexKind("cluster", _build_cluster, _open_cluster, options=("retrieve", "estimate", "scan_max")),
)}
assert tuple(KINDS) == INDEXES, "core/settings.INDEXES names the kinds (the CLI checks --index without numpy)"


def kind(name: str) -> IndexKind:
    """The registered kind `name`, or a UsageError listing the kinds."""
    if name not in KINDS:
        raise UsageError(f"unknown index kind {name!r} (choose from {', '.join(KINDS)})")
    return KINDS[name]
