"""Weights that are 4- or 8-bit blocks, read as such by the one-token decode steps, exactly.

A model converted from a GGUF (core/gguf_convert.py) holds fp32 weights that are, bit for bit,
the file's quantized blocks dequantized: for Q4_0/Q4_1, w = d * q + m in each block of 32 weights
along a row (q in 0..15, d and m fp16 values); for Q8_0, w = d * q (q in -127..127). A decode step
reads every weight once per token, and on a CPU that read (4 bytes per weight in fp32) is most of
the linear layers' time. `find_blocks` recovers (q, d, m) from the fp32 weights and keeps them
only if d * q + m gives back every weight exactly (no assumption about where the weights came
from: a tensor that is not such blocks stays fp32); `BlockLinear` then computes y = W x from the
blocks as the file holds them (`kernel_form`: 4-bit weights two to a byte, `pack4`; 8-bit ones a
byte each; d and m as fp16 bits, widened exactly by core/jit.h2f):

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

from .jit import call, h2f

BLOCK = 32


def find_blocks(w: np.ndarray):
    """w: fp32 [N, K] -> (q [N, K] uint8 or int8, d [N, K/32] fp32, m [N, K/32] fp32) with
    fp32(d * q + m) == w for every weight, or None when w is not such blocks.

    Q4 (affine, q in 0..15): each block's smallest weight is m (q = 0) and its largest d * 15 + m
    (the GGUF quantizer maps a block's range onto 0..15); Q8 (symmetric, q in -127..127, m = 0):
    the largest magnitude is 127 d. d and m are fp16 values in both formats (as the file stores
    them); a tensor whose offsets are not is not taken as blocks."""
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
        if not np.array_equal(m.astype(np.float16).astype(np.float32), m):  # m is an fp16 value too
            continue
        safe = np.where(d == 0, np.float32(1), d)
        q = np.rint((b - m[..., None]) / safe[..., None])
        if q.min() < lo or q.max() > hi:
            continue
        if np.array_equal(d[..., None] * q + m[..., None], b):  # every weight given back exactly
            return q.astype(np.int8 if signed else np.uint8).reshape(N, K), d, m
    return None


def pack4(q: np.ndarray) -> np.ndarray:
    """Q4 weights q [N, K] (0..15, uint8) -> [N, K/2] uint8, two per byte: in each block of 32,
    byte j holds weight j in its low four bits and weight 16 + j in its high four (GGUF's order).
    Half the bytes of `q` for the decode step to read; `unpack4` gives `q` back."""
    N, K = q.shape
    b = q.reshape(N, K // BLOCK, 2, BLOCK // 2)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(N, K // 2)


def unpack4(p: np.ndarray) -> np.ndarray:
    N, H = p.shape
    b = p.reshape(N, H // (BLOCK // 2), 1, BLOCK // 2)
    return np.concatenate([b & 15, b >> 4], axis=2).reshape(N, 2 * H)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _gemv4(p, d, m, x, y):
    """y [N] = Q4 blocks (p [N, K/2] packed as pack4; d, m [N, K/32] fp16 bits) times x [K]. Four
    rows at a time (x read once for four rows); N a multiple of 4 (BlockLinear pads the rows)."""
    B = p.shape[1] // 16
    xs = np.empty(B, np.float32)  # each block's sum of x: the offsets' factor, m * sum x
    for b in range(B):
        t = np.float32(0.0)
        for j in range(32):
            t += x[b * 32 + j]
        xs[b] = t
    for c in prange(p.shape[0] // 4):
        n = c * 4
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        for b in range(B):
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            s2 = np.float32(0.0)
            s3 = np.float32(0.0)
            for j in range(16):
                lo = x[b * 32 + j]        # weight j of the block: a byte's low four bits
                hi = x[b * 32 + 16 + j]   # weight 16 + j: its high four
                v0, v1, v2, v3 = p[n, b * 16 + j], p[n + 1, b * 16 + j], p[n + 2, b * 16 + j], p[n + 3, b * 16 + j]
                s0 += np.float32(v0 & 15) * lo + np.float32(v0 >> 4) * hi
                s1 += np.float32(v1 & 15) * lo + np.float32(v1 >> 4) * hi
                s2 += np.float32(v2 & 15) * lo + np.float32(v2 >> 4) * hi
                s3 += np.float32(v3 & 15) * lo + np.float32(v3 >> 4) * hi
            a0 += h2f(d[n, b]) * s0 + h2f(m[n, b]) * xs[b]
            a1 += h2f(d[n + 1, b]) * s1 + h2f(m[n + 1, b]) * xs[b]
            a2 += h2f(d[n + 2, b]) * s2 + h2f(m[n + 2, b]) * xs[b]
            a3 += h2f(d[n + 3, b]) * s3 + h2f(m[n + 3, b]) * xs[b]
        y[n], y[n + 1], y[n + 2], y[n + 3] = a0, a1, a2, a3


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _gemv8(q, d, x, y):
    """y [N] = Q8 blocks (q [N, K] int8, d [N, K/32] fp16 bits; no offsets) times x [K]; four rows
    at a time, N a multiple of 4."""
    B = q.shape[1] // 32
    for c in prange(q.shape[0] // 4):
        n = c * 4
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
            a0 += h2f(d[n, b]) * s0
            a1 += h2f(d[n + 1, b]) * s1
            a2 += h2f(d[n + 2, b]) * s2
            a3 += h2f(d[n + 3, b]) * s3
        y[n], y[n + 1], y[n + 2], y[n + 3] = a0, a1, a2, a3


def reference_linear(x, q, d, m, bias=None):
    """The plain product over the dequantized weights (the tests' reference): x [..., K] -> [..., N]."""
    qt = torch.as_tensor(q).float()
    N, K = qt.shape
    w = (qt.view(N, K // BLOCK, BLOCK) * torch.as_tensor(d)[..., None] + torch.as_tensor(m)[..., None]).view(N, K)
    return torch.nn.functional.linear(x, w, bias)


def kernel_form(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> dict:
    """find_blocks' (q, d, m) as the kernels read them: Q4 {"q4": pack4(q), "d", "m"}; Q8
    {"q8": q, "d"} (its offsets are zero); d and m as fp16 bits (uint16: they are fp16 values, so
    exactly; core/jit.h2f widens them)."""
    bits = lambda a: a.astype(np.float16).view(np.uint16)  # noqa: E731
    if q.dtype == np.uint8:
        return {"q4": pack4(q), "d": bits(d), "m": bits(m)}
    return {"q8": q, "d": bits(d)}


def _padded(a: np.ndarray, rows: int) -> np.ndarray:
    return a if a.shape[0] == rows else np.concatenate([a, np.zeros((rows - a.shape[0], *a.shape[1:]), a.dtype)])


class BlockLinear(torch.nn.Module):
    """nn.Linear over blocks in kernel form (`kernel_form`; fp32 activations, CPU), one row of x at
    a time. The rows are padded with zero rows to a multiple of four for the kernels."""

    def __init__(self, blocks: dict, bias=None):
        super().__init__()
        self.blocks = blocks
        self.bias = bias
        q = blocks.get("q4", blocks.get("q8"))
        self.out_features = q.shape[0]
        self.in_features = q.shape[1] * (2 if "q4" in blocks else 1)
        rows = -(-self.out_features // 4) * 4
        q4 = "q4" in blocks
        self._kernel = _gemv4 if q4 else _gemv8
        self._kernel_args = tuple(_padded(blocks[k], rows) for k in (("q4", "d", "m") if q4 else ("q8", "d")))
        self._rows = rows
        self._compiled = False  # core/jit.call's signal guard is for the first call only

    def forward(self, x):
        rows = x.reshape(-1, self.in_features).float().contiguous()  # [R, K]; a decode step: R = 1
        y = torch.empty(rows.shape[0], self._rows)
        xn, yn = rows.numpy(), y.numpy()
        for r in range(rows.shape[0]):
            if self._compiled:  # the argument types never change: no check per call (~3 us, 210 calls a step)
                self._kernel(*self._kernel_args, xn[r], yn[r])
            else:
                call(self._kernel, *self._kernel_args, xn[r], yn[r])
                self._compiled = True
        if self._rows != self.out_features:
            y = y[:, :self.out_features]
        if self.bias is not None:
            y += self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def _linear_names(model) -> list[str]:
    return [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
            and mod.weight.device.type == "cpu" and mod.weight.dtype == torch.float32]


def _find_all(model, names: list[str]) -> dict:
    """name -> blocks in kernel form for every linear layer of `model` in `names` that is exactly
    blocks (the layers in parallel threads: numpy releases the GIL)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    weights = [model.get_submodule(n).weight.detach().numpy() for n in names]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        found = list(pool.map(find_blocks, weights))
    return {n: kernel_form(*f) for n, f in zip(names, found) if f is not None}


def _shapes_fit(blocks: dict, out_features: int, in_features: int) -> bool:
    """Whether blocks in kernel form (`kernel_form`) are of a [out_features, in_features] weight."""
    rows, groups = (out_features, in_features // BLOCK)
    if set(blocks) == {"q4", "d", "m"}:
        return blocks["q4"].shape == (rows, in_features // 2) and blocks["q4"].dtype == np.uint8 \
            and blocks["d"].shape == blocks["m"].shape == (rows, groups) and blocks["d"].dtype == blocks["m"].dtype == np.uint16
    if set(blocks) == {"q8", "d"}:
        return blocks["q8"].shape == (rows, in_features) and blocks["q8"].dtype == np.int8 \
            and blocks["d"].shape == (rows, groups) and blocks["d"].dtype == np.uint16
    return False


def _load(path, names: list[str], model) -> dict | None:
    """The blocks kept in `path` (safetensors: `<layer>.q4`, `.d`, `.m` or `<layer>.q8`, `.d`), or
    None when the file is missing, unreadable or not of this model's shapes (an older layout too)."""
    from safetensors.numpy import load_file

    try:
        flat = load_file(str(path))
    except Exception:  # missing, torn or not safetensors: made again
        return None
    out: dict = {}
    for key, a in flat.items():
        n, part = key.rsplit(".", 1)
        out.setdefault(n, {})[part] = a
    for n, blocks in out.items():
        lin = model.get_submodule(n) if n in names else None
        if lin is None or not _shapes_fit(blocks, *lin.weight.shape):
            return None
    return out


def _save(path, blocks: dict) -> None:
    """Write the blocks to `path` atomically (a temporary file renamed over it)."""
    import os

    from safetensors.numpy import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({f"{n}.{part}": a for n, parts in blocks.items() for part, a in parts.items()}, str(tmp))
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
    for name, parts in blocks.items():
        twin.set_submodule(name, BlockLinear(parts, bias=twin.get_submodule(name).bias))
    return twin, len(blocks), len(names)
