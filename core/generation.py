"""Prefill, one forward step, and the greedy generate loop, as small plain functions.

`prefill` runs the document prefix once, chunk by chunk, and hands every chunk's post-RoPE K/V
(and a sample of its queries) to a sink, the store's writer. `generate` runs the question and
the answer on top of a cache built from the store (core/engine.py) and yields token ids.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from transformers import DynamicCache

from .outbox import Outbox


class QueryCapture:
    """Keeps the prefill queries at `positions` (sorted absolute positions) for each layer.

    The attention hook calls `record(layer, q)` with the chunk's queries q: [1, Hq, T, D].
    outbox: a core/outbox.Outbox the picked queries leave through (overlapped with compute on a
    GPU; the prefill flushes it); None: written at once.
    """

    def __init__(self, positions: np.ndarray, write: Callable[[int, slice, np.ndarray], None], outbox=None):
        self.positions, self.write, self.outbox = positions, write, outbox
        self.chunk_start = self.chunk_end = 0
        self._on_device = {}  # device -> positions there (uploaded once: a per-chunk upload would sync)

    def set_chunk(self, start: int, end: int) -> None:
        self.chunk_start, self.chunk_end = start, end
        lo, hi = np.searchsorted(self.positions, [start, end])
        self.slot = slice(int(lo), int(hi))

    def record(self, layer: int, q: torch.Tensor) -> None:
        if self.slot.stop <= self.slot.start:
            return
        pos = self._on_device.get(q.device)
        if pos is None:
            pos = self._on_device[q.device] = torch.from_numpy(self.positions.astype(np.int64)).to(q.device)
        picked = q[0][:, pos[self.slot] - self.chunk_start].float()  # [Hq, n, D]
        if self.outbox is None:
            self.write(layer, self.slot, picked.cpu().numpy())
        else:
            self.outbox.send((picked,), lambda a, layer=layer, slot=self.slot: self.write(layer, slot, a))


@torch.inference_mode()
def prefill(model, ids: np.ndarray, chunk_size: int, write_kv, capture: QueryCapture | None = None,
            progress=None) -> None:
    """Run the prefix through the model in chunks; write_kv(layer, start, k [KVH,T,D], v) per chunk.

    Only the decoder body runs (no vocabulary projection: the prefix needs no logits). Peak memory
    is the prefix KV plus one chunk's activations.
    """
    if capture is not None and capture.outbox is not None:
        raise ValueError("prefill writes as it goes: give its QueryCapture no outbox")
    device = next(model.parameters()).device
    body = model.base_model
    cache = DynamicCache(config=model.config)
    n = len(ids)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        x = torch.from_numpy(ids[start:end].astype(np.int64))[None].to(device)
        pos = torch.arange(start, end, device=device)[None]
        if capture is not None:
            capture.set_chunk(start, end)
        body(input_ids=x, cache=cache, position_ids=pos, use_cache=True, ra_capture=capture)
        for layer, cl in enumerate(cache.layers):
            write_kv(layer, start, cl.keys[0, :, start:end].float().cpu().numpy(),
                     cl.values[0, :, start:end].float().cpu().numpy())
        if progress:
            progress(end, n)


# decoder bodies whose forward is exactly: embed, rotary, the layers in order, a final norm (the
# layer-by-layer prefill runs the same modules in the same way; other models take `prefill`)
LAYERWISE = ("llama", "mistral", "qwen2")


def layerwise_supported(model) -> bool:
    """Whether `prefill_layerwise` runs this model as its own forward would (no sliding window)."""
    cfg, body = model.config, model.base_model
    sliding = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    return cfg.model_type in LAYERWISE and hasattr(body, "embed_tokens") and hasattr(body, "rotary_emb") and not sliding


@torch.inference_mode()
def prefill_layerwise(model, ids: np.ndarray, chunk_size: int, write_kv, capture: QueryCapture | None = None,
                      progress=None, start_layer: int = 0, hidden: torch.Tensor | None = None,
                      on_layer=None, due=None, store_dtype: torch.dtype = torch.float32,
                      one_buffer: bool | None = None, outbox=None) -> None:
    """`prefill` with memory that does not grow with the layers: one layer at a time over the whole
    prefix. The hidden states of every token [1, N, H] stay on the device; layer i runs over them
    chunk by chunk (each chunk attends to the chunks before it through a cache holding this layer's
    K/V only), overwriting each chunk's hidden states with its output, and writes the layer's K/V
    as it goes; the cache is dropped before the next layer. Same modules, masks and chunks as
    `prefill`: the K/V are the same. Peak: N x H hidden states + one layer's K/V + one chunk's
    activations (against all L layers' K/V for `prefill`).

    Resuming: `hidden` [1, N, H] is every token's state after layers [0, start_layer) (a
    checkpoint); on_layer(layers_done, hidden) is called after a layer (to checkpoint it) when
    due() says so (after every layer without `due`), every row of the layers done delivered.
    store_dtype: the K/V leave the device in it (fp16: half of fp32's bytes over the bus; the
    rounding is the one the store's own conversion would make).
    one_buffer: a layer's K/V in one buffer of the document's length, so that each chunk attends
    to the earlier keys in one flash call where core/attention.flash_usable (core/layer.PrefillKV);
    None: on CUDA (on the CPU the fused kernel per earlier chunk is kept: it is what BENCHMARKS.md
    measures).
    outbox: a core/outbox.Outbox the K/V leave through (give `capture` the same one): on a GPU the
    copies and the store's writes then overlap the next chunk's compute, across layers too; flushed
    before on_layer (a checkpoint never counts a layer whose rows are in flight) and at the end.
    None: each chunk's K/V are copied and written before the next chunk starts."""
    from .layer import PrefillKV, RaCache

    device = next(model.parameters()).device
    body = model.base_model
    n, L = len(ids), model.config.num_hidden_layers
    outbox = Outbox(device, defer=False) if outbox is None else outbox  # not deferred: each send written at once
    if hidden is None:
        hidden = body.embed_tokens(torch.from_numpy(ids.astype(np.int64))[None].to(device))  # [1, N, H]
    chunks = [(a, min(a + chunk_size, n)) for a in range(0, n, chunk_size)]
    if one_buffer is None:
        one_buffer = device.type == "cuda"
    for i, layer in enumerate(body.layers[:L]):
        if i < start_layer:
            continue
        kv = PrefillKV(i, capture, capacity=n if one_buffer else None)
        cache = RaCache([kv] * L)  # whichever index layer i asks for, it reaches this layer's K/V
        for start, end in chunks:
            x = hidden[:, start:end]
            pos = torch.arange(start, end, device=device)[None]
            if capture is not None:
                capture.set_chunk(start, end)
            hidden[:, start:end] = layer(x, attention_mask=None, position_ids=pos, cache=cache, use_cache=True,
                                         position_embeddings=body.rotary_emb(x, position_ids=pos), ra_cache=cache)
            k = kv.k_chunks[-1][0].to(store_dtype).contiguous()  # [KVH, T, D]
            v = kv.v_chunks[-1][0].to(store_dtype).contiguous()
            outbox.send((k, v), lambda k, v, i=i, start=start: write_kv(i, start, k, v))
        del kv, cache  # rows still on their way stay alive: core/outbox.py (record_stream)
        if progress:
            progress(int(n * (i + 1) / L), n)
        if on_layer is not None and i + 1 < L and (due is None or due()):
            outbox.flush()
            on_layer(i + 1, hidden)
    outbox.flush()


@torch.inference_mode()
def forward(model, cache, ids: list[int], pos: int) -> torch.Tensor:
    """Run new tokens at absolute positions pos.. on top of `cache`; -> logits of the last one [V]."""
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    position_ids = torch.arange(pos, pos + len(ids), device=device)[None]
    out = model(input_ids=x, cache=cache, position_ids=position_ids, use_cache=True, logits_to_keep=1,
                ra_cache=cache)
    return out.logits[0, -1]


def generate(model, cache, prompt_ids: list[int], pos: int, max_new_tokens: int, stop: set[int],
             on_logits=None, step_model=None) -> Iterator[int]:
    """Greedy decoding: feed the prompt, then one token at a time. Yields generated token ids.
    step_model: the model of the one-token steps (core/model.step_copy; default: `model`)."""
    ids = prompt_ids
    for i in range(max_new_tokens):
        logits = forward(model if i == 0 or step_model is None else step_model, cache, ids, pos)
        if on_logits is not None:
            on_logits(logits)
        pos += len(ids)
        nxt = int(logits.argmax())
        if nxt in stop:
            return
        yield nxt
        ids = [nxt]


class TextStream:
    """Incremental detokenization: feed ids, get the newly completed text (whole UTF-8 characters)."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.sent = tokenizer, [], 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return ""
        new, self.sent = text[self.sent:], len(text)
        return new
