"""Exact attention of a few query rows over fp16 keys and values, on the CPU, read as stored.

The `exact` kind attends every offloaded key at every decode step. The store keeps K/V in fp16;
PyTorch's fused CPU kernel wants them in fp32 (its fp16 path rounds the query to fp16 too), so
over fp32 copies a step reads 8 bytes per key and value element. These kernels read the fp16
bits (4 bytes) and widen each element exactly (core/jit.h2f: the CPU's own conversion), then
compute the softmax in fp32: the same numbers as the fused kernel over fp32 copies, summed in
another order. A decode step is bound by reading the K/V, so half the bytes is most of the gain
(BENCHMARKS.md, "The decode step"). core/attention's `partial_attention` is the reference they
are tested against (tests/test_attention_f16.py).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import overload

from .jit import call, exp_f32, h2f

SLICE = 1024  # keys per task


def widen(x):
    """An element of K or V as fp32: fp16 bits (uint16) through h2f, fp32 as it is."""


@overload(widen, inline="always")
def _widen(x):
    if x == types.uint16:
        return lambda x: h2f(x)
    if x == types.float32:
        return lambda x: x
    return None


@njit(fastmath=True, inline="always")
def _slice(q, h, k, k0, v, v0, a, b, scale, o_out, m_out, l_out, logits, keep, D):
    """The partial softmax of keys a..b (at most SLICE) of KV head h, one pass over K and V (as
    FlashAttention's blocks; the scores never leave the task). q fp32 [KVH, M, D]; k, v
    [KVH, >= k0 + b, D] and [KVH, >= v0 + b, D], fp16 bits (uint16) or fp32, rows k0 + i and
    v0 + i for i in a..b. Writes m_out[r] = the largest scaled logit of query row r,
    l_out[r] = sum exp(logit - m), o_out[r] = sum exp(logit - m) * v; with `keep` the unscaled
    q.k into logits[h, r, i]. Inlined into its callers, which pass D as a constant for the usual
    head sizes (`_task`): loops of a known length compile to straight vector code."""
    M = q.shape[1]
    sc = np.empty((M, SLICE), np.float32)
    buf = np.empty(D, np.float32)
    for i in range(a, b):
        for d in range(D):
            buf[d] = widen(k[h, k0 + i, d])
        for r in range(M):
            t = np.float32(0.0)
            for d in range(D):
                t += q[h, r, d] * buf[d]
            sc[r, i - a] = t * scale
            if keep:
                logits[h, r, i] = t
    for r in range(M):
        mx = np.float32(-np.inf)
        for i in range(b - a):
            mx = max(mx, sc[r, i])
        total = np.float32(0.0)
        for i in range(b - a):
            e = exp_f32(sc[r, i] - mx)
            sc[r, i] = e
            total += e
        m_out[r] = mx
        l_out[r] = total
    acc = np.zeros((M, D), np.float32)
    for i in range(a, b):
        for d in range(D):
            buf[d] = widen(v[h, v0 + i, d])
        for r in range(M):
            w = sc[r, i - a]
            for d in range(D):
                acc[r, d] += w * buf[d]
    o_out[:, :] = acc


@njit(fastmath=True, inline="always")
def _task(q, h, k, k0, v, v0, a, b, scale, o_out, m_out, l_out, logits, keep):
    """`_slice` with the head size as a compile-time constant where it is 64 or 128 (a loop of a
    known length compiles to straight vector code), any other size as it is."""
    D = q.shape[2]
    if D == 64:
        _slice(q, h, k, k0, v, v0, a, b, scale, o_out, m_out, l_out, logits, keep, 64)
    elif D == 128:
        _slice(q, h, k, k0, v, v0, a, b, scale, o_out, m_out, l_out, logits, keep, 128)
    else:
        _slice(q, h, k, k0, v, v0, a, b, scale, o_out, m_out, l_out, logits, keep, D)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _slices(q, k, k0, v, v0, n, scale, o_part, m_part, l_part, logits, keep):
    """Each slice of SLICE keys' partial (`_slice`), the KV heads' slices spread over the threads:
    n keys, rows k0.. of k and v0.. of v; slice s of head h into o_part[h, s] [M, D],
    m_part[h, s], l_part[h, s] [M]. With `keep`, `logits` [KVH, M, n] gets the unscaled q.k (a
    tally wants them); else it is a placeholder, never written."""
    KVH = q.shape[0]
    S = o_part.shape[1]
    for task in prange(KVH * S):
        h, s = task // S, task % S
        a = s * SLICE
        _task(q, h, k, k0, v, v0, a, min(a + SLICE, n), scale, o_part[h, s], m_part[h, s], l_part[h, s], logits, keep)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _slices2(q, ka, va, na, kb, kb0, vb, vb0, nb, scale, o_part, m_part, l_part, logits, keep):
    """`_slices` over two key sets at once: rows 0..na of ka, va (the document's fp16 rows) in
    the first slices of each head, rows kb0.. / vb0.. (nb of them) of kb, vb (the tokens after
    it, fp32) in the rest. With `keep`, `logits` [KVH, M, na] gets the document rows' unscaled q.k
    (a tally wants them); else it is a placeholder, never written."""
    KVH = q.shape[0]
    S = o_part.shape[1]
    Sa = (na + SLICE - 1) // SLICE
    none = np.empty((1, 1, 1), np.float32)
    for task in prange(KVH * S):
        h, s = task // S, task % S
        if s < Sa:
            a = s * SLICE
            _task(q, h, ka, 0, va, 0, a, min(a + SLICE, na), scale, o_part[h, s], m_part[h, s], l_part[h, s], logits, keep)
        else:
            a = (s - Sa) * SLICE
            _task(q, h, kb, kb0, vb, vb0, a, min(a + SLICE, nb), scale, o_part[h, s], m_part[h, s], l_part[h, s], none, False)


@njit(cache=True, nogil=True)
def _combine(o_part, m_part, l_part, o, lse):
    """The slices' partials merged by the log-sum-exp rule (core/attention.merge's): o [KVH, M, D],
    lse [KVH, M]; no slice (no key) gives o = 0, lse = -inf."""
    KVH, S, M, D = o_part.shape
    for h in range(KVH):
        for r in range(M):
            mx = np.float32(-np.inf)
            for s in range(S):
                mx = max(mx, m_part[h, s, r])
            o[h, r] = 0.0
            if mx == -np.inf:
                lse[h, r] = mx
                continue
            total = np.float32(0.0)
            for s in range(S):
                w = np.exp(m_part[h, s, r] - mx)
                total += w * l_part[h, s, r]
                for d in range(D):
                    o[h, r, d] += w * o_part[h, s, r, d]
            for d in range(D):
                o[h, r, d] /= total
            lse[h, r] = mx + np.log(total)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _shares(logits, lse, scale, starts, run_units, skip, nowhere, out, tokens, keep):
    """Each key's share of its query row's softmax, p = exp(scale * logit - lse), added to
    out[l, r, u]: u = run_units[j] for the keys of run j (starts[j]..starts[j + 1]) but those in
    `skip`, u = nowhere for those; and, with `keep`, to tokens[l, i]. logits [L, R, n] unscaled,
    lse [L, R]; out [L, R, U] fp32 and tokens [L, n] fp64 (without `keep`: a placeholder, never
    written), added to. Per row: the shares (vectorized), the skipped keys' summed and zeroed,
    then one sum per run. Layers over the threads."""
    L, R, n = logits.shape
    for l in prange(L):
        p = np.empty(n, np.float32)
        for r in range(R):
            m = lse[l, r]
            for i in range(n):  # vectorizes
                p[i] = exp_f32(min(logits[l, r, i] * scale - m, np.float32(0.0)))
            if keep:
                for i in range(n):
                    tokens[l, i] += p[i]
            t = np.float32(0.0)
            for i in skip:
                t += p[i]
                p[i] = np.float32(0.0)
            out[l, r, nowhere] += t
            for j in range(len(run_units)):
                out[l, r, run_units[j]] += p[starts[j]:starts[j + 1]].sum()  # a slice's sum vectorizes


def scatter_shares(logits: torch.Tensor, lse: torch.Tensor, scale: float, runs, out: torch.Tensor, tokens=None):
    """A tally's step over every document key (core/citations.Tally): logits [L, R, n] (fp32,
    unscaled), lse [L, R] of each row's whole softmax -> the shares exp(scale * logit - lse) added
    to out [L, R, U] (fp32, in place) by `runs` (core/citations.unit_runs of the keys' passages)
    and, unless tokens is None, to tokens [L, n] (fp64, in place: each key's shares summed over a
    layer's rows). No [L, R, n] temporary."""
    L, R, n = logits.shape
    starts, run_units, skip, nowhere = runs
    assert starts[-1] == n, (starts[-1], n)
    if tokens is not None and (tuple(tokens.shape) != (L, n) or tokens.dtype != torch.float64):
        raise ValueError(f"tokens buffer {tuple(tokens.shape)} {tokens.dtype}, not {(L, n)} float64")
    call(_shares, logits.contiguous().numpy(), lse.float().contiguous().numpy(), np.float32(scale), starts,
         run_units, skip, np.int64(nowhere), out.numpy(),
         np.zeros((1, 1), np.float64) if tokens is None else tokens.numpy(), tokens is not None)


def rows(a: np.ndarray, start: int = 0, stop: int | None = None):
    """K or V [KVH, N, D] (rows start..stop of it) as the kernels read them: (an array [KVH, >= stop,
    D], C-contiguous: fp16 as its uint16 bits, fp32 as it is; start). A view where `a` is
    C-contiguous (a layer of the store's memory map, StaticKV's buffer); otherwise a contiguous
    copy of the rows (tests' slices)."""
    a = np.asarray(a)
    stop = a.shape[1] if stop is None else stop
    if not a.flags.c_contiguous:
        a, start = np.ascontiguousarray(a[:, start:stop]), 0
    return (a.view(np.uint16) if a.dtype == np.float16 else a), start


def _slice_parts(KVH: int, S: int, M: int, D: int):
    """(o_part [KVH, S, M, D], m_part [KVH, S, M], l_part [KVH, S, M]) for `_slices` / `_slices2` to fill."""
    return np.empty((KVH, S, M, D), np.float32), np.empty((KVH, S, M), np.float32), np.empty((KVH, S, M), np.float32)


def _merged(parts, G: int, T: int):
    """The slices' partials merged by `_combine` -> (o [KVH, G, T, D], lse [KVH, G, T])."""
    KVH, _, M, D = parts[0].shape
    o = torch.empty(KVH, M, D)
    lse = torch.empty(KVH, M)
    call(_combine, *parts, o.numpy(), lse.numpy())
    return o.reshape(KVH, G, T, D), lse.reshape(KVH, G, T)


def attention_f16(q: torch.Tensor, k, v, scale: float, keep_logits: bool = False, n: int | None = None):
    """q [KVH, G, T, D] (fp32, CPU) over n keys (default all) of k, v: arrays [KVH, N, D] (fp16 or
    fp32) or `rows` results (array, start) -> (o [KVH, G, T, D], lse [KVH, G, T]) as
    core/attention.partial_attention (every row sees every key: no causal mask), and with
    keep_logits the unscaled logits q.k [KVH, G*T, n] (else None). Meant for a decode step's few
    rows (every row reads every key)."""
    KVH, G, T, D = q.shape
    (kb, ks), (vb, vs) = (x if isinstance(x, tuple) else rows(x) for x in (k, v))
    N = n if n is not None else kb.shape[1] - ks
    S = math.ceil(N / SLICE)
    M = G * T
    logits = torch.empty(KVH, M, N if keep_logits else 1)
    parts = _slice_parts(KVH, S, M, D)
    if S:
        call(_slices, q.reshape(KVH, M, D).contiguous().numpy(), kb, ks, vb, vs, N, np.float32(scale), *parts,
             logits.numpy() if keep_logits else np.empty((1, 1, 1), np.float32), keep_logits)
    o, lse = _merged(parts, G, T)
    return o, lse, (logits if keep_logits else None)


def step_attention(q: torch.Tensor, doc_k, doc_v, new_k, new_v, n_new: int, scale: float, logits=None):
    """One decode step of the `exact` kind in one kernel: q [KVH, G, 1, D] (fp32, CPU) over every
    key of the document, read as stored (doc_k, doc_v: `rows` results (fp16 bits [KVH, N, D], 0)),
    and the n_new tokens after it (new_k, new_v: (fp32 [KVH, >= start + n_new, D], start)) ->
    (o [KVH, G, 1, D], lse [KVH, G, 1]); logits: None, or a buffer [KVH, G, N] (fp32, C-contiguous;
    a tally's) that gets the unscaled logits of every document row, in document order. The same
    softmax as `attention_f16` over the document merged with a partial over the new tokens
    (core/layer: the static zone's partial, the offloaded keys' partial and core/attention.merge),
    in one pass and one call per layer."""
    KVH, G, T, D = q.shape
    (ka, _), (va, _) = doc_k, doc_v
    (kb, kb0), (vb, vb0), nb = new_k, new_v, n_new
    na = ka.shape[1]
    S = math.ceil(na / SLICE) + math.ceil(nb / SLICE)
    M = G * T
    parts = _slice_parts(KVH, S, M, D)
    if logits is not None and tuple(logits.shape) != (KVH, G, na):
        raise ValueError(f"logits buffer {tuple(logits.shape)}, not {(KVH, G, na)}")
    call(_slices2, q.reshape(KVH, M, D).contiguous().numpy(), ka, va, na, kb, kb0, vb, vb0, nb, np.float32(scale),
         *parts, np.empty((1, 1, 1), np.float32) if logits is None else logits.numpy().reshape(KVH, M, na),
         logits is not None)
    return _merged(parts, G, T)
