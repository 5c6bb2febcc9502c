"""Indexes return each query's top-k keys and their exact logits; centring keys keeps rankings."""
import pytest
import numpy as np
import torch

from core.errors import UsageError
from core.index import KINDS, kind


def _build(name, keys, out, queries=None, values=None):
    values = keys if values is None else values
    kind(name).build(lambda l: keys[l], lambda l: values[l], (lambda l: queries[l]) if queries is not None else None,
                     keys.shape[0], out, None)


def _keys(L=2, KVH=2, N=300, D=16, seed=0):
    rng = np.random.default_rng(seed)
    # real keys are one-sided (a large shared component): imitate that
    return (rng.standard_normal((L, KVH, N, D)) + 3.0 * rng.standard_normal((1, KVH, 1, D))).astype(np.float32)


def test_flat_is_exact_top_k_with_exact_logits(tmp_path):
    keys = _keys()
    q = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 5, 16)).astype(np.float32))
    _build("flat", keys, tmp_path)
    idx = kind("flat").open(tmp_path, 1, keys[1])
    ids, scores = idx.search(q, 10)
    full = torch.einsum("hmd,hnd->hmn", q, torch.from_numpy(keys[1]))
    want = full.topk(10, dim=-1).indices
    for h in range(2):
        for m in range(5):
            assert set(ids[h, m].tolist()) == set(want[h, m].tolist())
    torch.testing.assert_close(scores, torch.gather(full, 2, ids))


def test_hnsw_on_centred_keys_finds_the_exact_top_k_and_logits(tmp_path):
    keys = _keys()
    _build("hnsw", keys, tmp_path)
    idx = kind("hnsw").open(tmp_path, 0, keys[0], ef=300)
    q = torch.from_numpy(np.random.default_rng(2).standard_normal((2, 7, 16)).astype(np.float32))
    ids, scores = idx.search(q, 10)
    full = torch.einsum("hmd,hnd->hmn", q, torch.from_numpy(keys[0]))
    want = full.topk(10, dim=-1).indices
    recall = np.mean([len(set(ids[h, m].tolist()) & set(want[h, m].tolist())) / 10
                      for h in range(2) for m in range(7)])
    assert recall >= 0.95  # ef=300 on 300 keys: the graph search is near exhaustive
    # the logits come back exact although the graph holds centred keys
    torch.testing.assert_close(scores, torch.gather(full, 2, ids), rtol=1e-4, atol=1e-4)


def test_kinds_are_one_registry():
    """Every kind validates in one place; an unknown one is a usage error naming the choices."""
    assert set(KINDS) == {"flat", "exact", "hnsw", "graph", "cluster"} and kind("graph").format == ".v2"
    with pytest.raises(UsageError, match="flat, exact, hnsw, graph, cluster"):
        kind("ivf")


def _graph(tmp_path, keys16, queries):
    _build("graph", keys16, tmp_path, queries)
    return [kind("graph").open(tmp_path, l, keys16[l]) for l in range(keys16.shape[0])]


def test_graph_with_k_covering_every_key_is_exact(tmp_path):
    """k = N: the best-first search must reach every key (positional links make the graph
    connected) and return exact fp16 logits, so retrieval attention equals full attention."""
    keys16 = _keys(N=500).astype(np.float16)
    queries = np.random.default_rng(3).standard_normal((2, 2, 64, 16)).astype(np.float32)  # [L, KVH, m, D]
    idx = _graph(tmp_path, keys16, queries)
    q = torch.from_numpy(np.random.default_rng(4).standard_normal((2, 6, 16)).astype(np.float32))
    ids, scores = idx[1].search(q, 500)
    full = torch.einsum("hmd,hnd->hmn", q, torch.from_numpy(keys16[1].astype(np.float32)))
    for h in range(2):
        for m in range(6):
            assert sorted(ids[h, m].tolist()) == list(range(500))
    torch.testing.assert_close(scores, torch.gather(full, 2, ids), rtol=1e-5, atol=1e-5)
    # files are memory-mapped, not read whole: the layer's graph is a view of graph.npy
    assert isinstance(np.load(tmp_path / "graph.npy", mmap_mode="r"), np.memmap)


def test_graph_finds_the_top_k_of_queries_like_its_build_queries(tmp_path):
    """Queries drawn like the build queries: a small search finds most of the exact top-10."""
    rng = np.random.default_rng(5)
    keys16 = _keys(L=1, N=2000).astype(np.float16)
    centres = rng.standard_normal((1, 2, 8, 16)).astype(np.float32) * 3
    def draw(n):  # queries cluster around a few directions, as attention queries do
        return centres[:, :, rng.integers(0, 8, n)] + rng.standard_normal((1, 2, n, 16)).astype(np.float32)
    idx = _graph(tmp_path, keys16, draw(400))[0]
    idx.ef = 64
    q = torch.from_numpy(draw(20)[0])
    ids, scores = idx.search(q, 10)
    full = torch.einsum("hmd,hnd->hmn", q, torch.from_numpy(keys16[0].astype(np.float32)))
    want = full.topk(10, dim=-1).indices
    recall = np.mean([len(set(ids[h, m].tolist()) & set(want[h, m].tolist())) / 10
                      for h in range(2) for m in range(20)])
    assert recall >= 0.9
    assert idx.scanned / idx.searched < 0.5 * 2000  # and it did not score every key
    torch.testing.assert_close(scores, torch.gather(full, 2, ids), rtol=1e-5, atol=1e-5)


def test_graph_refuses_a_float32_store(tmp_path):
    import pytest

    keys = _keys(N=200)
    queries = np.zeros((2, 2, 8, 16), np.float32)
    with pytest.raises(ValueError, match="fp16"):
        _graph(tmp_path, keys, queries)


def test_packed_ids_round_trip():
    """The graph files keep ids in 3 bytes: every id a head can hold, and 'none', come back."""
    from core.graph import pack_ids, unpack_ids

    ids = np.array([[0, 1, 255, 256, 65535, 65536], [2**24 - 2, -1, 7, -1, 123456, 9]], np.int32)
    packed = pack_ids(ids)
    assert packed.dtype == np.uint8 and packed.shape == (2, 6, 3)
    assert (unpack_ids(packed) == ids).all()
    with pytest.raises(ValueError):
        pack_ids(np.array([2**24 - 1]))
