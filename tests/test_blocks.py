"""--step-dtype blocks (core/blocks.py): fp32 weights that are a GGUF's 4/8-bit blocks, read as
blocks by the decode steps. The recovery must be exact or refuse; the kernel must equal the plain
product over the dequantized weights; the answers must equal fp32 full attention's."""
import numpy as np
import pytest
import torch

from conftest import book_text
from core.blocks import BlockLinear, block_copy, find_blocks, kernel_form, pack4, reference_linear, unpack4
from core.documents import Document
from core.engine import AnswerStats, Engine, Settings
from core.errors import UsageError

QUESTION = "Who is in the story? Answer briefly."


def q4_weights(N, K, seed=0):
    """Weights as a Q4_1 GGUF's dequantization makes them: fp32(d * q + m), d and m fp16 values,
    each block's q spanning 0..15 (the quantizer maps a block's range onto it)."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (N, K // 32, 32)).astype(np.float32)
    q[..., 0], q[..., 1] = 0, 15
    d = (rng.random((N, K // 32)) * 0.01 + 1e-4).astype(np.float16).astype(np.float32)
    m = (-rng.random((N, K // 32)) * 0.05).astype(np.float16).astype(np.float32)
    return (d[..., None] * q + m[..., None]).astype(np.float32).reshape(N, K)


def q8_weights(N, K, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.integers(-127, 128, (N, K // 32, 32)).astype(np.float32)
    q[..., 0] = 127
    d = (rng.random((N, K // 32)) * 0.01 + 1e-4).astype(np.float16).astype(np.float32)
    return (d[..., None] * q).astype(np.float32).reshape(N, K)


@pytest.mark.parametrize("make,dtype", [(q4_weights, np.uint8), (q8_weights, np.int8)])
def test_blocks_are_found_exactly_or_not_at_all(make, dtype):
    w = make(37, 96)
    q, d, m = find_blocks(w)
    assert q.dtype == dtype and d.shape == m.shape == (37, 3)
    back = (q.astype(np.float32).reshape(37, 3, 32) * d[..., None] + m[..., None]).reshape(37, 96)
    assert np.array_equal(back, w)
    off = w.copy()
    off[5, 40] = np.nextafter(off[5, 40], np.float32(1))  # one weight one ulp off the grid
    assert find_blocks(off) is None
    assert find_blocks(np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)) is None  # plain fp32
    assert find_blocks(w[:, :90].copy()) is None  # rows not a whole number of blocks
    if make is q4_weights:  # a block moved off the fp16 grid of offsets (its m is no fp16 value)
        shifted = w.copy()
        shifted[0, :32] += np.float32(0.000123457)
        assert find_blocks(shifted) is None


def test_four_bit_weights_pack_two_to_a_byte_in_the_gguf_order():
    q = np.random.default_rng(0).integers(0, 16, (5, 64)).astype(np.uint8)
    p = pack4(q)
    assert p.shape == (5, 32) and np.array_equal(unpack4(p), q)
    assert p[2, 3] == q[2, 3] | (q[2, 19] << 4) and p[2, 16 + 3] == q[2, 35] | (q[2, 51] << 4)


@pytest.mark.parametrize("make", [q4_weights, q8_weights])
@pytest.mark.parametrize("N", [1, 6, 37, 256])
def test_block_linear_equals_the_plain_product(make, N):
    """The kernels (Q4 packed, Q8; four rows at a time, the rows padded to a multiple of four)
    against F.linear over the dequantized weights, for one row and for several (the question's
    tokens go row by row)."""
    w = make(N, 160, seed=N)
    q, d, m = find_blocks(w)
    bias = torch.randn(N)
    lin = BlockLinear(kernel_form(q, d, m), bias=bias)
    for shape in [(1, 1, 160), (1, 5, 160)]:
        x = torch.randn(*shape)
        want = reference_linear(x, q, d, m, bias)
        torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(want, torch.nn.functional.linear(x, torch.from_numpy(w), bias), rtol=0, atol=0)


def test_block_steps_answer_as_fp32_full_attention(smol, tmp_path):
    """Every linear layer of the embedded model (a Q4_1/Q8_0 GGUF) is found as blocks; the steps on
    them give the logits of fp32 full attention (through transformers' own cache) within fp32
    rounding, and the same greedy answer."""
    model, tok, identity = smol
    copy_, done, total = block_copy(model)
    assert done == total == model.config.num_hidden_layers * 7 + 1  # q, k, v, o, gate, up, down; the head
    assert isinstance(copy_.lm_head, BlockLinear) and not isinstance(model.lm_head, BlockLinear)
    assert copy_.model.embed_tokens.weight is model.model.embed_tokens.weight  # shared, not copied

    doc = Document(text=book_text(3000), name="alice-part", kind="text")
    s = Settings(sink=16, recent=32, max_tokens=6, index="exact", step_dtype="blocks")
    engine = Engine(tmp_path, s, loaded=(model, tok, identity))
    logits = []
    "".join(engine.ask(engine.prepare(doc), QUESTION, AnswerStats(), on_logits=lambda l: logits.append(l.clone())))
    full = []
    "".join(engine.ask(engine.prepare(doc, s.but(attention="full")), QUESTION, AnswerStats(),
                       on_logits=lambda l: full.append(l.clone())))
    assert isinstance(engine.step_model(s).lm_head, BlockLinear)  # the steps above ran on the blocks
    ra, full = torch.stack(logits), torch.stack(full)
    assert len(ra) == 6
    torch.testing.assert_close(ra, full, rtol=0, atol=5e-4)
    assert ra.argmax(-1).tolist() == full.argmax(-1).tolist()


def test_blocks_are_kept_on_disk_and_a_bad_file_is_made_again(smol, tmp_path):
    model, _, _ = smol
    kept = tmp_path / "ra-blocks.safetensors"
    first, n, _ = block_copy(model, kept)
    assert kept.exists() and n > 0
    again, n2, _ = block_copy(model, kept)  # read back, not searched
    assert n2 == n and np.array_equal(again.lm_head.blocks["q8"], first.lm_head.blocks["q8"])
    kept.write_bytes(kept.read_bytes()[:1000])  # torn
    third, n3, _ = block_copy(model, kept)
    assert n3 == n and np.array_equal(third.model.layers[3].mlp.up_proj.blocks["q4"], first.model.layers[3].mlp.up_proj.blocks["q4"])
    assert kept.stat().st_size > 1000  # written again
    from safetensors.numpy import save_file
    save_file({"lm_head.q": first.lm_head.blocks["q8"], "lm_head.d": np.ones((1, 1), np.float32)}, str(kept))
    fourth, n4, _ = block_copy(model, kept)  # an older layout: not read, made again
    assert n4 == n and np.array_equal(fourth.lm_head.blocks["q8"], first.lm_head.blocks["q8"])


def test_blocks_refused_off_the_cpu_float32_path(smol, tmp_path):
    model, tok, identity = smol
    with pytest.raises(UsageError, match="blocks"):
        Engine(tmp_path, Settings(step_dtype="blocks", dtype="bfloat16", device="cpu"))
    assert Settings(step_dtype="blocks").check()
    with pytest.raises(UsageError):
        Settings(step_dtype="q4").check()


def test_auto_steps_on_blocks_for_a_gguf_on_the_cpu(ra_home):
    """The default (`auto`) for the embedded GGUF on the CPU: block steps, the blocks found once
    (a notice says so) and kept beside the conversion, read back by the next engine; the logits
    equal float32 steps' within fp32 rounding."""
    from core.model import converted_dir, resolve

    doc = Document(text=book_text(2000), name="alice-part", kind="text")
    notices = []
    engine = Engine(ra_home, Settings(sink=16, recent=32, max_tokens=4, index="exact"), notice=notices.append)
    assert engine.step_dtype == "blocks"
    kept = converted_dir(resolve(None), ra_home / "models") / "ra-blocks.safetensors"
    kept.unlink(missing_ok=True)
    p = engine.prepare(doc)
    got, want = [], []
    "".join(engine.ask(p, QUESTION, on_logits=lambda l: got.append(l.clone())))
    assert kept.exists() and sum("weight blocks" in n for n in notices) == 1
    fp32 = Engine(ra_home, Settings(sink=16, recent=32, max_tokens=4, index="exact", step_dtype="float32"),
                  loaded=(engine.model, engine.tokenizer, engine.ref.identity))
    "".join(fp32.ask(fp32.prepare(doc), QUESTION, on_logits=lambda l: want.append(l.clone())))
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=0, atol=5e-4)
    notices.clear()
    again = Engine(ra_home, Settings(sink=16, recent=32, max_tokens=4, index="exact"), notice=notices.append)
    assert isinstance(again.step_model(again.settings).lm_head, BlockLinear) and not notices  # read, not searched


def test_a_ctrl_c_during_a_kernels_first_call_is_delivered_after_it():
    """core/jit.signals_held: numba loads a kernel through ctypes callbacks that drop exceptions, so
    a SIGINT arriving then is held and raised as KeyboardInterrupt once the call returns."""
    import os
    import signal

    from core.jit import signals_held

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job starts with SIGINT ignored
    try:
        reached_end = False
        with pytest.raises(KeyboardInterrupt):
            with signals_held():
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):  # the handler has run by now (it only records)
                    pass
                reached_end = True
        assert reached_end
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with signals_held():  # an ignored SIGINT stays ignored
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, before)
