"""What an index kind costs per answer token, against another, on the same cached document.

    python benchmarks/index_cost.py [--indexes flat,cluster] [--runs 5] [--tokens 48] [--chars 26000]

One run, one machine: the embedded SmolLM2-135M-Instruct, the start of Alice (~7K tokens, the
serve and decode-step benchmarks' document) prefilled once into a temporary RA_HOME; each index is
built on it, then the same question is answered greedily `--runs` times per index, the order of
the indexes alternating between runs, and the median ms per answer token (after the first) is
compared with the first index's (the baseline). The answers are printed so a difference in them
is seen too.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_ask import QUESTION, alice_start, machine  # noqa: E402
from core import data_home  # noqa: E402
from core import model as models  # noqa: E402
from core.engine import AnswerStats, Engine, Settings  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--indexes", default="flat,cluster", help="index kinds; the first is the baseline")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--chars", type=int, default=26000)
    args = ap.parse_args(argv)
    kinds = args.indexes.split(",")

    ref = models.resolve(None)
    models_root = data_home() / "models"
    model, tok = models.load(ref, models_root, "cpu")
    with tempfile.TemporaryDirectory() as home:
        home = Path(home)
        (home / "models").symlink_to(models_root, target_is_directory=True)
        base = Settings(max_tokens=args.tokens, stop_at_eos=False)
        engine = Engine(home, base, loaded=(model, tok, ref.identity))
        prepared = {k: engine.prepare(alice_start(args.chars), base.but(index=k)) for k in kinds}
        answers, ms = {}, {k: [] for k in kinds}
        for k in kinds:  # warm: the flat scan's fp32 key copy, allocator caches
            answers[k] = "".join(engine.ask(prepared[k], QUESTION, AnswerStats())).strip()
        for run in range(args.runs):
            for k in kinds if run % 2 == 0 else kinds[::-1]:
                st = AnswerStats()
                "".join(engine.ask(prepared[k], QUESTION, st))
                ms[k].append(st.ms_per_token)
                print(f"run {run + 1}, {k}: {ms[k][-1]:.1f} ms/token", file=sys.stderr)
        n_doc = prepared[kinds[0]].entry.n_tokens
    print(f"machine: {machine()}")
    print(f"SmolLM2-135M-Instruct (embedded), fp32; document {n_doc:,} tokens; {args.tokens} answer tokens; "
          f"medians of {args.runs} runs\n")
    print("| index | ms/token | vs " + kinds[0] + " | answer |")
    print("|---|---:|---:|---|")
    b = statistics.median(ms[kinds[0]])
    for k in kinds:
        m = statistics.median(ms[k])
        print(f"| {k} | {m:.1f} | {m / b:.3f}x | {answers[k][:70]!r} |")


if __name__ == "__main__":
    main()
