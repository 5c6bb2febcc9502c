"""Retrieval attention's math, the naive reference beside it, and the transformers hook.

A decoding query attends to disjoint key sets (zones), each giving a partial softmax
(output, log-sum-exp): the static keys on the compute device, the keys an index retrieves from
the offloaded middle of the document, and whatever zone comes next. `merge` combines any number
of partials exactly, as FlashAttention combines blocks; it is the only merge in ra. With every
offloaded key retrieved the result IS full attention (tests/test_attention.py, test_exactness.py).
The parts that produce the partials for a cached document are in core/layer.py.
"""
from __future__ import annotations

import math

import torch

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
    # the G query heads of a KV head go in as G * T rows of one head (row g * T + t), so the kernel
    # reads each K/V once and nothing is copied; the causal mask is the same for every g
    mask = None
    if causal_offset is not None and causal_offset >= S - 1:
        causal_offset = None  # every query sees every key (a decode step)
    if causal_offset is not None:  # additive mask: query t sees key j <= causal_offset + t
        t = torch.arange(T)[:, None]
        j = torch.arange(S)[None, :]
        mask = torch.zeros(T, S).masked_fill(j > causal_offset + t, float("-inf")).repeat(G, 1)
    o, lse = op(q.reshape(1, KVH, G * T, D), k[None], v[None], 0.0, False, attn_mask=mask, scale=scale)
    return o.view(KVH, G, T, -1), lse.view(KVH, G, T)


def flash_usable(q: torch.Tensor) -> bool:
    """Whether `flash_attention` runs q ([..., D]) on its device: CUDA with sm80+ (PyTorch's flash
    kernel) in fp16/bf16, or the CPU (its flash-style kernel, which tests use to check the
    reshapes), with a head size the kernels take."""
    D = q.shape[-1]
    if D % 8 or D > 256:
        return False
    if q.device.type == "cuda":  # a build with flash attention (not every one has it), an sm80+ GPU
        built = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)()
        return built and q.dtype in (torch.float16, torch.bfloat16) and torch.cuda.get_device_capability(q.device) >= (8, 0)
    return q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def flash_attention(q, k, v, scale: float, causal: bool = False):
    """partial_attention through PyTorch's flash kernel, which returns the log-sum-exp beside the
    output and never holds a [T, S] score tensor: the prefill's attention on a GPU, in the model's
    dtype (core/layer.PrefillKV). Check `flash_usable(q)` first.

    q: [KVH, G, T, D] (GQA groups), k, v: [KVH, S, D] (the last dim contiguous; a slice of a larger
    buffer is read in place) -> o: [KVH, G, T, D] (q's dtype), lse: [KVH, G, T] (fp32)
    causal: S == T and query t sees keys <= t (a chunk over its own keys); else every key."""
    KVH, G, T, D = q.shape
    S = k.shape[1]
    if causal:  # the mask is per row of one head: one head per query head (the chunk's K/V x G)
        assert S == T, (S, T)
        qh = q.reshape(1, KVH * G, T, D)
        kh = k[:, None].expand(KVH, G, S, D).reshape(1, KVH * G, S, D)
        vh = v[:, None].expand(KVH, G, S, D).reshape(1, KVH * G, S, D)
    else:  # the G query heads of a KV head as G * T rows of one head: each K/V read once, in place
        qh, kh, vh = q.reshape(1, KVH, G * T, D), k[None], v[None]
    if q.device.type == "cuda":
        out = torch.ops.aten._scaled_dot_product_flash_attention(qh, kh, vh, 0.0, causal, False, scale=scale)
    else:
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh, 0.0, causal, scale=scale)
    o, lse = out[0], out[1].float()  # o: [1, heads, rows, D]; lse: [1, heads, rows] (natural log, scaled logits)
    lse = lse.masked_fill(lse == math.inf, -math.inf)  # a row with no key: flash says +inf, merge reads -inf
    return o.reshape(KVH, G, T, D), lse.reshape(KVH, G, T)


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


def merge(parts):
    """Exact combination of any number of partials [(o, lse), ...] over disjoint key sets: the
    pairwise rule folded left to right (parts[0] with parts[1], the result with parts[2], ...).
    Returns (o, lse)."""
    o, lse = parts[0]
    for o2, lse2 in parts[1:]:
        o, lse = merge_partials(o, lse, o2, lse2)
    return o, lse


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


# ----------------------------------------------------------------------------- the hook

# How a cache reaches the attention function, in one place:
#   1. `register()` (called by core/model.load and by whoever builds a model for ra) adds
#      `ra_attention` to transformers' AttentionInterface under the name "ra", with SDPA's mask;
#      a model loaded with attn_implementation="ra" then calls it in every attention layer.
#   2. ra's own loops (core/generation.py, core/longctx.py) pass the Cache they built as the
#      keyword argument `ra_cache=cache` to `model(...)`; transformers forwards keyword arguments
#      it does not know to the attention function untouched (and passes the same object as
#      `cache`, through which each layer's `update` stores the new tokens' K/V first).
#   3. `ra_attention` looks up `ra_cache.layers[module.layer_idx]`; a layer with an `attend`
#      method (core/layer.DocumentLayer, core/longctx.LongPrefillLayer) computes the attention
#      itself; any other layer (a DynamicLayer: the `full` baseline, the prefill inside the
#      window, a model used without a document) falls through to transformers' SDPA.
#   `ra_capture` (a core/generation.QueryCapture) rides along the same way during a prefill.

def ra_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, ra_cache=None, **kwargs):
    """AttentionInterface function: a layer's own `attend` where it has one, SDPA everywhere else."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if ra_cache is not None:
        attend = getattr(ra_cache.layers[module.layer_idx], "attend", None)
        if attend is not None:
            scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
            return attend(query, key, value, scale), None
    capture = kwargs.pop("ra_capture", None)
    if capture is not None:
        capture.record(module.layer_idx, query)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def register() -> str:
    """Register the "ra" attention implementation with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, ra_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION
