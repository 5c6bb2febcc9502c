"""Weights that are 4- or 8-bit blocks, read as such by the one-token decode steps, exactly.

A model converted from a GGUF (core/gguf_convert.py) holds fp32 weights that are, bit for bit,
the file's quantized blocks dequantized: for Q4_0/Q4_1, w = d * q + m in each block of 32 weights
along a row (q in 0..15, d and m fp16 values); for Q8_0, w = d * q (q in -127..127). A decode step
reads every weight once per token, and on a CPU that read (4 bytes per weight in fp32) is most of
the linear layers' time. `find_blocks` recovers (q, d, m) from the fp32 weights and keeps them
only if d * q + m gives back every weight exactly (no assumption about where the weights came
from: a tensor that is not such blocks stays fp32); `BlockLinear` then computes y = W x from one
byte per weight:

    y[n] = sum_b ( d[n, b] * sum_j q[n, b, j] * x[b, j]  +  m[n, b] * sum_j x[b, j] )

the same weights and fp32 arithmetic as the fp32 product, summed in another order (so results
differ from it by rounding, ~1e-7 relative, as two BLAS libraries do). `reference_linear` is
the plain product over the dequantized weights, kept beside it as the tests' reference.

Why a kernel of ra's own: torch's int4 CPU kernel (`_weight_int4pack_mm_for_cpu`) represents
these blocks exactly but ran ~10x slower than fp32 on an AVX2 host (no AVX-512 path), and
llama.cpp's kernels quantize the activations to 8 bits (not the same arithmetic). numba (already
ra's dependency for the graph index) compiles this loop to vector code, cached on disk.
"""
from __future__ import annotations

import weakref

import numpy as np
import torch
from numba import njit, prange

from .jit import call

BLOCK = 32


def find_blocks(w: np.ndarray):
    """w: fp32 [N, K] -> (q [N, K] uint8 or int8, d [N, K/32] fp32, m [N, K/32] fp32) with
    fp32(d * q + m) == w for every weight, or None when w is not such blocks.

    Q4 (affine, q in 0..15): each block's smallest weight is m (q = 0) and its largest d * 15 + m
    (the GGUF quantizer maps a block's range onto 0..15); Q8 (symmetric, q in -127..127, m = 0):
    the largest magnitude is 127 d. d is an fp16 value in both formats."""
    N, K = w.shape
    if K % BLOCK or w.dtype != np.float32 or N == 0:
        return None
    b = w.reshape(N, K // BLOCK, BLOCK)
    for signed in (False, True):
        if signed:
            m = np.zeros(b.shape[:2], np.float32)
            d = (np.abs(b).max(-1) / np.float32(127)).astype(np.float16).astype(np.float32)
            lo, hi = -127, 127
        else:
            m = b.min(-1)
            d = ((b.max(-1) - m) / np.float32(15)).astype(np.float16).astype(np.float32)
            lo, hi = 0, 15
        if not (np.isfinite(d).all() and np.isfinite(m).all()):
            return None
        safe = np.where(d == 0, np.float32(1), d)
        q = np.rint((b - m[..., None]) / safe[..., None])
        if q.min() < lo or q.max() > hi:
            continue
        if np.array_equal(d[..., None] * q + m[..., None], b):  # every weight given back exactly
            return q.astype(np.int8 if signed else np.uint8).reshape(N, K), d, m
    return None


@njit(parallel=True, fastmath=True, cache=True)
def _gemv(q, d, m, x, y):
    """y [N] = blocks (q [N, K], d, m [N, K/32]) times x [K]; four rows at a time (x read once)."""
    N, K = q.shape
    B = K // 32
    xs = np.empty(B, np.float32)
    for b in range(B):
        t = np.float32(0.0)
        for j in range(32):
            t += x[b * 32 + j]
        xs[b] = t
    for c in prange((N + 3) // 4):
        n = c * 4
        if n + 4 <= N:
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for b in range(B):
                s0 = np.float32(0.0)
                s1 = np.float32(0.0)
                s2 = np.float32(0.0)
                s3 = np.float32(0.0)
                for j in range(32):
                    xv = x[b * 32 + j]
                    s0 += np.float32(q[n, b * 32 + j]) * xv
                    s1 += np.float32(q[n + 1, b * 32 + j]) * xv
                    s2 += np.float32(q[n + 2, b * 32 + j]) * xv
                    s3 += np.float32(q[n + 3, b * 32 + j]) * xv
                a0 += d[n, b] * s0 + m[n, b] * xs[b]
                a1 += d[n + 1, b] * s1 + m[n + 1, b] * xs[b]
                a2 += d[n + 2, b] * s2 + m[n + 2, b] * xs[b]
                a3 += d[n + 3, b] * s3 + m[n + 3, b] * xs[b]
            y[n] = a0
            y[n + 1] = a1
            y[n + 2] = a2
            y[n + 3] = a3
        else:
            for r in range(n, N):
                a = np.float32(0.0)
                for b in range(B):
                    s = np.float32(0.0)
                    for j in range(32):
                        s += np.float32(q[r, b * 32 + j]) * x[b * 32 + j]
                    a += d[r, b] * s + m[r, b] * xs[b]
                y[r] = a


def reference_linear(x, q, d, m, bias=None):
    """The plain product over the dequantized weights (the tests' reference): x [..., K] -> [..., N]."""
    qt = torch.as_tensor(q).float()
    N, K = qt.shape
    w = (qt.view(N, K // BLOCK, BLOCK) * torch.as_tensor(d)[..., None] + torch.as_tensor(m)[..., None]).view(N, K)
    return torch.nn.functional.linear(x, w, bias)


class BlockLinear(torch.nn.Module):
    """nn.Linear over (q, d, m) blocks (fp32 activations, CPU): one row of x at a time."""

    def __init__(self, q: np.ndarray, d: np.ndarray, m: np.ndarray, bias=None):
        super().__init__()
        self.q, self.d, self.m = q, d, m
        self.bias = bias
        self.out_features, self.in_features = q.shape

    def forward(self, x):
        rows = x.reshape(-1, self.in_features).float().contiguous()  # [R, K]; a decode step: R = 1
        y = torch.empty(rows.shape[0], self.out_features)
        xn, yn = rows.numpy(), y.numpy()
        for r in range(rows.shape[0]):
            call(_gemv, self.q, self.d, self.m, xn[r], yn[r])
        if self.bias is not None:
            y += self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def _linear_names(model) -> list[str]:
    return [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
            and mod.weight.device.type == "cpu" and mod.weight.dtype == torch.float32]


def _find_all(model, names: list[str]) -> dict:
    """name -> (q, d, m) for every linear layer of `model` in `names` that is exactly blocks
    (the layers in parallel threads: numpy releases the GIL)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    weights = [model.get_submodule(n).weight.detach().numpy() for n in names]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        found = list(pool.map(find_blocks, weights))
    return {n: f for n, f in zip(names, found) if f is not None}


def _load(path, names: list[str], model) -> dict | None:
    """The blocks kept in `path` (safetensors: `<layer>.q`, `.d`, `.m`), or None when the file is
    missing, unreadable or not of this model's shapes."""
    from safetensors.numpy import load_file

    try:
        flat = load_file(str(path))
    except Exception:  # missing, torn or not safetensors: made again
        return None
    out = {}
    for n in {k.rsplit(".", 1)[0] for k in flat}:
        q, d, m = (flat.get(f"{n}.{x}") for x in "qdm")
        lin = model.get_submodule(n) if n in names else None
        if lin is None or q is None or d is None or m is None or q.shape != tuple(lin.weight.shape) \
                or d.shape != (q.shape[0], q.shape[1] // BLOCK) or d.shape != m.shape:
            return None
        out[n] = (q, d, m)
    return out


def _save(path, blocks: dict) -> None:
    """Write the blocks to `path` atomically (a temporary file renamed over it)."""
    import os

    from safetensors.numpy import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({f"{n}.{x}": a for n, qdm in blocks.items() for x, a in zip("qdm", qdm)}, str(tmp))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a read-only or full disk: the blocks are made again next time


_made = weakref.WeakKeyDictionary()  # model -> its block_copy result, where no file keeps the blocks


def block_copy(model, cache=None):
    """A copy of `model` (CPU, fp32) whose linear layers that are exactly 4/8-bit blocks are
    BlockLinears; every other parameter is shared with `model`, not copied. `cache`: a file
    (pathlib.Path) keeping the blocks found (safetensors, no pickle) so the next process reads
    them instead of searching the weights (~2 s for the embedded model here); None: no file, and
    the copy is made once per model object in this process (engines sharing a loaded model).
    -> (copy, linear layers converted, linear layers in all)."""
    if cache is None and model in _made:
        return _made[model]
    out = _block_copy(model, cache)
    if cache is None:
        _made[model] = out
    return out


def _block_copy(model, cache):
    import copy

    memo = {id(p): p for p in model.parameters()}  # deepcopy shares the parameters: no second fp32 copy
    memo.update({id(b): b for b in model.buffers()})
    twin = copy.deepcopy(model, memo).eval()
    names = _linear_names(twin)
    blocks = _load(cache, names, twin) if cache is not None else None
    if blocks is None:
        blocks = _find_all(twin, names)
        if cache is not None and blocks:
            _save(cache, blocks)
    for name, (q, d, m) in blocks.items():
        twin.set_submodule(name, BlockLinear(q, d, m, bias=twin.get_submodule(name).bias))
    return twin, len(blocks), len(names)
