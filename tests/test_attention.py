"""The math: partial softmaxes merged with the log-sum-exp rule equal one softmax over the union."""
import math

import pytest
import torch

from core.attention import merge_partials, partial_attention, reference_attention, retrieval_attention


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


def test_retrieval_attention_with_every_key_retrieved_is_full_attention():
    # GQA: 2 KV heads x 3 query heads each; 5 new tokens (causal among themselves), 17 local keys,
    # 23 offloaded keys, all retrieved (in a shuffled order: order must not matter)
    KVH, G, T, S, N, D = 2, 3, 5, 17, 23, 8
    q = _rand(KVH, G, T, D, seed=1)
    k_loc, v_loc = _rand(KVH, S, D, seed=2), _rand(KVH, S, D, seed=3)
    k_off, v_off = _rand(KVH, N, D, seed=4), _rand(KVH, N, D, seed=5)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    k_sel = k_off[:, perm][:, None, None].expand(KVH, G, T, N, D)
    v_sel = v_off[:, perm][:, None, None].expand(KVH, G, T, N, D)
    s_sel = (q[..., None, :] * k_sel).sum(-1)  # the logits an index returns with its ids
    out = retrieval_attention(q, k_loc, v_loc, s_sel, v_sel, 0.25)
    # reference: offloaded keys come before the local ones, all visible; local ones causal
    k_all = torch.cat([k_off, k_loc], 1)[:, None]
    v_all = torch.cat([v_off, v_loc], 1)[:, None]
    ref = reference_attention(q, k_all, v_all, 0.25, causal_offset=N + S - T)
    torch.testing.assert_close(out, ref)


def test_retrieval_attention_with_few_keys_differs_from_full():
    # the converse, so the test above cannot pass by ignoring the retrieved keys
    KVH, G, T, S, N, D = 1, 2, 1, 4, 50, 8
    q = _rand(KVH, G, T, D, seed=1) * 3
    k_loc, v_loc = _rand(KVH, S, D, seed=2), _rand(KVH, S, D, seed=3)
    k_off, v_off = _rand(KVH, N, D, seed=4), _rand(KVH, N, D, seed=5)
    k_sel = k_off[:, None, None, :2].expand(KVH, G, T, 2, D)
    out = retrieval_attention(q, k_loc, v_loc, (q[..., None, :] * k_sel).sum(-1),
                              v_off[:, None, None, :2].expand(KVH, G, T, 2, D), 0.35)
    ref = reference_attention(q, torch.cat([k_off, k_loc], 1)[:, None], torch.cat([v_off, v_loc], 1)[:, None], 0.35)
    assert (out - ref).abs().max() > 1e-3
