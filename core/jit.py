"""What ra's numba kernels (core/blocks.py, core/attention_f16.py) share: `h2f`, and `call`, so
that Ctrl-C still works.

`h2f` widens fp16 bits (a uint16) to fp32 inside a kernel: LLVM's `fpext half to float`, exact
for every fp16 value, which the compiler turns into the CPU's conversion instruction (F16C's
vcvtph2ps, 16 at a time) where the kernel's loop vectorizes. numba has no float16 type of its own.
`exp_f32` is an exp that vectorizes too. Both are inlined into the kernels that use them, and
numba's disk cache keys a kernel by its own file only: a change to them here must come with a
change to those files (or a cleared cache, `NUMBA_CACHE_DIR`), or old kernels are loaded.

The kernels are compiled with nogil: they touch no Python object, and releasing the GIL lets
other threads run while one is inside a kernel (`ra serve` streams an answer from its HTTP threads
while the model's thread steps; holding it, each streamed token waited for a kernel to return).

Numba loads a kernel from its disk cache, or compiles it, at the kernel's first call in a process
(per argument types), through LLVM callbacks that llvmlite makes with ctypes; an exception raised
inside such a callback is printed ("Exception ignored on calling ctypes callback function") and
dropped. A Ctrl-C landing there was lost: the answer it meant to stop ran on. `call` makes each
kernel's first call with SIGINT and SIGTERM held back until it returns, then delivers them.
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

_loaded: set = set()


@intrinsic
def h2f(typingctx, bits):
    """fp16 bits (uint16) -> the same value as fp32, exactly (see the module docstring)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _f32_of_bits(typingctx, bits):
    """int32 bits -> the fp32 value they encode (a bit cast)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(inline="always", fastmath=True)
def exp_f32(x):
    """exp(x) for fp32 x <= 0 (a softmax's logit minus its row's largest), within a few ulp of the
    correctly rounded value, written out so a kernel's loop over it vectorizes (numba's np.exp is
    a call to libm per element). Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, then a degree-6
    polynomial of r times 2^n; below -87.3 (under the smallest normal fp32) it gives 0."""
    n = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)  # ln2 in two parts
    z = r * r
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    y = p * z + r + np.float32(1.0)
    ni = np.int32(max(n, np.float32(-126.0)))
    out = y * _f32_of_bits(np.int32((ni + 127) << 23))
    return out if x >= np.float32(-87.3) else np.float32(0.0)


@contextmanager
def signals_held():
    """SIGINT / SIGTERM arriving inside the block are delivered at its end, to the handlers that
    were in place (outside the main thread, where no handler runs, it does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got, old = [], {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        old[sig] = signal.signal(sig, lambda s, frame: got.append(s))
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    for sig in dict.fromkeys(got):
        handler = old[sig]
        if callable(handler):
            handler(sig, None)  # e.g. Python's default for SIGINT: KeyboardInterrupt
        elif handler == signal.SIG_DFL:
            os.kill(os.getpid(), sig)


def call(kernel, *args):
    """kernel(*args); its first call for these argument dtypes with signals held (see above)."""
    key = (kernel, *(getattr(a, "dtype", None) for a in args))
    if key in _loaded:
        return kernel(*args)
    with signals_held():
        out = kernel(*args)
    _loaded.add(key)
    return out
