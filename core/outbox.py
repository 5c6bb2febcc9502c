"""Device-to-host copies that overlap the device's work: the prefill's K/V and captured queries.

A synchronous copy-out (`t.cpu()` after each chunk) makes the host wait for the GPU to finish
the chunk, and the GPU then idles while the host writes the rows to the store. An Outbox instead,
on CUDA:
  - records an event on the compute stream where the tensors are ready,
  - copies them on a stream of its own into pinned host buffers (a ring of `depth` slots),
  - hands them to their `deliver` callback (the store's writer) when a slot is needed again or
    on `flush`, in the order they were sent,
so the copy engine and the host's writes run while the GPU computes the next chunk.

On the CPU the tensors are host memory already: `send` delivers at once (the synchronous path),
unless `defer=True` asks for the ring's bookkeeping with plain copies (tests run it so; the
CUDA-only part is the streams and events, checked by benchmarks/gpu_check.py).

`flush()` delivers everything sent so far: call it before anything that must see the writes (a
checkpoint saying a layer is complete, the end of the prefill).
"""
from __future__ import annotations

from collections import deque
from typing import Callable

import torch


class Outbox:
    """Device -> host transfers, delivered in send order; overlapped with compute on CUDA."""

    def __init__(self, device, depth: int = 4, defer: bool | None = None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.defer = self.cuda if defer is None else defer
        self.slots = [[] for _ in range(depth)]  # each slot: one flat host byte buffer per tensor sent
        self.pending = deque()                   # (deliver, host views, slot, done event | None, bytes)
        self.stream = torch.cuda.Stream(self.device) if self.cuda and self.defer else None
        self.sent = self.delivered = 0
        self.waits = 0                           # deliveries that had to wait for their copy (CUDA)
        # bytes sent and not yet delivered, as host buffers hold them; on a GPU the sources are held
        # there until their copy completes, which is no later than their delivery
        self.in_flight = self.peak_bytes = 0

    def send(self, tensors: tuple[torch.Tensor, ...], deliver: Callable[..., None]) -> None:
        """tensors: ready on the current stream (not to be written again by the caller: the copy
        may run later); deliver(*arrays) receives them as numpy arrays (host views valid only
        during the call: deliver copies what it keeps)."""
        self.sent += 1
        if not self.defer:
            deliver(*[t.detach().cpu().numpy() for t in tensors])
            self.delivered += 1
            return
        if not self.slots:
            self._complete_oldest()
        slot = self.slots.pop()
        host = [self._view(slot, i, t) for i, t in enumerate(tensors)]
        done = None
        if self.cuda:
            ready = torch.cuda.current_stream(self.device).record_event()
            self.stream.wait_event(ready)
            with torch.cuda.stream(self.stream):
                for h, t in zip(host, tensors):
                    h.copy_(t, non_blocking=True)
                    t.record_stream(self.stream)  # the allocator keeps t until this stream is past the copy
                done = self.stream.record_event(torch.cuda.Event(blocking=True))  # a wait sleeps: the host writes
        else:
            for h, t in zip(host, tensors):
                h.copy_(t)
        nbytes = sum(h.nbytes for h in host)
        self.pending.append((deliver, host, slot, done, nbytes))
        self.in_flight += nbytes
        self.peak_bytes = max(self.peak_bytes, self.in_flight)

    def flush(self) -> None:
        """Deliver everything sent so far."""
        while self.pending:
            self._complete_oldest()

    def _complete_oldest(self) -> None:
        deliver, host, slot, done, nbytes = self.pending.popleft()
        self.in_flight -= nbytes
        try:
            if done is not None:
                if not done.query():
                    self.waits += 1
                done.synchronize()
            deliver(*[h.numpy() for h in host])
            self.delivered += 1
        finally:
            self.slots.append(slot)

    def _view(self, slot: list, i: int, t: torch.Tensor) -> torch.Tensor:
        """A host tensor shaped like t, in slot's i-th buffer (pinned on CUDA), grown when too small
        (to a power of two: sizes that vary by a row do not allocate pinned memory each time)."""
        nbytes = t.numel() * t.element_size()
        if len(slot) <= i:
            slot.append(None)
        if slot[i] is None or slot[i].numel() < nbytes:
            slot[i] = torch.empty(1 << max(nbytes - 1, 1).bit_length(), dtype=torch.uint8, pin_memory=self.cuda)
        return slot[i][:nbytes].view(t.dtype).view(t.shape)

