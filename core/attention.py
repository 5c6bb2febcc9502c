"""Retrieval attention: the math, the naive reference beside it, and the transformers hook.

A decoding query attends to two disjoint key sets:
  * the *static* set on the compute device: the document's first `sink` and last `recent`
    tokens plus every token after the document (question, answer so far);
  * the *offloaded* middle of the document, on the CPU, of which only the top-k keys that the
    index returns for this query are read.
Each set gives a partial softmax (output, log-sum-exp); `merge_partials` combines them exactly,
as FlashAttention combines blocks. With k covering every offloaded key the result IS full
attention, which tests/test_attention.py and tests/test_exactness.py check.

transformers integration uses public extension points only: `AttentionInterface` (the function
`ra_attention` below, registered as "ra") and a `Cache` whose layers are `RetrievalLayer`s. The
cache reaches the attention function as the `ra_cache` keyword argument that our own generation
loop passes to `model(...)`; transformers forwards unknown keyword arguments to the attention
function untouched.
"""
from __future__ import annotations

import math

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "ra"


# ----------------------------------------------------------------------------- the math

def partial_attention(q, k, v, scale: float, causal_offset: int | None = None):
    """Softmax attention of q over one key set, returned as (output, log-sum-exp).

    q: [..., T, D]   k, v: [..., S, D] (broadcastable batch dims)
    causal_offset: if given, query t may see key j only when j <= causal_offset + t
                   (bottom-right alignment: causal_offset = S - T).
    returns o: [..., T, D], lse: [..., T]; a query that sees no key gets o = 0, lse = -inf.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [..., T, S]
    if causal_offset is not None:
        T, S = scores.shape[-2], scores.shape[-1]
        t = torch.arange(T, device=scores.device)[:, None]
        j = torch.arange(S, device=scores.device)[None, :]
        scores = scores.masked_fill(j > causal_offset + t, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [..., T]
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(scores - safe[..., None])  # rows with no visible key are all zeros
    return torch.matmul(p, v), lse


def local_attention(q, k, v, scale: float, causal_offset: int | None = None):
    """partial_attention for the big local key sets of a chunk, through PyTorch's fused flash-style
    CPU kernel, which returns the log-sum-exp too and never holds the [T, S] score tensor in
    memory. Elsewhere (CUDA, other dtypes) the naive one.

    q: [KVH, G, T, D] (GQA groups), k, v: [KVH, S, D] -> o: [KVH, G, T, D], lse: [KVH, G, T]
    """
    KVH, G, T, D = q.shape
    S = k.shape[1]
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if q.device.type != "cpu" or q.dtype != torch.float32 or op is None:
        return partial_attention(q, k[:, None], v[:, None], scale, causal_offset)
    mask = None
    if causal_offset is not None:  # additive mask: query t sees key j <= causal_offset + t
        t = torch.arange(T)[:, None]
        j = torch.arange(S)[None, :]
        mask = torch.zeros(T, S).masked_fill(j > causal_offset + t, float("-inf"))
    kx = k[:, None].expand(KVH, G, S, D).reshape(1, KVH * G, S, D)  # the kernel wants one K per query head
    vx = v[:, None].expand(KVH, G, S, v.shape[-1]).reshape(1, KVH * G, S, v.shape[-1])
    o, lse = op(q.reshape(1, KVH * G, T, D), kx, vx, 0.0, False, attn_mask=mask, scale=scale)
    return o.view(KVH, G, T, -1), lse.view(KVH, G, T)


def merge_partials(o1, lse1, o2, lse2):
    """Exact combination of two partial softmaxes over disjoint key sets (log-sum-exp rule).

    o: [..., T, D], lse: [..., T]. Equals one softmax over the union of both key sets.
    """
    m = torch.maximum(lse1, lse2)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)  # exp(-inf) = 0 for an empty side
    denom = w1 + w2
    o = (o1 * w1[..., None] + o2 * w2[..., None]) / denom[..., None].clamp_min(torch.finfo(o1.dtype).tiny)
    return o, m + torch.log(denom)


def reference_attention(q, k, v, scale: float, causal_offset: int | None = None):
    """Naive full softmax attention, kept as the reference every fast path is tested against.

    q: [..., T, D], k, v: [..., S, D] -> [..., T, D]
    """
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal_offset is not None:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(causal_offset)
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def attention_from_scores(scores, v, scale: float):
    """Partial attention when the logits are already known (an index returns them with the ids).

    scores: [..., K] unscaled q.k of the K selected keys; v: [..., K, D] -> o: [..., D], lse: [...]
    """
    s = scores * scale
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    return torch.matmul(p[..., None, :], v)[..., 0, :], lse


def retrieval_attention(q, k_local, v_local, s_sel, v_sel, scale: float):
    """Attention over the local keys (causal for the newest) merged with per-query retrieved keys.

    q:        [KVH, G, T, D]    queries grouped by the KV head they share (GQA)
    k_local:  [KVH, S, D]       static set + tokens after the document; the last T are the queries' own
    s_sel:    [KVH, G, T, K]    q.k logits (unscaled) of the K offloaded keys retrieved for each query
    v_sel:    [KVH, G, T, K, D] their values (K may be 0)
    returns   [KVH, G, T, D]
    """
    KVH, G, T, D = q.shape
    S = k_local.shape[-2]
    # [KVH, G*T, D] against [KVH, S, D]: one bmm per KV head, no broadcast copies of the keys
    scores = torch.bmm(q.reshape(KVH, G * T, D), k_local.transpose(1, 2)).view(KVH, G, T, S) * scale
    if T > 1:  # the new tokens see each other causally; everything before them is visible
        t = torch.arange(T, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        scores = scores.masked_fill(j > S - T + t, float("-inf"))
    lse_loc = torch.logsumexp(scores, dim=-1)  # [KVH, G, T]; finite: a token always sees itself
    p = torch.exp(scores - lse_loc[..., None]).view(KVH, G * T, S)
    o_loc = torch.bmm(p, v_local).view(KVH, G, T, D)
    if s_sel.shape[-1] == 0:
        return o_loc
    o_ret, lse_ret = attention_from_scores(s_sel, v_sel, scale)
    o, _ = merge_partials(o_loc, lse_loc, o_ret, lse_ret)
    return o


# ----------------------------------------------------------------------------- the cache

class RetrievalLayer(DynamicLayer):
    """One layer's KV for a cached document: static keys on the compute device, the rest offloaded.

    `keys`/`values` (inherited, [1, KVH, S, D], on the compute device) start as the static set and
    grow by `update` with every token after the document, as a DynamicLayer does. The offloaded
    middle lives in `offloaded` (an `OffloadedKV` of core/engine.py: CPU, memory-mapped) and is
    reached only through `index`, which returns the ids and logits of each query's top-k keys.
    """

    def __init__(self, static_k, static_v, offloaded, index, top_k: int, n_prefix: int):
        super().__init__()
        self.keys, self.values = static_k, static_v
        self.device = static_k.device
        self.is_initialized = True
        self.offloaded, self.index, self.top_k = offloaded, index, top_k
        self.n_offloaded = n_prefix - static_k.shape[-2]
        self.last_retrieved = None  # ids of the last step, for tests and future citations

    def get_seq_length(self) -> int:
        # the logical length (document + new tokens): transformers derives positions from it
        return self.n_offloaded + self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # ra_attention builds its own mask; keep the unused one as small as the local key set
        return self.keys.shape[-2] + query_length, 0

    def attend(self, query, key, value, scale: float):
        """query: [1, Hq, T, D]; key/value: [1, KVH, S, D] as returned by update -> [1, T, Hq, D]."""
        _, Hq, T, D = query.shape
        KVH = key.shape[1]
        # the attention math runs in fp32 whatever the model's dtype (cheap: few keys per query)
        q = query[0].float().reshape(KVH, Hq // KVH, T, D)  # query head h uses KV head h // G
        k = min(self.top_k, self.n_offloaded)
        if k > 0:
            # the index returns the ids of each query's top-k keys and their exact logits q.k
            ids, scores = self.index.search(q.reshape(KVH, -1, D), k)  # [KVH, G*T, k], CPU
            self.last_retrieved = ids
            v_sel = self.offloaded.gather_values(ids)  # [KVH, G*T, k, D], CPU, store dtype
            s_sel = scores.to(q.device).reshape(*q.shape[:3], k)
            v_sel = v_sel.to(q.device, torch.float32).reshape(*q.shape[:3], k, D)
        else:
            s_sel, v_sel = q.new_zeros(*q.shape[:3], 0), q.new_zeros(*q.shape[:3], 0, D)
        o = retrieval_attention(q, key[0].float(), value[0].float(), s_sel, v_sel, scale)
        return o.reshape(Hq, T, D).transpose(0, 1)[None].to(query.dtype).contiguous()


class RetrievalCache(Cache):
    """A transformers Cache made of RetrievalLayers (retrieval mode) or of plain DynamicLayers
    holding the whole document (the `--attention full` baseline)."""

    def __init__(self, layers):
        super().__init__(layers=layers)


# ----------------------------------------------------------------------------- the hook

def ra_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, ra_cache=None, **kwargs):
    """AttentionInterface function: retrieval attention on RetrievalLayers, SDPA everywhere else
    (prefill, the full-attention baseline, models used without a document)."""
    if ra_cache is not None:
        attend = getattr(ra_cache.layers[module.layer_idx], "attend", None)  # RetrievalLayer and kin
        if attend is not None:
            scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
            return attend(query, key, value, scale), None
    capture = kwargs.pop("ra_capture", None)
    if capture is not None:
        capture.record(module.layer_idx, query)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, ra_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
