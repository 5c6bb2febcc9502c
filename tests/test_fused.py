"""core/fused.py: a Llama layer's one-token step as kernel calls. Its small kernels against
transformers' own modules, the whole step against the layer's parts (transformers' layer, the
block linears, the attention partials merged), and every case it must leave to the layer."""
import numpy as np
import pytest
import torch
from conftest import book_text

from core.documents import Document
from core.engine import Engine, Settings
from core.fused import FusedStepLayer, _add_rmsnorm, _rmsnorm, _rope_rows, _silu_mul, fuse_layers
from core.generation import forward
from core.prompt import question_ids

QUESTION = "Who is the story about?"


def test_kernels_equal_transformers_modules(smol):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = smol[0]
    cfg, layer = model.config, model.model.layers[2]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.hidden_size, generator=g) * 3
    h = np.empty(cfg.hidden_size, np.float32)
    _rmsnorm(x.numpy(), layer.input_layernorm.weight.detach().numpy(), np.float32(layer.input_layernorm.variance_epsilon), h)
    torch.testing.assert_close(torch.from_numpy(h), layer.input_layernorm(x[None])[0].detach(), rtol=1e-5, atol=1e-6)
    t = torch.randn(cfg.hidden_size, generator=g)
    xa = x.clone().numpy()
    _add_rmsnorm(xa, t.numpy(), layer.post_attention_layernorm.weight.detach().numpy(), np.float32(1e-5), h)
    torch.testing.assert_close(torch.from_numpy(xa), x + t)
    torch.testing.assert_close(torch.from_numpy(h), layer.post_attention_layernorm((x + t)[None])[0].detach(),
                               rtol=1e-5, atol=1e-6)

    n_q, n_kv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    qkv = torch.randn((n_q + 2 * n_kv) * D, generator=g)
    cos, sin = model.model.rotary_emb(x[None, None], position_ids=torch.tensor([[1234]]))  # [1, 1, D]
    q_out = np.empty((n_q, D), np.float32)
    k_rows, v_rows = np.zeros((n_kv, 5, D), np.float32), np.zeros((n_kv, 5, D), np.float32)
    _rope_rows(qkv.numpy(), cos.reshape(-1).numpy(), sin.reshape(-1).numpy(), n_q, n_kv, q_out, k_rows, v_rows, 3)
    q, k, v = qkv[:n_q * D].view(1, n_q, 1, D), qkv[n_q * D:(n_q + n_kv) * D].view(1, n_kv, 1, D), qkv[(n_q + n_kv) * D:]
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(torch.from_numpy(q_out), q_ref[0, :, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(k_rows[:, 3]), k_ref[0, :, 0], rtol=1e-5, atol=1e-6)
    assert np.array_equal(v_rows[:, 3], v.view(n_kv, D).numpy()) and not k_rows[:, [0, 1, 2, 4]].any()

    gu = torch.randn(2 * 100, generator=g) * 4
    a = np.empty(100, np.float32)
    _silu_mul(gu.numpy(), 100, a)
    torch.testing.assert_close(torch.from_numpy(a), torch.nn.functional.silu(gu[:100]) * gu[100:], rtol=1e-5, atol=1e-6)


def _steps(engine, prepared, step_model, ids, n, whole, capacity, fuse=True, tally=None):
    """The question through the model, then n greedy one-token steps through step_model ->
    (logits [n, V], the static zone's K rows after the steps of layer 5)."""
    cache = engine.build_cache(prepared, capacity=capacity, whole_step=whole, fuse=fuse, tally=tally)
    pos = prepared.entry.n_tokens
    logits = forward(engine.model, cache, ids, pos)
    pos += len(ids)
    out = []
    for _ in range(n):
        logits = forward(step_model, cache, [int(logits.argmax())], pos)
        pos += 1
        out.append(logits.clone())
    st = cache.layers[5].static
    return torch.stack(out), st.k[0, :, st.n0:st.n].clone()


def test_fused_step_equals_the_layers_parts(smol, tmp_path):
    """Eight steps fused (the default) and through transformers' layer with the attention's parts
    merged (whole_step=False, fuse=False), and through the layer with the one-kernel attention
    (fuse=False): the same logits within fp32 rounding, the same tokens, the same K rows kept; an
    answer longer than the cache's capacity grows it on every path."""
    model, tok, identity = smol
    s = Settings(sink=16, recent=32, max_tokens=8, index="exact", step_dtype="blocks")
    engine = Engine(tmp_path, s, loaded=(model, tok, identity))
    prepared = engine.prepare(Document(text=book_text(3000), name="alice-part", kind="text"))
    step = engine.step_model(s)
    fused = [m for m in step.model.layers if isinstance(m, FusedStepLayer)]
    assert len(fused) == model.config.num_hidden_layers  # every layer of the embedded model is Q4 blocks
    ids = question_ids(tok, QUESTION)
    before = fused[0].fused_steps
    a, ka = _steps(engine, prepared, step, ids, 8, True, capacity=len(ids) + 3)
    assert fused[0].fused_steps == before + 8 and fused[-1].fused_steps == fused[0].fused_steps
    b, kb = _steps(engine, prepared, step, ids, 8, False, capacity=len(ids) + 3, fuse=False)
    assert fused[0].fused_steps == before + 8  # transformers' layer, the attention's parts
    torch.testing.assert_close(a, b, rtol=0, atol=2e-4)
    assert a.argmax(-1).tolist() == b.argmax(-1).tolist()
    assert ka.shape[1] == kb.shape[1] == len(ids) + 8
    torch.testing.assert_close(ka, kb, rtol=1e-5, atol=1e-5)
    c, kc = _steps(engine, prepared, step, ids, 8, True, capacity=len(ids) + 3, fuse=False)  # the layer, one-kernel attention
    assert fused[0].fused_steps == before + 8
    torch.testing.assert_close(a, c, rtol=0, atol=2e-4)
    torch.testing.assert_close(ka, kc, rtol=1e-5, atol=1e-5)


def test_other_layers_step_through_their_own_update_and_attend(smol, tmp_path):
    """Flat top-k retrieval and a tally (--sources) are fused too, through the cache layer's own
    update and attend (over `exact` with a tally: the one kernel keeping every document key's
    logit, Tally.record_document): the same logits, tokens and attention mass as transformers'
    layer around the attention's parts (fuse=False, whole_step=False: Tally.record over the static
    rows and the offloaded keys). A question's several tokens run transformers' layer; a model
    whose linear layers are not blocks has nothing fused."""
    model, tok, identity = smol
    assert fuse_layers(model) == 0  # fp32 linear layers: not blocks
    s = Settings(sink=16, recent=32, max_tokens=6, index="flat", top_k=20, step_dtype="blocks")
    engine = Engine(tmp_path, s, loaded=(model, tok, identity))
    doc = Document(text=book_text(2000), name="alice-part", kind="text")
    step = engine.step_model(s)
    layer0 = step.model.layers[0]
    ids = question_ids(tok, QUESTION)
    for prepared in (engine.prepare(doc), engine.prepare(doc, s.but(index="exact"))):
        ta, tb = engine.tally(prepared), engine.tally(prepared)
        n = layer0.fused_steps
        a, ka = _steps(engine, prepared, step, ids, 6, True, capacity=len(ids) + 6, tally=ta)
        assert layer0.fused_steps == n + 6
        b, kb = _steps(engine, prepared, step, ids, 6, False, capacity=len(ids) + 6, fuse=False, tally=tb)
        assert layer0.fused_steps == n + 6
        torch.testing.assert_close(a, b, rtol=0, atol=2e-4)
        assert a.argmax(-1).tolist() == b.argmax(-1).tolist()
        torch.testing.assert_close(ka, kb, rtol=1e-5, atol=1e-5)
        ta.finish(), tb.finish()
        assert ta.mass.sum() > 0 and ta.tokens.sum() > 0
        torch.testing.assert_close(ta.mass, tb.mass, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ta.tokens, tb.tokens, rtol=1e-4, atol=1e-6)
    cache = engine.build_cache(prepared, capacity=len(ids) + 2)
    n = layer0.fused_steps
    forward(step, cache, ids, prepared.entry.n_tokens)  # several tokens at once: transformers' layer
    assert layer0.fused_steps == n


@pytest.mark.parametrize("arch", ["qwen2"])
def test_other_families_are_not_fused(arch):
    """Only a plain Llama layer is fused (a Qwen2 layer has q/k/v biases: transformers' layer)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from core.fused import fusable_layer

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    assert not fusable_layer(model.model.layers[0], model.config) and fuse_layers(model) == 0
