"""A Llama decoder layer's one-token decode step over 4-bit blocks, as plain numpy and ra's kernels.

A decode step through transformers' modules runs ~60 small torch operators per layer (norms,
rotary, views, residuals, the attention interface), each a few microseconds: on the embedded
model at ~7K tokens the step took 1.25x as long with it (BENCHMARKS.md, "The whole layer
fused"). `FusedStepLayer` replaces a decoder layer of the block-weight step copy (core/blocks.py)
and, for every one-token step over a document (a core/layer.DocumentLayer on the CPU:
`layer_fusable`), runs the same computation as a handful of kernel calls on numpy arrays:

    h = rmsnorm(x) * w1                        _rmsnorm
    q, k, v = Wqkv h                           core/blocks._gemv4 (q, k and v rows stacked)
    rotate q, k                                _rope_rows
    o = attention(q)                           the DocumentLayer's own: see below
    x += Wo o; h = rmsnorm(x) * w2             _gemv4, _add_rmsnorm
    x += Wdown (silu(Wgate h) * Wup h)         _gemv4 (gate and up stacked), _silu_mul, _gemv4

The attention is the cache layer's: for the `exact` kind inside the window (`one_kernel`, the
default there) the new token's K/V are written straight into the static zone's next row and
core/attention_f16.step_attention attends the document and the tokens after it in one call
(keeping every document key's logit in a tally's buffer for --sources); any other layer (another
index kind, a remapped document) gets its own `update` and `attend`, as transformers' attention
module would call them. A question's tokens,
full attention and weights that are not all Q4 blocks go to the wrapped transformers layer. The
arithmetic is the same fp32 arithmetic as the layer's (sums in another order: results within
~1e-6 relative); tests/test_fused.py checks the steps against the wrapped layer's.

Plugged in as BlockLinear is: a module of the step copy replaced through nn.Module's public API
(`fuse_layers`); the model's own forward still runs the embedding, rotary, layers and head.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit

from .blocks import BlockLinear, _gemv4
from .jit import call


@njit(fastmath=True, cache=True, nogil=True)
def _rmsnorm(x, w, eps, out):
    """out = x / sqrt(mean(x^2) + eps) * w (transformers' LlamaRMSNorm in fp32)."""
    s = np.float32(0.0)
    for i in range(x.shape[0]):
        s += x[i] * x[i]
    r = np.float32(1.0) / np.sqrt(s / np.float32(x.shape[0]) + eps)
    for i in range(x.shape[0]):
        out[i] = w[i] * (x[i] * r)


@njit(fastmath=True, cache=True, nogil=True)
def _add_rmsnorm(x, t, w, eps, out):
    """x += t (the residual), then out = rmsnorm(x) * w."""
    for i in range(x.shape[0]):
        x[i] += t[i]
    _rmsnorm(x, w, eps, out)


@njit(fastmath=True, cache=True, nogil=True)
def _rope_rows(qkv, cos, sin, n_q, n_kv, q_out, k_rows, v_rows, row):
    """qkv [(n_q + 2 n_kv) * D] (q, k, v heads in order) -> q_out [n_q, D] rotated; the rotated
    key and the value written to row `row` of k_rows, v_rows [n_kv, capacity, D]. Rotation as
    transformers' apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, rotate_half(x) =
    (-x[D/2:], x[:D/2])."""
    D = cos.shape[0]
    half = D // 2
    for h in range(n_q + n_kv):
        base = h * D
        for d in range(D):
            other = -qkv[base + d + half] if d < half else qkv[base + d - half]
            y = qkv[base + d] * cos[d] + other * sin[d]
            if h < n_q:
                q_out[h, d] = y
            else:
                k_rows[h - n_q, row, d] = y
    for h in range(n_kv):
        for d in range(D):
            v_rows[h, row, d] = qkv[(n_q + n_kv + h) * D + d]


@njit(fastmath=True, cache=True, nogil=True)
def _silu_mul(gu, n, out):
    """out [n] = silu(gu[:n]) * gu[n:2n] (the MLP's activation; silu(a) = a / (1 + exp(-a)))."""
    for i in range(n):
        a = gu[i]
        out[i] = a / (np.float32(1.0) + np.exp(-a)) * gu[n + i]


def _stacked(*linears: BlockLinear):
    """The Q4 blocks of several linear layers over the same input, rows stacked (one kernel call
    for q, k and v, or gate and up) and padded to a multiple of four -> (p, d, m) for _gemv4."""
    parts = [tuple(lin.blocks[k] for k in ("q4", "d", "m")) for lin in linears]
    rows = sum(p[0].shape[0] for p in parts)
    pad = -rows % 4
    stack = lambda i: np.ascontiguousarray(np.concatenate(  # noqa: E731
        [p[i] for p in parts] + [np.zeros((pad, parts[0][i].shape[1]), parts[0][i].dtype)]))
    return stack(0), stack(1), stack(2)


def fusable_layer(layer, config) -> bool:
    """Whether `layer` (a decoder layer of the block-weight step copy) is a plain Llama layer whose
    seven linear layers are all Q4 blocks without bias: what FusedStepLayer computes."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None or config.model_type != "llama" or getattr(config, "hidden_act", "") != "silu":
        return False
    linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
              [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(lin, BlockLinear) and "q4" in lin.blocks and lin.bias is None for lin in linears):
        return False
    norms = [getattr(layer, n, None) for n in ("input_layernorm", "post_attention_layernorm")]
    return all(n is not None and hasattr(n, "weight") and hasattr(n, "variance_epsilon") for n in norms)


class FusedStepLayer(torch.nn.Module):
    """A Llama decoder layer (`inner`, kept and called for everything but the fused case) whose
    one-token step over a document's cache layer runs as kernel calls (see the module docstring)."""

    def __init__(self, inner, config):
        super().__init__()
        self.inner = inner
        attn, mlp = inner.self_attn, inner.mlp
        self.layer_idx = attn.layer_idx
        self.D = attn.head_dim
        self.n_q = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.scale = float(attn.scaling)
        self.hidden = config.hidden_size
        self.inter = mlp.gate_proj.out_features
        self.qkv = _stacked(attn.q_proj, attn.k_proj, attn.v_proj)
        self.o = _stacked(attn.o_proj)
        self.gu = _stacked(mlp.gate_proj, mlp.up_proj)
        self.down = _stacked(mlp.down_proj)
        norm = lambda n: n.weight.detach().float().contiguous().numpy()  # noqa: E731
        self.w1, self.w2 = norm(inner.input_layernorm), norm(inner.post_attention_layernorm)
        self.eps1 = np.float32(inner.input_layernorm.variance_epsilon)
        self.eps2 = np.float32(inner.post_attention_layernorm.variance_epsilon)
        self.fused_steps = 0  # steps that took the fused path (tests)
        self._warm = False    # every kernel called once (core/jit.call's signal guard is for first calls)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        cl = None
        if (cache is not None and hidden_states.shape[:2] == (1, 1) and hidden_states.dtype == torch.float32
                and hidden_states.device.type == "cpu" and position_embeddings is not None):
            layers = getattr(cache, "layers", ())
            cl = layers[self.layer_idx] if self.layer_idx < len(layers) else None
        if cl is None or not getattr(cl, "layer_fusable", lambda: False)():
            return self.inner(hidden_states, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                              use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
        return self._step(hidden_states, position_embeddings, cl)

    def _step(self, hidden_states, position_embeddings, cl):
        from .attention_f16 import step_attention
        from .layer import span

        run = call if not self._warm else (lambda kernel, *args: kernel(*args))  # jit.call: first calls only
        out = hidden_states.detach().clone()
        x = out.numpy().reshape(-1)                                       # [H] the residual stream
        cos, sin = (t.reshape(-1).float().contiguous().numpy() for t in position_embeddings)  # [D]
        n_q, n_kv, D = self.n_q, self.n_kv, self.D
        h = np.empty(self.hidden, np.float32)
        run(_rmsnorm, x, self.w1, self.eps1, h)
        qkv = np.empty(self.qkv[0].shape[0], np.float32)                 # q, k, v (and pad rows)
        run(_gemv4, *self.qkv, h, qkv)
        q = np.empty((n_q, D), np.float32)
        if cl.one_kernel():  # the `exact` kind: K/V written in place, one kernel over the document and after
            (doc_k, doc_v), (k_rows, v_rows), n0, row = cl.step_rows()   # room for this token's K/V
            run(_rope_rows, qkv, cos, sin, n_q, n_kv, q, k_rows, v_rows, row)
            qt = torch.from_numpy(q).reshape(n_kv, n_q // n_kv, 1, D)
            with span("ra.attend", cl.trace):                             # a profiler range only with trace on
                o, lse = step_attention(qt, doc_k, doc_v, (k_rows, n0), (v_rows, n0), row + 1 - n0, self.scale,
                                        cl.tally_logits())               # o: [KVH, G, 1, D]
                cl.stepped(lse, self.scale)
            o = o.numpy().reshape(-1)                                     # heads in order: h = kv * G + g
        else:             # the layer's own update and attend, as transformers' attention module calls them
            kv = np.empty((2, n_kv, 1, D), np.float32)
            run(_rope_rows, qkv, cos, sin, n_q, n_kv, q, kv[0], kv[1], 0)
            k_new, v_new = torch.from_numpy(kv)[:, None]                  # [1, KVH, 1, D] each
            keys, values = cl.update(k_new, v_new)
            o = cl.attend(torch.from_numpy(q)[None, :, None], keys, values, self.scale)  # [1, 1, Hq, D]
            o = o.float().contiguous().numpy().reshape(-1)
        t = np.empty(self.o[0].shape[0], np.float32)
        run(_gemv4, *self.o, o, t)
        run(_add_rmsnorm, x, t, self.w2, self.eps2, h)
        gu = np.empty(self.gu[0].shape[0], np.float32)                   # gate, up
        run(_gemv4, *self.gu, h, gu)
        a = np.empty(self.inter, np.float32)
        run(_silu_mul, gu, self.inter, a)
        run(_gemv4, *self.down, a, t)
        x += t[:self.hidden]
        self._warm = True
        self.fused_steps += 1
        return out


def fuse_layers(model) -> int:
    """Replace each fusable decoder layer of `model` (the block-weight step copy) by a
    FusedStepLayer wrapping it -> how many were replaced."""
    body = getattr(model, "base_model", None)
    layers = getattr(body, "layers", None)
    if layers is None:
        return 0
    done = 0
    for i, layer in enumerate(layers):
        if not isinstance(layer, FusedStepLayer) and fusable_layer(layer, model.config):
            layers[i] = FusedStepLayer(layer, model.config)
            done += 1
    return done
