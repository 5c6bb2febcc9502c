"""core/attention_f16: attention over fp16 K/V read as stored, against the naive reference over
the same values widened by torch (its own conversion and arithmetic)."""
import numpy as np
import pytest
import torch

from core.attention import partial_attention
from core.attention_f16 import SLICE, attention_f16


@pytest.mark.parametrize("N,G,T", [(1, 3, 1), (7, 3, 1), (SLICE, 4, 1), (SLICE + 1, 3, 2), (2 * SLICE + 517, 3, 1)])
def test_fp16_attention_equals_the_reference(N, G, T):
    g = torch.Generator().manual_seed(N)
    KVH, D = 3, 64
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
