"""Whole books with the embedded 8K-window model: needles past the window, plot questions, and the
cost of indexing a book (core/longctx.py; issue 6).

    python benchmarks/long_context.py needle --lengths 8000,16000,32000,64000,whole --depths 10,50,90
    python benchmarks/long_context.py needle --book alice --lengths whole --depths 10,50,90
    python benchmarks/long_context.py plot           # questions about the plot of Alice, from the store
    python benchmarks/long_context.py plot --control --configs ra:100,full   # each over its own chapter
    python benchmarks/long_context.py report --jsonl FILE    # tables (pass rates, time per 1K tokens)

Haystacks are real books (sample_docs/alice.txt; Frankenstein and Sherlock Holmes from
../shared/data/books when present); `whole` is the entire book after the Gutenberg header. Each
case is prefilled once; every config answers from the same store entry. `full` (plain positions
over the whole cached KV) runs only up to --full-max tokens: past the window it is the baseline that
breaks, and its decode cost grows with the length. Each prefill's progress is timed per chunk, so
the JSONL rows carry the time per 1K tokens along the document (is indexing cost linear?).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from accuracy import books, code, index_config, insert_at, make_engine, passed  # noqa: E402

# questions about Alice whose answers a string match can check (any one expected string passes)
PLOT = [  # (question, expected, the chapter that holds the answer: the --control document)
    ("Who says \"Off with her head!\"?", ["queen"], "VIII"),
    ("What does Alice follow down the rabbit-hole?", ["rabbit"], "I"),
    ("What animal grins and slowly vanishes, leaving its grin behind?", ["cat"], "VI"),
    ("Who is having a tea party with the Hatter?", ["hare", "dormouse"], "VII"),
    ("What game does the Queen play with flamingos as mallets?", ["croquet"], "VIII"),
    ("What is written on the little bottle Alice finds?", ["drink me"], "I"),
    ("Who is accused of stealing the tarts?", ["knave"], "XI"),
    ("What is the Mock Turtle's dance called?", ["lobster"], "X"),
    ("What does the Caterpillar smoke?", ["hookah"], "V"),
    ("Who is the Duchess's cook's baby turned into?", ["pig"], "VI"),
]


NEEDLE_QUESTION = "What is the secret passcode? Answer with the number only."


def needle(hay: str, book: str, length: str, depth: int, seed: int) -> tuple[str, str]:
    """(document text, passcode) of a needle case: its passcode sentence at `depth` % of `hay`."""
    c = code(random.Random(f"long-{book}-{length}-{depth}-{seed}"))
    return insert_at(hay, f"The secret passcode is {c}.", depth), c


def chapter(text: str, roman: str) -> str:
    """One chapter of Alice ("CHAPTER VI." up to the next chapter heading)."""
    heads = list(re.finditer(r"^CHAPTER [IVXL]+\.\s*$", text, re.M))  # headings alone on a line (not the contents)
    i = next(j for j, m in enumerate(heads) if m.group().split()[1] == f"{roman}.")
    return text[heads[i].start():heads[i + 1].start() if i + 1 < len(heads) else len(text)]


def book_text(name: str) -> str:
    found = dict(books())
    if name not in found:
        raise SystemExit(f"book {name!r} not found (have: {', '.join(found)}); ../shared/data/books is needed")
    return found[name]


def cut(tokenizer, text: str, n_tokens: int | None, seed: int) -> str:
    """n_tokens of the book from a seeded start; None: the whole book."""
    if n_tokens is None:
        return text
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if n_tokens >= len(offsets):
        raise SystemExit(f"the book has {len(offsets):,} tokens, fewer than {n_tokens:,}")
    start = random.Random(seed * 7919 + n_tokens).randrange(0, len(offsets) - n_tokens)
    return text[offsets[start][0]:offsets[start + n_tokens][0]]


class Timer:
    """Progress callback that keeps (tokens done, seconds) per prefill chunk."""

    def __init__(self, log):
        self.log, self.points, self.t0, self.last = log, [], None, 0.0

    def __call__(self, stage, done, total):
        if stage != "prefill":
            return
        now = time.perf_counter()
        if self.points and done <= self.points[-1][0]:  # a new prefill without run_case's reset
            self.t0, self.points = now, []
        self.points.append((done, round(now - self.t0, 3)))
        if now - self.last > 30 or done == total:
            self.last = now
            el = max(now - self.t0, 1e-6)
            self.log(f"  prefill {done:,}/{total:,} tokens, {done / el:.0f} tok/s, ~{el / done * (total - done) / 60:.1f} min left")


def configs(spec: str, index: str = "flat"):
    """'ra:100,full,cluster:r=0:e=1:s=65536' -> [(name, Settings changes)]: ra:K is retrieval with
    top-K over `index` (the --index option); an index spec as accuracy.py's --indexes takes (a
    kind with budgets: cluster:r=..:e=..:s=..:k=..; d=N places the estimated clusters at distance
    N, RemapScheme.estimate_distance) is retrieval over that index; full is plain positions over
    the whole cached KV."""
    out = []
    for item in spec.split(","):
        kind, _, k = item.partition(":")
        if kind == "full":
            out.append((item, {"attention": "full"}))
        elif kind == "ra":
            out.append((item, {"attention": "retrieval", "top_k": int(k or 100), "index": index}))
        else:  # d=N: the estimated clusters' distance (RemapScheme.estimate_distance), not an index budget
            opts = item.split(":")
            dist = [int(o[2:]) for o in opts if o.startswith("d=")]
            c = index_config(":".join(o for o in opts if not o.startswith("d=")), 100)
            out.append((item, {"attention": "retrieval", "top_k": c.top_k, "index": c.index, "retrieve": c.retrieve,
                               "estimate": c.estimate, "scan_max": c.scan_max,
                               **({"estimate_distance": dist[0]} if dist else {})}))
    return out


def run_case(engine, timer, name, text, question, expected, cfgs, full_max, out, log, extra):
    from core.documents import Document

    doc = Document(text=text, name=name, kind="text")
    timer.points = []
    timer.t0 = time.perf_counter()
    base = engine.settings
    p = engine.prepare(doc, base.but(attention="retrieval", top_k=100))
    hit, profile = p.cache_hit, (None if p.cache_hit else timer.points)
    rows = []
    for cname, changes in cfgs:
        if changes["attention"] == "full" and p.entry.n_tokens > full_max:
            continue
        if "estimate_distance" in changes:
            changes = {**changes, "remap": replace(base.remap, estimate_distance=changes["estimate_distance"])}
            del changes["estimate_distance"]
        p = engine.prepare(doc, base.but(**changes))
        t = time.perf_counter()
        answer = "".join(engine.ask(p, question)).strip()
        row = {**extra, "case": name, "tokens": p.entry.n_tokens, "remapped": p.entry.remapped, "config": cname,
               "question": question, "expected": expected, "answer": answer,
               "passed": passed_any(answer, expected), "answer_s": round(time.perf_counter() - t, 2),
               "prefill_s": p.entry.manifest.prefill_s, "cache_hit": hit,
               "prefill_profile": profile, "index": p.index_kind, "index_s": round(p.index_s, 2)}
        profile = None  # kept once per case
        rows.append(row)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()
        log(f"{name} [{cname}] {'PASS' if row['passed'] else 'fail'}: {answer[:80]!r} (expected {expected})")
    return rows


def passed_any(answer: str, expected: list[str]) -> bool:
    return any(passed(answer, [e]) for e in expected)


def per_1k(profile, at) -> float | None:
    """Seconds per 1K tokens around position `at` (the chunks ending in (at - 2048, at + 2048])."""
    pts = [(d, s) for d, s in profile]
    prev = [(0, 0.0)] + pts[:-1]
    sel = [(d - pd, s - ps) for (d, s), (pd, ps) in zip(pts, prev) if at - 2048 < d <= at + 2048]
    if not sel:
        return None
    return sum(s for _, s in sel) / sum(n for n, _ in sel) * 1000


def report(rows) -> str:
    out = []
    needle = [r for r in rows if r.get("task") == "needle"]
    if needle:
        cfgs = list(dict.fromkeys(r["config"] for r in needle))
        out.append("### Needle past the window: passes by length (tokens) and config\n")
        out.append("| book | length | tokens | depths | " + " | ".join(cfgs) + " |")
        out.append("|---|---|---:|---|" + "---:|" * len(cfgs))
        groups = {}
        for r in needle:
            cut = r["case"].rpartition("-first")[2] if "-first" in r["case"] else ""  # --first cases apart
            groups.setdefault((r["book"], r["length"] + (f", first {cut}" if cut else "")), []).append(r)
        for (book, length), sel in sorted(groups.items(), key=lambda kv: (kv[0][0], max(r["tokens"] for r in kv[1]))):
            cells = []
            for c in cfgs:
                cs = [r for r in sel if r["config"] == c]
                cells.append(f"{sum(r['passed'] for r in cs)}/{len(cs)}" if cs else "-")
            depths = ",".join(str(d) for d in sorted({r["depth"] for r in sel}))
            out.append(f"| {book} | {length} | {max(r['tokens'] for r in sel):,} | {depths} | " + " | ".join(cells) + " |")
        out.append("")
    plot = [r for r in rows if r.get("task") == "plot"]
    if plot:
        out.append("### Questions about the plot of Alice\n")
        out.append("| question | expected | document | tokens | config | answer | pass |\n|---|---|---|---:|---|---|---|")
        for r in plot:
            out.append(f"| {r['question']} | {' / '.join(r['expected'])} | {r['length']} | {r['tokens']:,} | {r['config']} | "
                       f"{r['answer'][:70].replace('|', '/').replace(chr(10), ' ')} | {'yes' if r['passed'] else 'no'} |")
        out.append("")
    profiled = [r for r in rows if r.get("prefill_profile")]
    if profiled:
        big = max(profiled, key=lambda r: r["tokens"])
        marks = [m for m in (4096, 8192, 16384, 32768, 65536, 98304) if m <= big["tokens"]]
        out.append(f"### Indexing time per 1K tokens along one {big['tokens']:,}-token prefill ({big['case']})\n")
        out.append("| position (tokens) | s per 1K tokens |\n|---:|---:|")
        for m in marks:
            v = per_1k(big["prefill_profile"], m)
            out.append(f"| {m:,} | {v:.2f} |" if v else f"| {m:,} | - |")
        out.append(f"\nwhole prefill: {big['prefill_s']:.0f} s ({big['tokens'] / big['prefill_s']:.0f} tokens/s)\n")
        out.append("| case | tokens | prefill s | tokens/s |\n|---|---:|---:|---:|")
        for r in sorted(profiled, key=lambda r: r["tokens"]):
            out.append(f"| {r['case']} | {r['tokens']:,} | {r['prefill_s']:.0f} | {r['tokens'] / r['prefill_s']:.0f} |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=["needle", "plot", "report"])
    ap.add_argument("--book", default="frankenstein", help="alice | frankenstein | sherlock")
    ap.add_argument("--lengths", default="8000,16000,32000,64000,whole")
    ap.add_argument("--depths", default="10,50,90")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", default="ra:100,full",
                    help="ra:K (retrieval, top-K over --index), full, or an index with budgets as accuracy.py's "
                         "--indexes takes (cluster:r=0:e=1:s=65536), comma-separated")
    ap.add_argument("--full-max", type=int, default=16500, help="run `full` only up to this many tokens")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--index", default="flat",
                    help="decode-time index (default flat: exact, and no graph build of ~2x the prefill time "
                         "per case; `auto` is what `ra` uses)")
    ap.add_argument("--jsonl", default=None)
    ap.add_argument("--first", type=int, default=0,
                    help="needle: keep only each case's first N tokens (after the needle is inserted)")
    ap.add_argument("--control", action="store_true",
                    help="plot: ask each question over the one chapter that holds its answer (inside the window)")
    ap.add_argument("--home", default=None, help="data directory to keep the prefills in (default: temporary)")
    args = ap.parse_args(argv)
    if args.task == "report":
        print(report([json.loads(line) for line in open(args.jsonl)]))
        return
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    out = open(args.jsonl, "a") if args.jsonl else None
    cfgs = configs(args.configs, args.index)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(args.home) if args.home else Path(tmp)
        engine = make_engine(home, max_tokens=args.max_tokens, index=args.index)
        timer = Timer(log)
        engine.progress, engine.notice = timer, lambda m: log(f"  {m}")
        if args.task == "needle":
            text = book_text(args.book)
            for length in args.lengths.split(","):
                n = None if length == "whole" else int(length)
                hay = cut(engine.tokenizer, text, n, args.seed)
                for d in (int(x) for x in args.depths.split(",")):
                    doc_text, c = needle(hay, args.book, length, d, args.seed)
                    name = f"{args.book}-{length}-d{d}"
                    if args.first:  # the same case cut after its first N tokens: does the later text hide the needle?
                        off = engine.tokenizer(doc_text, add_special_tokens=False, return_offsets_mapping=True)
                        doc_text, name = doc_text[:off["offset_mapping"][args.first][0]], f"{name}-first{args.first}"
                    rows += run_case(engine, timer, name, doc_text, NEEDLE_QUESTION, [c], cfgs, args.full_max, out, log,
                                     {"task": "needle", "book": args.book, "length": length, "depth": d})
        else:
            text = book_text("alice")
            for q, exp, ch in PLOT:
                doc, name = (chapter(text, ch), f"alice-ch{ch}") if args.control else (text, "alice-whole")
                rows += run_case(engine, timer, name, doc, q, exp, cfgs, args.full_max, out, log,
                                 {"task": "plot", "book": "alice", "length": f"chapter {ch}" if args.control else "whole"})
    print(report(rows))


if __name__ == "__main__":
    main()
