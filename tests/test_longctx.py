"""Remapped positions for documents past the model's window (core/longctx.py), against references.

The fast paths (fused local attention + sinks + retrieved keys merged by log-sum-exp, chunked
prefill with block retrieval) are checked against naive computations that build every key at its
virtual position explicitly. A tiny randomly initialised Llama (transformers' own class, no
download) stands in where only the shapes matter; the engine test runs the embedded SmolLM2.
"""
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicLayer

from core import longctx
from core.attention import local_attention, reference_attention, register
from core.index import FlatLayerIndex
from core.layer import DocumentLayer, RaCache, RemappedPositions, Retriever, StaticKV
from core.longctx import Rope, remapped_reference
from core.settings import RemapScheme

SHIPPED = RemapScheme()
# small schemes for small inputs, passed as values (nothing is patched)
PREFILL_SMALL = RemapScheme(sink=4, local=16, distance=16, block=3, prefill_topk=10_000, span=4, spans=10_000)
ENGINE_SMALL = RemapScheme(sink=4, local=32, distance=32, block=8, prefill_topk=10**6, span=8, spans=10**6)


@pytest.fixture(scope="module")
def tiny():
    register()
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


@pytest.mark.parametrize("T,off", [(7, None), (7, 13), (7, 19), (1, 19), (1, None), (1, 5)])
def test_fused_local_attention_equals_naive(T, off):
    """The fused CPU kernel path of local_attention against the naive reference softmax and an
    explicit log-sum-exp, GQA groups of 3, causal or not, a decode step (T = 1, every key seen),
    over K/V that are a slice of a bigger buffer (as StaticKV's). If this torch build lacked the
    kernel, local_attention would fall back to the naive code and the test would compare a
    function with itself: it refuses to."""
    assert getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None) is not None
    q = torch.randn(2, 3, T, 16)
    k, v = torch.randn(2, 32, 16)[:, :20], torch.randn(2, 32, 16)[:, :20]  # strided views
    o, lse = local_attention(q, k, v, 0.25, off)
    ref = reference_attention(q, k[:, None], v[:, None], 0.25, off)
    scores = (q @ k[:, None].transpose(-1, -2)) * 0.25
    if off is not None:
        scores = scores.masked_fill(~torch.ones(T, 20, dtype=torch.bool).tril(off), float("-inf"))
    assert torch.allclose(o, ref, atol=1e-5) and torch.allclose(lse, torch.logsumexp(scores, -1), atol=1e-5)


@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize("top_k", [1000, 10])
def test_decode_layer_equals_reference(tiny, top_k, ordered):
    """The composed DocumentLayer with RemappedPositions (flat index over the offloaded middle) ==
    one softmax over the sinks, the local window and the exact top-k (all of the middle for
    k = 1000), each key built at its distance: ordered, the retrieved keys in document order just
    beyond the distance and the sinks beyond them; not ordered, all of them at the distance."""
    rope, scheme = Rope(tiny), replace(SHIPPED, ordered=ordered)
    d = scheme.distance
    KVH, G, D, n, a, b = 2, 2, 16, 40, 4, 30  # sinks [0, 4), offloaded [4, 30), local [30, 40)
    k_pre, v = torch.randn(KVH, n, D), torch.randn(KVH, n, D)
    k_loc = rope.rotate(k_pre[:, b:], torch.arange(b, n))
    retriever = Retriever(k_pre[:, a:b].numpy(), v[:, a:b].numpy(), FlatLayerIndex(k_pre[:, a:b].contiguous()))
    static = StaticKV(k_loc[None], v[:, b:][None], n - b + 1, k_pre[:, :a], v[:, :a])
    layer = DocumentLayer(static, retriever, RemappedPositions(rope, scheme), top_k, n)
    q_pre, k_new, v_new = torch.randn(KVH * G, 1, D), torch.randn(KVH, 1, D), torch.randn(KVH, 1, D)
    k_new_post = rope.rotate(k_new, torch.tensor([n]))
    key, value = layer.update(k_new_post[None], v_new[None])
    q = rope.rotate(q_pre, torch.tensor([n]))
    out = layer.attend(q[None], key, value, 0.25)[0].transpose(0, 1)  # [Hq, 1, D]
    loc_pos = torch.arange(b, n + 1)
    K = min(top_k, b - a)
    if ordered:
        dist = torch.cat([torch.full((a,), d + K), d + K - 1 - torch.arange(K)])
    else:
        dist = torch.full((a + K,), d)
    q_glob = rope.rotate(q, torch.tensor([d - n]))  # the frame the index ranks in
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
    local window at true positions and to every earlier key at the scheme's distance (no retrieval
    cut). Past the prefix (decoding), as the decode with k covering every key: the offloaded keys
    [decode_sink, decode_lo) in document order from the distance on, the sinks just beyond them."""

    def __init__(self, rope, scheme, writer, layer, n_prefix=None, decode_lo=None, decode_sink=None):
        super().__init__()
        self.rope, self.scheme, self.writer, self.layer = rope, scheme, writer, layer
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
        SINK, LOCAL, DIST = self.scheme.sink, self.scheme.local, self.scheme.distance
        lo = 0 if n <= SINK + LOCAL or s < SINK else max(SINK, s - LOCAL)
        dist = DIST  # every global key at the distance
        if self.n_prefix is not None and s >= self.n_prefix:
            lo, a = self.decode_lo, self.decode_sink
            K = lo - a
            dist = torch.cat([torch.full((a,), DIST + K), DIST + K - 1 - torch.arange(K)])
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


def test_long_prefill_equals_dense_reference(tiny):
    """Chunked prefill (exact phase, then sinks + local window + block retrieval covering every far
    key) writes the same pre-RoPE K/V, in every layer, as the dense per-query reference."""
    scheme = PREFILL_SMALL
    ids = np.random.default_rng(0).integers(0, 97, size=75)
    L, KVH, D = 2, 2, 16
    fast = _Writer(L, KVH, len(ids), D)
    longctx.prefill_long(tiny, ids, 8, fast, scheme)
    ref = _Writer(L, KVH, len(ids), D)
    cache = RaCache([_DenseRemapLayer(Rope(tiny), scheme, ref, i) for i in range(L)])
    with torch.inference_mode():
        for s in range(0, len(ids), 8):
            x = torch.from_numpy(ids[s:s + 8])[None]
            tiny.base_model(input_ids=x, cache=cache, position_ids=torch.arange(s, s + x.shape[1])[None],
                            use_cache=True, ra_cache=cache)
    assert np.allclose(fast.values, ref.values, atol=1e-4)
    assert np.allclose(fast.keys, ref.keys, atol=1e-4)
    # and the block retrieval matters: with 2 far keys per block, from the 2 spans of highest
    # bound, the result differs
    cut = _Writer(L, KVH, len(ids), D)
    longctx.prefill_long(tiny, ids, 8, cut, replace(scheme, prefill_topk=2, spans=2))
    assert not np.allclose(cut.values[1], ref.values[1], atol=1e-4)


def test_engine_answers_past_the_window_and_equals_dense_reference(tiny_vocab_model, tmp_path):
    """The whole pipeline for a document longer than the model's window (store on disk, pre-RoPE
    keys, index over the offloaded middle, local window rotated back): with every retrieval
    covering every key, the answer's logits equal the dense reference's."""
    from conftest import book_text
    from core.documents import Document
    from core.engine import AnswerStats, Engine, Settings
    from core.prompt import build_prefix, question_ids

    model, tok = tiny_vocab_model
    notices = []
    s = Settings(sink=4, recent=16, chunk_size=40, top_k=10**6, kv_dtype="float32", max_tokens=4, remap=ENGINE_SMALL)
    engine = Engine(tmp_path, s, loaded=(model, tok, "tiny"), notice=notices.append)
    doc = Document(text=book_text(1200), name="alice-part", kind="text")
    prepared = engine.prepare(doc)
    n = prepared.entry.n_tokens
    assert n > model.config.max_position_embeddings and prepared.entry.remapped
    assert any("past the model's" in m for m in notices)
    a, b = prepared.split
    assert (a, b) == (4, n - 32)  # the local window is at least the scheme's at decode too
    assert prepared.entry.manifest.scheme == replace(ENGINE_SMALL)  # recorded in the entry
    logits, stats = [], AnswerStats()
    "".join(engine.ask(prepared, "Where did the White Rabbit go?", stats, on_logits=lambda l: logits.append(l.clone())))
    got = torch.stack(logits)

    prefix = build_prefix(tok, doc).ids
    q = question_ids(tok, "Where did the White Rabbit go?") + stats.answer_ids
    cache = RaCache([_DenseRemapLayer(Rope(model), ENGINE_SMALL, None, i, n, b, a) for i in range(2)])
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

    e = prepared.entry
    as16 = lambda remapped: types.SimpleNamespace(remapped=remapped, keys=np.zeros(1, np.float16), split=e.split,
                                                  manifest=e.manifest)
    one = s.but(graph_min_keys=1)
    assert engine.index_kind(as16(True), one) == "flat" and engine.index_kind(as16(False), one) == "graph"
    # every key at one distance is not what `exact` means: asked for past the window, a usage error
    from core.errors import UsageError

    with pytest.raises(UsageError, match="inside the model's window"):
        engine.index_kind(as16(True), s.but(index="exact"))
    assert engine.index_kind(as16(False), s.but(index="exact")) == "exact"
    # the clustered index past the window: every key scanned, the top-k attended exactly, the
    # rest estimated, whatever scan_max and retrieve say (its whole-cluster mode missed there)
    pc = engine.prepare(doc, s.but(index="cluster", top_k=8, scan_max=0, retrieve=0.5))
    assert pc.settings.scan_max >= n and pc.settings.retrieve == 0.0 and pc.settings.estimate == s.estimate
    assert all(r.index.scan is not None for r in pc.retrievers)
    r = pc.retrievers[0]
    z = r.zones(torch.randn(r.k.shape[0], 3, r.k.shape[-1]), pc.settings.top_k, 0.125)
    assert z.ids.shape[-1] == 8 and z.estimate is not None  # the top 8 keys exact, clusters estimated
    "".join(engine.ask(pc, "Where did the White Rabbit go?"))  # and it answers


@pytest.fixture(scope="module")
def tiny_vocab_model(smol):
    """A tiny random Llama with the embedded model's tokenizer and a 256-token window."""
    torch.manual_seed(0)
    tok = smol[1]
    register()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      attn_implementation="ra")
    return LlamaForCausalLM(cfg).eval(), tok


def test_an_interrupted_long_prefill_resumes_to_the_same_entry(tiny_vocab_model, tmp_path):
    """The chunked prefill past the window, stopped (as Ctrl-C) after three different chunks and
    resumed each time from its checkpoint (local windows restored, span bounds recomputed): the
    entry's K/V and queries equal an uninterrupted run's byte for byte."""
    import filecmp

    from conftest import book_text
    from core.documents import Document
    from core.engine import Engine, Settings

    model, tok = tiny_vocab_model
    s = Settings(sink=4, recent=16, chunk_size=40, checkpoint_s=0, remap=ENGINE_SMALL, index="flat")
    doc = Document(text=book_text(1200), name="alice-part", kind="text")
    ref = Engine(tmp_path / "ref", s, loaded=(model, tok, "tiny")).prepare(doc).entry.path
    notices = []
    for target in (80, 200, 280):
        def stop(stage, done, total):
            if stage == "prefill" and done >= target:
                raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            Engine(tmp_path / "home", s, loaded=(model, tok, "tiny"), progress=stop, notice=notices.append).prepare(doc)
        assert f"stopped: {target - 40:,} of" in notices[-1] and "tokens of alice-part's prefill are kept" in notices[-1]
    p = Engine(tmp_path / "home", s, loaded=(model, tok, "tiny"), notice=notices.append).prepare(doc)
    resumed = [m for m in notices if "resuming an interrupted prefill" in m]
    assert [m.split("from token ")[1].split(" ")[0] for m in resumed] == ["40", "160", "240"]
    assert p.entry.remapped and not p.cache_hit
    for f in ("keys.npy", "values.npy", "queries.npy", "tokens.npy"):
        assert filecmp.cmp(p.entry.path / f, ref / f, shallow=False), f
    assert not any((tmp_path / "home" / "store" / "tmp").iterdir())
