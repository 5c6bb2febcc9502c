"""One layer of attention over a cached document, composed of small parts.

A decoding query [KVH, G, T, D] (its query heads grouped by the KV head they share) attends to:

  StaticKV        the static zone on the compute device: keys at true positions (the document's
                  first `sink` and last `recent` tokens, then every token after the document),
                  preallocated for the whole answer so a new token is written in place; for a
                  document past the model's window also its sinks, kept pre-RoPE (`glob_k/v`)
  Retriever       the offloaded middle of the document (the store's memory maps, CPU) and the
                  index that finds each query's top-k keys there (core/index.py: flat, hnsw,
                  graph, cluster); returns a `Selection`: ids, logits, values, and for the
                  clustered index the estimated clusters (core/cluster.py), a zone of its own
  PositionPolicy  where the retrieved (and pre-RoPE static) keys sit relative to the query:
                    ExactPositions     keys stored post-RoPE: the index's logits are the logits
                    RemappedPositions  keys stored pre-RoPE (core/longctx.py): searched in the frame
                                       of a fixed distance, attended at ordered distances beyond it

`DocumentLayer.attend` asks each part for its partial softmax (output, log-sum-exp) and merges
them once with core/attention.merge. A new way to retrieve keys is a Retriever, a new way to place
them a PositionPolicy, a new zone one more partial in that list. With k covering every offloaded
key the layer equals full attention (tests/test_exactness.py, tests/test_longctx.py).

With `trace` on (Settings.trace), profiler ranges name a decode step's parts for
benchmarks/gpu_check.py: `ra.select` the index's search, `ra.copy` gathering the selected rows and
moving them to the compute device, `ra.attend` the partials and their merge. They change no
result; off (the default), none is entered: an idle torch.profiler range still costs ~10 us, and a
step would enter ~150 of them.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from torch.profiler import record_function
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention import attention_from_scores, flash_attention, flash_usable, local_attention, merge, partial_attention
from .cluster import Estimate, Zones, estimated_attention
from .index import gather_rows
from .longctx import Rope, ordered_scores
from .settings import RemapScheme


def span(name: str, on: bool):
    """A torch.profiler range named `name` when `on` (Settings.trace), else no range at all."""
    return record_function(name) if on else nullcontext()


class StaticKV:
    """The static zone of one layer, on the compute device, preallocated (as gpt-fast's KVCache).

    k, v: [1, KVH, S0, D] keys at true positions (post-RoPE): sinks + recent window for a document
    inside the window, the local window alone past it. `capacity` rows are allocated up front;
    `append` writes the new tokens' K/V in place and returns views of the filled rows (it doubles
    the buffer only if an answer outgrows what the caller asked for). glob_k/glob_v: [KVH, Ns, D]
    pre-RoPE sinks of a remapped document (fp32; empty otherwise), scored by the PositionPolicy.
    """

    def __init__(self, k, v, capacity: int, glob_k=None, glob_v=None):
        _, KVH, S0, D = k.shape
        self.k = k.new_empty(1, KVH, max(capacity, S0), D)
        self.v = v.new_empty(1, KVH, max(capacity, S0), v.shape[-1])
        self.k[:, :, :S0], self.v[:, :, :S0] = k, v
        self.n = self.n0 = S0  # n0: the document's rows; the tokens after it follow
        empty = torch.zeros(KVH, 0, D, device=k.device)
        self.glob_k = empty if glob_k is None else glob_k
        self.glob_v = empty if glob_v is None else glob_v

    def room(self, T: int) -> None:
        """Make room for T more rows (doubling the buffers if an answer outgrew its capacity)."""
        if self.n + T > self.k.shape[-2]:
            grow = max(self.k.shape[-2], T)
            self.k = torch.cat([self.k, self.k.new_empty(*self.k.shape[:2], grow, self.k.shape[-1])], dim=-2)
            self.v = torch.cat([self.v, self.v.new_empty(*self.v.shape[:2], grow, self.v.shape[-1])], dim=-2)

    def append(self, k, v):
        """k, v: [1, KVH, T, D] -> the filled rows [1, KVH, n, D] (views, no copy)."""
        T = k.shape[-2]
        self.room(T)
        self.k[:, :, self.n:self.n + T] = k
        self.v[:, :, self.n:self.n + T] = v
        self.n += T
        return self.k[:, :, :self.n], self.v[:, :, :self.n]

    def partial(self, q, k, v, scale: float):
        """Exact partial of q [KVH, G, T, D] (the newest T rows are its own tokens: causal)."""
        return local_attention(q, k[0].float(), v[0].float(), scale, causal_offset=k.shape[-2] - q.shape[2])

    def new_rows(self):
        """The tokens after the document as core/attention_f16.step_attention reads them:
        ((K [KVH, capacity, D], first row), (V, first row), count); fp32 on the CPU only."""
        k, v = self.k[0].numpy(), self.v[0].numpy()
        return (k, self.n0), (v, self.n0), self.n - self.n0


@dataclass
class Selection:
    """What a layer retrieved for its queries: ids [KVH, G*T, K] into the offloaded range (-1 pads
    rows of unequal length), logits [KVH, G, T, K] (unscaled, at the positions the policy gives
    them; -inf at a pad), values [KVH, G, T, K, D]; and, from a clustered index, the estimated
    clusters (a core/cluster.Estimate, dense over the layer's clusters: [KVH, G, T, C]) or None."""

    ids: torch.Tensor
    logits: torch.Tensor
    values: torch.Tensor
    estimate: Estimate | None = None
    every: bool = False  # ids are every offloaded key in order (0..N-1: the `exact` kind), K = N
    rows: tuple | None = None  # logits kept for these query rows only ([KVH, G, len(rows), K]; None: all T)


class Retriever:
    """One layer's offloaded K/V ([KVH, N, D] memory maps, CPU, store dtype) and its index.

    `zones(q [KVH, M, D], k, scale) -> Zones`: the index's retrieved keys (ids, exact logits,
    [KVH, M, K]: K = k for flat, hnsw and graph; for the clustered index every member of the best
    clusters, -1 / -inf padded) and, where the index estimates (core/cluster.py), its estimate.
    Over the `exact` kind (`exact` True) nothing is selected: `partial` attends every key
    (core/attention_f16 at a decode step, the fused kernel for a question), `partial_kept` too,
    keeping every key's logit for a tally."""

    def __init__(self, keys, values, index, span: tuple[int, int] | None = None):
        """keys, values: [KVH, N, D] numpy (memory maps), all offloaded; or with span=(a, b) a
        layer's whole K/V (C-contiguous) of which rows a..b are (core/attention_f16 reads it so)."""
        a, b = span or (0, keys.shape[1])
        self.span = (a, b)
        self.keys, self.values = keys, values
        self.k = torch.from_numpy(keys[:, a:b])
        self.v = torch.from_numpy(values[:, a:b])
        self.index = index
        self.n = b - a
        self.exact = getattr(index, "exact", False)
        self._rows = None  # (K bits, start), (V bits, start) for core/attention_f16, made at its first use
        self._doc = None   # the same for every row of the document (whole_step)

    def _stepwise(self, q) -> bool:
        """A decode step's query (one token) over fp16 K/V on the CPU: core/attention_f16 reads them as stored."""
        return q.shape[2] == 1 and q.device.type == "cpu" and self.k.dtype == torch.float16

    def _f16(self, q, scale: float, keep_logits: bool):
        from .attention_f16 import attention_f16, rows  # numba: imported where it is used

        if self._rows is None:
            self._rows = rows(self.keys, *self.span), rows(self.values, *self.span)
        return attention_f16(q, *self._rows, scale, keep_logits, n=self.n)

    def whole_step(self, q, static: StaticKV, scale: float, logits=None):
        """A decode step of the `exact` kind in one kernel (core/attention_f16.step_attention):
        q [KVH, G, 1, D] over every key of the document, read from the store (its static rows
        too: they are the same values), and the static zone's tokens after it -> (o, lse). Equals
        merging `static.partial` with `partial` (tests/test_attention_f16.py); only for one
        token's query on the CPU over fp16 K/V with fp32 static rows: `can_step_whole`.
        logits: a tally's buffer for every document key's logit (step_attention)."""
        from .attention_f16 import step_attention

        return step_attention(q, *self.document_rows(), *static.new_rows(), scale, logits)

    def document_rows(self):
        """Every key and value of the document as core/attention_f16 reads them (made once)."""
        from .attention_f16 import rows

        if self._doc is None:
            self._doc = rows(self.keys), rows(self.values)
        return self._doc

    def can_step_whole(self, q, static: StaticKV) -> bool:
        """Whether `whole_step` serves this query (the caller, DocumentLayer.one_kernel, checks the
        rest: the static rows are the store's rows as stored, fp32 on the CPU)."""
        return self._stepwise(q)

    def partial(self, q, scale: float):
        """q [KVH, G, T, D] -> (o, lse) over every offloaded key, exact: a decode step through
        core/attention_f16 over the stored fp16 K/V; several tokens (a question) through the fused
        kernel over fp32 conversions made for the call (nothing kept: the store's pages are the cache)."""
        qc = q.to("cpu", torch.float32)
        if self._stepwise(q):
            o, lse, _ = self._f16(qc, scale, False)
        else:
            o, lse = local_attention(qc, self.k.float(), self.v.float(), scale)
        return o.to(q.device), lse.to(q.device)

    def partial_kept(self, q, scale: float, rows=None):
        """`partial`, keeping the logits of query rows `rows` (None: all) over every key for a
        tally (citations): a decode step's from core/attention_f16, which computes them anyway;
        several tokens' (a question) from one product of those rows with the keys, beside the
        fused kernel's attention (the tally reads two rows of a question: Tally.rows).
        -> ((o, lse), Selection of every offloaded key: ids, unscaled logits, no values)."""
        KVH, G, T, D = q.shape
        qc = q.to("cpu", torch.float32)
        rows = tuple(range(T)) if rows is None else tuple(rows)
        if self._stepwise(q):  # one row: rows is (0,)
            o, lse, logits = self._f16(qc, scale, True)
            logits = logits.reshape(KVH, G, 1, self.n)
        else:
            keys = self.k.float()
            o, lse = local_attention(qc, keys, self.v.float(), scale)
            qr = qc[:, :, list(rows)].reshape(KVH, G * len(rows), D)
            logits = torch.bmm(qr, keys.transpose(1, 2)).reshape(KVH, G, len(rows), self.n)  # unscaled
        ids = torch.arange(self.n).expand(KVH, G * T, self.n)              # a view: nothing allocated
        sel = Selection(ids, logits.to(q.device), None, every=True, rows=rows)
        return (o.reshape(KVH, G, T, -1).to(q.device), lse.reshape(KVH, G, T).to(q.device)), sel

    def zones(self, q, k: int, scale: float, q_estimate=None) -> Zones:
        if hasattr(self.index, "zones"):
            return self.index.zones(q, k, scale, q_estimate)
        ids, scores = self.index.search(q, k)
        return Zones(ids, scores, None)

    def gather_values(self, ids):
        """ids: [KVH, M, K] (-1: a pad, read as row 0) -> [KVH, M, K, D] (fp32, CPU)."""
        return gather_rows(self.v, ids)

    def gather_keys(self, ids):
        return gather_rows(self.k, ids)


class ExactPositions:
    """Keys stored post-RoPE at their true positions: search with the query itself; the index's
    logits are the attention logits; every static key is in StaticKV's true-position rows."""

    def __init__(self, trace: bool = False):
        self.trace = trace

    def select(self, q, pos, retriever: Retriever, k: int, scale: float) -> Selection:
        KVH, G, T, D = q.shape
        with span("ra.select", self.trace):
            z = retriever.zones(q.reshape(KVH, -1, D), k, scale)  # [KVH, G*T, K], CPU
        ids, K = z.ids, z.ids.shape[-1]
        with span("ra.copy", self.trace):
            logits = z.scores.to(q.device).reshape(KVH, G, T, K)
            values = retriever.gather_values(ids).to(q.device).reshape(KVH, G, T, K, -1)
            estimate = z.estimate and z.estimate.grouped(G, T, q.device)
        return Selection(ids, logits, values, estimate)

    def global_partials(self, q, pos, static: StaticKV, k_retrieved: int, scale: float) -> list:
        return []


class RemappedPositions:
    """Keys stored pre-RoPE (a document past the model's window, core/longctx.py).

    The index is searched with the query rotated to `scheme.distance` (every key that far back:
    the frame the index was built in). With `scheme.ordered` the K retrieved keys are then attended
    in document order just beyond it (the latest at `distance`, the earliest at distance + K - 1)
    and the sinks at distance + K; without, every retrieved key and the sinks at `distance`."""

    def __init__(self, rope: Rope, scheme: RemapScheme, trace: bool = False):
        self.rope, self.scheme, self.trace = rope, scheme, trace

    def select(self, q, pos, retriever: Retriever, k: int, scale: float) -> Selection:
        KVH, G, T, D = q.shape
        d = self.scheme.distance
        q_search = self.rope.rotate(q, d - pos).reshape(KVH, -1, D)
        d_est = self.scheme.estimate_distance  # estimated clusters: at `distance` (0) or there
        q_est = self.rope.rotate(q, d_est - pos).reshape(KVH, -1, D) if d_est else None
        with span("ra.select", self.trace):
            z = retriever.zones(q_search, k, scale, q_est)  # [KVH, G*T, K]
        ids, K = z.ids, z.ids.shape[-1]
        est = z.estimate
        if self.scheme.ordered:
            ids, perm = ids.sort(dim=-1)  # document order (pads, -1, first: the farthest slots)
            est = est and est.permuted(perm)
            with span("ra.copy", self.trace):
                k_sel = retriever.gather_keys(ids).to(q.device).reshape(KVH, G, T, K, D)
            with span("ra.attend", self.trace):
                logits = ordered_scores(q, k_sel, pos, self.rope, d)
                logits = logits.masked_fill((ids < 0).to(q.device).reshape(KVH, G, T, K), float("-inf"))
        else:
            with span("ra.copy", self.trace):
                logits = z.scores.to(q.device).reshape(KVH, G, T, K)
        with span("ra.copy", self.trace):
            values = retriever.gather_values(ids).to(q.device).reshape(KVH, G, T, K, -1)
            # estimated clusters: all at `distance` (the search frame) or at scheme.estimate_distance
            estimate = est and est.grouped(G, T, q.device)
        return Selection(ids, logits, values, estimate)

    def global_partials(self, q, pos, static: StaticKV, k_retrieved: int, scale: float) -> list:
        if static.glob_k.shape[1] == 0:
            return []
        beyond = k_retrieved if self.scheme.ordered else 0  # the sinks just beyond the farthest retrieved key
        q_sink = self.rope.rotate(q, self.scheme.distance + beyond - pos)
        return [partial_attention(q_sink, static.glob_k[:, None], static.glob_v[:, None], scale)]


class DocumentLayer(CacheLayerMixin):
    """A transformers cache layer answering over a cached document: StaticKV + Retriever +
    PositionPolicy, merged once. `update` appends the new tokens to StaticKV; `attend` is called
    by core/attention.ra_attention."""

    def __init__(self, static: StaticKV, retriever: Retriever | None, policy, top_k: int, n_document: int,
                 layer: int = 0, tally=None, trace: bool = False, whole_step: bool = True, fuse: bool = True):
        super().__init__()
        self.whole_step = whole_step  # the `exact` kind's one-kernel step where it applies (off: the parts, merged)
        self.fuse = fuse              # with it, the whole layer's step in kernel calls (core/fused.py) where it applies
        self.static, self.retriever, self.policy, self.top_k = static, retriever, policy, top_k
        self.trace = trace  # profiler ranges (see the module docstring)
        self.layer, self.tally = layer, tally  # tally: a core/citations.Tally (attention mass for sources), or None
        self.n_document = n_document  # logical length of the document (static + offloaded)
        self.n_new = 0                # tokens after the document, so far
        self.device = static.k.device
        self.keys, self.values = static.k[:, :, :static.n], static.v[:, :, :static.n]
        self.is_initialized = True
        self.last: Selection | None = None  # the last step's selection, values dropped (tests)

    def lazy_initialization(self, key_states, value_states) -> None:  # built initialized
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        self.n_new += key_states.shape[-2]
        self.keys, self.values = self.static.append(key_states, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.n_document + self.n_new  # transformers derives positions from it

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.static.n + query_length, 0  # attend builds its own mask; keep the unused one small

    def one_kernel(self) -> bool:
        """Whether a one-token step's attention over this layer may run in one kernel (`attend`'s
        fast path; core/fused.FusedStepLayer then writes the new token's K/V in place and calls the
        kernel itself: `step_rows`, `stepped`): the `exact` kind at true positions (the static rows
        are the store's own), fp16 store K/V, fp32 static rows on the CPU."""
        r = self.retriever
        return (self.whole_step and r is not None and r.exact and r.n > 0 and self.top_k > 0
                and isinstance(self.policy, ExactPositions) and r.k.dtype == torch.float16
                and self.static.k.device.type == "cpu" and self.static.k.dtype == torch.float32)

    def layer_fusable(self) -> bool:
        """Whether core/fused.FusedStepLayer may run a one-token step of its layer over this one
        (with `one_kernel`, writing the K/V in place and attending in one kernel; else through
        `update` and `attend`): fp32 static rows on the CPU."""
        return self.fuse and self.static.k.device.type == "cpu" and self.static.k.dtype == torch.float32

    def step_rows(self):
        """For a one-token step that writes its own K/V (core/fused.py): room for them in the static
        zone -> ((document K, V as core/attention_f16.rows gives them), (static K, V: fp32 numpy
        [KVH, capacity, D]), the static zone's first row after the document, the row to write).
        `stepped()` records the row once written."""
        self.static.room(1)
        st = self.static
        return self.retriever.document_rows(), (st.k[0].numpy(), st.v[0].numpy()), st.n0, st.n

    def tally_logits(self):
        """The tally's buffer for this layer's document logits [KVH, G, n], or None (no tally)."""
        return None if self.tally is None else self.tally.document_logits(self.layer, self.static.k.shape[1])

    def stepped(self, lse=None, scale: float = 1.0) -> None:
        """The row from `step_rows` written and attended; with a tally, its step recorded (lse
        [KVH, G, 1]; the logits in the tally's buffer)."""
        if self.tally is not None:
            self.tally.record_document(self.layer, lse, scale)
        self.static.n += 1
        self.n_new += 1
        self.keys, self.values = self.static.k[:, :, :self.static.n], self.static.v[:, :, :self.static.n]
        self.last = None

    def attend(self, query, key, value, scale: float):
        """query: [1, Hq, T, D]; key/value: the StaticKV rows returned by update -> [1, T, Hq, D]."""
        _, Hq, T, D = query.shape
        KVH = key.shape[1]
        # the attention math runs in fp32 whatever the model's dtype (cheap: few keys per query)
        q = query[0].float().reshape(KVH, Hq // KVH, T, D)  # query head h uses KV head h // G
        k = min(self.top_k, self.retriever.n) if self.retriever is not None else 0
        exact = k > 0 and self.retriever.exact  # the `exact` kind: every offloaded key, nothing selected
        if self.one_kernel() and self.retriever.can_step_whole(q, self.static):
            with span("ra.attend", self.trace):  # the parts below, in one kernel: the fast path
                if self.tally is None:
                    o, _ = self.retriever.whole_step(q, self.static, scale)
                else:  # the tally reads every document key's logit: kept by the kernel, in its buffer
                    o, lse = self.retriever.whole_step(q, self.static, scale, self.tally_logits())
                    self.tally.record_document(self.layer, lse, scale)
            self.last = None
            return o.reshape(Hq, T, D).transpose(0, 1)[None].to(query.dtype).contiguous()
        end = self.get_seq_length()
        pos = torch.arange(end - T, end, device=q.device)
        with span("ra.attend", self.trace):
            parts = [self.static.partial(q, key, value, scale)]
        if exact:
            with span("ra.attend", self.trace):
                if self.tally is None:
                    parts.append(self.retriever.partial(q, scale))
                    sel = None
                else:  # the tally reads every key's logit: computed once, by the attention itself
                    part, sel = self.retriever.partial_kept(q, scale, self.tally.rows(T))
                    parts.append(part)
        else:
            sel = self.policy.select(q, pos, self.retriever, k, scale) if k > 0 else None  # ra.select, ra.copy
        # kept for tests without its values: those are the big part ([KVH, G, T, K, D]: ~0.5 GiB a layer
        # for a question over 128K keys with the clustered index's whole clusters), and 30 layers of them
        # held until the next step ran a 24 GiB machine out of memory
        self.last = None if sel is None else replace(sel, values=None)
        with span("ra.attend", self.trace):
            parts += self.policy.global_partials(q, pos, self.static, 0 if sel is None else sel.ids.shape[-1], scale)
            if sel is not None and not exact:
                parts.append(attention_from_scores(sel.logits, sel.values, scale))
                if sel.estimate is not None:
                    parts.append(estimated_attention(sel.estimate, scale, sel.values))
            o, lse = merge(parts)
        if self.tally is not None:  # each key's share of the merged softmax, from the logits above
            self.tally.record(self.layer, q, key[0], lse, sel, scale)
        return o.reshape(Hq, T, D).transpose(0, 1)[None].to(query.dtype).contiguous()


class PrefillKV(CacheLayerMixin):
    """One layer's K/V while the layer-by-layer prefill (core/generation.prefill_layerwise) runs it
    over the whole document, kept as the list of its chunks' K/V ([1, KVH, T, D] each).
    `attend` is a chunk's exact causal attention: one partial over its own keys (causal) and the
    earlier keys', merged, with no [T, S] score or mask tensor and no copy of the earlier K/V:
      - on the CPU (and where flash does not apply) one partial per earlier chunk, through the
        fused CPU kernel (core/attention.local_attention; fp32);
      - with `capacity` (the document's tokens; a GPU's prefill) every chunk's K/V go into one
        buffer [1, KVH, capacity, D] in the model's dtype, and where core/attention.flash_usable
        says so (CUDA sm80+, fp16/bf16) the earlier keys are one flash call over the buffer's
        rows before the chunk (core/attention.flash_attention)."""

    def __init__(self, layer: int = 0, capture=None, capacity: int | None = None):
        super().__init__()
        self.layer, self.capture = layer, capture  # capture: a core/generation.QueryCapture, or None
        self.capacity = capacity
        self.k_buf = self.v_buf = None             # [1, KVH, capacity, D], made at the first chunk
        self.k_chunks, self.v_chunks = [], []
        self.n = 0
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        """Keeps the chunk's K/V; returns them (attend finds the earlier chunks itself)."""
        T = key_states.shape[-2]
        if self.capacity is None:
            self.k_chunks.append(key_states.contiguous())
            self.v_chunks.append(value_states.contiguous())
        else:
            if self.k_buf is None:
                _, KVH, _, D = key_states.shape
                self.k_buf = key_states.new_empty(1, KVH, self.capacity, D)
                self.v_buf = value_states.new_empty(1, KVH, self.capacity, D)
            self.k_buf[:, :, self.n:self.n + T] = key_states
            self.v_buf[:, :, self.n:self.n + T] = value_states
            self.k_chunks.append(self.k_buf[:, :, self.n:self.n + T])
            self.v_chunks.append(self.v_buf[:, :, self.n:self.n + T])
        self.n += T
        return self.k_chunks[-1], self.v_chunks[-1]

    def get_seq_length(self) -> int:
        return self.n

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0  # attend builds no mask from it

    def attend(self, query, key, value, scale: float):
        """query: [1, Hq, T, D]; key/value: this chunk's [1, KVH, T, D] -> [1, T, Hq, D]."""
        _, Hq, T, D = query.shape
        KVH = key.shape[1]
        if self.capture is not None:
            self.capture.record(self.layer, query)
        if self.k_buf is not None and flash_usable(query):
            q = query[0].reshape(KVH, Hq // KVH, T, D)
            start = self.n - T  # the chunk's first row in the buffer
            parts = [flash_attention(q, key[0], value[0], scale, causal=True)]
            if start:
                parts.append(flash_attention(q, self.k_buf[0, :, :start], self.v_buf[0, :, :start], scale))
            o, _ = merge([(o.float(), lse) for o, lse in parts])
        else:
            q = query[0].float().reshape(KVH, Hq // KVH, T, D)
            parts = [local_attention(q, key[0].float(), value[0].float(), scale, causal_offset=0)]
            for k, v in zip(self.k_chunks[:-1], self.v_chunks[:-1]):
                parts.append(local_attention(q, k[0].float(), v[0].float(), scale))
            o, _ = merge(parts)
        return o.reshape(Hq, T, D).transpose(0, 1)[None].to(query.dtype).contiguous()


class RaCache(Cache):
    """A transformers Cache of ra's layers (DocumentLayer, LongPrefillLayer) or of plain
    DynamicLayers holding the whole document (the `--attention full` baseline)."""

    def __init__(self, layers):
        super().__init__(layers=layers)
