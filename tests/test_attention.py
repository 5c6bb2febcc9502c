"""The math: partial softmaxes merged with the log-sum-exp rule equal one softmax over the union."""
import math

import pytest
import torch

from core.attention import flash_attention, flash_usable, merge_partials, partial_attention, reference_attention


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("s1,s2", [(1, 1), (7, 13), (3, 0), (0, 5), (31, 2)])
def test_merge_equals_softmax_over_union(s1, s2):
    T, D = 3, 5
    q = _rand(2, T, D, seed=1)
    k1, v1 = _rand(2, s1, D, seed=2), _rand(2, s1, D, seed=3)
    k2, v2 = _rand(2, s2, D, seed=4), _rand(2, s2, D, seed=5)
    scale = 1 / math.sqrt(D)
    o1, l1 = partial_attention(q, k1, v1, scale)
    o2, l2 = partial_attention(q, k2, v2, scale)
    o, lse = merge_partials(o1, l1, o2, l2)
    k, v = torch.cat([k1, k2], 1), torch.cat([v1, v2], 1)
    torch.testing.assert_close(o, reference_attention(q, k, v, scale), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp((q @ k.transpose(-1, -2)) * scale, -1))


def test_partial_attention_causal_matches_reference():
    q, k, v = _rand(4, 6, 8, seed=1), _rand(4, 11, 8, seed=2), _rand(4, 11, 8, seed=3)
    o, _ = partial_attention(q, k, v, 0.3, causal_offset=11 - 6)
    torch.testing.assert_close(o, reference_attention(q, k, v, 0.3, causal_offset=5))


def test_empty_side_is_ignored_and_large_logits_are_stable():
    q = _rand(1, 2, 4) * 1000  # logits in the thousands: naive exp would overflow
    k, v = _rand(1, 9, 4, seed=7), _rand(1, 9, 4, seed=8)
    o, l = partial_attention(q, k, v, 1.0)
    empty_o, empty_l = partial_attention(q, k[:, :0], v[:, :0], 1.0)
    assert torch.isinf(empty_l).all() and (empty_o == 0).all()
    m, _ = merge_partials(o, l, empty_o, empty_l)
    torch.testing.assert_close(m, reference_attention(q, k, v, 1.0))
    assert torch.isfinite(m).all()


def _exact_layer(k_loc, v_loc, k_off, v_off, top_k, n_new):
    """A DocumentLayer (ExactPositions, flat index) whose static rows are k_loc[:, :-n_new] and whose
    offloaded range is k_off; the last n_new rows of k_loc are appended as the new tokens."""
    from core.index import FlatLayerIndex
    from core.layer import DocumentLayer, ExactPositions, Retriever, StaticKV

    S0 = k_loc.shape[1] - n_new
    static = StaticKV(k_loc[None, :, :S0], v_loc[None, :, :S0], S0 + n_new)
    retriever = Retriever(k_off.numpy(), v_off.numpy(), FlatLayerIndex(k_off))
    layer = DocumentLayer(static, retriever, ExactPositions(), top_k, S0 + k_off.shape[1])
    key, value = layer.update(k_loc[None, :, S0:], v_loc[None, :, S0:])
    return layer, key, value


def test_document_layer_with_every_key_retrieved_is_full_attention():
    # GQA: 2 KV heads x 3 query heads each; 5 new tokens (causal among themselves), 17 local keys,
    # 23 offloaded keys, all retrieved; in float32, as the layer computes
    KVH, G, T, S, N, D = 2, 3, 5, 17, 23, 8
    q = _rand(KVH, G, T, D, seed=1).float()
    k_loc, v_loc = _rand(KVH, S, D, seed=2).float(), _rand(KVH, S, D, seed=3).float()
    k_off, v_off = _rand(KVH, N, D, seed=4).float(), _rand(KVH, N, D, seed=5).float()
    layer, key, value = _exact_layer(k_loc, v_loc, k_off, v_off, top_k=10**6, n_new=T)
    out = layer.attend(q.reshape(1, KVH * G, T, D), key, value, 0.25)  # [1, T, Hq, D]
    assert layer.last.ids.shape == (KVH, G * T, N)  # the index was asked, for every key
    # reference: offloaded keys come before the local ones, all visible; local ones causal
    k_all = torch.cat([k_off, k_loc], 1)[:, None].double()
    v_all = torch.cat([v_off, v_loc], 1)[:, None].double()
    ref = reference_attention(q.double(), k_all, v_all, 0.25, causal_offset=N + S - T)  # [KVH, G, T, D]
    torch.testing.assert_close(out[0].transpose(0, 1).reshape(KVH, G, T, D).double(), ref, rtol=1e-5, atol=1e-5)


def test_document_layer_with_few_keys_differs_from_full():
    # the converse, so the test above cannot pass by ignoring the retrieved keys
    KVH, G, T, S, N, D = 1, 2, 1, 4, 50, 8
    q = (_rand(KVH, G, T, D, seed=1) * 3).float()
    k_loc, v_loc = _rand(KVH, S, D, seed=2).float(), _rand(KVH, S, D, seed=3).float()
    k_off, v_off = _rand(KVH, N, D, seed=4).float(), _rand(KVH, N, D, seed=5).float()
    layer, key, value = _exact_layer(k_loc, v_loc, k_off, v_off, top_k=2, n_new=T)
    out = layer.attend(q.reshape(1, KVH * G, T, D), key, value, 0.35)[0].transpose(0, 1).reshape(KVH, G, T, D)
    ref = reference_attention(q, torch.cat([k_off, k_loc], 1)[:, None], torch.cat([v_off, v_loc], 1)[:, None], 0.35)
    assert (out - ref).abs().max() > 1e-3


def test_merge_of_three_zones_equals_one_softmax():
    """`merge` folds any number of partials: three disjoint key sets == one softmax over all."""
    from core.attention import merge

    q = _rand(2, 3, 6, seed=1)
    ks = [_rand(2, n, 6, seed=10 + n) for n in (4, 9, 1)]
    vs = [_rand(2, n, 6, seed=20 + n) for n in (4, 9, 1)]
    o, lse = merge([partial_attention(q, k, v, 0.4) for k, v in zip(ks, vs)])
    torch.testing.assert_close(o, reference_attention(q, torch.cat(ks, 1), torch.cat(vs, 1), 0.4))


def test_static_kv_appends_in_place():
    """StaticKV preallocates: appending writes into the same storage (no concatenation per step)."""
    from core.layer import StaticKV

    k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    static = StaticKV(k, v, capacity=8)
    ptr = static.k.data_ptr()
    for _ in range(3):
        kk, vv = static.append(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    assert static.k.data_ptr() == ptr and kk.shape == (1, 2, 8, 4) and kk.data_ptr() == ptr
    torch.testing.assert_close(kk[:, :, :5], k)
    static.append(torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4))  # past the capacity: it grows
    assert static.n == 10 and torch.equal(static.k[:, :, :5], k)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("device,dtype,tol", [("cpu", torch.float32, 1e-5), ("cpu", torch.bfloat16, 2e-2),
                                              pytest.param("cuda", torch.bfloat16, 2e-2, marks=CUDA)])
@pytest.mark.parametrize("causal", [True, False])
def test_flash_attention_equals_the_reference(device, dtype, tol, causal):
    """core/attention.flash_attention (the GPU prefill's partial; on the CPU through its flash
    kernel, the same reshapes) against float64 softmax written out here: GQA groups, keys read
    in place from a slice of a longer buffer, the log-sum-exp included."""
    g = torch.Generator().manual_seed(5)
    KVH, G, T, D = 2, 3, 40, 16
    S = T if causal else 70
    q = torch.randn(KVH, G, T, D, generator=g).to(device, dtype)
    buf_k = torch.randn(KVH, 100, D, generator=g).to(device, dtype)
    buf_v = torch.randn(KVH, 100, D, generator=g).to(device, dtype)
    k, v = buf_k[:, 10:10 + S], buf_v[:, 10:10 + S]  # not contiguous: the buffer's rows
    assert flash_usable(q) and not k.is_contiguous()
    o, lse = (x.cpu() for x in flash_attention(q, k, v, 0.25, causal=causal))
    assert o.shape == (KVH, G, T, D) and lse.shape == (KVH, G, T) and lse.dtype == torch.float32
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    s = torch.einsum("hgtd,hsd->hgts", q.double(), k.double()) * 0.25
    if causal:
        s = s.masked_fill(torch.ones(T, S, dtype=torch.bool).triu(1), float("-inf"))
    want_lse = torch.logsumexp(s, -1)
    want = torch.einsum("hgts,hsd->hgtd", torch.softmax(s, -1), v.double())
    torch.testing.assert_close(o.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), want_lse, rtol=tol, atol=tol)
