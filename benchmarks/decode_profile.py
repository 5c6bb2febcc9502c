"""Where a decode step's time goes: a repeated ask on a cached document under torch.profiler.

    python benchmarks/decode_profile.py [--chars 26000] [--tokens 32] [--index flat] [--dtype float32]
                                        [--attention retrieval]

One run, one machine: the embedded SmolLM2-135M-Instruct, the start of Alice (~7K tokens, the
serve and llama.cpp benchmarks' document) prefilled once into a temporary RA_HOME, then the same
question answered twice from the store: once plain (ms per answer token, the baseline of the
table) and once under the profiler (its overhead makes that run slower: read the shares, not the
profiled milliseconds). Operators are summed by their self CPU time into groups: the model's
linear layers, the vocabulary projection, the flat index's scores (and torch's top-k where it is
used), gathering retrieved K/V, the attention of the static zone, and the rest; it also counts the
aten operators per answer step.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_ask import QUESTION, alice_start, machine  # noqa: E402
from core import data_home  # noqa: E402
from core import model as models  # noqa: E402
from core.engine import AnswerStats, Engine, Settings  # noqa: E402

# operator -> group; the vocabulary projection is the matmul whose output is the vocabulary wide
GROUPS = {
    "aten::addmm": "linear layers", "aten::mm": "linear layers", "aten::_weight_int4pack_mm_for_cpu": "linear layers",
    "aten::bmm": "retrieval scores (flat: q x every offloaded key)",
    "aten::topk": "top-k (torch; the flat index uses numpy, counted in the rest)",
    "aten::index": "gather retrieved K/V",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "static zone attention (fused kernel)",
    "aten::_scaled_dot_product_attention_math": "static zone attention (fused kernel)",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chars", type=int, default=26000)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--index", default="flat")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--attention", default="retrieval")
    args = ap.parse_args()

    doc = alice_start(args.chars)
    ref = models.resolve(None)
    models_root = data_home() / "models"
    settings = Settings(max_tokens=args.tokens, stop_at_eos=False, index=args.index, dtype=args.dtype,
                        attention=args.attention)
    model, tok = models.load(ref, models_root, "cpu", models.pick_dtype(args.dtype, "cpu"))
    with tempfile.TemporaryDirectory() as home:
        home = Path(home)
        (home / "models").symlink_to(models_root, target_is_directory=True)
        engine = Engine(home, settings, loaded=(model, tok, ref.identity))
        prepared = engine.prepare(doc)
        "".join(engine.ask(prepared, QUESTION, AnswerStats()))  # warm: flat's fp32 key copy, caches
        plain = AnswerStats()
        answer = "".join(engine.ask(prepared, QUESTION, plain))
        prof_st = AnswerStats()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            t = time.perf_counter()
            "".join(engine.ask(prepared, QUESTION, prof_st))
            wall = time.perf_counter() - t
        n_doc = prepared.entry.n_tokens

    # self time per group, from the operators' own time (children excluded)
    vocab = model.config.vocab_size
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    by_group: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages(group_by_input_shape=True):
        group = GROUPS.get(ev.key)
        shapes = [s for s in ev.input_shapes if isinstance(s, list) and s]
        if group == "linear layers" and any(s[-1] == vocab for s in shapes):
            group = "vocabulary projection"
        elif group == "linear layers" and len(shapes) >= 2 and len(shapes[1]) == 2 and shapes[1][0] == head_dim:
            group = GROUPS["aten::bmm"]  # the flat index's per-head q [M, D] x keys [D, N]
        if group:
            by_group[group] += ev.self_cpu_time_total
        by_op[ev.key] += ev.self_cpu_time_total
    n_ops = sum(ev.count for ev in prof.key_averages() if ev.key.startswith("aten::"))
    total = wall * 1e6
    by_group["rest (Python, norms, small ops)"] = total - sum(by_group.values())

    print(f"machine: {machine()}")
    print(f"model: SmolLM2-135M-Instruct (embedded), weights {args.dtype}; document {n_doc:,} tokens; "
          f"attention {args.attention}, index {args.index}; {args.tokens} answer tokens")
    print(f"decode, not profiled: {plain.ms_per_token:.1f} ms/token (the baseline); profiled: "
          f"{prof_st.ms_per_token:.1f} ms/token; {n_ops / prof_st.answer_tokens:,.0f} aten operators "
          f"per answer step; answer {answer.strip()[:60]!r}\n")
    print("| part of the answer | share of the profiled answer |")
    print("|---|---:|")
    for group, us in sorted(by_group.items(), key=lambda kv: -kv[1]):
        print(f"| {group} | {100 * us / total:.1f}% |")
    print("\nbusiest operators (self time):", ", ".join(
        f"{k} {100 * v / total:.1f}%" for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:10]))


if __name__ == "__main__":
    main()
