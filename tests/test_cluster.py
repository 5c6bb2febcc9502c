"""The clustered index and the estimation zone (core/cluster.py) against naive references.

The references are written out key by key in float64 numpy: the cluster masses from the keys and
labels, and one dense softmax per query over the keys a zone claims to cover (the retrieved keys
as they are, each estimated cluster's other members at its mean key with their own values).
"""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from core.attention import attention_from_scores, merge
from core.cluster import (build_cluster_dir, cluster_keys, estimated_attention, estimated_reference,
                          n_clusters, open_cluster_layer, segments)
from core.index import kind
from core.layer import DocumentLayer, ExactPositions, RemappedPositions, Retriever, StaticKV
from core.longctx import Rope, remapped_reference
from core.settings import RemapScheme

SCALE = 0.3


def _kv(L, KVH, N, D, seed):
    rng = np.random.default_rng(seed)
    # one-sided keys (a shared component), as real keys are
    k = rng.standard_normal((L, KVH, N, D)) + 2.0 * rng.standard_normal((1, KVH, 1, D))
    return k.astype(np.float32), rng.standard_normal((L, KVH, N, D)).astype(np.float32)


def _build(tmp_path, keys, values, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    build_cluster_dir(lambda l: keys[l], lambda l: values[l], keys.shape[0], tmp_path, None, **kw)
    return tmp_path


def _labels(index, h):
    """Each offloaded key's cluster, read back from the index's order/offsets."""
    order, offsets = index.order[h].numpy(), index.offsets[h].numpy()
    labels = np.empty(len(order), np.int64)
    for j in range(len(offsets) - 1):
        labels[order[offsets[j]:offsets[j + 1]]] = j
    return labels


def test_segments_cover_and_a_short_tail_joins():
    assert segments(95, 40) == [(0, 40), (40, 95)]  # a 15-token tail joins the second segment
    assert segments(100, 40) == [(0, 40), (40, 80), (80, 100)]  # half a segment stands alone
    assert segments(130, 40) == [(0, 40), (40, 80), (80, 130)]
    assert segments(5, 40) == [(0, 5)]
    assert n_clusters(95, 16, 40) == round(40 / 16) + round(55 / 16)


def test_tables_partition_the_keys_and_building_is_deterministic(tmp_path):
    keys, values = _kv(2, 2, 203, 8, seed=0)
    a = _build(tmp_path / "a", keys, values, size=8, segment=64)
    b = _build(tmp_path / "b", keys, values, size=8, segment=64)
    for name in ("centroids", "sizes", "vsums", "order", "offsets", "index"):
        ext = ".json" if name == "index" else ".npy"
        assert (a / f"{name}{ext}").read_bytes() == (b / f"{name}{ext}").read_bytes(), name
    for layer in range(2):
        idx = open_cluster_layer(a, layer, keys[layer])
        for h in range(2):
            order = idx.order[h].numpy()
            assert sorted(order.tolist()) == list(range(203))  # a permutation of the offloaded range
            labels = _labels(idx, h)
            seg = np.searchsorted([s for s, _ in segments(203, 64)], np.arange(203), side="right") - 1
            for j in range(idx.c):
                members = np.flatnonzero(labels == j)
                assert idx.sizes[h, j] == len(members)
                if len(members):
                    assert len(set(seg[members])) == 1  # a cluster never crosses a segment
                    np.testing.assert_allclose(idx.cent[h, j], keys[layer, h, members].mean(0), rtol=1e-5, atol=1e-5)
                    np.testing.assert_allclose(idx.vsums[h, j], values[layer, h, members].sum(0), rtol=1e-5, atol=1e-4)


def test_clusters_group_similar_keys():
    """Keys drawn around 6 directions: spherical k-means with 6 clusters recovers the groups."""
    rng = np.random.default_rng(3)
    dirs = rng.standard_normal((6, 16))
    truth = rng.integers(0, 6, 240)
    keys = dirs[truth] * 5 + 0.2 * rng.standard_normal((240, 16))
    labels = cluster_keys(keys, size=40, segment=10_000).numpy()
    for j in range(6):  # each true group lands in one cluster
        assert len(set(labels[truth == j])) == 1


@pytest.mark.parametrize("k, retrieve, estimate, scan", [
    (1, 0.0, 0.0, False),      # one cluster retrieved, nothing estimated
    (20, 0.0, 0.3, False),     # a key budget, then estimation
    (1, 0.25, 0.5, False),     # fractions
    (1, 1.0, 0.5, False),      # everything retrieved: the estimated zone is empty
    (1, 0.0, 1.0, False),      # one retrieved, all the rest estimated
    (9, 0.0, 0.0, True),       # the true top-9 (a scan), nothing estimated
    (9, 0.0, 0.4, True),       # the true top-9, then estimated clusters, some holding a top-9 key
    (1, 0.1, 1.0, True),       # the top 10% of keys, every other key estimated
    (173, 0.0, 1.0, True),     # every key retrieved: estimated clusters have no member left
])
def test_zones_equal_naive_reference(tmp_path, k, retrieve, estimate, scan):
    L, KVH, N, D, M = 1, 2, 173, 8, 5  # odd sizes; 3 segments of 64 (the tail joins), clusters of ~7
    keys, values = _kv(L, KVH, N, D, seed=1)
    _build(tmp_path, keys, values, size=7, segment=64)
    idx = open_cluster_layer(tmp_path, 0, keys[0], retrieve=retrieve, estimate=estimate, scan_max=N if scan else 0)
    q = torch.from_numpy(np.random.default_rng(2).standard_normal((KVH, M, D)).astype(np.float32))
    z = idx.zones(q, k, SCALE)
    r, e = idx.budgets(k)
    assert (z.estimate is None) == (e == 0)
    if scan and e and k < N:  # some top-k keys sit in estimated clusters: the case the overlap handles
        assert (z.estimate.overlap >= 0).any()
    heads = torch.arange(KVH)[:, None, None]
    parts = [attention_from_scores(z.scores, torch.from_numpy(values[0])[heads, z.ids.clamp_min(0)], SCALE)]
    if z.estimate is not None:
        sel_values = torch.from_numpy(values[0])[heads, z.ids.clamp_min(0)]
        parts.append(estimated_attention(z.estimate, SCALE, sel_values))
    o, lse = merge(parts)
    for h in range(KVH):
        labels = _labels(idx, h)
        for m in range(M):
            qn = q[h, m].double().numpy()
            mass = []  # each cluster's estimated mass, from the keys and labels
            for j in range(idx.c):
                members = keys[0, h, labels == j].astype(np.float64)
                mass.append(SCALE * qn @ members.mean(0) + math.log(len(members)) if len(members) else -math.inf)
            ranked = np.argsort(-np.array(mass), kind="stable")
            retrieved, estimated = ranked[:r].tolist(), ranked[r:r + e].tolist()
            got = set(z.ids[h, m][z.ids[h, m] >= 0].tolist())
            if scan:  # the true top-k of the exact logits
                n_exact = min(N, max(k, math.ceil(retrieve * N)))
                want = np.argsort(-(keys[0, h].astype(np.float64) @ qn), kind="stable")[:n_exact]
            else:     # every member of the best clusters
                want = np.flatnonzero(np.isin(labels, retrieved))
            assert got == set(want.tolist())
            o_ref, lse_ref = estimated_reference(qn, keys[0, h], values[0, h], labels, got, estimated, SCALE)
            np.testing.assert_allclose(o[h, m].numpy(), o_ref, rtol=1e-4, atol=1e-5)
            assert abs(float(lse[h, m]) - lse_ref) < 1e-4


def test_estimate_with_no_cluster_is_an_empty_zone():
    from core.cluster import Estimate

    est = Estimate(torch.full((2, 5, 3), -math.inf), torch.zeros(2, 1, 3), torch.randn(2, 3, 4))
    o, lse = estimated_attention(est, SCALE)
    assert (o == 0).all() and torch.isinf(lse).all()


def _layer(tmp_path, policy, retrieve, estimate, k_static, v_static, k_off, v_off, glob=(None, None), scan_max=0):
    keys, values = k_off.numpy()[None], v_off.numpy()[None]
    _build(tmp_path, keys, values, size=5, segment=32)
    index = kind("cluster").open(tmp_path, 0, keys[0], retrieve=retrieve, estimate=estimate, scan_max=scan_max)
    retriever = Retriever(keys[0], values[0], index)
    static = StaticKV(k_static[None], v_static[None], k_static.shape[1] + 1, *glob)
    return DocumentLayer(static, retriever, policy, 1, k_off.shape[1] + k_static.shape[1]), index


def _stand_ins(index, h, ids_row, est_clusters, keys, values):
    """The dense key set a zone claims: retrieved keys, then each estimated cluster's other
    members at its mean key (with their own values). Returns keys, values, and which are estimated."""
    labels = _labels(index, h)
    ks, vs, is_est = [keys[h, i] for i in ids_row], [values[h, i] for i in ids_row], [False] * len(ids_row)
    for j in est_clusters:
        members = [i for i in np.flatnonzero(labels == j) if i not in set(ids_row)]
        ks += [keys[h, np.flatnonzero(labels == j)].mean(0)] * len(members)
        vs += [values[h, i] for i in members]
        is_est += [True] * len(members)
    return ks, vs, is_est


def _estimated_clusters(index, q_rows, k):
    """The clusters the index estimates for q_rows [KVH, M, D], recomputed from its tables."""
    r, e = index.budgets(k)
    mass = torch.bmm(q_rows.float(), index.cent.transpose(1, 2)) * SCALE + index.log_sizes[:, None]
    return mass.topk(r + e, dim=-1).indices[..., r:]


@pytest.mark.parametrize("retrieve, estimate, scan_max", [(1.0, 0.0, 0), (0.2, 0.4, 0), (0.0, 1.0, 0),
                                                      (0.1, 0.5, 10_000), (1.0, 1.0, 10_000)])
def test_document_layer_with_estimation_equals_dense_reference(tmp_path, retrieve, estimate, scan_max):
    """Static zone + retrieved clusters + estimated clusters, through DocumentLayer, == one dense
    float64 softmax per query over the static keys and the stand-ins; with every cluster retrieved
    that is full attention."""
    KVH, G, S, N, D = 2, 2, 6, 70, 8
    rng = np.random.default_rng(5)
    k_st, v_st = (torch.from_numpy(rng.standard_normal((KVH, S, D)).astype(np.float32)) for _ in range(2))
    k_off, v_off = (torch.from_numpy(rng.standard_normal((KVH, N, D)).astype(np.float32)) for _ in range(2))
    layer, index = _layer(tmp_path, ExactPositions(), retrieve, estimate, k_st, v_st, k_off, v_off, scan_max=scan_max)
    k_new, v_new = torch.randn(1, KVH, 1, D), torch.randn(1, KVH, 1, D)
    key, value = layer.update(k_new, v_new)
    q = torch.randn(1, KVH * G, 1, D)
    out = layer.attend(q, key, value, SCALE)[0, 0]  # [Hq, D]
    est = _estimated_clusters(index, q[0, :, 0].reshape(KVH, G, D), 1)
    for h in range(KVH * G):
        kv, g = divmod(h, G)
        ids = layer.last.ids[kv, g][layer.last.ids[kv, g] >= 0].tolist()
        ks, vs, _ = _stand_ins(index, kv, ids, est[kv, g].tolist(), k_off.numpy(), v_off.numpy())
        ks += list(key[0, kv].numpy())
        vs += list(value[0, kv].numpy())
        logits = np.array([SCALE * float(np.dot(q[0, h, 0].double().numpy(), kk)) for kk in ks])
        w = np.exp(logits - logits.max())
        ref = (w[:, None] * np.array(vs, np.float64)).sum(0) / w.sum()
        np.testing.assert_allclose(out[h].numpy(), ref, rtol=1e-4, atol=1e-5)
        if retrieve == 1.0:
            assert len(ids) == N  # every key, exactly: full attention


@pytest.mark.parametrize("ordered, scan_max, estimate_distance",
                         [(False, 0, 0), (True, 0, 0), (True, 10_000, 0), (True, 10_000, 3000), (False, 0, 3000)])
def test_remapped_estimation_equals_reference_in_the_global_frame(tmp_path, ordered, scan_max, estimate_distance):
    """Past the window (pre-RoPE keys): retrieved keys at the scheme's distances, estimated
    clusters at `distance` (the frame the index is searched in) or at `estimate_distance`, sinks
    beyond; checked against core/longctx.remapped_reference, which builds every key at its
    distance. The clusters are chosen in the search frame either way."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    rope = Rope(tiny)
    scheme = replace(RemapScheme(), ordered=ordered, estimate_distance=estimate_distance)
    d = scheme.distance
    KVH, G, D, n, a, b = 2, 2, 16, 90, 3, 80  # sinks [0, 3), offloaded [3, 80), local [80, 90)
    k_pre, v = torch.randn(KVH, n, D), torch.randn(KVH, n, D)
    k_loc = rope.rotate(k_pre[:, b:], torch.arange(b, n))
    layer, index = _layer(tmp_path, RemappedPositions(rope, scheme), 0.1, 0.3, k_loc, v[:, b:],
                          k_pre[:, a:b].contiguous(), v[:, a:b].contiguous(), (k_pre[:, :a], v[:, :a]), scan_max)
    layer.n_document = n
    k_new, v_new = torch.randn(KVH, 1, D), torch.randn(KVH, 1, D)
    key, value = layer.update(rope.rotate(k_new, torch.tensor([n]))[None], v_new[None])
    q = rope.rotate(torch.randn(KVH * G, 1, D), torch.tensor([n]))
    out = layer.attend(q[None], key, value, SCALE)[0].transpose(0, 1)  # [Hq, 1, D]
    q_glob = rope.rotate(q, torch.tensor([d - n]))
    est = _estimated_clusters(index, q_glob[:, 0].reshape(KVH, G, D), 1)
    K = layer.last.ids.shape[-1]
    off_k, off_v = k_pre[:, a:b].numpy(), v[:, a:b].numpy()
    for h in range(KVH * G):
        kv, g = divmod(h, G)
        ids = sorted(layer.last.ids[kv, g][layer.last.ids[kv, g] >= 0].tolist())
        ks, vs, is_est = _stand_ins(index, kv, ids, est[kv, g].tolist(), off_k, off_v)
        n_ret = len(ids)
        d_est = estimate_distance or d  # the estimated clusters' stand-ins
        if ordered:  # the i-th retrieved key (document order) at d + n_ret - 1 - i; the sinks at d + K
            dist = [d + K] * a + [d + n_ret - 1 - i for i in range(n_ret)] + [d_est] * (len(ks) - n_ret)
        else:
            dist = [d] * (a + n_ret) + [d_est] * (len(ks) - n_ret)
        glob_k = torch.cat([k_pre[kv, :a], torch.tensor(np.array(ks))])[None, None]
        glob_v = torch.cat([v[kv, :a], torch.tensor(np.array(vs))])[None, None]
        ref = remapped_reference(q[h][None], torch.tensor([n]), key[0, kv][None], value[0, kv][None],
                                 torch.arange(b, n + 1), glob_k, glob_v, rope, SCALE, distance=torch.tensor(dist))
        assert torch.allclose(out[h], ref[0], atol=1e-5), (h, (out[h] - ref[0]).abs().max())
