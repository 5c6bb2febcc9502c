"""The `exact` kind's decode step three ways: the whole layer in kernel calls (the default), the
one-kernel attention inside transformers' layer, and the attention's parts merged.

    python benchmarks/exact_step.py [--chars 26000] [--tokens 32] [--rounds 3]

One document (the start of Alice, ~7K tokens, the llama.cpp peer's), one question, the default
settings (`exact`, the GGUF's block steps). Each round decodes the same answer three times, each
from a fresh cache: (1) fused: each Llama layer's one-token step as kernel calls on numpy arrays
(core/fused.FusedStepLayer); (2) one kernel: transformers' layer, its attention one kernel per
layer (core/attention_f16.step_attention: every document row read from the store and the tokens
after it, one softmax); (3) parts: transformers' layer, the attention as the parts that kernel
replaces (the static zone through PyTorch's fused kernel, every offloaded key through
core/attention_f16, merged by core/attention.merge). Prints the median ms per answer token of
each, the ratios, and whether the three answers are the same tokens.
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
from core.generation import forward  # noqa: E402
from core.prompt import question_ids  # noqa: E402


def decode(engine, prepared, q: list[int], n: int, whole_step: bool, fuse: bool):
    """-> (ms per answer step, median; the answer's token ids)."""
    cache = engine.build_cache(prepared, capacity=len(q) + n + 1, whole_step=whole_step, fuse=fuse)
    step_model = engine.step_model(prepared.settings)
    pos = prepared.entry.n_tokens
    logits = forward(engine.model, cache, q, pos)
    pos += len(q)
    times, ids = [], []
    for _ in range(n):
        ids.append(int(logits.argmax()))
        t = time.perf_counter()
        logits = forward(step_model, cache, [ids[-1]], pos)
        times.append(time.perf_counter() - t)
        pos += 1
    return 1000 * statistics.median(times), ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chars", type=int, default=26000, help="document length in characters (start of Alice)")
    ap.add_argument("--tokens", type=int, default=32, help="answer tokens per decode")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ref = models.resolve(None)
    model, tok = models.load(ref, data_home() / "models", "cpu")
    doc = alice_start(args.chars)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        (home / "models").symlink_to(data_home() / "models", target_is_directory=True)
        engine = Engine(home, Settings(max_tokens=args.tokens, stop_at_eos=False), loaded=(model, tok, ref.identity))
        p = engine.prepare(doc)
        assert p.index_kind == "exact", p.index_kind
        "".join(engine.ask(p, QUESTION, AnswerStats()))  # kernels compiled or loaded, pages warm
        q = question_ids(tok, QUESTION)
        rows = []
        for r in range(args.rounds):
            fused, ids_fused = decode(engine, p, q, args.tokens, True, True)
            one, ids_one = decode(engine, p, q, args.tokens, True, False)
            parts, ids_parts = decode(engine, p, q, args.tokens, False, False)
            rows.append((fused, one, parts, ids_fused == ids_one == ids_parts))
            print(f"round {r + 1}: fused {fused:.1f} ms, one kernel {one:.1f} ms, parts {parts:.1f} ms",
                  file=sys.stderr, flush=True)
    print(f"machine: {machine()}; document: {p.entry.n_tokens:,} tokens; {args.tokens} answer tokens; "
          f"median ms per answer step\n")
    print("| round | fused layer (default) | one-kernel attention | parts merged | fused / one kernel | one kernel / parts "
          "| same answer |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for i, (fused, one, parts, same) in enumerate(rows, 1):
        print(f"| {i} | {fused:.1f} | {one:.1f} | {parts:.1f} | {fused / one:.2f}x | {one / parts:.2f}x "
              f"| {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
