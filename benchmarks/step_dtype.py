"""The one-token decode steps' weights (--step-dtype): the model's fp32, its GGUF blocks (the
default on the CPU) and a bf16 copy.

    python benchmarks/step_dtype.py [--chars 26000] [--tokens 32] [--runs 5] [--index exact]
                                    [--dtypes float32,blocks,bfloat16]

One run, one machine: the embedded SmolLM2-135M-Instruct (fp32 weights), the start of Alice
(~7K tokens, the serve and llama.cpp benchmarks' document) prefilled once into a temporary
RA_HOME, then the same question answered from the store with each step dtype in turn, `--runs`
rounds alternating (the first answer of each, which makes the copy, is not timed). Prints ms per
answer token after the first (the question runs in fp32 either way), the median over rounds, the
ratio to the first dtype, the copy's time, and whether the answers are the same.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_ask import QUESTION, alice_start, machine  # noqa: E402
from core import data_home  # noqa: E402
from core import model as models  # noqa: E402
from core.engine import AnswerStats, Engine, Settings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chars", type=int, default=26000)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--index", default="exact")
    ap.add_argument("--dtypes", default="float32,blocks,bfloat16")
    args = ap.parse_args()

    import torch

    dtypes = args.dtypes.split(",")
    ref = models.resolve(None)
    models_root = data_home() / "models"
    model, tok = models.load(ref, models_root, "cpu", torch.float32)
    with tempfile.TemporaryDirectory() as home:
        home = Path(home)
        (home / "models").symlink_to(models_root, target_is_directory=True)
        engines = {d: Engine(home, Settings(max_tokens=args.tokens, stop_at_eos=False, index=args.index, step_dtype=d),
                             loaded=(model, tok, ref.identity)) for d in dtypes}
        doc = alice_start(args.chars)
        prepared = {d: e.prepare(doc) for d, e in engines.items()}  # one prefill: the same entry for all
        answers, copy_s, per_token = {}, {}, {d: [] for d in dtypes}
        for d, e in engines.items():
            t = time.perf_counter()
            e.step_model(prepared[d].settings)  # the copy (for float32: the model itself)
            copy_s[d] = time.perf_counter() - t
            answers[d] = "".join(e.ask(prepared[d], QUESTION)).strip()  # warm
        for _ in range(args.runs):
            for d, e in engines.items():
                st = AnswerStats()
                "".join(e.ask(prepared[d], QUESTION, st))
                per_token[d].append((st.answer_s - st.first_token_s) / max(1, st.answer_tokens - 1) * 1e3)
        n_doc = next(iter(prepared.values())).entry.n_tokens

    base = statistics.median(per_token[dtypes[0]])
    print(f"machine: {machine()}")
    print(f"model: SmolLM2-135M-Instruct (embedded), weights float32; document {n_doc:,} tokens; index {args.index}; "
          f"{args.tokens} answer tokens; median of {args.runs} alternating rounds\n")
    print("| step weights | ms per answer token after the first | vs " + dtypes[0] + " | copy s | answer |")
    print("|---|---:|---:|---:|---|")
    for d in dtypes:
        med = statistics.median(per_token[d])
        same = "same as " + dtypes[0] if answers[d] == answers[dtypes[0]] else repr(answers[d][:60])
        print(f"| {d} | {med:.1f} | {med / base:.2f}x | {copy_s[d]:.2f} | {same} |")
    print(f"\nanswer ({dtypes[0]}): {answers[dtypes[0]][:120]!r}")


if __name__ == "__main__":
    main()
