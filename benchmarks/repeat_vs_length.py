"""A repeated question on a cached document vs transformers' generate re-prefilling it, by length.

    python benchmarks/repeat_vs_length.py [--sizes 1000,2000,4000,7500] [--tokens 16] [--repeats 3]

Same model (embedded SmolLM2, fp32, CPU), same prompt tokens, same number of answer tokens (end
of text ignored) for both; the document is a cut of Alice of the given token length. "ra
repeated" opens the store with a new Engine (as a new process would) and answers with retrieval
attention (flat, k=100); its prefill is paid once, before the timing.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_ask import QUESTION, hf_generate, machine  # noqa: E402
from core import data_home  # noqa: E402
from core import model as models  # noqa: E402
from core.documents import Document  # noqa: E402
from core.engine import AnswerStats, Engine, Settings  # noqa: E402


def median(xs):
    return sorted(xs)[len(xs) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,2000,4000,7500")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    ref = models.resolve(None)
    model, tok = models.load(ref, data_home() / "models", "cpu")
    text = (ROOT / "sample_docs" / "alice.txt").read_text(encoding="utf-8")
    text = text[text.index("CHAPTER I."):]
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    rows = []
    with tempfile.TemporaryDirectory() as home:
        for n in [int(s) for s in args.sizes.split(",")]:
            doc = Document(text=text[:offsets[n][0]], name=f"alice-{n}", kind="text")
            s = Settings(max_tokens=args.tokens, stop_at_eos=False)
            t = time.perf_counter()
            Engine(home, s, loaded=(model, tok, ref.identity)).prepare(doc)
            first = time.perf_counter() - t
            ra = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                e = Engine(home, s, loaded=(model, tok, ref.identity))
                p = e.prepare(doc)
                assert p.cache_hit
                "".join(e.ask(p, QUESTION, AnswerStats()))
                ra.append(time.perf_counter() - t)
            hf_s, _ = hf_generate(model, tok, doc, args.tokens, args.repeats)
            rows.append((p.entry.n_tokens, hf_s, first, median(ra)))
            print(f"{n}: done", file=sys.stderr, flush=True)
    print(f"machine: {machine()}")
    print(f"model: SmolLM2-135M-Instruct (embedded), fp32; {args.tokens} answer tokens; median of {args.repeats}\n")
    print("| document tokens | transformers generate s | ra prefill + index (once) s | ra repeated ask s | speedup of a repeated ask |")
    print("|---:|---:|---:|---:|---:|")
    for n, hf, first, ra in rows:
        print(f"| {n:,} | {hf:.2f} | {first:.2f} | {ra:.2f} | {hf / ra:.1f}x |")


if __name__ == "__main__":
    main()
