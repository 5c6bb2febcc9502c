"""Exact attention of a few query rows over fp16 keys and values, on the CPU, read as stored.

The `exact` kind attends every offloaded key at every decode step. The store keeps K/V in fp16;
PyTorch's fused CPU kernel wants them in fp32 (its fp16 path rounds the query to fp16 too), so
over fp32 copies a step reads 8 bytes per key and value element. This kernel reads the fp16 bits
(4 bytes) and widens each element exactly:

    fp16 bits h -> fp32 bits ((h & 0x8000) << 16) | ((h & 0x7FFF) << 13), times 2^112

(the exponent is rebiased by the multiplication, which also turns fp16 subnormals into the
right normal fp32 values; K/V hold no inf or NaN), then computes the softmax in fp32: the same
numbers as the fused kernel over fp32 copies, summed in another order. A decode step is bound by
reading the K/V, so half the bytes is most of the gain (BENCHMARKS.md, "The decode step"). core/attention's
`partial_attention` is the reference it is tested against (tests/test_attention_f16.py).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

from .jit import call

SLICE = 1024  # keys per task


@njit(inline="always")
def _widen(row, buf_u, buf_f):
    """fp16 bits (uint16 [D]) -> buf_f (fp32 [D], a view of buf_u's memory), exactly."""
    for d in range(row.shape[0]):
        h = np.uint32(row[d])
        buf_u[d] = ((h & np.uint32(0x8000)) << np.uint32(16)) | ((h & np.uint32(0x7FFF)) << np.uint32(13))
    for d in range(row.shape[0]):
        buf_f[d] *= np.float32(5.192296858534828e+33)  # 2^112


@njit(parallel=True, fastmath=True, cache=True)
def _scores(q, k, start, scale, n_slices, out):
    """q fp32 [KVH, M, D]; k uint16 (fp16 bits) [KVH, >= start + N, D] -> out [KVH, M, N] =
    scale * q.k over k's rows start.. (parallel over (KV head, slice of SLICE keys) tasks)."""
    KVH, M, D = q.shape
    N = out.shape[2]
    for task in prange(KVH * n_slices):
        h = task // n_slices
        a = (task % n_slices) * SLICE
        buf_u = np.empty(D, np.uint32)
        buf_f = buf_u.view(np.float32)
        for n in range(a, min(a + SLICE, N)):
            _widen(k[h, start + n], buf_u, buf_f)
            for r in range(M):
                t = np.float32(0.0)
                for d in range(D):
                    t += q[h, r, d] * buf_f[d]
                out[h, r, n] = t * scale


@njit(parallel=True, fastmath=True, cache=True)
def _weighted(p, v, start, n_slices, out):
    """p fp32 [KVH, M, N]; v uint16 (fp16 bits) [KVH, >= start + N, D] -> out [KVH, S, M, D]: each
    slice's sum of p * v over v's rows start.. (the slices are added by the caller)."""
    KVH, M, N = p.shape
    D = v.shape[2]
    for task in prange(KVH * n_slices):
        h = task // n_slices
        s = task % n_slices
        a = s * SLICE
        buf_u = np.empty(D, np.uint32)
        buf_f = buf_u.view(np.float32)
        acc = np.zeros((M, D), np.float32)
        for n in range(a, min(a + SLICE, N)):
            _widen(v[h, start + n], buf_u, buf_f)
            for r in range(M):
                w = p[h, r, n]
                for d in range(D):
                    acc[r, d] += w * buf_f[d]
        out[h, s] = acc


def rows(a: np.ndarray, start: int = 0, stop: int | None = None):
    """fp16 K or V [KVH, N, D] (rows start..stop of it) as the kernels read them: (uint16 bits
    [KVH, >= stop, D], C-contiguous, start). A view where `a` is C-contiguous (a layer of the
    store's memory map); otherwise a contiguous copy of the rows (tests' slices)."""
    a = np.asarray(a)
    stop = a.shape[1] if stop is None else stop
    if not a.flags.c_contiguous:
        a, start = np.ascontiguousarray(a[:, start:stop]), 0
    return a.view(np.uint16), start


def attention_f16(q: torch.Tensor, k, v, scale: float, keep_logits: bool = False, n: int | None = None):
    """q [KVH, G, T, D] (fp32, CPU) over n keys (default all) of k, v: fp16 arrays [KVH, N, D] or
    `rows` results (bits, start) -> (o [KVH, G, T, D], lse [KVH, G, T]) as
    core/attention.partial_attention, and with keep_logits the unscaled logits q.k [KVH, G*T, n]
    (else None). The logits and the weighted values are read off the fp16 bits here; the softmax
    between them is torch's (its vectorized exp). Meant for a decode step's few rows (every row
    reads every key)."""
    KVH, G, T, D = q.shape
    (kb, ks), (vb, vs) = (x if isinstance(x, tuple) else rows(x) for x in (k, v))
    N = n if n is not None else kb.shape[1] - ks
    S = math.ceil(N / SLICE)
    logits = torch.empty(KVH, G * T, N)
    call(_scores, q.reshape(KVH, G * T, D).contiguous().numpy(), kb, ks, np.float32(1.0), S, logits.numpy())
    s = logits * scale if keep_logits else logits.mul_(scale)
    lse = torch.logsumexp(s, dim=-1)                          # [KVH, M]
    p = s.sub_(lse[..., None]).exp_()                         # the softmax, in place
    o_part = np.empty((KVH, S, G * T, D), np.float32)
    call(_weighted, p.numpy(), vb, vs, S, o_part)
    o = torch.from_numpy(o_part).sum(dim=1)                   # [KVH, M, D]
    return o.reshape(KVH, G, T, D), lse.reshape(KVH, G, T), (logits if keep_logits else None)
