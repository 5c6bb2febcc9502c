"""Calling ra's numba kernels (core/blocks.py, core/attention_f16.py) so that Ctrl-C still works.

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

_loaded: set = set()


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
