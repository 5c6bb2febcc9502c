"""Retrieval attention with the flat index and k covering every offloaded key equals full
attention: the logits of the whole pipeline (chunked prefill -> store on disk -> cache -> answer)
are compared with one plain transformers forward pass over prompt + question + answer."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from conftest import book_text
from core.attention import register
from core.documents import Document
from core.engine import AnswerStats, Engine, Settings
from core.prompt import build_prefix, question_ids

QUESTION = "Where did the White Rabbit go?"


def _tiny(config_cls, vocab):
    register()
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                     attn_implementation="ra")
    return AutoModelForCausalLM.from_config(cfg).eval()


def _answer_logits(engine, prepared):
    logits = []
    stats = AnswerStats()
    "".join(engine.ask(prepared, QUESTION, stats, on_logits=lambda l: logits.append(l.clone())))
    return torch.stack(logits)


def _sdpa_twin(model):
    """The same weights in a model that uses transformers' own SDPA attention, not ra's hook: the
    reference shares no attention code with what it checks."""
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("sdpa")
    assert twin.config._attn_implementation == "sdpa"
    return twin


def _reference_logits(model, tok, doc, n_steps, answer_ids):
    """Plain transformers forward (SDPA, no cache) over the whole sequence."""
    prefix = build_prefix(tok, doc).ids.tolist()
    q = question_ids(tok, QUESTION)
    ids = torch.tensor([prefix + q + answer_ids])
    with torch.no_grad():
        out = _sdpa_twin(model)(input_ids=ids).logits[0]
    first = len(prefix) + len(q) - 1
    return out[first:first + n_steps]


def _check(model, tok, identity, home, n_chars, atol):
    doc = Document(text=book_text(n_chars), name="alice-part", kind="text")
    s = Settings(sink=16, recent=32, chunk_size=100, top_k=10**6, kv_dtype="float32", max_tokens=6, index="flat")
    engine = Engine(home, s, loaded=(model, tok, identity))
    prepared = engine.prepare(doc)
    n = prepared.entry.n_tokens
    assert n % s.chunk_size != 0, "the prefix length must not be a multiple of the chunk size"
    a, b = prepared.split
    assert b - a > 100  # most of the document is offloaded and reached only through the index
    got = _answer_logits(engine, prepared)
    answer = [int(x) for x in got.argmax(-1)]
    ref = _reference_logits(model, tok, doc, len(got), answer)
    print("max |diff|", (got - ref).abs().max().item(), "max |logit|", ref.abs().max().item())
    torch.testing.assert_close(got, ref, rtol=0, atol=atol)
    # and the converse: with k=4 the answer's logits move, so the index really is in the loop
    few = _answer_logits(engine, engine.prepare(doc, s.but(top_k=4)))
    assert (few[0] - ref[0]).abs().max() > 10 * atol
    return engine, prepared


@pytest.mark.parametrize("config_cls", [LlamaConfig, Qwen2Config, MistralConfig])
def test_tiny_random_models_retrieval_equals_full(config_cls, smol, tmp_path):
    _, tok, _ = smol
    model = _tiny(config_cls, len(tok))
    _check(model, tok, f"tiny-{config_cls.__name__}", tmp_path, 3000, atol=1e-5)


def test_smollm2_retrieval_equals_full(smol, tmp_path):
    model, tok, identity = smol
    _check(model, tok, identity, tmp_path, 4000, atol=5e-4)


@pytest.mark.parametrize("index", ["flat", "graph", "cluster", "exact"])
def test_fp16_store_retrieval_equals_full_over_the_same_store(index, smol, tmp_path):
    """With the default fp16 KV store, `--attention full` over the same cached KV is the reference.
    The graph search with k covering every key must reach all of them (positional links); the
    cluster index with k covering every key retrieves every cluster (nothing left to estimate);
    the exact kind attends every key whatever k (here the default 100)."""
    model, tok, identity = smol
    doc = Document(text=book_text(3000), name="alice-part", kind="text")
    s = Settings(sink=16, recent=32, top_k=100 if index == "exact" else 10**6, max_tokens=5, index=index)
    engine = Engine(tmp_path, s, loaded=(model, tok, identity))
    ra = _answer_logits(engine, engine.prepare(doc))
    full = _answer_logits(engine, engine.prepare(doc, s.but(attention="full")))
    print("max |diff|", (ra - full).abs().max().item())
    torch.testing.assert_close(ra, full, rtol=0, atol=5e-4)


def test_bf16_steps_stay_close_to_fp32_full_attention(smol, tmp_path):
    """--step-dtype bfloat16 (core/model.step_copy): the question runs in the weights' fp32, so the
    first logits still equal full attention's; the one-token steps after it run on a bf16 copy of
    the weights, so theirs move by bf16 rounding, and only that much: the greedy answer is the
    same and every logit is within 2% of the largest. The copy shares nothing with the model."""
    from core.model import step_copy

    model, tok, identity = smol
    doc = Document(text=book_text(3000), name="alice-part", kind="text")
    s = Settings(sink=16, recent=32, max_tokens=6, index="exact", step_dtype="bfloat16")
    engine = Engine(tmp_path, s, loaded=(model, tok, identity))
    ra = _answer_logits(engine, engine.prepare(doc))
    full = _answer_logits(engine, engine.prepare(doc, s.but(attention="full")))  # full steps in fp32
    diff = (ra - full).abs().amax(-1)
    print("max |diff| per step", diff.tolist(), "max |logit|", full.abs().max().item())
    assert diff[0] < 5e-4  # the question: fp32 weights
    assert (diff[1:] > 1e-3).all()  # the steps: bf16 weights really ran
    assert (diff[1:] < 0.02 * full.abs().max()).all()
    assert ra.argmax(-1).tolist() == full.argmax(-1).tolist()

    copy_ = step_copy(model, torch.bfloat16)
    assert {p.dtype for p in copy_.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the model itself is untouched
    assert copy_.lm_head.weight is copy_.model.embed_tokens.weight  # SmolLM2's tie kept
    for (name, b), (_, b2) in zip(model.named_buffers(), copy_.named_buffers()):
        assert b.dtype == b2.dtype and torch.equal(b, b2), name  # RoPE's frequencies unchanged


def test_exact_with_sources_answers_as_without(smol, tmp_path):
    """With a tally (sources) the `exact` kind keeps the logits the tally reads (Retriever.
    partial_kept for the question, the one kernel's buffer at a decode step): the same logits
    within fp32 rounding, and the sources come out of it."""
    model, tok, identity = smol
    doc = Document(text=book_text(3000), name="alice-part", kind="text")
    engine = Engine(tmp_path, Settings(sink=16, recent=32, max_tokens=5, index="exact"), loaded=(model, tok, identity))
    prepared = engine.prepare(doc)
    plain = _answer_logits(engine, prepared)
    kept, stats = [], AnswerStats()
    "".join(engine.ask(prepared, QUESTION, stats, on_logits=lambda l: kept.append(l.clone()), sources=3))
    torch.testing.assert_close(torch.stack(kept), plain, rtol=0, atol=1e-4)
    assert len(stats.sources) == 3
