"""`ra plan`'s arithmetic (core/plan.py) against tensors actually allocated for small models, and
the command itself on the Llama-3.1-8B config (no weights, no torch import)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from typer.testing import CliRunner

from conftest import ROOT
from core.attention import register
from core.generation import QueryCapture, prefill_layerwise
from core.outbox import Outbox
from core.plan import PlanInput, Shape, parse_size, plan, read_shape
from ra_cli.main import app

# the Llama-3.1-8B config.json (../shared/data/configs/llama-3.1-8b/), kept here so a clone without
# ../shared tests the same numbers
LLAMA_8B = ROOT / "tests" / "data" / "llama-3.1-8b-config.json"


def _tiny(cls, cfg_cls, tied):
    register()
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=211, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=tied, max_position_embeddings=1024, attn_implementation="ra")
    return cls(cfg).eval(), cfg


@pytest.mark.parametrize("cls, cfg_cls, tied", [(LlamaForCausalLM, LlamaConfig, False),
                                                (Qwen2ForCausalLM, Qwen2Config, True)])
def test_plan_counts_what_the_model_allocates(cls, cfg_cls, tied):
    model, cfg = _tiny(cls, cfg_cls, tied)
    shape = Shape.from_config(cfg.to_dict())
    assert shape.params() == sum(p.numel() for p in model.parameters())  # biases and tied heads included
    n = 97
    cache = DynamicCache(config=cfg)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 211, (1, n)), cache=cache, use_cache=True)
    held = sum(l.keys.nbytes + l.values.nbytes for l in cache.layers)
    assert shape.kv_per_token(4) * n == held
    # the layer-by-layer prefill holds every token's hidden state and one layer's K/V
    p = plan(shape, PlanInput(n, dtype_bytes=4, chunk=32))["retrieval"]
    hidden = model.base_model.embed_tokens(torch.zeros(1, n, dtype=torch.long))
    assert p["prefill_hidden_bytes"] == hidden.nbytes
    seen = []
    prefill_layerwise(model, np.zeros(n, np.int64), 32, lambda layer, start, k, v: seen.append(k.nbytes + v.nbytes))
    assert p["prefill_layer_kv_bytes"] == sum(seen) // cfg.num_hidden_layers
    # what is on its way to the host at once: the engine's query samples, the Outbox's ring (deferred
    # on the CPU as on a GPU), K/V in the store dtype (fp16 here, as the plan's store_bytes)
    box = Outbox("cpu", defer=True)
    samples = max(PlanInput(n).query_samples, n // 25)
    q_pos = np.unique(np.linspace(0, n - 1, num=min(samples, n)).astype(np.int64))
    prefill_layerwise(model, np.zeros(n, np.int64), 32, lambda *a: None,
                      QueryCapture(q_pos, lambda *a: None, box), store_dtype=torch.float16, outbox=box)
    one_row = 2 * cfg.num_attention_heads * shape.head_dim * 4  # a query position per chunk: the plan's margin
    assert p["prefill_copy_out_bytes"] - one_row <= box.peak_bytes <= p["prefill_copy_out_bytes"]


def test_plan_of_the_embedded_model_reads_the_gguf(smol):
    model, _, _ = smol
    _, shape = read_shape(None)
    assert shape.params() == sum(p.numel() for p in model.parameters())
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (30, 3, 64)


def test_llama_8b_at_128k_fits_24gib_only_with_retrieval():
    r = CliRunner().invoke(app, ["plan", str(LLAMA_8B), "--tokens", "131072", "--gpu-memory", "24GiB", "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.output)
    assert p["retrieval"]["fits"] and not p["full"]["fits"]
    assert p["retrieval"]["peak_bytes"] < 24 * 2**30 < p["full"]["peak_bytes"]
    assert p["full"]["kv_bytes"] > 16 * 2**30 and p["retrieval"]["weights_bytes"] > 14 * 2**30  # bf16, 8.03B
    human = CliRunner().invoke(app, ["plan", str(LLAMA_8B), "--tokens", "131072", "--gpu-memory", "24GiB"])
    assert "DOES NOT FIT" in human.output and "fits" in human.output


def test_plan_does_not_import_torch():
    code = (f"import sys, runpy; sys.argv=['ra','plan',{str(LLAMA_8B)!r},'--tokens','1000','--json']\n"
            "try:\n    runpy.run_module('ra_cli.main', run_name='__main__')\nexcept SystemExit: pass\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] == 1000


@pytest.mark.parametrize("args, msg", [
    (["plan", "--tokens", "10", "/nonexistent/config.json"], "no such file"),
    (["plan", "--tokens", "10", "--gpu-memory", "lots"], "not a size"),
    (["plan", "--tokens", "10", "--dtype", "int3"], "--dtype"),
])
def test_plan_bad_input_is_one_line(args, msg, tmp_path):
    r = subprocess.run([sys.executable, "-m", "ra_cli.main", *args], capture_output=True, text=True, cwd=ROOT,
                       env={"RA_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_sizes_parse():
    assert parse_size("24GiB") == 24 * 2**30 and parse_size("80GB") == 80 * 10**9 and parse_size("512M") == 512 * 10**6
    assert parse_size("1000") == 1000 and parse_size("1.5 TiB") == int(1.5 * 2**40)


def test_refusal_names_the_numbers_and_the_way_out():
    from core.plan import refusal

    _, shape = read_shape(str(LLAMA_8B))
    p = plan(shape, PlanInput(131072))
    assert refusal(p, "retrieval", 24 * 2**30) is None
    why = refusal(p, "full", 24 * 2**30)
    assert "131,072 tokens need about 31.2 GiB" in why and "retrieval attention would need 20.1 GiB" in why
    assert "retrieval attention would" not in (refusal(p, "full", 10 * 2**30) or "")


def test_plan_of_a_gguf_says_what_converting_it_takes(smol):
    """The conversion's disk is every tensor in the dtype asked for; no torch import for it."""
    from core.model import embedded_gguf

    model = smol[0]
    r = CliRunner().invoke(app, ["plan", str(embedded_gguf()), "--tokens", "1000", "--dtype", "float32", "--json"])
    assert r.exit_code == 0, r.output
    c = json.loads(r.output)["conversion"]
    params = sum(p.numel() for p in model.parameters())  # the embedding counted once (tied)
    assert c["dtype"] == "float32" and c["params"] == params
    assert params * 4 <= c["disk_bytes"] <= params * 4 + (64 << 20)
    assert c["largest_tensor"] < c["params"] and c["host_bytes"] > c["largest_tensor"] * 8
    human = CliRunner().invoke(app, ["plan", str(embedded_gguf()), "--tokens", "1000"])
    assert "first use converts the GGUF to bfloat16" in human.output


def test_plan_host_bytes_of_the_exact_kind_are_what_answering_allocates(smol, tmp_path):
    """`--index exact` converts one layer's offloaded K/V to fp32 at a time for the question (a
    decode step reads the stored fp16): the plan's host bytes equal that conversion's, and
    answering keeps no fp32 copy of the offloaded K/V."""
    from conftest import book_text
    from core.documents import Document
    from core.engine import Engine, Settings

    s = Settings(sink=16, recent=32, max_tokens=2, index="exact")
    engine = Engine(tmp_path, s, loaded=smol)
    p = engine.prepare(Document(text=book_text(1500), name="alice-part", kind="text"))
    "".join(engine.ask(p, "Who is it about?"))
    r = p.retrievers[0]
    one_layer = r.k.float().nbytes + r.v.float().nbytes
    assert not [v for r in p.retrievers for v in vars(r).values() if torch.is_tensor(v) and v.dtype == torch.float32]
    _, shape = read_shape(None)
    want = plan(shape, PlanInput(p.entry.n_tokens, sink=16, recent=32, index="exact"))["retrieval"]["host_index_bytes"]
    assert one_layer == want > 0


def test_plan_bytes_of_the_device_search_are_what_it_allocates(smol, tmp_path):
    """`flat` on a GPU (core/device.DeviceRetriever, built here on the CPU): the plan's device
    bytes are its fp8 keys of every layer, its host bytes the offloaded K and V it reads rows of,
    and its step workspace holds one layer's keys widened to the score dtype plus a block of
    scores and of its candidates' keys."""
    from conftest import book_text
    from core.device import ROWS, WIDEN, DeviceRetriever
    from core.documents import Document
    from core.engine import Engine, Settings

    s = Settings(sink=16, recent=32, max_tokens=2, index="flat")
    engine = Engine(tmp_path, s, loaded=smol)
    p = engine.prepare(Document(text=book_text(1500), name="alice-part", kind="text"))
    dev = [DeviceRetriever(r.keys, r.values, r.index, r.span, "cpu") for r in p.retrievers]
    _, shape = read_shape(None)
    r = plan(shape, PlanInput(p.entry.n_tokens, sink=16, recent=32, index="flat"))["retrieval"]
    assert r["device_index_bytes"] == sum(d.k8.nbytes for d in dev) > 0
    assert r["host_index_bytes"] == sum(d.host_k.nbytes + d.host_v.nbytes for d in dev)
    KVH, N, D = dev[0].k8.shape
    widened = dev[0].k8.to(torch.bfloat16)
    scores = torch.empty(KVH, ROWS, N, dtype=torch.bfloat16)
    stored = torch.empty(KVH, ROWS, WIDEN * s.top_k, D, dtype=dev[0].host_k.dtype)  # a block's candidate keys as
    candidates = stored.float()                                                      # gathered, then in fp32
    assert r["decode_workspace_bytes"] >= widened.nbytes + scores.nbytes + stored.nbytes + candidates.nbytes
