"""Indexes return each query's top-k keys and their exact logits; centring keys keeps rankings."""
import numpy as np
import torch

from core.index import build_index_dir, open_layer_index


def _keys(L=2, KVH=2, N=300, D=16, seed=0):
    rng = np.random.default_rng(seed)
    # real keys are one-sided (a large shared component): imitate that
    return (rng.standard_normal((L, KVH, N, D)) + 3.0 * rng.standard_normal((1, KVH, 1, D))).astype(np.float32)


def test_flat_is_exact_top_k_with_exact_logits(tmp_path):
    keys = _keys()
    q = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 5, 16)).astype(np.float32))
    build_index_dir("flat", lambda l: keys[l], 2, tmp_path)
    idx = open_layer_index("flat", tmp_path, 1, torch.from_numpy(keys[1]), 300, 16, 2)
    ids, scores = idx.search(q, 10)
    full = torch.einsum("hmd,hnd->hmn", q, torch.from_numpy(keys[1]))
    want = full.topk(10, dim=-1).indices
    for h in range(2):
        for m in range(5):
            assert set(ids[h, m].tolist()) == set(want[h, m].tolist())
    torch.testing.assert_close(scores, torch.gather(full, 2, ids))


def test_hnsw_on_centred_keys_finds_the_exact_top_k_and_logits(tmp_path):
    keys = _keys()
    build_index_dir("hnsw", lambda l: keys[l], 2, tmp_path)
    idx = open_layer_index("hnsw", tmp_path, 0, None, 300, 16, 2, ef=300)
    q = torch.from_numpy(np.random.default_rng(2).standard_normal((2, 7, 16)).astype(np.float32))
    ids, scores = idx.search(q, 10)
    full = torch.einsum("hmd,hnd->hmn", q, torch.from_numpy(keys[0]))
    want = full.topk(10, dim=-1).indices
    recall = np.mean([len(set(ids[h, m].tolist()) & set(want[h, m].tolist())) / 10
                      for h in range(2) for m in range(7)])
    assert recall >= 0.95  # ef=300 on 300 keys: the graph search is near exhaustive
    # the logits come back exact although the graph holds centred keys
    torch.testing.assert_close(scores, torch.gather(full, 2, ids), rtol=1e-4, atol=1e-4)


def test_centring_keeps_every_ranking():
    keys = _keys()[0, 0]
    mu = keys.mean(0)
    q = np.random.default_rng(3).standard_normal((20, 16)).astype(np.float32)
    a = np.argsort(-(q @ keys.T), axis=1)
    b = np.argsort(-(q @ (keys - mu).T), axis=1)
    assert (a[:, :50] == b[:, :50]).mean() > 0.99  # equal up to float ties
