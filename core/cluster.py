"""The clustered index and the estimation zone (tripartite attention, as RetroInfer's wave index).

The offloaded keys of each (layer, KV head) are grouped into clusters of about `size` keys:
segmented spherical k-means over mean-centred keys (segments of `segment` tokens, `iters` rounds,
seeds evenly spaced). A decoding query scores every cluster by its estimated attention mass,
scale * q.c + log |C| (c: the mean of the cluster's keys, |C| its size), and splits them:

  retrieval   keys attended exactly (ids + exact logits). Up to `scan_max` offloaded keys per head
              the true top-k (every key scored, as the flat index); past it every member of the
              best clusters (at least k keys' worth and the fraction `retrieve` of the clusters)
  estimation  the next clusters by mass: not read; each member not already retrieved is taken to
              sit at the cluster's mean key c, so the cluster adds n exp(scale q.c) to the softmax
              denominator and exp(scale q.c) * (sum of those members' values) to the numerator, n
              its members not retrieved (`estimated_attention`; the retrieved members' values are
              subtracted from the stored value sum, so no key counts twice)
  dropped     the rest

Retrieving every key is exactly full attention; `estimated_reference` is the naive dense softmax
the two zones are tested against. Choosing the clusters is a dense matmul over a small table
(N / size centroids), which runs as well on a GPU as on the CPU.

Persisted per index directory (all .npy, memory-mapped, no pickle), L layers, KVH heads, C
clusters per head (the same C for every head: it depends only on N), N offloaded keys:
  index.json     {"kind": "cluster", "size", "segment", "iters", "clusters": C}, written last
  centroids.npy  float32 [L, KVH, C, D]   mean of each cluster's keys (in the stored frame)
  sizes.npy      int32   [L, KVH, C]      members per cluster (0: an empty cluster, never chosen)
  vsums.npy      float32 [L, KVH, C, Dv]  sum of each cluster's values
  order.npy      int32   [L, KVH, N]      offloaded positions grouped by cluster
  offsets.npy    int64   [L, KVH, C + 1]  cluster j's members are order[offsets[j]:offsets[j+1]]
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIZE = 16        # keys per cluster, on average
SEGMENT = 8192   # tokens clustered together (a tail under half a segment joins the one before it)
ITERS = 9        # spherical k-means rounds


# ----------------------------------------------------------------------------- building

def segments(n: int, segment: int = SEGMENT) -> list[tuple[int, int]]:
    """[start, end) ranges of about `segment` tokens covering n; a short tail joins the last one."""
    bounds = list(range(0, n, segment)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < segment // 2:
        del bounds[-2]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def n_clusters(n: int, size: int = SIZE, segment: int = SEGMENT) -> int:
    return sum(max(1, round((b - a) / size)) for a, b in segments(n, segment))


def cluster_keys(keys, size: int = SIZE, segment: int = SEGMENT, iters: int = ITERS):
    """Spherical k-means labels of one head's keys. keys: [N, D] (any float) -> int64 [N] in [0, C).

    Keys are centred on their mean (which shifts every logit of a query equally) and normalised;
    each segment has its own clusters, seeded with evenly spaced keys. Deterministic."""
    import torch

    x = torch.as_tensor(np.asarray(keys, np.float32))
    x = x - x.mean(0)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    labels = torch.empty(x.shape[0], dtype=torch.int64)
    base = 0
    for a, b in segments(x.shape[0], segment):
        xs = x[a:b]
        c = max(1, round((b - a) / size))
        cent = xs[torch.linspace(0, b - a - 1, c).round().long()].clone()
        for it in range(iters + 1):
            lab = torch.from_numpy((xs @ cent.T).numpy().argmax(1))  # numpy's argmax: faster than torch's here, same ties
            if it == iters:
                break
            new = torch.zeros_like(cent).index_add_(0, lab, xs)
            norm = new.norm(dim=1, keepdim=True)
            cent = torch.where(norm > 0, new / norm.clamp_min(1e-12), cent)  # an empty cluster keeps its seed
        labels[a:b] = lab + base
        base += c
    return labels


def head_tables(keys, values, labels, c: int):
    """centroids [C, D], sizes [C], vsums [C, Dv], order [N], offsets [C + 1] of one head."""
    import torch

    k = torch.as_tensor(np.asarray(keys, np.float32))
    v = torch.as_tensor(np.asarray(values, np.float32))
    sizes = torch.bincount(labels, minlength=c)
    ksum = torch.zeros(c, k.shape[1]).index_add_(0, labels, k)
    vsum = torch.zeros(c, v.shape[1]).index_add_(0, labels, v)
    cent = ksum / sizes.clamp_min(1)[:, None]
    order = torch.argsort(labels, stable=True)
    offsets = torch.zeros(c + 1, dtype=torch.int64)
    offsets[1:] = sizes.cumsum(0)
    return cent.numpy(), sizes.numpy().astype(np.int32), vsum.numpy(), order.numpy().astype(np.int32), offsets.numpy()


def build_cluster_dir(keys, values, n_layers: int, out: Path, progress=None,
                      size: int = SIZE, segment: int = SEGMENT, iters: int = ITERS, start_layer: int = 0) -> None:
    """Cluster every (layer, head) of keys(layer) / values(layer) ([KVH, N, D] views) into `out`
    (from `start_layer`: a resumed build, the earlier layers' tables already there)."""
    from .store import open_rows  # preallocated: a full disk is an error here, not a SIGBUS later

    first = keys(0)
    KVH, N, D = first.shape
    Dv = values(0).shape[-1]
    C = n_clusters(N, size, segment)
    arrays = {
        "centroids": open_rows(out / "centroids.npy", np.float32, (n_layers, KVH, C, D), reuse=start_layer > 0),
        "sizes": open_rows(out / "sizes.npy", np.int32, (n_layers, KVH, C), reuse=start_layer > 0),
        "vsums": open_rows(out / "vsums.npy", np.float32, (n_layers, KVH, C, Dv), reuse=start_layer > 0),
        "order": open_rows(out / "order.npy", np.int32, (n_layers, KVH, N), reuse=start_layer > 0),
        "offsets": open_rows(out / "offsets.npy", np.int64, (n_layers, KVH, C + 1), reuse=start_layer > 0),
    }
    for layer in range(start_layer, n_layers):
        k, v = keys(layer), values(layer)
        for h in range(KVH):
            kh = np.asarray(k[h], np.float32)  # read the head's keys from the store once
            tables = head_tables(kh, v[h], cluster_keys(kh, size, segment, iters), C)
            for name, t in zip(("centroids", "sizes", "vsums", "order", "offsets"), tables):
                arrays[name][layer, h] = t
        if progress:
            progress(layer + 1, n_layers)
    for a in arrays.values():
        a.flush()
    del arrays
    (out / "index.json").write_text(json.dumps({"kind": "cluster", "size": size, "segment": segment,
                                                "iters": iters, "clusters": C}))


# ----------------------------------------------------------------------------- the estimation zone

@dataclass
class Estimate:
    """The estimated clusters of each query, dense over a layer's C clusters (a matmul over a small
    table, no gather): logits [..., M, C] unscaled q.c, -inf outside the query's estimated set (and
    where every member was retrieved); log_counts [..., 1 or M, C] log of the members not
    retrieved; vsums [..., C, Dv] the clusters' value sums; overlap [..., M, K] or None: for each
    retrieved key (in the Selection's order), its cluster if that cluster is estimated, else -1
    (its value is taken back out of the cluster's sum)."""

    logits: object
    log_counts: object
    vsums: object
    overlap: object = None

    def grouped(self, G: int, T: int, device) -> "Estimate":
        """Rows M = G*T (query head g, token t) as [KVH, G, T, C], on `device`."""
        KVH, _, C = self.logits.shape
        rows = lambda t: t.to(device).reshape(KVH, G, T, *t.shape[2:]) if t.shape[1] > 1 else t.to(device)[:, None]
        return Estimate(self.logits.to(device).reshape(KVH, G, T, C), rows(self.log_counts),
                        self.vsums.to(device)[:, None],
                        None if self.overlap is None else self.overlap.to(device).reshape(KVH, G, T, -1))

    def permuted(self, perm) -> "Estimate":
        """The same estimate for the retrieved keys reordered by perm [KVH, M, K] (a sort)."""
        return self if self.overlap is None else Estimate(self.logits, self.log_counts, self.vsums,
                                                          self.overlap.gather(-1, perm))


def estimated_attention(est: Estimate, scale: float, values=None):
    """Partial softmax (o [..., Dv], lse [...]) of the estimated clusters, every member not
    retrieved taken to be its cluster's mean key: lse = log sum_j n_j exp(s_j), o = sum_j
    exp(s_j - lse) (Vsum_j - values of j's retrieved members), s_j = scale * q.c_j. values
    [..., K, Dv]: the retrieved keys' values, needed when est.overlap is set. A query with no
    estimated cluster gets o = 0, lse = -inf."""
    import torch

    s = est.logits * scale                                             # -inf: not estimated
    lse = torch.logsumexp(s + est.log_counts, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w = torch.exp(s - safe[..., None])                                 # 0 outside the set
    o = torch.matmul(w, est.vsums)
    if est.overlap is not None:                                        # retrieved members: out of the sums
        back = w.gather(-1, est.overlap.clamp_min(0)) * (est.overlap >= 0)  # [..., K]
        o = o - torch.matmul(back[..., None, :], values)[..., 0, :]
    return o, lse


def estimated_reference(q, keys, values, labels, exact, estimated, scale: float):
    """Naive reference of the retrieval + estimation zones for one query: a dense softmax over the
    exactly attended keys `exact` (ids), plus every other member of an estimated cluster with its
    own value but its cluster's mean key (the mean over all its members); every other key removed.

    q [D]; keys [N, D], values [N, Dv]; labels [N]; exact: key ids; estimated: cluster ids.
    Returns (o [Dv], lse) as a float64 computation written out key by key."""
    exact, estimated = set(int(i) for i in exact), set(int(j) for j in estimated)
    ks, vs = [], []
    for i in range(len(labels)):
        if i in exact:
            ks.append(np.asarray(keys[i], np.float64))
        elif int(labels[i]) in estimated:
            ks.append(np.mean([keys[m] for m in range(len(labels)) if labels[m] == labels[i]], axis=0, dtype=np.float64))
        else:
            continue
        vs.append(np.asarray(values[i], np.float64))
    if not ks:
        return np.zeros(values.shape[1]), -math.inf
    logits = np.array([float(np.dot(np.asarray(q, np.float64), k)) * scale for k in ks])
    m = logits.max()
    w = np.exp(logits - m)
    return (w[:, None] * np.asarray(vs)).sum(0) / w.sum(), m + math.log(w.sum())


# ----------------------------------------------------------------------------- searching

@dataclass
class Zones:
    """What the cluster index found for each query row: the retrieved keys (ids [KVH, M, K] into
    the offloaded range, -1 for padding; scores [KVH, M, K] exact unscaled logits, -inf for
    padding) and the estimated clusters (an Estimate over [KVH, M, E], or None)."""

    ids: object
    scores: object
    estimate: Estimate | None


class ClusterLayerIndex:
    """One layer's clusters (memory-mapped tables) over its offloaded keys [KVH, N, D].

    `zones(q [KVH, M, D], k, scale)`: the retrieval zone, then the estimated clusters (the next
    fraction `estimate` of all clusters by mass). The retrieval zone is the true top-k (at least k
    keys and the fraction `retrieve` of them; a flat scan) while N <= scan_max, else every member
    of the best clusters (at least k keys' worth and the fraction `retrieve` of the clusters)."""

    def __init__(self, tables: dict, keys, retrieve: float = 0.0, estimate: float = 0.0, scan_max: int = 0):
        import torch

        from .index import FlatLayerIndex

        self.retrieve, self.estimate = retrieve, estimate
        small = lambda a, dtype: torch.from_numpy(np.array(a, dtype))  # read into memory: N / 16 rows
        self.cent = small(tables["centroids"], np.float32)              # [KVH, C, D]
        self.cent_t = self.cent.transpose(1, 2).contiguous()            # [KVH, D, C]: one bmm per step
        self.sizes = small(tables["sizes"], np.int64)                   # [KVH, C]
        self.log_sizes = torch.log(self.sizes.float())                  # -inf: an empty cluster
        self.offsets = small(tables["offsets"], np.int64)               # [KVH, C + 1]
        self.order = small(tables["order"], np.int64)                   # [KVH, N]
        self.vsums = _mapped(tables["vsums"])                           # [KVH, C, Dv]
        self.keys = _mapped(keys)                                       # [KVH, N, D] the store's keys
        self.c = self.cent.shape[1]
        self.n = self.keys.shape[1]
        self.size = max(1.0, self.n / max(1, self.c))
        self.scan = FlatLayerIndex(keys) if self.n <= scan_max else None  # the retrieval zone's top-k
        self.labels = None                                              # [KVH, N] each key's cluster (scan only)
        if self.scan is not None:
            cluster_of_slot = torch.repeat_interleave(torch.arange(self.c).expand(self.order.shape[0], -1).reshape(-1),
                                                      self.sizes.reshape(-1)).reshape(self.order.shape)
            self.labels = torch.empty_like(self.order).scatter_(1, self.order, cluster_of_slot)

    def budgets(self, k: int) -> tuple[int, int]:
        """(clusters retrieved, clusters estimated) for a budget of k keys and the two fractions
        (retrieved: 0 when the retrieval zone is a scan, whose keys are `scan_k(k)`)."""
        r = 0 if self.scan is not None else min(self.c, max(1, math.ceil(k / self.size), math.ceil(self.retrieve * self.c)))
        e = min(self.c - r, math.ceil(self.estimate * self.c))
        return r, e

    def scan_k(self, k: int) -> int:
        return min(self.n, max(k, math.ceil(self.retrieve * self.n)))

    def zones(self, q, k: int, scale: float, q_estimate=None) -> Zones:
        """q_estimate [KVH, M, D]: the query the estimated clusters' logits are taken with (a
        remapped document's decode may place them at another distance); default q. Which clusters
        are retrieved and estimated is always decided with q."""
        import torch

        q = q.to("cpu", torch.float32)                                  # [KVH, M, D]
        KVH, M, D = q.shape
        r, e = self.budgets(k)
        logits = torch.bmm(q, self.cent_t)                              # [KVH, M, C] unscaled q.c
        mass = logits * scale + self.log_sizes[:, None, :]              # estimated mass of each cluster
        if q_estimate is not None:                                      # the estimate's own frame
            logits = torch.bmm(q_estimate.to("cpu", torch.float32), self.cent_t)
        if self.scan is None:                                           # whole clusters retrieved
            best, chosen = ranked(mass, r, e)
            ids, scores = self._members(q, best)
            if e == 0:
                return Zones(ids, scores, None)
            return Zones(ids, scores, Estimate(logits.masked_fill(~chosen, float("-inf")),
                                               self.log_sizes[:, None, :], self.vsums))
        ids, scores = self.scan.search(q, self.scan_k(k))               # the true top-k
        if e == 0:
            return Zones(ids, scores, None)
        chosen = None if e == self.c else ranked(mass, 0, e)[1]         # None: every cluster estimated
        lab = self.labels.gather(1, ids.clamp_min(0).reshape(KVH, -1)).reshape(ids.shape)  # [KVH, M, K] their clusters
        estimated = ids >= 0 if chosen is None else (ids >= 0) & chosen.gather(2, lab)
        overlap = torch.where(estimated, lab, -1)
        left = self.sizes[:, None, :].expand(KVH, M, self.c).clone()    # members not retrieved
        left.scatter_add_(2, overlap.clamp_min(0), -estimated.long())
        keep = left > 0 if chosen is None else chosen & (left > 0)
        return Zones(ids, scores, Estimate(logits.masked_fill(~keep, float("-inf")), torch.log(left.float()),
                                           self.vsums, overlap))

    def search(self, q, k: int):
        """The plain index contract: the retrieval zone's keys with exact logits (-1 / -inf pad
        rows of different lengths)."""
        z = self.zones(q, k, 1.0 / math.sqrt(q.shape[-1]))  # (ranking only: the default scale)
        return z.ids, z.scores

    def _members(self, q, best):
        """ids [KVH, M, K] (-1 padded) and exact logits of every member of the clusters best
        [KVH, M, r]: one flat list of (row, member) pairs built in numpy (cheaper than torch's
        advanced indexing at these sizes), then the members' keys gathered with one index_select
        per head."""
        import torch

        from .index import gather_rows

        KVH, M, r = best.shape
        b = best.numpy()
        heads = np.arange(KVH)[:, None, None]
        sz = self.sizes.numpy()[heads, b].reshape(-1)                   # [R * r] members of each chosen cluster
        st = self.offsets.numpy()[heads, b].reshape(-1)                 # where they start in `order`
        per_row = sz.reshape(KVH * M, r).sum(-1)                        # [R] members per query row
        K = max(1, int(per_row.max()))
        slot = np.repeat(np.arange(sz.size), sz)                        # each member's (row, cluster) slot
        j = np.arange(slot.size)
        pos = st[slot] + j - (np.cumsum(sz) - sz)[slot]                 # its place in `order`
        row = slot // r
        col = j - (np.cumsum(per_row) - per_row)[row]                   # its column in the row
        ids = np.full((KVH * M, K), -1, dtype=np.int64)
        ids[row, col] = self.order.numpy()[row // M, pos]
        ids = torch.from_numpy(ids.reshape(KVH, M, K))
        scores = torch.matmul(gather_rows(self.keys, ids), q[..., None])[..., 0]  # [KVH, M, K]
        return ids, scores.masked_fill(ids < 0, float("-inf"))


def ranked(mass, r: int, e: int):
    """Clusters by estimated mass [KVH, M, C]: (best [KVH, M, r] the r largest, int64, in no
    particular order; estimated [KVH, M, C] bool, the next e). numpy's introselect, not a sort:
    which of equal masses at a boundary is taken is unspecified."""
    import torch

    m = -mass.numpy()
    C = m.shape[-1]
    if r + e >= C:                                                      # the r + e largest
        top = np.broadcast_to(np.arange(C), m.shape).copy()
    else:
        top = np.argpartition(m, r + e - 1, axis=-1)[..., :r + e] if r + e else np.zeros(m.shape[:-1] + (0,), np.int64)
    estimated = np.zeros(m.shape, dtype=bool)
    if r == 0:
        best = np.zeros(m.shape[:-1] + (0,), np.int64)
        np.put_along_axis(estimated, top, True, -1)
        return torch.from_numpy(best), torch.from_numpy(estimated)
    mt = np.take_along_axis(m, top, -1)
    inner = np.argpartition(mt, r - 1, axis=-1) if r < top.shape[-1] else np.broadcast_to(np.arange(r), mt.shape)
    best = np.take_along_axis(top, inner[..., :r], -1)
    np.put_along_axis(estimated, np.take_along_axis(top, inner[..., r:], -1), True, -1)
    return torch.from_numpy(best.astype(np.int64)), torch.from_numpy(estimated)


def _mapped(array):
    """A tensor over a read-only memory map, without copying it (ra never writes through it)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(array))


def open_cluster_layer(index_dir: Path, layer: int, keys, retrieve: float = 0.0,
                       estimate: float = 0.0, scan_max: int = 0) -> ClusterLayerIndex:
    tables = {name: np.load(index_dir / f"{name}.npy", mmap_mode="r", allow_pickle=False)[layer]
              for name in ("centroids", "sizes", "vsums", "order", "offsets")}
    return ClusterLayerIndex(tables, keys, retrieve, estimate, scan_max)
