"""CUDA check of the same engine code: static KV on the GPU, offloaded KV + index on the CPU.

    python benchmarks/gpu_check.py --tokenizer DIR [--tokens 32768] [--layers 32]

1. Exactness on the GPU: a tiny random Llama, fp32 on CUDA, through the whole pipeline (chunked
   prefill -> store -> RaCache), k covering every offloaded key, against one plain
   transformers forward on CUDA; then the same in bf16.
2. Scale: a randomly initialised model with Llama-3.1-8B's shapes (config from
   shared/data/configs; random weights, so answers are noise but timings and memory are real),
   bf16 on the GPU, a document of --tokens tokens: prefill, store size, peak GPU memory, decode
   ms/token for retrieval attention (flat, k=100) vs full attention over the same cached KV.
No weights are downloaded: the tokenizer is SmolLM2's (a local directory), ids fit any vocab.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig  # noqa: E402

from core.attention import register  # noqa: E402
from core.documents import Document  # noqa: E402
from core.engine import AnswerStats, Engine, Settings  # noqa: E402
from core.prompt import build_prefix, question_ids  # noqa: E402

Q = "What did Alice see when she looked down the rabbit hole?"
DEVICE = "cuda"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def reset_peak():
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")


def alice(n_chars: int) -> str:
    text = (ROOT / "sample_docs" / "alice.txt").read_text(encoding="utf-8")
    text = text[text.index("CHAPTER I."):]
    return (text * (1 + n_chars // len(text)))[:n_chars]


def exactness(tok, dtype, atol):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192,
                      attn_implementation="ra")
    model = AutoModelForCausalLM.from_config(cfg).to(DEVICE, dtype).eval()
    doc = Document(text=alice(6000), name="alice", kind="text")
    with tempfile.TemporaryDirectory() as home:
        e = Engine(home, Settings(sink=16, recent=32, chunk_size=300, top_k=10**6, kv_dtype="float32",
                                  max_tokens=5), loaded=(model, tok, f"tiny-{dtype}"))
        p = e.prepare(doc)
        logits = []
        "".join(e.ask(p, Q, AnswerStats(), on_logits=lambda l: logits.append(l.float().clone())))
        got = torch.stack(logits)
        ans = [int(x) for x in got.argmax(-1)]
        ids = torch.tensor([build_prefix(tok, doc).ids.tolist() + question_ids(tok, Q) + ans], device=DEVICE)
        with torch.no_grad():
            ref = model(input_ids=ids).logits[0].float()
        first = ids.shape[1] - len(ans) - 1
        ref = ref[first:first + len(got)]
        diff = (got - ref).abs().max().item()
        layer = e.build_cache(p).layers[0]
        print(f"exactness {str(dtype):15s} tokens={p.entry.n_tokens} static KV on {layer.keys.device}, "
              f"offloaded KV on {layer.retriever.k.device}: max|logit diff|={diff:.2e} (atol {atol}) "
              f"{'OK' if diff <= atol else 'FAIL'}")
        return diff <= atol


def scale(tok, n_tokens: int, layers: int, repeats: int):
    cfg = LlamaConfig.from_dict(json.loads((ROOT / "benchmarks" / "llama-3.1-8b-config.json").read_text()))
    cfg.num_hidden_layers = layers
    cfg._attn_implementation = "ra"
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="ra").eval()
    print(f"random {layers}-layer Llama-3.1-8B-shaped model on GPU in {time.perf_counter() - t:.1f} s, "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params")
    doc = Document(text=alice(int(n_tokens * 3.6)), name="alice-x", kind="text")
    with tempfile.TemporaryDirectory(dir="/tmp") as home:
        s = Settings(chunk_size=4096, max_tokens=32, stop_at_eos=False)
        e = Engine(home, s, loaded=(model, tok, "llama8b-random"))
        reset_peak()
        p = e.prepare(doc)
        n = p.entry.n_tokens
        print(f"document {n:,} tokens: prefill {p.prefill_s:.1f} s ({n / p.prefill_s:,.0f} tok/s incl. store writes), "
              f"flat index {p.index_s:.1f} s, open {p.load_s:.1f} s; store {p.entry.size_bytes() / 2**30:.2f} GiB; "
              f"peak GPU during prefill {peak_gib():.1f} GiB")
        for attention in ("retrieval", "full"):
            pa = e.prepare(doc, s.but(attention=attention))
            best = None
            for _ in range(repeats):
                sync()
                reset_peak()
                st = AnswerStats()
                "".join(e.ask(pa, Q, st))
                sync()
                ms = 1000 * (st.answer_s - st.first_token_s) / (st.answer_tokens - 1)
                best = ms if best is None else min(best, ms)
            print(f"decode {attention:9s}: {best:7.1f} ms/token (best of {repeats}), first token "
                  f"{st.first_token_s:.2f} s, peak GPU {peak_gib():.1f} GiB")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda", help="cpu only for a dry run of this script")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    print(torch.__version__, torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
          "transformers", __import__("transformers").__version__)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    register()  # the "ra" attention implementation the models below are built with
    ok = exactness(tok, torch.float32, 1e-4)
    ok &= exactness(tok, torch.bfloat16, 0.05)
    scale(tok, args.tokens, args.layers, args.repeats)
    print("ALL OK" if ok else "EXACTNESS FAILED")


if __name__ == "__main__":
    main()
