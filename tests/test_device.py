"""The offloaded zone searched on the compute device (core/device.py), checked on the CPU (the same
code with the device being the CPU) against independent arithmetic and against full attention;
on CUDA (skipped without it) the GPU's retriever against the CPU's."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import book_text
from core.device import FP8_MAX, DeviceRetriever, scoring_keys
from core.documents import Document
from core.engine import AnswerStats, Engine, Settings
from core.index import FlatLayerIndex

QUESTION = "Where did the White Rabbit go?"


def _keys(KVH=2, N=600, D=16, seed=0):
    g = np.random.default_rng(seed)
    k = (g.standard_normal((KVH, N, D)) * np.array([1.0, 7.0])[:KVH, None, None]).astype(np.float16)
    v = g.standard_normal((KVH, N, D)).astype(np.float16)
    return k, v


def test_scoring_keys_round_each_head_to_fp8():
    """keys ~= fp8 * scale: each head's largest |key| maps to e4m3's largest value, and every key
    is within e4m3's rounding (3 mantissa bits: half an ulp is 1/16 of the value) of its own."""
    k, _ = _keys()
    k8, s = scoring_keys(torch.from_numpy(k), "cpu")
    assert k8.dtype == torch.float8_e4m3fn and s.shape == (2, 1, 1)
    k64 = k.astype(np.float64)
    for h in range(2):
        assert abs(float(s[h]) * FP8_MAX - np.abs(k64[h]).max()) < 1e-6 * np.abs(k64[h]).max()
    back = k8.double().numpy() * s.double().numpy()
    err = np.abs(back - k64)
    tiny = s.double().numpy() * 2.0 ** -9  # e4m3's subnormal step, scaled
    assert (err <= np.abs(k64) / 16 + tiny).all()
    assert err.max() > 0  # it does round (the converse of a no-op)


def test_device_zones_hold_the_exact_top_k_with_exact_logits():
    """The zone, found through fp8 scores in bf16 (as on a GPU), is the exact top-k (float64
    scores written out here) with the exact q.k as logits, over more query rows than one block
    (ROWS); without the widened candidates (widen=1) the rounding drops top-k keys."""
    from core.device import ROWS

    k, v = _keys(N=2000, D=32, seed=1)
    r = DeviceRetriever(k, v, FlatLayerIndex(k), device="cpu")
    M = ROWS + 7
    q = torch.randn(2, M, 32, generator=torch.Generator().manual_seed(2))
    z = r.zones(q, 50, 1.0)
    assert z.ids.shape == (2, M, 50) and z.estimate is None
    k64, q64 = k.astype(np.float64), q.double().numpy()
    top = np.argsort(-np.einsum("hnd,hmd->hmn", k64, q64), -1)[..., :50]  # [2, M, 50]
    for h in range(2):
        for m in range(M):
            got = z.ids[h, m].tolist()
            assert set(top[h, m].tolist()) == set(got), (h, m)
            np.testing.assert_allclose(z.scores[h, m].double().numpy(), k64[h, got] @ q64[h, m], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(r.gather_values(z.ids)[1, 3].numpy(), v[1, z.ids[1, 3].numpy()].astype(np.float32))
    narrow = DeviceRetriever(k, v, FlatLayerIndex(k), device="cpu", widen=1).zones(q, 50, 1.0)
    missed = sum(len(set(top[h, m].tolist()) - set(narrow.ids[h, m].tolist())) for h in range(2) for m in range(M))
    assert missed > 0
    pads = torch.tensor([[[-1, 4]], [[7, -1]]])  # -1: a pad, read as row 0 (Retriever's contract)
    want = np.stack([k[0, [0, 4]], k[1, [7, 0]]])[:, None].astype(np.float32)  # [2, 1, 2, D]
    np.testing.assert_array_equal(r.gather_keys(pads).numpy(), want)


def test_device_retrieval_with_every_key_equals_full_attention(smol, tmp_path):
    """The whole pipeline with the device's retriever (k covering every offloaded key) answers
    with full attention's logits over the same store."""
    model, tok, identity = smol
    doc = Document(text=book_text(3000), name="alice-part", kind="text")
    s = Settings(sink=16, recent=32, top_k=10**6, max_tokens=5, index="flat")
    engine = Engine(tmp_path, s, loaded=(model, tok, identity))
    p = engine.prepare(doc)
    on_device = tuple(DeviceRetriever(r.keys, r.values, r.index, r.span, "cpu") for r in p.retrievers)
    ra = _answer_logits(engine, replace(p, retrievers=on_device))
    full = _answer_logits(engine, engine.prepare(doc, s.but(attention="full")))
    torch.testing.assert_close(ra, full, rtol=0, atol=5e-4)


def test_device_retrieval_at_top_k_answers_as_the_host_flat_index(smol, tmp_path):
    """At a small k the device's zone (the best k of 2k candidates by fp8 score) is the host
    flat index's exact top-k, so its answer is the flat index's, token for token."""
    model, tok, identity = smol
    doc = Document(text=book_text(3000), name="alice-part", kind="text")
    s = Settings(sink=16, recent=32, top_k=20, max_tokens=8, index="flat")
    engine = Engine(tmp_path, s, loaded=(model, tok, identity))
    p = engine.prepare(doc)
    on_device = tuple(DeviceRetriever(r.keys, r.values, r.index, r.span, "cpu") for r in p.retrievers)
    host, dev = AnswerStats(), AnswerStats()
    "".join(engine.ask(p, QUESTION, host))
    "".join(engine.ask(replace(p, retrievers=on_device), QUESTION, dev))
    assert dev.answer_ids == host.answer_ids


def _answer_logits(engine, prepared):
    logits = []
    "".join(engine.ask(prepared, QUESTION, AnswerStats(), on_logits=lambda l: logits.append(l.clone())))
    return torch.stack(logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_retriever_equals_the_cpu_one():
    """On a GPU: the pinned pages read through the UVA view (and, without it, the host gather)
    give the CPU retriever's ids, logits and values."""
    k, v = _keys(N=3000, D=64, seed=3)
    cpu = DeviceRetriever(k, v, FlatLayerIndex(k), device="cpu")
    gpu = DeviceRetriever(k, v, FlatLayerIndex(k), device="cuda")
    q = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(4))
    assert gpu.uva  # pinned pages read in place (gpu_check prints it as uva_gather)
    a, b = cpu.zones(q, 30, 1.0), gpu.zones(q.cuda(), 30, 1.0)
    k64, q64 = k.astype(np.float64), q.double().numpy()
    for h in range(2):
        for m in range(4):
            exact = k64[h] @ q64[h, m]
            got = b.ids[h, m].cpu().numpy()
            assert set(np.argsort(-exact)[:30].tolist()) == set(got.tolist())
            np.testing.assert_allclose(b.scores[h, m].double().cpu().numpy(), exact[got], rtol=1e-5, atol=1e-4)
    ids = a.ids.cuda()
    torch.testing.assert_close(gpu.gather_values(ids).cpu(), cpu.gather_values(a.ids))
    gpu.rows_k = gpu.rows_v = None  # the path without UVA: a host gather and a copy
    torch.testing.assert_close(gpu.gather_values(ids).cpu(), cpu.gather_values(a.ids))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_prepares_of_one_document_share_its_device_retrievers(smol, tmp_path):
    """Opening an open document again with other settings (serve keys its open documents by them)
    holds one copy of the fp8 keys and pinned K/V, not one per prepare."""
    import copy

    model, tok, identity = smol
    engine = Engine(tmp_path, Settings(sink=16, recent=32, index="flat"),
                    loaded=(copy.deepcopy(model).cuda(), tok, identity))
    doc = Document(text=book_text(3000), name="alice-part", kind="text")
    p1 = engine.prepare(doc)
    p2 = engine.prepare(doc, engine.settings.but(top_k=50, max_tokens=9))
    assert isinstance(p1.retrievers[0], DeviceRetriever)
    assert all(a is b for a, b in zip(p1.retrievers, p2.retrievers))
