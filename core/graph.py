"""The query-aware graph index: find a query's top-k keys while scoring a small fraction of them.

Why: decode-time queries and keys come from different distributions, so a graph built from
key-key similarity alone (hnswlib) leads a query astray unless it scans many keys. Like
RetrievalAttention (arXiv 2409.10516, after RoarGraph), this graph is built from the document's
own prefill queries, which are distributed like the decode queries:

  build, per KV head, from m prefill queries (all query heads of the GQA group):
    1. exact top-`fan` keys of every build query (blocked torch matmul, memory-bounded);
    2. projection: two keys are linked when they are among the top keys of the same queries;
       each key keeps its most co-attended partners (weighted by rank and divided by the square
       root of the partner's number of lists, so hubs that sit in every list do not fill it);
    3. key-key links: `key_degree` of the slots hold hnswlib's level-0 neighbours over mean-centred
       keys (a diversified local neighbourhood, so the beam can climb towards higher q.k);
    4. positional links: key i also reaches i-1 and i+1 (implicit, not stored), because attention
       goes to spans of text, and it makes every key reachable;
    5. entry points: the build queries are clustered by direction (spherical k-means, `n_clusters`);
       each cluster keeps the `n_entry` keys its queries attend to most. The cluster centroids are
       themselves grouped (`n_coarse` groups), so a query scores the groups and then only the
       centroids of its `coarse_probe` best groups: many fine clusters for the cost of few.
  search, per query: pick the `n_probe` best clusters (two levels), seed a best-first beam with
  their entry keys (fewer from each next-best cluster), expand neighbours while they can still enter the `ef` best; return the k best
  ids and their exact logits (fp16 keys from the store, fp32 arithmetic).

Storage (index directory, all memory-mapped on open; nothing is copied or unpickled):
  graph.npy      uint8 [L, KVH, N, degree, 3]  neighbour ids into the offloaded range (24-bit, see pack_ids)
  centroids.npy  fp32  [L, KVH, C, D]        unit query directions, ordered by group
  coarse.npy     fp32  [L, KVH, C2, D]       unit group directions
  bounds.npy     int32 [L, KVH, C2 + 1]      group j holds centroids bounds[j]:bounds[j+1]
  entries.npy    uint8 [L, KVH, C, n_entry, 3]  entry keys per centroid (24-bit)
(core/store.py names the directory with a format number, so an index of an older layout is rebuilt,
never misread.)
Keys are not duplicated: search reads the store's fp16 keys through their memory map.

The kernels are numba-compiled (cached on disk after the first run) and run the queries of a
layer in parallel threads; `scanned` counts every key and centroid scored.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numba
import numpy as np
import torch
from numba import njit, prange

# defaults picked on benchmarks/index_recall.py (100K real keys per head; see BENCHMARKS.md)
DEGREE = 15        # stored neighbours per key: 45 bytes/key/head (24-bit ids) + entries <= 25% of fp16 K+V
KEY_DEGREE = 8     # ... of which key-key neighbours (the rest: co-attention partners)
FAN = 100          # top keys per build query that get projected to edges
N_CLUSTERS = 1024  # query directions (at most; one per KEYS_PER_CLUSTER keys and per QUERIES_PER_CLUSTER
KEYS_PER_CLUSTER = 100    # build queries): the seeds do most of the work and finer directions seed
QUERIES_PER_CLUSTER = 12  # better, but the entry table is fixed-size and each needs queries to vote
N_COARSE = 32      # groups of directions: a query scores 32 groups + the ~100 directions of 3 of them
COARSE_PROBE = 3   # groups whose directions a query scores
N_ENTRY = 512      # entry keys per direction
N_PROBE = 4        # directions whose entry keys seed a search, the t-th best giving (N_PROBE - t) / N_PROBE
                   # of its entries (512, 384, 256, 128; tuned on index_recall.py's capture)
EF = 175           # search width (the beam); >= k


# ----------------------------------------------------------------------------- build

def exact_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, block: int = 512) -> torch.Tensor:
    """queries [m, D], keys [N, D] (fp32) -> ids [m, k] of each query's k highest q.k, best first."""
    out = torch.empty(queries.shape[0], k, dtype=torch.int32)
    for s in range(0, queries.shape[0], block):
        scores = queries[s:s + block] @ keys.T  # [b, N]: block keeps this at block * N floats
        out[s:s + block] = scores.topk(k, dim=-1, sorted=True).indices.to(torch.int32)
    return out


def spherical_kmeans(x: torch.Tensor, n: int, iters: int = 12, seed: int = 0):
    """Cluster rows of x [m, D] by direction. -> (unit centroids [n, D], assignment [m])."""
    x = torch.nn.functional.normalize(x, dim=-1)
    g = torch.Generator().manual_seed(seed)
    n = min(n, x.shape[0])
    c = x[torch.randperm(x.shape[0], generator=g)[:n]].clone()
    for _ in range(iters):
        assign = (x @ c.T).argmax(dim=-1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        empty = sums.norm(dim=-1) == 0
        sums[empty] = c[empty]  # an empty cluster keeps its centroid
        c = torch.nn.functional.normalize(sums, dim=-1)
    return c, (x @ c.T).argmax(dim=-1)


@njit(cache=True, nogil=True)
def _project(lists, n_keys, degree, hub_norm=False):
    """lists int32 [m, fan] (best first) -> neighbours int32 [n_keys, degree], -1 padded.

    Co-attention weight of (x, y) = sum over the queries that rank both of 1/(1+rank_x+rank_y):
    pairs near the top of many queries' lists weigh most."""
    m, fan = lists.shape
    # inverted lists: for each key, the (query, rank) pairs it appears in (CSR)
    counts = np.zeros(n_keys + 1, np.int64)
    for i in range(m):
        for r in range(fan):
            counts[lists[i, r] + 1] += 1
    starts = np.cumsum(counts)
    fill = starts[:-1].copy()
    occ_q = np.empty(m * fan, np.int32)
    occ_r = np.empty(m * fan, np.int32)
    for i in range(m):
        for r in range(fan):
            x = lists[i, r]
            occ_q[fill[x]] = i
            occ_r[fill[x]] = r
            fill[x] += 1
    out = np.full((n_keys, degree), -1, np.int32)
    weight = np.zeros(n_keys, np.float32)
    touched = np.empty(n_keys, np.int32)
    for x in range(n_keys):
        nt = 0
        for j in range(starts[x], starts[x + 1]):
            i, rx = occ_q[j], occ_r[j]
            for ry in range(fan):
                y = lists[i, ry]
                if y == x:
                    continue
                if weight[y] == 0.0:
                    touched[nt] = y
                    nt += 1
                weight[y] += 1.0 / (1.0 + rx + ry)
        if nt > 0:
            w = np.empty(nt, np.float32)
            for t in range(nt):
                w[t] = weight[touched[t]]
                if hub_norm:  # a key that sits in every list says little about its partners
                    y = touched[t]
                    w[t] /= np.sqrt(np.float32(starts[y + 1] - starts[y]))
            order = np.argsort(-w)
            for t in range(min(degree, nt)):
                out[x, t] = touched[order[t]]
            for t in range(nt):
                weight[touched[t]] = 0.0
    return out


def _entries(lists: np.ndarray, assign: np.ndarray, n_clusters: int, n_entry: int) -> np.ndarray:
    """Per cluster, the keys its queries rank highest (rank-weighted votes). -> int32 [C, n_entry]."""
    out = np.full((n_clusters, n_entry), -1, np.int32)
    fan = lists.shape[1]
    w = 1.0 / (1.0 + np.arange(fan))
    for c in range(n_clusters):
        members = lists[assign == c]
        if len(members) == 0:
            continue
        ids, inv = np.unique(members.ravel(), return_inverse=True)
        votes = np.bincount(inv, weights=np.tile(w, len(members)))
        top = ids[np.argsort(-votes, kind="stable")[:n_entry]]
        out[c, :len(top)] = top
    return out


def hnsw_level0(path: Path, n: int):
    """Level-0 adjacency of a saved hnswlib index: (int32 [n, maxM0] with -1 padding, entry point).

    hnswlib's file (hnswalg.h saveIndex): 6 size_t, int maxlevel, uint32 entry point, 3 size_t,
    double mult, size_t ef_construction, then n level-0 records of size_data_per_element bytes:
    uint32 link count, maxM0 uint32 links, the vector, the label. Read with numpy, no pickle."""
    raw = np.fromfile(path, dtype=np.uint8)
    hdr = raw[:96]
    off0, _maxel, count, size_per, _label_off, _data_off = (int(x) for x in hdr[:48].view(np.uint64))
    entry = int(hdr[52:56].view(np.uint32)[0])
    maxm0 = int(hdr[64:72].view(np.uint64)[0])
    if off0 != 0 or count != n:
        raise ValueError(f"unexpected hnswlib file layout in {path}")
    rec = raw[96:96 + n * size_per].reshape(n, size_per)
    links = rec[:, :4 * (1 + maxm0)].copy().view(np.uint32).reshape(n, 1 + maxm0)
    cnt = (links[:, 0] & 0xFFFF).astype(np.int64)
    graph = links[:, 1:].astype(np.int32)
    graph[np.arange(maxm0)[None, :] >= cnt[:, None]] = -1
    return graph, entry


def key_graph(keys: np.ndarray, degree: int, tmp: Path, ef_construction: int = 64) -> np.ndarray:
    """Key-key neighbours (hnswlib's level-0 links over mean-centred keys, its own diversified
    selection), first `degree` per key. keys: [N, D] -> int32 [N, degree]."""
    import hnswlib

    k = np.asarray(keys, np.float32)
    k = k - k.mean(axis=0)
    g = hnswlib.Index(space="ip", dim=k.shape[1])
    g.init_index(max_elements=len(k), M=max(8, degree // 2), ef_construction=ef_construction, random_seed=0)
    g.set_num_threads(os.cpu_count() or 1)
    g.add_items(k, np.arange(len(k)))
    f = tmp / f"keygraph-{os.getpid()}.hnsw"
    g.save_index(str(f))
    try:
        return hnsw_level0(f, len(k))[0][:, :degree]
    finally:
        f.unlink()


@njit(cache=True, nogil=True)
def _merge(a, b, degree):
    """Row-wise union of two neighbour tables (a first), deduplicated, -1 padded to degree."""
    n = a.shape[0]
    both = np.concatenate((a, b), axis=1)
    out = np.full((n, degree), -1, np.int32)
    for x in range(n):
        t = 0
        for j in range(both.shape[1]):
            y = both[x, j]
            if y < 0 or t >= degree:
                continue
            dup = False
            for u in range(t):
                if out[x, u] == y:
                    dup = True
                    break
            if not dup:
                out[x, t] = y
                t += 1
    return out


def n_clusters_for(n_keys: int, n_queries: int) -> int:
    """Query directions for a head of n_keys keys and n_queries build queries: one per
    KEYS_PER_CLUSTER keys (the direction + entry table stays ~18 bytes per key on short documents
    too) and per QUERIES_PER_CLUSTER queries (an entry table voted by 3-4 queries seeds badly:
    measured on a whole-book entry kept with 1% of its positions), 64 to N_CLUSTERS."""
    return int(min(N_CLUSTERS, max(64, min(n_keys // KEYS_PER_CLUSTER, n_queries // QUERIES_PER_CLUSTER))))


def grouped_clusters(q: torch.Tensor, n_clusters: int, n_coarse: int):
    """Two-level spherical k-means of queries q [m, D].

    -> (centroids [C, D] ordered by group, assignment [m] into that order, coarse [C2, D],
        bounds int32 [C2 + 1]); fewer queries than clusters leave zero rows after bounds[-1]
        (never scored) and empty groups."""
    cents, assign = spherical_kmeans(q, n_clusters)
    coarse, group = spherical_kmeans(cents, n_coarse)
    order = torch.argsort(group, stable=True)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(len(order))
    bounds = np.zeros(n_coarse + 1, np.int32)
    bounds[1:coarse.shape[0] + 1] = np.cumsum(np.bincount(group.numpy(), minlength=coarse.shape[0]))
    bounds[coarse.shape[0] + 1:] = bounds[coarse.shape[0]]
    pad = lambda x, n: torch.cat([x, torch.zeros(n - x.shape[0], x.shape[1])]) if x.shape[0] < n else x
    return pad(cents[order], n_clusters), inv[assign], pad(coarse, n_coarse), bounds


def build_head(keys: np.ndarray, queries: np.ndarray, degree: int = DEGREE, fan: int = FAN,
               n_clusters: int | None = None, n_entry: int = N_ENTRY, key_degree: int = KEY_DEGREE,
               tmp: Path | None = None, hub_norm: bool = True, n_coarse: int = N_COARSE):
    """keys fp16/fp32 [N, D], build queries [m, D] -> (graph [N, degree], centroids [C, D],
    entries [C, n_entry], coarse [C2, D], bounds [C2 + 1]) (see grouped_clusters; C defaults to
    n_clusters_for(N, m)).

    key_degree > 0: that many of the degree slots go to key-key neighbours (see key_graph)."""
    if len(queries) == 0:
        raise ValueError("the graph index is built from the entry's prefill queries, and this entry has none")
    k32 = torch.from_numpy(np.asarray(keys, dtype=np.float32))
    q32 = torch.from_numpy(np.asarray(queries, dtype=np.float32))
    n = k32.shape[0]
    fan = min(fan, n)
    lists = exact_topk(q32, k32, fan).numpy()
    graph = _project(lists, n, degree - key_degree, hub_norm)
    if key_degree > 0:
        graph = _merge(graph, key_graph(k32.numpy(), key_degree, tmp or Path("/tmp")), degree)
    n_clusters = n_clusters or n_clusters_for(n, len(queries))
    cents, assign, coarse, bounds = grouped_clusters(q32, n_clusters, n_coarse)
    entries = _entries(lists, assign.numpy(), n_clusters, n_entry)
    return graph, cents.numpy().astype(np.float32), entries, coarse.numpy().astype(np.float32), bounds


def pack_ids(ids: np.ndarray) -> np.ndarray:
    """int32 key ids (-1 = none) -> uint8 [..., 3], little-endian 24-bit, 0xFFFFFF = none.

    Why: 3 bytes per id instead of 4 is what keeps 15 neighbours per key plus 512 entry keys per
    direction within 25% of the fp16 K+V at 100K keys; it caps a head at 2^24 - 1 keys."""
    ids = np.asarray(ids)
    if ids.size and ids.max() >= 0xFFFFFF:
        raise ValueError("the graph index holds at most 16,777,214 keys per head")
    v = (ids.astype(np.int64) & 0xFFFFFF).astype("<u4")
    return np.ascontiguousarray(v.view(np.uint8).reshape(ids.shape + (4,))[..., :3])


def unpack_ids(packed: np.ndarray) -> np.ndarray:
    """The inverse of pack_ids: uint8 [..., 3] -> int32 [...] with -1 = none."""
    p = np.asarray(packed).astype(np.int32)
    v = p[..., 0] | (p[..., 1] << 8) | (p[..., 2] << 16)
    return np.where(v == 0xFFFFFF, -1, v).astype(np.int32)


# ----------------------------------------------------------------------------- search

@njit(inline="always")
def _id(a, i, t):
    """Entry t of row i of a packed id table (uint8 [rows, width, 3]); -1 = none."""
    v = np.int32(a[i, t, 0]) | (np.int32(a[i, t, 1]) << 8) | (np.int32(a[i, t, 2]) << 16)
    return np.int32(-1) if v == 0xFFFFFF else v


@njit(inline="always")
def _dot_f16(q, row, buf_u, buf_f):
    """q float32 [D] . row (fp16 bits, uint16 [D]) in float32, exact conversion."""
    extra = np.float32(0.0)
    for d in range(q.shape[0]):
        h = np.uint32(row[d])
        if h & 0x7C00:  # normal: rebias the exponent, widen the mantissa
            buf_u[d] = ((h & 0x8000) << 16) | (((h & 0x7FFF) << 13) + 0x38000000)
        else:  # zero or subnormal: m * 2^-24
            buf_u[d] = 0
            v = np.float32(h & 0x3FF) * np.float32(5.9604645e-08)
            extra += q[d] * (-v if h & 0x8000 else v)
    s = np.float32(0.0)
    for d in range(q.shape[0]):
        s += q[d] * buf_f[d]
    return s + extra


@njit(inline="always")
def _heap_push_min(hs, hi, size, s, i):
    """Min-heap on hs (scores) with payload hi; returns the new size."""
    j = size
    hs[j], hi[j] = s, i
    while j > 0:
        p = (j - 1) >> 1
        if hs[p] <= hs[j]:
            break
        hs[p], hs[j] = hs[j], hs[p]
        hi[p], hi[j] = hi[j], hi[p]
        j = p
    return size + 1


@njit(inline="always")
def _heap_pop_min(hs, hi, size):
    """Remove the root of a min-heap; returns the new size."""
    size -= 1
    hs[0], hi[0] = hs[size], hi[size]
    j = 0
    while True:
        l = 2 * j + 1
        if l >= size:
            break
        c = l
        if l + 1 < size and hs[l + 1] < hs[l]:
            c = l + 1
        if hs[j] <= hs[c]:
            break
        hs[c], hs[j] = hs[j], hs[c]
        hi[c], hi[j] = hi[j], hi[c]
        j = c
    return size


@njit(inline="always")
def _dot_f32(q, row):
    s = np.float32(0.0)
    for d in range(q.shape[0]):
        s += q[d] * row[d]
    return s


@njit(cache=True, nogil=True)
def _search_one(q, keys, graph, cents, entries, coarse, bounds, coarse_probe, n_probe, ef, k, positional,
                visited, mark, out_ids, out_scores):
    """Best-first search for one query q [D] over one head. Returns the number of vectors scored."""
    n, degree = graph.shape[0], graph.shape[1]
    D = q.shape[0]
    buf_u = np.empty(D, np.uint32)
    buf_f = buf_u.view(np.float32)
    # results: min-heap of the ef best (root = worst kept); candidates: max-heap via negated scores
    rs = np.empty(ef, np.float32)
    ri = np.empty(ef, np.int32)
    cs = np.empty(n + 1, np.float32)
    ci = np.empty(n + 1, np.int32)
    nr = 0
    nc = 0
    scanned = 0
    # 1a. the coarse_probe groups whose directions best match q
    C2 = coarse.shape[0]
    gscore = np.empty(C2, np.float32)
    for g in range(C2):
        gscore[g] = _dot_f32(q, coarse[g])
    scanned += C2
    gorder = np.argsort(-gscore)
    # 1b. their centroids; the n_probe best give the entry keys
    fid = np.empty(cents.shape[0], np.int32)
    fsc = np.empty(cents.shape[0], np.float32)
    nf = 0
    for t in range(min(coarse_probe, C2)):
        g = gorder[t]
        for c in range(bounds[g], bounds[g + 1]):
            fid[nf] = c
            fsc[nf] = _dot_f32(q, cents[c])
            nf += 1
    scanned += nf
    order = np.argsort(-fsc[:nf])
    for t in range(min(n_probe, nf)):
        # the t-th best direction gives (n_probe - t) / n_probe of its entry keys
        n_e = entries.shape[1] * (n_probe - t) // n_probe
        for e in range(n_e):
            x = _id(entries, fid[order[t]], e)
            if x < 0 or visited[x] == mark:
                continue
            visited[x] = mark
            s = _dot_f16(q, keys[x], buf_u, buf_f)
            scanned += 1
            nc = _heap_push_min(cs, ci, nc, -s, x)
            if nr < ef:
                nr = _heap_push_min(rs, ri, nr, s, x)
            elif s > rs[0]:
                nr = _heap_pop_min(rs, ri, nr)
                nr = _heap_push_min(rs, ri, nr, s, x)
    # 2. best-first expansion: graph neighbours plus the two positional neighbours
    while nc > 0:
        s_best = -cs[0]
        x = ci[0]
        nc = _heap_pop_min(cs, ci, nc)
        if nr >= ef and s_best < rs[0]:
            break
        for t in range(degree + 2 if positional else degree):
            if t < degree:
                y = _id(graph, x, t)
                if y < 0:
                    continue
            elif t == degree:
                y = x - 1
                if y < 0:
                    continue
            else:
                y = x + 1
                if y >= n:
                    continue
            if visited[y] == mark:
                continue
            visited[y] = mark
            s = _dot_f16(q, keys[y], buf_u, buf_f)
            scanned += 1
            if nr < ef:
                nr = _heap_push_min(rs, ri, nr, s, y)
                nc = _heap_push_min(cs, ci, nc, -s, y)
            elif s > rs[0]:
                nr = _heap_pop_min(rs, ri, nr)
                nr = _heap_push_min(rs, ri, nr, s, y)
                nc = _heap_push_min(cs, ci, nc, -s, y)
    # 3. the k best of the kept ones (fewer only if fewer keys exist than k)
    idx = np.argsort(-rs[:nr])
    for t in range(k):
        if t < nr:
            out_ids[t] = ri[idx[t]]
            out_scores[t] = rs[idx[t]]
        else:
            out_ids[t] = out_ids[0]
            out_scores[t] = np.float32(-np.inf)
    return scanned


@njit(parallel=True, cache=True, nogil=True)
def _search_layer(q, keys, graph, cents, entries, coarse, bounds, coarse_probe, n_probe, ef, k, positional,
                  visited, epoch, out_ids, out_scores):
    """q float32 [KVH, M, D]; keys uint16 [KVH, N, D]; visited int32 [S, N] (S parallel slots).

    Tasks (head, query) are dealt to S slots; each slot owns one visited array, marked with a
    task-unique epoch so it never needs clearing. Returns scanned counts [KVH, M]."""
    KVH, M = q.shape[0], q.shape[1]
    S = visited.shape[0]
    scanned = np.zeros((KVH, M), np.int64)
    n_tasks = KVH * M
    for slot in prange(S):
        for task in range(slot, n_tasks, S):
            h, i = task // M, task % M
            scanned[h, i] = _search_one(q[h, i], keys[h], graph[h], cents[h], entries[h], coarse[h], bounds[h],
                                        coarse_probe, n_probe, ef, k, positional, visited[slot], epoch + task,
                                        out_ids[h, i], out_scores[h, i])
    return scanned


class GraphLayerIndex:
    """One layer's graphs (one per KV head) over the offloaded keys, searched in parallel.

    keys: fp16 [KVH, N, D] (the store's memory map); graph/cents/entries/coarse/bounds: this
    layer's slices (coarse/bounds None: the centroids form one group, so every one is scored)."""

    def __init__(self, keys: np.ndarray, graph: np.ndarray, cents: np.ndarray, entries: np.ndarray,
                 coarse: np.ndarray | None = None, bounds: np.ndarray | None = None, ef: int = EF,
                 n_probe: int = N_PROBE, coarse_probe: int = COARSE_PROBE, slots: int | None = None,
                 positional: bool = True):
        if keys.dtype != np.float16:
            raise ValueError("the graph index reads fp16 keys; this store keeps its KV as " + str(keys.dtype))
        # plain ndarray views (numba does not take np.memmap); nothing is copied or read here
        self.keys = np.asarray(keys).view(np.uint16)
        # graph/entries: packed (the index files) or int32 (a graph built in memory, packed here)
        pack = lambda a: a if a.dtype == np.uint8 else pack_ids(a)
        self.graph, self.cents, self.entries = pack(np.asarray(graph)), np.asarray(cents), pack(np.asarray(entries))
        KVH, C, D = self.cents.shape
        if coarse is None:  # one group holding every centroid: the search scores them all
            coarse = np.zeros((KVH, 1, D), np.float32)
            bounds = np.tile(np.array([0, C], np.int32), (KVH, 1))
        self.coarse, self.bounds = np.asarray(coarse), np.asarray(bounds)
        self.ef, self.n_probe, self.coarse_probe, self.positional = ef, n_probe, coarse_probe, positional
        self.visited = np.zeros((slots or max(1, numba.get_num_threads()), keys.shape[1]), np.int32)
        self.epoch = 1
        self.scanned = 0   # vectors scored since creation (keys + centroids), for benchmarks
        self.searched = 0  # queries searched

    def search(self, q: torch.Tensor, k: int):
        q = np.ascontiguousarray(q.to("cpu", torch.float32).numpy())  # [KVH, M, D]
        KVH, M = q.shape[:2]
        if self.epoch + KVH * M >= 2**31 - 1:
            self.visited[:] = 0
            self.epoch = 1
        ids = np.empty((KVH, M, k), np.int32)
        scores = np.empty((KVH, M, k), np.float32)
        n = _search_layer(q, self.keys, self.graph, self.cents, self.entries, self.coarse, self.bounds,
                          self.coarse_probe, self.n_probe, max(self.ef, k), k, self.positional, self.visited,
                          self.epoch, ids, scores)
        self.epoch += KVH * M
        self.scanned += int(n.sum())
        self.searched += KVH * M
        return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(scores)


# ----------------------------------------------------------------------------- store glue

def build_graph_dir(offloaded_keys, build_queries, n_layers: int, out: Path, progress=None,
                    degree: int = DEGREE, fan: int = FAN, n_clusters: int | None = None, n_entry: int = N_ENTRY,
                    key_degree: int = KEY_DEGREE, n_coarse: int = N_COARSE, start_layer: int = 0) -> None:
    """Write graph.npy / centroids.npy / entries.npy / coarse.npy / bounds.npy into the (temporary)
    index directory `out`.

    offloaded_keys(layer) -> fp16 [KVH, N, D]; build_queries(layer) -> [KVH, m, D] (the prefill
    queries of each KV head's query heads, stacked)."""
    from .store import open_rows

    first = offloaded_keys(0)
    KVH, N, D = first.shape
    arrays = {}
    if N >= 0xFFFFFF:
        raise ValueError("the graph index holds at most 16,777,214 keys per head")
    first_qs = build_queries(0)
    n_clusters = n_clusters or n_clusters_for(N, first_qs.shape[1])
    for name, dtype, shape in [("graph", np.uint8, (N, degree, 3)), ("centroids", np.float32, (n_clusters, D)),
                               ("entries", np.uint8, (n_clusters, n_entry, 3)), ("coarse", np.float32, (n_coarse, D)),
                               ("bounds", np.int32, (n_coarse + 1,))]:
        arrays[name] = open_rows(out / f"{name}.npy", dtype, (n_layers, KVH) + shape, reuse=start_layer > 0)
    names = ("graph", "centroids", "entries", "coarse", "bounds")  # build_head's order
    for layer in range(start_layer, n_layers):  # start_layer > 0: resume a build into `out`
        keys = first if layer == 0 else offloaded_keys(layer)
        qs = first_qs if layer == 0 else build_queries(layer)
        for h in range(KVH):
            parts = build_head(keys[h], qs[h], degree, fan, n_clusters, n_entry, key_degree, out, n_coarse=n_coarse)
            for name, part in zip(names, parts):
                arrays[name][layer, h] = pack_ids(part) if name in ("graph", "entries") else part
        if progress:
            progress(layer + 1, n_layers)
    for a in arrays.values():
        a.flush()
    (out / "index.json").write_text(json.dumps({"kind": "graph", "degree": degree, "key_degree": key_degree,
                                                "fan": fan, "clusters": n_clusters, "coarse": n_coarse,
                                                "entries": n_entry}))


def open_graph_layer(index_dir: Path, layer: int, keys: np.ndarray, ef: int = EF, n_probe: int = N_PROBE):
    """keys: this layer's offloaded fp16 keys [KVH, N, D] (a view of the store's memory map)."""
    load = lambda name: np.load(index_dir / name, mmap_mode="r", allow_pickle=False)[layer]
    return GraphLayerIndex(keys, load("graph.npy"), load("centroids.npy"), load("entries.npy"), load("coarse.npy"),
                           load("bounds.npy"), ef=ef, n_probe=n_probe)


def set_threads() -> None:
    numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, os.cpu_count() or 1)))
