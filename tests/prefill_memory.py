"""Run by tests/test_prefill.py in a fresh process: prefill a document into a store entry's
writer with a tiny random Llama and print the growth of peak resident memory (VmHWM) during the
prefill, in bytes, as JSON.   python tests/prefill_memory.py {plain|layerwise} N_TOKENS OUT_DIR"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.attention import register  # noqa: E402
from core.generation import prefill, prefill_layerwise  # noqa: E402
from core.store import EntryWriter  # noqa: E402

# the shape of the issue: 8 layers, 8 KV heads of 128 dims, a window far past the document
LAYERS, HEADS, DIM = 8, 8, 128


def vm(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def main(kind: str, n: int, out: Path) -> None:
    torch.manual_seed(0)
    register()
    cfg = LlamaConfig(vocab_size=1000, hidden_size=HEADS * DIM, intermediate_size=1024, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, head_dim=DIM,
                      max_position_embeddings=65536, attn_implementation="ra")
    model = LlamaForCausalLM(cfg).eval()
    ids = np.random.default_rng(0).integers(0, 1000, n)
    out.mkdir(parents=True, exist_ok=True)
    w = EntryWriter(out, n, LAYERS, HEADS, HEADS, DIM, "float32", np.arange(0, n, 64))
    run = prefill_layerwise if kind == "layerwise" else prefill
    run(model, ids[:64], 32, lambda *a: None)  # warm up: the libraries' one-off buffers are not the document's
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    before = vm("VmRSS")
    run(model, ids, 512, w.write_kv)
    grew = vm("VmHWM") - before
    w._k.close(), w._v.close()
    print(json.dumps({"grew": grew, "full_kv_fp32": 2 * LAYERS * HEADS * DIM * 4 * n}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
