"""Accuracy of retrieval attention against full attention, on the same model and the same inputs.

    python benchmarks/accuracy.py needle [--lengths 1000,2000,4000,6000,7500] [--seeds 3]
    python benchmarks/accuracy.py ruler  [--lengths 2000,4000,7500] [--seeds 3]
    python benchmarks/accuracy.py qa
    python benchmarks/accuracy.py sweep  [--lengths 7500] [--seeds 3]   # top-k and static windows
    python benchmarks/accuracy.py all --quick                          # the CI smoke test

Every case is prefilled once into a temporary store; retrieval attention and full attention then
answer from the very same cached KV (the store is shared, only the attention differs), so a
difference in the answers is the approximation's and nothing else. A case passes when every
expected string is in the greedy answer. Results: a markdown table per task on stdout, and one
JSON object per (case, config) with --jsonl FILE.

Haystacks are cut from real books: sample_docs/alice.txt, and Frankenstein and Sherlock Holmes
from ../shared/data/books when that folder is there (seed i uses book i mod the books found).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEPTHS = (0, 10, 25, 50, 75, 90, 100)


@dataclass
class Case:
    task: str
    name: str
    text: str
    question: str
    expected: list[str]
    length: int = 0          # target document length in tokens (0: a real document as is)
    depth: int | None = None
    seed: int = 0
    meta: dict = field(default_factory=dict)


from core.settings import DEFAULTS  # noqa: E402


@dataclass
class Config:
    name: str
    attention: str = DEFAULTS.attention
    top_k: int = DEFAULTS.top_k
    sink: int = DEFAULTS.sink
    recent: int = DEFAULTS.recent
    index: str = "flat"
    retrieve: float = DEFAULTS.retrieve   # the cluster index's budgets (core/cluster.py)
    estimate: float = DEFAULTS.estimate
    scan_max: int = DEFAULTS.scan_max


def index_config(spec: str, top_k: int) -> Config:
    """`--indexes` entry -> Config: a kind (flat, graph, cluster, auto: what `ra` picks), optionally
    with budgets, e.g. `cluster:r=0.05:e=0` (r: --retrieve, e: --estimate fractions, k: --top-k)."""
    kind, *opts = spec.split(":")
    kw = {"top_k": top_k}
    for o in opts:
        name, value = o.split("=")
        field_name = {"k": "top_k", "r": "retrieve", "e": "estimate", "s": "scan_max"}[name]
        kw[field_name] = int(value) if name in ("k", "s") else float(value)
    name = f"ra k={kw['top_k']}" + ("" if kind == "flat" else f" {kind}") + "".join(f" {o}" for o in opts if not o.startswith("k="))
    return Config(name, index=kind, **kw)


FULL = Config("full", attention="full")
RA = Config("ra k=100")


# ----------------------------------------------------------------------------- inputs

def books() -> list[tuple[str, str]]:
    found = [("alice", (ROOT / "sample_docs" / "alice.txt").read_text(encoding="utf-8"))]
    shared = ROOT.parent / "shared" / "data" / "books"
    for name, f in (("frankenstein", "pg84.txt"), ("sherlock", "pg1661.txt")):
        if (shared / f).exists():
            found.append((name, (shared / f).read_text(encoding="utf-8")))
    # skip the Project Gutenberg header: start at the first chapter-ish line
    out = []
    for name, text in found:
        start = text.find("*** START OF")
        start = text.find("\n", start) + 1 if start >= 0 else 0
        out.append((name, text[start:]))
    return out


class Hay:
    """Cuts haystacks of an exact token length from real books."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.books = books()
        self._ids = {}

    def cut(self, n_tokens: int, seed: int) -> str:
        name, text = self.books[seed % len(self.books)]
        if name not in self._ids:
            enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
            self._ids[name] = enc["offset_mapping"]
        offsets = self._ids[name]
        rng = random.Random(seed * 7919 + n_tokens)
        start_tok = rng.randrange(0, max(1, len(offsets) - n_tokens - 1))
        a = offsets[start_tok][0]
        b = offsets[min(start_tok + n_tokens, len(offsets) - 1)][0]
        return text[a:b]


def insert_at(hay: str, sentence: str, depth: int) -> str:
    """Put `sentence` at `depth` percent of the haystack, at the nearest sentence boundary."""
    pos = len(hay) * depth // 100
    if 0 < pos < len(hay):
        nxt = hay.find(". ", pos)
        pos = nxt + 2 if 0 <= nxt < pos + 400 else pos
    return hay[:pos] + f" {sentence} " + hay[pos:]


def code(rng: random.Random) -> str:
    return str(rng.randrange(10000, 100000))


def needle_cases(hay: Hay, lengths, depths, seeds) -> list[Case]:
    cases = []
    for n in lengths:
        for seed in range(seeds):
            for d in depths:
                rng = random.Random(f"needle-{n}-{d}-{seed}")
                c = code(rng)
                text = insert_at(hay.cut(n, seed), f"The secret passcode is {c}.", d)
                cases.append(Case("needle", f"needle-{n}-d{d}-s{seed}", text,
                                  "What is the secret passcode? Answer with the number only.", [c], n, d, seed))
    return cases


def ruler_cases(hay: Hay, lengths, seeds) -> list[Case]:
    """RULER-style tasks of our own making: multi-key, multi-value, variable tracking."""
    cases = []
    colors = ["red", "blue", "green", "yellow", "black", "white"]
    for n in lengths:
        for seed in range(seeds):
            rng = random.Random(f"ruler-{n}-{seed}")
            # multi-key: four passcodes for four doors; one is asked
            doors = rng.sample(colors, 4)
            codes = [code(rng) for _ in doors]
            text = hay.cut(n, seed)
            for i, (door, c) in enumerate(zip(doors, codes)):
                text = insert_at(text, f"The passcode for the {door} door is {c}.", 15 + 22 * i)
            asked = rng.randrange(4)
            cases.append(Case("multikey", f"multikey-{n}-s{seed}", text,
                              f"What is the passcode for the {doors[asked]} door? Answer with the number only.",
                              [codes[asked]], n, None, seed))
            # multi-value: three numbers for one key, spread out
            key = rng.choice(["Orion", "Lyra", "Cygnus", "Draco"])
            vals = [code(rng) for _ in range(3)]
            text = hay.cut(n, seed + 100)
            for i, v in enumerate(vals):
                text = insert_at(text, f"One of the special magic numbers for {key} is {v}.", 20 + 30 * i)
            cases.append(Case("multivalue", f"multivalue-{n}-s{seed}", text,
                              f"What are all the special magic numbers for {key}? List them.", vals, n, None, seed))
            # variable tracking: a chain of assignments spread over the text
            v = code(rng)
            names = [f"X{rng.randrange(10, 99)}{i}" for i in range(4)]
            text = hay.cut(n, seed + 200)
            text = insert_at(text, f"VAR {names[0]} = {v}.", 10)
            for i in range(1, 4):
                text = insert_at(text, f"VAR {names[i]} = VAR {names[i - 1]}.", 10 + 25 * i)
            cases.append(Case("vartrack", f"vartrack-{n}-s{seed}", text,
                              f"What is the value of VAR {names[3]}? Answer with the number only.", [v], n, None, seed))
    return cases


# Questions with answers checkable by string match, written for this harness over real documents.
QA = [
    ("alice-ch1-2", "What words were printed on the paper label of the little bottle?", ["DRINK ME"]),
    ("alice-ch1-2", "What words were marked in currants on the little cake?", ["EAT ME"]),
    ("alice-ch1-2", "What is the name of Alice's cat?", ["Dinah"]),
    ("alice-ch1-2", "What did the White Rabbit take out of its waistcoat-pocket?", ["watch"]),
    ("alice-ch1-2", "What was the label on the jar Alice took from a shelf?", ["ORANGE MARMALADE"]),
    ("alice-ch1-2", "What animal did Alice meet swimming in the pool of tears?", ["Mouse"]),
    ("R-intro-p9-14", "What command quits the R program?", ["q()"]),
    ("R-intro-p9-14", "What command launches the HTML help in a web browser?", ["help.start"]),
    ("R-intro-p9-14", "Which character starts a comment in R?", ["#"]),
    ("R-intro-p9-14", "Is R case sensitive?", ["yes"]),
    ("frankenstein-letters", "To whom are the letters written? Give her name.", ["Saville"]),
    ("frankenstein-letters", "From which city is the first letter written?", ["Petersburgh"]),
    ("sherlock-scandal", "To Sherlock Holmes, who is always 'the woman'?", ["Irene Adler"]),
]


def qa_documents() -> dict[str, str]:
    docs = {"alice-ch1-2": (ROOT / "sample_docs" / "alice-ch1-2.txt").read_text(encoding="utf-8")}
    from pypdf import PdfReader

    reader = PdfReader(str(ROOT / "sample_docs" / "R-intro.pdf"))
    docs["R-intro-p9-14"] = "\n\n".join(reader.pages[i].extract_text() for i in range(8, 14))
    for name, text in books()[1:]:
        if name == "frankenstein":
            i = text.find("Letter 1")
            docs["frankenstein-letters"] = text[i:i + 24000]
        if name == "sherlock":
            i = text.find("To Sherlock Holmes she is always")
            docs["sherlock-scandal"] = text[max(0, i - 200):i + 20000]
    return docs


def qa_cases() -> list[Case]:
    docs = qa_documents()
    return [Case("qa", f"{doc}: {q}", docs[doc], q, exp) for doc, q, exp in QA if doc in docs]


# ----------------------------------------------------------------------------- running

def passed(answer: str, expected: list[str]) -> bool:
    low = answer.lower()
    return all(e.lower() in low for e in expected)


def run(cases: list[Case], configs: list[Config], engine, max_tokens: int, out=None, log=print) -> list[dict]:
    """Prefill each case once, answer it with every config from the same store entry."""
    from core.documents import Document

    rows = []
    t0 = time.perf_counter()
    for i, case in enumerate(cases):
        doc = Document(text=case.text, name=case.name, kind="text")
        answers, index_s, prefill_s = {}, {}, 0.0
        for cfg in configs:
            settings = engine.settings.but(attention=cfg.attention, top_k=cfg.top_k, sink=cfg.sink, recent=cfg.recent,
                                           max_tokens=max_tokens, index=cfg.index, retrieve=cfg.retrieve,
                                           estimate=cfg.estimate, scan_max=cfg.scan_max)
            p = engine.prepare(doc, settings)  # a cache hit after the first config
            index_s[cfg.name] = round(p.index_s, 2)  # building this config's index (0 once built)
            prefill_s = max(prefill_s, p.prefill_s)  # the case's prefill (the first config's; 0 on a hit)
            answers[cfg.name] = "".join(engine.ask(p, case.question)).strip()
        full = answers.get(FULL.name)
        for cfg in configs:
            a = answers[cfg.name]
            row = {"task": case.task, "case": case.name, "length": case.length, "depth": case.depth,
                   "seed": case.seed, "tokens": p.entry.n_tokens, "config": cfg.name, "expected": case.expected,
                   "answer": a, "passed": passed(a, case.expected), "index_s": index_s[cfg.name], "prefill_s": round(prefill_s, 2),
                   "same_as_full": (a == full) if full is not None else None}
            rows.append(row)
            if out:
                out.write(json.dumps(row) + "\n")
                out.flush()
        done = time.perf_counter() - t0
        log(f"[{i + 1}/{len(cases)}] {case.name}: " + ", ".join(
            f"{c.name}={'pass' if passed(answers[c.name], case.expected) else 'fail'}" for c in configs)
            + f"  ({done / (i + 1):.1f} s/case, ~{done / (i + 1) * (len(cases) - i - 1) / 60:.0f} min left)")
    return rows


def table(rows: list[dict], by: str, configs: list[Config]) -> str:
    """Pass rate per `by` value and config, and how often each config's answer equals full's."""
    keys = sorted({r[by] for r in rows}, key=lambda x: (x is None, x))
    partial = any(len(r["expected"]) > 1 for r in rows)  # multi-value: count the values found, too
    head = [by] + [f"{c.name} pass" for c in configs] + [f"{c.name} = full" for c in configs if c.name != FULL.name]
    head += [f"{c.name} values found" for c in configs] if partial else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        cells = [str(k)]
        for c in configs:
            sel = [r for r in rows if r[by] == k and r["config"] == c.name]
            cells.append(f"{sum(r['passed'] for r in sel)}/{len(sel)}")
        for c in configs:
            if c.name == FULL.name:
                continue
            sel = [r for r in rows if r[by] == k and r["config"] == c.name and r["same_as_full"] is not None]
            cells.append(f"{sum(r['same_as_full'] for r in sel)}/{len(sel)}" if sel else "-")
        for c in configs if partial else []:
            sel = [r for r in rows if r[by] == k and r["config"] == c.name]
            found = sum(e.lower() in r["answer"].lower() for r in sel for e in r["expected"])
            cells.append(f"{found}/{sum(len(r['expected']) for r in sel)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def make_engine(home: Path, **settings):
    """An Engine over the embedded model (converted once under $RA_HOME) with these settings."""
    from core import data_home
    from core import model as models
    from core.engine import Engine, Settings

    ref = models.resolve(None)
    model, tok = models.load(ref, data_home() / "models", "cpu")
    return Engine(home, Settings(**settings), loaded=(model, tok, ref.identity))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=["needle", "ruler", "qa", "sweep", "all", "report"],
                    help="report: print the tables of an earlier run's --jsonl file, running nothing")
    ap.add_argument("--lengths", default=None, help="comma-separated document lengths in tokens")
    ap.add_argument("--depths", default=",".join(map(str, DEPTHS)))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--indexes", default="flat", help="retrieval configs to compare with full attention: index kinds "
                    "(flat, graph, cluster, auto), each optionally with budgets: cluster:r=0.05:e=0.2")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--quick", action="store_true", help="a few cells only (CI smoke test)")
    ap.add_argument("--step-dtype", default="auto", help="weights of the retrieval configs' one-token steps "
                    "(Settings.step_dtype); full attention stays in the weights' dtype, so its answers are the baseline")
    ap.add_argument("--jsonl", default=None, help="append one JSON object per (case, config) here")
    ap.add_argument("--home", default=None,
                    help="keep the prefilled cases in this data directory (default: a temporary one); "
                         "runs that share it reuse each other's prefills, e.g. `sweep` after `needle`")
    args = ap.parse_args(argv)

    if args.task == "report":
        rows = [json.loads(line) for line in open(args.jsonl)]
        names = list(dict.fromkeys(r["config"] for r in rows))
        configs = [next((c for c in (FULL,) if c.name == n), None) or Config(n) for n in names]
        configs.sort(key=lambda c: c.name == FULL.name)
        for task in dict.fromkeys(r["task"] for r in rows):
            sel = [r for r in rows if r["task"] == task]
            by = "case" if task == "qa" else "length"
            print(f"### {task}: pass rate by {by}\n\n{table(sel, by, configs)}\n")
            if task == "needle":
                print(f"### {task}: pass rate by depth (%)\n\n{table(sel, 'depth', configs)}\n")
        return
    depths = [int(d) for d in args.depths.split(",")]
    lengths = [int(n) for n in args.lengths.split(",")] if args.lengths else None
    ras = [index_config(spec, args.top_k) for spec in args.indexes.split(",")]
    out = open(args.jsonl, "a") if args.jsonl else None
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(args.home) if args.home else Path(tmp)
        home.mkdir(parents=True, exist_ok=True)
        engine = make_engine(home, step_dtype=args.step_dtype)
        hay = Hay(engine.tokenizer)
        sections = []
        if args.task in ("needle", "all"):
            ls = lengths or ([1000] if args.quick else [1000, 2000, 4000, 6000, 7500])
            ds = [50] if args.quick else depths
            rows = run(needle_cases(hay, ls, ds, 1 if args.quick else args.seeds), ras + [FULL], engine,
                       args.max_tokens, out, log)
            sections.append(("Needle in a haystack: pass rate by length", table(rows, "length", ras + [FULL])))
            sections.append(("Needle: pass rate by depth (%)", table(rows, "depth", ras + [FULL])))
        if args.task in ("ruler", "all"):
            ls = lengths or ([1000] if args.quick else [2000, 4000, 7500])
            cases = ruler_cases(hay, ls, 1 if args.quick else args.seeds)
            cases = cases[:1] if args.quick else cases
            rows = run(cases, ras + [FULL], engine, args.max_tokens, out, log)
            sections.append(("RULER-style tasks: pass rate by task", table(rows, "task", ras + [FULL])))
            sections.append(("RULER-style tasks: pass rate by length", table(rows, "length", ras + [FULL])))
        if args.task in ("qa", "all"):
            cases = [c for c in qa_cases() if c.name.startswith("R-intro")][:1] if args.quick else qa_cases()
            rows = run(cases, ras + [FULL], engine, args.max_tokens, out, log)
            sections.append(("Questions over real documents", table(rows, "case", ras + [FULL])))
        if args.task in ("sweep",):
            ls = lengths or [7500]
            configs = [FULL] + [Config(f"k={k}", top_k=k) for k in (25, 50, 100, 200, 400, 1000)] + [
                Config("k=100 sink 16 recent 64", sink=16, recent=64),
                Config("k=100 sink 512 recent 1024", sink=512, recent=1024)]
            rows = run(needle_cases(hay, ls, depths, args.seeds), configs, engine, args.max_tokens, out, log)
            sections.append((f"Sweep: top-k and static windows (needle, {ls} tokens)", table(rows, "length", configs)))
    for title, body in sections:
        print(f"### {title}\n\n{body}\n")


if __name__ == "__main__":
    main()
