"""Remapped positions for documents past the model's window (core/longctx.py), against references.

The fast paths (fused local attention + sinks + retrieved keys merged by log-sum-exp, chunked
prefill with block retrieval) are checked against naive computations that build every key at its
virtual position explicitly. A tiny randomly initialised Llama (transformers' own class, no
download) stands in where only the shapes matter; the engine test runs the embedded SmolLM2.
"""
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicLayer

from core import longctx
from core.attention import RetrievalCache, local_attention, partial_attention
from core.index import FlatLayerIndex
from core.longctx import RemappedRetrievalLayer, Rope, remapped_attention, remapped_reference


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rope_theta=10000.0, attn_implementation="ra")
    return LlamaForCausalLM(cfg).eval()


def test_rope_rotations_are_exact_and_relative(tiny):
    rope = Rope(tiny)
    x = torch.randn(2, 5, 16)
    pos = torch.tensor([0, 3, 100, 5000, 70000])
    assert torch.allclose(rope.rotate(rope.rotate(x, pos), -pos), x, atol=1e-5)
    # the logit of a key d tokens back == query rotated to d . key with its rotation removed
    q, k = torch.randn(16), torch.randn(16)
    p, d = torch.tensor([9000]), 2048
    q_post, k_post = rope.rotate(q[None], p)[0], rope.rotate(k[None], p - d)[0]
    q_glob = rope.rotate(q_post[None], d - p)[0]
    assert torch.allclose(q_post @ k_post, q_glob @ k, atol=1e-4)


def test_fused_local_attention_equals_naive():
    q, k, v = torch.randn(2, 3, 7, 16), torch.randn(2, 20, 16), torch.randn(2, 20, 16)
    for off in (None, 13):
        o1, l1 = local_attention(q, k, v, 0.25, off)
        o2, l2 = partial_attention(q, k[:, None], v[:, None], 0.25, off)
        assert torch.allclose(o1, o2, atol=1e-5) and torch.allclose(l1, l2, atol=1e-5)


def test_remapped_attention_equals_one_softmax_at_virtual_positions(tiny):
    rope = Rope(tiny)
    KVH, G, T, D, S, Ns, K = 2, 2, 3, 16, 9, 4, 6
    pos = torch.arange(5000, 5000 + T)
    loc_pos = torch.arange(5000 + T - S, 5000 + T)
    q_pre = torch.randn(KVH, G, T, D)
    q = rope.rotate(q_pre, pos)
    k_loc = rope.rotate(torch.randn(KVH, S, D), loc_pos)
    v_loc = torch.randn(KVH, S, D)
    k_sink, v_sink = torch.randn(KVH, Ns, D), torch.randn(KVH, Ns, D)
    k_ret, v_ret = torch.randn(KVH, G, T, K, D), torch.randn(KVH, G, T, K, D)  # each query's own picks
    q_glob = rope.rotate(q, longctx.DISTANCE - pos)
    s_sel = (q_glob[..., None, :] @ k_ret.transpose(-1, -2))[..., 0, :]
    fast = remapped_attention(q, q_glob, k_loc, v_loc, k_sink, v_sink, s_sel, v_ret, 0.25)
    for h in range(KVH):
        glob_k = torch.cat([k_sink[h][None, None].expand(G, T, Ns, D), k_ret[h]], dim=2)
        glob_v = torch.cat([v_sink[h][None, None].expand(G, T, Ns, D), v_ret[h]], dim=2)
        ref = remapped_reference(q[h], pos, k_loc[h][None].expand(G, S, D), v_loc[h][None].expand(G, S, D),
                                 loc_pos, glob_k, glob_v, rope, 0.25)
        assert torch.allclose(fast[h], ref, atol=1e-5)


@pytest.mark.parametrize("top_k", [1000, 10])
def test_decode_layer_equals_reference(tiny, top_k):
    """RemappedRetrievalLayer (flat index over the offloaded middle) == one softmax over the sinks,
    the local window and the exact top-k (all of the middle for k = 1000), at their distances."""
    rope = Rope(tiny)
    KVH, G, D, n, a, b = 2, 2, 16, 40, 4, 30  # sinks [0, 4), offloaded [4, 30), local [30, 40)
    k_pre, v = torch.randn(KVH, n, D), torch.randn(KVH, n, D)
    k_loc = rope.rotate(k_pre[:, b:], torch.arange(b, n))
    h3 = torch.arange(KVH)[:, None, None]
    off = type("Off", (), {"gather_values": lambda self, ids: v[:, a:b][h3, ids],
                           "gather_keys": lambda self, ids: k_pre[:, a:b][h3, ids]})()
    layer = RemappedRetrievalLayer(k_loc[None], v[:, b:][None], k_pre[:, :a], v[:, :a], off,
                                   FlatLayerIndex(k_pre[:, a:b].contiguous()), top_k, n, rope)
    q_pre, k_new, v_new = torch.randn(KVH * G, 1, D), torch.randn(KVH, 1, D), torch.randn(KVH, 1, D)
    k_new_post = rope.rotate(k_new, torch.tensor([n]))
    key, value = layer.update(k_new_post[None], v_new[None])
    q = rope.rotate(q_pre, torch.tensor([n]))
    out = layer.attend(q[None], key, value, 0.25)[0].transpose(0, 1)  # [Hq, 1, D]
    loc_pos = torch.arange(b, n + 1)
    K = min(top_k, b - a)  # the retrieved keys in document order just beyond DISTANCE, the sinks beyond them
    dist = torch.cat([torch.full((a,), longctx.DISTANCE + K), longctx.DISTANCE + K - 1 - torch.arange(K)])
    q_glob = rope.rotate(q, torch.tensor([longctx.DISTANCE - n]))  # the frame the index ranks in
    for h in range(KVH * G):
        kv = h // G
        picked = a + (k_pre[kv, a:b] @ q_glob[h, 0]).topk(K).indices.sort().values  # exact top-k, in order
        glob_k = torch.cat([k_pre[kv, :a], k_pre[kv, picked]])[None, None]
        glob_v = torch.cat([v[kv, :a], v[kv, picked]])[None, None]
        ref = remapped_reference(q[h][None], torch.tensor([n]), key[0, kv][None], value[0, kv][None], loc_pos,
                                 glob_k, glob_v, rope, 0.25, distance=dist)
        assert torch.allclose(out[h], ref[0], atol=1e-5)


def test_span_bounds_bound_every_key_and_are_tight_for_one_key():
    from core.longctx import span_bounds

    rep = torch.randn(2, 3, 16)
    keys = torch.randn(2, 5, 8, 16)  # 5 spans of 8 keys
    bound = span_bounds(rep, keys.amin(2), keys.amax(2))  # [2, 3, 5]
    exact = torch.einsum("hgd,hsjd->hgsj", rep, keys).amax(-1)
    assert (bound >= exact - 1e-5).all()
    one = keys[:, :, :1]
    assert torch.allclose(span_bounds(rep, one.amin(2), one.amax(2)), torch.einsum("hgd,hsd->hgs", rep, one[:, :, 0]),
                          atol=1e-5)


class _Writer:
    def __init__(self, L, KVH, n, D):
        self.keys = np.zeros((L, KVH, n, D), np.float32)
        self.values = np.zeros((L, KVH, n, D), np.float32)

    def write_kv(self, layer, start, k, v):
        self.keys[layer, :, start:start + k.shape[1]] = k
        self.values[layer, :, start:start + v.shape[1]] = v


class _DenseRemapLayer(DynamicLayer):
    """The naive reference of LongPrefillLayer: keeps every key; each query attends to its chunk's
    local window at true positions and to every earlier key at DISTANCE (no retrieval cut). Past
    the prefix (decoding), as RemappedRetrievalLayer with k covering every key: the offloaded keys
    [decode_sink, decode_lo) in document order from DISTANCE on, the sinks just beyond them."""

    def __init__(self, rope, writer, layer, n_prefix=None, decode_lo=None, decode_sink=None):
        super().__init__()
        self.rope, self.writer, self.layer = rope, writer, layer
        self.n_prefix, self.decode_lo = n_prefix, decode_lo  # tokens past the prefix: local = [decode_lo, p]
        self.decode_sink = decode_sink
        self.all_k = self.all_v = None
        self.start = 0

    def get_seq_length(self):
        return 0 if self.all_k is None else self.all_k.shape[-2]

    def get_mask_sizes(self, query_length):
        return self.get_seq_length() + query_length, 0

    def update(self, k, v, *args, **kwargs):
        self.start = self.get_seq_length()
        pos = torch.arange(self.start, self.start + k.shape[-2])
        if self.writer is not None:
            self.writer.write_kv(self.layer, self.start, self.rope.rotate(k[0], -pos).numpy(), v[0].numpy())
        self.all_k = k if self.all_k is None else torch.cat([self.all_k, k], dim=-2)
        self.all_v = v if self.all_v is None else torch.cat([self.all_v, v], dim=-2)
        return self.all_k, self.all_v

    def attend(self, query, key, value, scale):
        _, Hq, T, D = query.shape
        KVH = key.shape[1]
        G, s = Hq // KVH, self.start
        n = s + T
        lo = 0 if n <= longctx.SINK + longctx.LOCAL or s < longctx.SINK else max(longctx.SINK, s - longctx.LOCAL)
        dist = None  # every global key at DISTANCE
        if self.n_prefix is not None and s >= self.n_prefix:
            lo, a = self.decode_lo, self.decode_sink
            K = lo - a
            dist = torch.cat([torch.full((a,), longctx.DISTANCE + K), longctx.DISTANCE + K - 1 - torch.arange(K)])
        pos = torch.arange(s, n)
        k_pre = self.rope.rotate(key[0], -torch.arange(n))
        out = torch.empty(Hq, T, D)
        for h in range(Hq):
            kv = h // G
            ref = remapped_reference(query[0, h][None], pos, key[0, kv, lo:][None], value[0, kv, lo:][None],
                                     torch.arange(lo, n), k_pre[kv, :lo][None, None].expand(1, T, lo, D),
                                     value[0, kv, :lo][None, None].expand(1, T, lo, D), self.rope, scale, dist)
            out[h] = ref[0]
        return out.transpose(0, 1)[None]


def test_long_prefill_equals_dense_reference(tiny, monkeypatch):
    """Chunked prefill (exact phase, then sinks + local window + block retrieval covering every far
    key) writes the same pre-RoPE K/V, in every layer, as the dense per-query reference."""
    for name, value in (("SINK", 4), ("LOCAL", 16), ("DISTANCE", 16), ("BLOCK", 3), ("PREFILL_TOPK", 10_000),
                        ("SPAN", 4), ("SPANS", 10_000)):
        monkeypatch.setattr(longctx, name, value)
    ids = np.random.default_rng(0).integers(0, 97, size=75)
    L, KVH, D = 2, 2, 16
    fast = _Writer(L, KVH, len(ids), D)
    longctx.prefill_long(tiny, ids, 8, fast)
    ref = _Writer(L, KVH, len(ids), D)
    cache = RetrievalCache([_DenseRemapLayer(Rope(tiny), ref, i) for i in range(L)])
    with torch.inference_mode():
        for s in range(0, len(ids), 8):
            x = torch.from_numpy(ids[s:s + 8])[None]
            tiny.base_model(input_ids=x, cache=cache, position_ids=torch.arange(s, s + x.shape[1])[None],
                            use_cache=True, ra_cache=cache)
    assert np.allclose(fast.values, ref.values, atol=1e-4)
    assert np.allclose(fast.keys, ref.keys, atol=1e-4)
    # and the block retrieval matters: with 2 far keys per block, from the 2 spans of highest
    # bound, the result differs
    monkeypatch.setattr(longctx, "PREFILL_TOPK", 2)
    monkeypatch.setattr(longctx, "SPANS", 2)
    cut = _Writer(L, KVH, len(ids), D)
    longctx.prefill_long(tiny, ids, 8, cut)
    assert not np.allclose(cut.values[1], ref.values[1], atol=1e-4)


def test_engine_answers_past_the_window_and_equals_dense_reference(tiny_vocab_model, monkeypatch, tmp_path):
    """The whole pipeline for a document longer than the model's window (store on disk, pre-RoPE
    keys, index over the offloaded middle, local window rotated back): with every retrieval
    covering every key, the answer's logits equal the dense reference's."""
    from conftest import book_text
    from core.documents import Document
    from core.engine import AnswerStats, Engine, Settings
    from core.prompt import build_prefix, question_ids

    model, tok = tiny_vocab_model
    for name, value in (("SINK", 4), ("LOCAL", 32), ("DISTANCE", 32), ("BLOCK", 8), ("PREFILL_TOPK", 10**6),
                        ("SPAN", 8), ("SPANS", 10**6)):
        monkeypatch.setattr(longctx, name, value)
    notices = []
    s = Settings(sink=4, recent=16, chunk_size=40, top_k=10**6, kv_dtype="float32", max_tokens=4)
    engine = Engine(tmp_path, s, loaded=(model, tok, "tiny"), notice=notices.append)
    doc = Document(text=book_text(1200), name="alice-part", kind="text")
    prepared = engine.prepare(doc)
    n = prepared.entry.n_tokens
    assert n > model.config.max_position_embeddings and prepared.entry.remapped
    assert any("past the model's" in m for m in notices)
    a, b = engine.split(prepared.entry)
    assert (a, b) == (4, n - 32)  # the local window is at least LOCAL at decode too
    logits, stats = [], AnswerStats()
    "".join(engine.ask(prepared, "Where did the White Rabbit go?", stats, on_logits=lambda l: logits.append(l.clone())))
    got = torch.stack(logits)

    prefix = build_prefix(tok, doc).ids
    q = question_ids(tok, "Where did the White Rabbit go?") + stats.answer_ids
    cache = RetrievalCache([_DenseRemapLayer(Rope(model), None, i, n, b, a) for i in range(2)])
    with torch.inference_mode():
        for st in range(0, n, 40):
            x = torch.from_numpy(prefix[st:st + 40].astype(np.int64))[None]
            model.base_model(input_ids=x, cache=cache, position_ids=torch.arange(st, st + x.shape[1])[None],
                             use_cache=True, ra_cache=cache)
        out = model(input_ids=torch.tensor([q]), cache=cache, position_ids=torch.arange(n, n + len(q))[None],
                    use_cache=True, ra_cache=cache).logits[0]
    first = len(q) - len(stats.answer_ids) - 1
    ref = out[first:first + len(got)]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-3)
    # a second question is a cache hit: nothing is prefilled again
    assert engine.prepare(doc).cache_hit
    # `--index auto` keeps exact search past the window even where it would pick the graph: the
    # same entry seen as fp16 with the key threshold at 1 is still flat; not remapped, it is graph
    import types

    import core.engine as engine_mod

    monkeypatch.setattr(engine_mod, "AUTO_GRAPH_MIN_KEYS", 1)
    e = prepared.entry
    as16 = lambda remapped: types.SimpleNamespace(remapped=remapped, keys=np.zeros(1, np.float16), split=e.split)
    assert engine.index_kind(as16(True)) == "flat" and engine.index_kind(as16(False)) == "graph"


@pytest.fixture(scope="module")
def tiny_vocab_model(smol):
    """A tiny random Llama with the embedded model's tokenizer and a 256-token window."""
    torch.manual_seed(0)
    tok = smol[1]
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      attn_implementation="ra")
    return LlamaForCausalLM(cfg).eval(), tok
