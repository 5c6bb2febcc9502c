"""Documents longer than the model's trained window: remapped positions (InfLLM-style).

A model trained on W tokens of RoPE positions breaks when a query sees keys more than W tokens
back (SmolLM2, W = 8K: a passcode found at 7K tokens, nothing at 11.5K). Retrieval attention only
ever attends to a few keys, so it can lie about where they are, as InfLLM does:

  * local keys  - the last `local` tokens before the query (and the query's own chunk) - keep
                  their true relative positions;
  * global keys - the first `sink` tokens and the top-k retrieved far keys - are placed just beyond
                  a fixed `distance` before the query: during the prefill all at `distance`;
                  when decoding an answer, the k retrieved keys of each head in document order at
                  distance + k - 1 (the earliest) ... distance (the latest), the sinks at
                  distance + k, so a retrieved sentence reads as if it were contiguous text.

The numbers are one value, a `RemapScheme` (core/settings.py), recorded in the entry's key and
manifest and passed to every function and layer here. Every relative distance the model sees is
then < local + chunk + k <= W, whatever the document length. (Why ordered when decoding: on 15 needles past the window one shared distance and ordered
distances both found 12, ordered all six whole-book ones; on 8 needles fixed beforehand and held
out, ordered found 6 and one distance 5: BENCHMARKS.md.)

How the fixed distance is computed (RoPE only sees relative positions): a key stored with its
rotation removed ("pre-RoPE", rotated to position 0) scored against the query rotated to position
`distance` gives exactly the logit of a key that many tokens before the query. So a long document's
store entry keeps pre-RoPE keys, and every global score (sinks, prefill retrieval, the decode-time
index) is q_glob . k_pre with q_glob = the query rotated to `distance`. The index is built and
searched in that same frame (queries for the graph index are captured as q_glob), so the scores it
ranks by are the scores attention uses. Local keys are rotated back to their true positions.

Prefill of a long document runs in chunks (bounded memory, cost linear in the length apart from a
cheap scan): the first sink + local tokens exactly (plain causal attention), then each chunk
attends to sinks + local window + the top `prefill_topk` far keys of each `block` of its queries,
ranked by the block's mean global query. Finding them must not cost a scan of every far key (that
made the cost per token grow with the position): the far keys are summarised in spans of `span`
tokens by their per-dimension min and max, which bound every key's score from above (Quest's
bound, exact); the `spans` spans with the highest bound are read from the entry being written (its
memory map) and scored exactly. The summaries grow as the chunks arrive (8 bytes per dimension
per 64 keys). The decode-time index (flat or graph, core/index.py) is built once the entry is
complete.

Decoding over such an entry is core/layer.py's DocumentLayer with the RemappedPositions policy.
`remapped_reference` is the naive version (one softmax, keys rotated to their virtual positions)
that tests/test_longctx.py checks the fast paths against.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from .attention import local_attention, merge, partial_attention, reference_attention
from .settings import RemapScheme


def supports(model) -> bool:
    """Remapping needs the model's RoPE module (every Llama/Mistral/Qwen-style model has one)."""
    return getattr(model.base_model, "rotary_emb", None) is not None


def needs_remap(n_tokens: int, window: int | None, reserve: int = 64) -> bool:
    """True when a prefix of n_tokens (plus room for a question) does not fit the trained window."""
    return bool(window) and n_tokens + reserve > window


# ----------------------------------------------------------------------------- RoPE

def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class Rope:
    """Rotations by the model's own RoPE angles at arbitrary (also negative) positions."""

    def __init__(self, model):
        self.emb = model.base_model.rotary_emb
        self.scale = float(getattr(self.emb, "attention_scaling", 1.0) or 1.0)

    def cos_sin(self, pos: torch.Tensor):
        """pos: [T] integer positions -> cos, sin: [T, D] float32 (pure rotations: scaling divided out)."""
        dummy = torch.zeros(1, dtype=torch.float32, device=pos.device)
        cos, sin = self.emb(dummy, pos[None].long())
        return cos[0] / self.scale, sin[0] / self.scale

    def rotate(self, x, pos: torch.Tensor):
        """x: [..., T, D] rotated by the angles of positions pos [T] (negative pos undoes a rotation)."""
        cos, sin = self.cos_sin(pos)
        return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------- the math

def ordered_scores(q, k_sel, pos, rope: Rope, distance: int):
    """Logits of each query's K retrieved keys placed in document order before it.

    q: [KVH, G, T, D] at true positions pos [T]; k_sel: [KVH, G, T, K, D] pre-RoPE, sorted by
    document position. Key j sits distance + K - 1 - j tokens before its query (the earliest
    farthest). Rotating the query by (distance - pos) equals rotating the key to pos - distance.
    returns [KVH, G, T, K] (unscaled)"""
    T, K, D = q.shape[2], k_sel.shape[3], q.shape[3]
    dist = distance + K - 1 - torch.arange(K, device=q.device)                   # [K]
    cos, sin = rope.cos_sin((dist[None, :] - pos[:, None]).reshape(-1))
    cos, sin = cos.reshape(T, K, D), sin.reshape(T, K, D)
    qx = q[..., None, :]                                                         # [KVH, G, T, 1, D]
    return ((qx * cos + rotate_half(qx) * sin) * k_sel).sum(-1)


def remapped_reference(q, pos, k_loc, v_loc, loc_pos, k_glob_pre, v_glob, rope: Rope, scale: float, distance):
    """Naive reference: one softmax per query over local keys (true positions, causal) and global
    keys rotated to position pos - distance. Builds every key explicitly, per query.

    q: [H, T, D] at positions pos [T]; k_loc: [H, S, D] at loc_pos [S]; k_glob_pre: [H, T, K, D]
    (each query's own global set, pre-RoPE); distance: one int or a [K] tensor, one distance per
    global key. returns [H, T, D]"""
    distance = torch.as_tensor(distance).expand(k_glob_pre.shape[2])
    out = torch.empty_like(q)
    for t in range(q.shape[1]):
        p = int(pos[t])
        vis = loc_pos <= p
        kg = rope.rotate(k_glob_pre[:, t], p - distance)
        keys = torch.cat([k_loc[:, vis], kg], dim=1)
        vals = torch.cat([v_loc[:, vis], v_glob[:, t]], dim=1)
        out[:, t] = reference_attention(q[:, t:t + 1], keys, vals, scale)[:, 0]
    return out


def span_bounds(rep, smin, smax):
    """Upper bound of q.k over each span: sum_d max(q_d * min_d, q_d * max_d) (exact, Quest).

    rep: [KVH, G, D]; smin, smax: [KVH, S, D] -> [KVH, G, S]"""
    return torch.bmm(rep.clamp(min=0), smax.transpose(1, 2)) + torch.bmm(rep.clamp(max=0), smin.transpose(1, 2))


def block_retrieval(q_glob, store_k, store_v, far_start: int, far_end: int, smin, smax, scheme: RemapScheme):
    """Prefill retrieval: each block of `scheme.block` queries shares the top `scheme.prefill_topk`
    far keys of its mean query.

    q_glob: [KVH, G, T, D]; store_k/v: [KVH, P, D] (pre-RoPE, the entry's memory map, any dtype);
    far keys are [far_start, far_end); smin/smax: [KVH, S, D] bounds of the S complete spans from
    far_start. Candidates: every far key while there are few, else the `spans` spans of highest bound
    plus the far keys past the last complete span. Returns a list over blocks of
    (T_b, k_sel [KVH, G, K, D] float32, v_sel [KVH, G, K, D] float32).
    """
    KVH, G, T, D = q_glob.shape
    dev = q_glob.device
    heads = torch.arange(KVH)[:, None, None]
    SPAN, SPANS = scheme.span, scheme.spans
    n_spans = smin.shape[1]
    tail = torch.arange(far_start + n_spans * SPAN, far_end)
    out = []
    for qb in torch.split(q_glob, scheme.block, dim=2):
        rep = qb.mean(dim=2)  # [KVH, G, D]
        if n_spans <= SPANS:  # every span would be picked: score every far key
            ids = torch.arange(far_start, far_end).expand(KVH, G, -1)
        else:
            top = span_bounds(rep, smin, smax).topk(min(SPANS, n_spans), dim=-1).indices.cpu()  # [KVH, G, B]
            ids = far_start + (top[..., None] * SPAN + torch.arange(SPAN)).flatten(2)
            ids = torch.cat([ids, tail.expand(KVH, G, -1)], dim=-1)  # [KVH, G, C]
        cand = store_k[heads, ids].to(dev, torch.float32)  # [KVH, G, C, D]
        scores = (cand @ rep[..., None])[..., 0]  # [KVH, G, C]
        pick = scores.topk(min(scheme.prefill_topk, ids.shape[-1]), dim=-1, sorted=False).indices  # [KVH, G, K]
        k_sel = cand.gather(2, pick[..., None].expand(-1, -1, -1, D))
        v_sel = store_v[heads, ids.gather(2, pick.cpu())].to(dev, torch.float32)
        out.append((qb.shape[2], k_sel, v_sel))
    return out


# ----------------------------------------------------------------------------- prefill

class LongPrefillLayer(DynamicLayer):
    """One layer's state while a long document is prefilled: sinks (pre-RoPE), the local window
    (true positions), and the entry being written (every key, pre-RoPE, for retrieval and the store).

    update(k, v) receives a chunk's post-RoPE keys; it writes them (pre-RoPE) to the store and
    returns the local window + the chunk. attend() is called by core/attention.py's hook.
    """

    def __init__(self, layer: int, rope: Rope, scheme: RemapScheme, write_kv, store_k, store_v, capture=None):
        super().__init__()
        self.layer, self.rope, self.scheme, self.write_kv, self.capture = layer, rope, scheme, write_kv, capture
        self.store_k, self.store_v = store_k, store_v  # [KVH, P, D] views of the entry's memory maps
        self.n_seen = 0     # tokens before the current chunk (after update: including it)
        self.start = 0      # first position of the current chunk
        self.loc_start = 0  # position of self.keys[..., 0, :]
        self.smin = self.smax = None  # [KVH, S, D] span bounds of the far keys written so far
        self.exact = True   # the current chunk is attended exactly (the prefix is still short)

    def get_seq_length(self) -> int:
        return self.n_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (0 if self.keys is None else self.keys.shape[-2]) + query_length, 0  # the mask is unused

    def update(self, key_states, value_states, *args, **kwargs):
        # key_states: [1, KVH, T, D] post-RoPE at positions n_seen..n_seen+T
        T = key_states.shape[-2]
        self.start = s = self.n_seen
        pos = torch.arange(s, s + T, device=key_states.device)
        k_pre = self.rope.rotate(key_states[0].float(), -pos)
        self.write_kv(self.layer, s, k_pre.cpu().numpy(), value_states[0].float().cpu().numpy())
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # plain causal attention while the whole prefix is within sink + local tokens (and for a
        # first chunk that holds the sinks themselves: its distances are < T anyway)
        SINK, LOCAL = self.scheme.sink, self.scheme.local
        self.exact = s + T <= SINK + LOCAL or s < SINK
        # local window of this chunk: [max(sink, s - local), s), all of [0, s) while exact
        lo = 0 if self.exact else max(SINK, s - LOCAL)
        drop = lo - self.loc_start
        if drop > 0:
            self.keys, self.values = self.keys[..., drop:, :], self.values[..., drop:, :]
            self.loc_start = lo
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.n_seen = s + T
        self._summarise()
        return self.keys, self.values

    def restore(self, keys: torch.Tensor, values: torch.Tensor, n_seen: int, loc_start: int) -> None:
        """Continue after a checkpoint: keys/values [1, KVH, W, D] is the local window (positions
        loc_start..n_seen) as it was; the span bounds are recomputed from the stored keys (min and
        max are exact, so they equal the ones an uninterrupted run built chunk by chunk)."""
        self.lazy_initialization(keys, values)
        self.keys, self.values, self.n_seen, self.loc_start = keys, values, n_seen, loc_start
        self.smin = self.smax = None
        self._summarise()

    def _summarise(self) -> None:
        """Min / max per dimension of every span [sink + i*span, sink + (i+1)*span) now complete,
        from the stored (fp16) keys, so the bounds hold for the keys that are scored."""
        SINK, SPAN = self.scheme.sink, self.scheme.span
        done = 0 if self.smin is None else self.smin.shape[1]
        total = max(0, self.n_seen - SINK) // SPAN
        if total <= done:
            return
        k = torch.from_numpy(self.store_k[:, SINK + done * SPAN:SINK + total * SPAN]).float()
        k = k.view(k.shape[0], total - done, SPAN, k.shape[-1])  # [KVH, spans, SPAN, D]
        mn, mx = k.amin(dim=2), k.amax(dim=2)
        self.smin = mn if self.smin is None else torch.cat([self.smin, mn], dim=1)
        self.smax = mx if self.smax is None else torch.cat([self.smax, mx], dim=1)

    def attend(self, query, key, value, scale: float):
        """query: [1, Hq, T, D] (true positions); key/value: the local window + chunk -> [1, T, Hq, D]."""
        _, Hq, T, D = query.shape
        KVH = key.shape[1]
        q = query[0].float().reshape(KVH, Hq // KVH, T, D)
        pos = torch.arange(self.start, self.start + T, device=q.device)
        q_glob = self.rope.rotate(q, self.scheme.distance - pos)
        if self.capture is not None:
            self.capture.record(self.layer, q_glob.reshape(1, Hq, T, D))
        k_loc, v_loc = key[0].float(), value[0].float()
        parts = [local_attention(q, k_loc, v_loc, scale, causal_offset=k_loc.shape[1] - T)]
        if not self.exact:
            dev, SINK = q.device, self.scheme.sink
            k_sink = torch.from_numpy(self.store_k[:, :SINK]).to(dev, torch.float32)
            v_sink = torch.from_numpy(self.store_v[:, :SINK]).to(dev, torch.float32)
            parts.append(partial_attention(q_glob, k_sink[:, None], v_sink[:, None], scale))
            far_end = self.loc_start  # far keys: [sink, loc_start)
            if far_end > SINK:
                n_spans = (far_end - SINK) // self.scheme.span  # complete spans inside the far range
                empty = torch.zeros(KVH, 0, D)
                smin = (empty if self.smin is None else self.smin[:, :n_spans]).to(dev)
                smax = (empty if self.smax is None else self.smax[:, :n_spans]).to(dev)
                store_k, store_v = torch.from_numpy(self.store_k), torch.from_numpy(self.store_v)
                blocks, t0 = [], 0
                for tb, k_sel, v_sel in block_retrieval(q_glob, store_k, store_v, SINK, far_end, smin, smax,
                                                        self.scheme):
                    blocks.append(partial_attention(q_glob[:, :, t0:t0 + tb], k_sel, v_sel, scale))
                    t0 += tb
                parts.append((torch.cat([p[0] for p in blocks], dim=2), torch.cat([p[1] for p in blocks], dim=2)))
        o, _ = merge(parts)
        return o.reshape(Hq, T, D).transpose(0, 1)[None].to(query.dtype).contiguous()


@torch.inference_mode()
def prefill_long(model, ids, chunk_size: int, writer, scheme: RemapScheme, capture=None, progress=None,
                 resume_at: int = 0, windows=None, loc_start: int = 0, on_chunk=None) -> None:
    """Prefill a prefix longer than the model's window into `writer` (a core/store.EntryWriter):
    pre-RoPE keys and values of every token, global-frame queries at the capture positions.

    Resuming: tokens [0, resume_at) are in the writer already and windows = (keys, values), each
    [L, KVH, W, D], the layers' local windows then (from `window_state`); on_chunk(end, layers)
    is called after each chunk (to checkpoint)."""
    from .layer import RaCache

    if capture is not None and capture.outbox is not None:
        raise ValueError("prefill_long writes as it goes: give its QueryCapture no outbox")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    rope = Rope(model)
    layers = [LongPrefillLayer(i, rope, scheme, writer.write_kv, writer.keys[i], writer.values[i], capture)
              for i in range(model.config.num_hidden_layers)]
    if resume_at:
        for layer, k, v in zip(layers, *windows):
            layer.restore(k[None].to(device, dtype), v[None].to(device, dtype), resume_at, loc_start)
    cache = RaCache(layers)
    n = len(ids)
    for start in range(resume_at, n, chunk_size):
        end = min(start + chunk_size, n)
        x = torch.from_numpy(ids[start:end].astype("int64"))[None].to(device)
        pos = torch.arange(start, end, device=device)[None]
        if capture is not None:
            capture.set_chunk(start, end)
        model.base_model(input_ids=x, cache=cache, position_ids=pos, use_cache=True, ra_cache=cache)
        if progress:
            progress(end, n)
        if on_chunk is not None and end < n:
            on_chunk(end, layers)


def window_state(layers: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The layers' local windows [L, KVH, W, D] (keys, values) and their first position: what a
    resumed `prefill_long` starts from."""
    return (torch.stack([la.keys[0] for la in layers]), torch.stack([la.values[0] for la in layers]),
            layers[0].loc_start)
