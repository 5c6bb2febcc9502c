"""core/attention_f16: attention over fp16 K/V read as stored, against the naive reference over
the same values widened by torch (its own conversion and arithmetic)."""
import numpy as np
import pytest
import torch

from core.attention import partial_attention
from core.attention_f16 import SLICE, attention_f16


@pytest.mark.parametrize("N,G,T,D", [(1, 3, 1, 64), (7, 3, 1, 128), (SLICE, 4, 1, 64), (SLICE + 1, 3, 2, 48),
                                     (2 * SLICE + 517, 3, 1, 128)])
def test_fp16_attention_equals_the_reference(N, G, T, D):
    """Head sizes 64 and 128 (compiled as constants) and 48 (any other size)."""
    g = torch.Generator().manual_seed(N)
    KVH = 3
    k = (torch.randn(KVH, N, D, generator=g) * 3).half()
    v = torch.randn(KVH, N, D, generator=g).half()
    special = torch.tensor([0.0, -0.0, 6e-8, -6e-8, 3e-5, -1e-6, 65504.0 / 1e3, -2.0]).half()  # zeros, subnormals
    k[0, 0, :8], v[-1, N - 1, :8] = special, special
    q = torch.randn(KVH, G, T, D, generator=g)
    o, lse, logits = attention_f16(q, k.numpy(), v.numpy(), 0.125, keep_logits=True)
    want_o, want_lse = partial_attention(q, k.float()[:, None], v.float()[:, None], 0.125)
    torch.testing.assert_close(o, want_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    want_logits = (q.reshape(KVH, G * T, D) @ k.float().transpose(1, 2))  # unscaled
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-4)
    o2, lse2, none = attention_f16(q, k.numpy(), v.numpy(), 0.125)
    assert none is None and torch.equal(o2, o) and torch.equal(lse2, lse)


def test_fp16_widening_is_exact_for_every_finite_value():
    """Every finite fp16 bit pattern, as a key against a one-hot query: the logit is the value."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    vals = bits.view(np.float16)
    finite = bits[np.isfinite(vals)]
    n = len(finite)
    k = np.zeros((1, n, 2), np.float16)
    k[0, :, 0] = finite.view(np.float16)
    v = np.zeros((1, n, 2), np.float16)
    q = torch.tensor([[[[1.0, 0.0]]]])
    _, _, logits = attention_f16(q, k, v, 1.0, keep_logits=True)
    assert torch.equal(logits[0, 0], torch.from_numpy(k[0, :, 0].astype(np.float32)))


def test_the_kernels_exp_is_within_a_few_ulp_of_the_exact_value():
    """core/jit.exp_f32 (the softmax's exp inside the kernel) against float64 exp, over the
    arguments a softmax gives it (a logit minus its row's largest: <= 0)."""
    from numba import njit

    from core.jit import exp_f32

    @njit
    def each(x, out):
        for i in range(x.shape[0]):
            out[i] = exp_f32(x[i])

    x = np.concatenate([np.linspace(-100, 0, 1_000_001), [0.0, -1e-30, -87.3, -87.31]]).astype(np.float32)
    got = np.empty_like(x)
    each(x, got)
    want = np.exp(x.astype(np.float64))
    normal = x >= np.float32(-87.3)
    assert np.max(np.abs(got[normal] - want[normal]) / want[normal]) < 4e-7  # ~3 ulp
    assert got[-4] == 1.0 and np.all(got[~normal] == 0)


@pytest.mark.parametrize("N,n_new,start,D", [(1, 1, 1, 64), (SLICE, 5, 640, 128), (SLICE + 1, SLICE + 3, 7, 64),
                                             (2 * SLICE + 517, 1, 3, 80)])
def test_one_kernel_step_equals_the_reference(N, n_new, start, D):
    """step_attention: the document's fp16 rows and the fp32 rows after it (at an offset in a
    larger buffer, as StaticKV holds them) in one softmax, against the reference over the two
    concatenated (widened by torch)."""
    from core.attention_f16 import rows, step_attention

    g = torch.Generator().manual_seed(N + n_new)
    KVH, G = 3, 3
    k = (torch.randn(KVH, N, D, generator=g) * 3).half()
    v = torch.randn(KVH, N, D, generator=g).half()
    buf_k = torch.randn(KVH, start + n_new + 4, D, generator=g) * 3  # rows past start + n_new: not read
    buf_v = torch.randn(KVH, start + n_new + 4, D, generator=g)
    q = torch.randn(KVH, G, 1, D, generator=g)
    o, lse = step_attention(q, rows(k.numpy()), rows(v.numpy()), (buf_k.numpy(), start), (buf_v.numpy(), start), n_new, 0.125)
    k_all = torch.cat([k.float(), buf_k[:, start:start + n_new]], 1)[:, None]
    v_all = torch.cat([v.float(), buf_v[:, start:start + n_new]], 1)[:, None]
    want_o, want_lse = partial_attention(q, k_all, v_all, 0.125)
    torch.testing.assert_close(o, want_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    logits = torch.empty(KVH, G, N)  # a tally's buffer: the document rows' logits
    o2, lse2 = step_attention(q, rows(k.numpy()), rows(v.numpy()), (buf_k.numpy(), start), (buf_v.numpy(), start),
                              n_new, 0.125, logits)
    assert torch.equal(o2, o) and torch.equal(lse2, lse)
    torch.testing.assert_close(logits, (q[:, :, 0] @ k.float().transpose(1, 2)), rtol=1e-5, atol=1e-4)


def test_a_documents_exact_step_in_one_kernel_equals_its_parts_and_the_reference():
    """DocumentLayer over the `exact` kind, laid out as the engine lays out a store: the layer's
    whole fp16 K/V, rows a..b offloaded, the rest static (widened), then a question and a step.
    The one-kernel step (whole_step, the default) and the parts merged (whole_step=False) both
    equal the naive reference over every key in float64."""
    from core.attention import reference_attention
    from core.index import ExactLayerIndex
    from core.layer import DocumentLayer, ExactPositions, Retriever, StaticKV

    g = torch.Generator().manual_seed(5)
    KVH, G, D, N, a, b, T = 3, 3, 64, 1500, 16, 1468, 4
    k = (torch.randn(KVH, N, D, generator=g) * 3).half().numpy()
    v = torch.randn(KVH, N, D, generator=g).half().numpy()
    new_k, new_v = torch.randn(1, KVH, T + 1, D, generator=g), torch.randn(1, KVH, T + 1, D, generator=g)
    q = torch.randn(1, KVH * G, 1, D, generator=g)
    outs = []
    for whole in (True, False):
        static = StaticKV(torch.from_numpy(np.concatenate([k[:, :a], k[:, b:]], 1)).float()[None],
                          torch.from_numpy(np.concatenate([v[:, :a], v[:, b:]], 1)).float()[None], N - (b - a) + T + 1)
        retriever = Retriever(k, v, ExactLayerIndex(torch.from_numpy(k[:, a:b])), span=(a, b))
        layer = DocumentLayer(static, retriever, ExactPositions(), 100, N, whole_step=whole)
        layer.update(new_k[:, :, :T], new_v[:, :, :T])  # the question (several tokens: the parts)
        key, value = layer.update(new_k[:, :, T:], new_v[:, :, T:])  # one answer token
        outs.append(layer.attend(q, key, value, 0.125))
        assert (retriever._doc is not None) == whole  # the one-kernel step ran only where asked
    k_all = torch.cat([torch.from_numpy(k).double(), new_k[0].double()], 1)[:, None]
    v_all = torch.cat([torch.from_numpy(v).double(), new_v[0].double()], 1)[:, None]
    ref = reference_attention(q[0].double().reshape(KVH, G, 1, D), k_all, v_all, 0.125)  # every key visible
    for out in outs:
        torch.testing.assert_close(out[0].transpose(0, 1).reshape(KVH, G, 1, D).double(), ref, rtol=1e-5, atol=1e-5)
