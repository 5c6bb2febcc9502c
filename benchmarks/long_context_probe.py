"""Probes on already-prefilled long_context.py needle cases (issue 6): change only how the answer
is decoded and see which cases pass. Not part of `ra`; a diagnostic kept so its numbers in
BENCHMARKS.md can be reproduced.

    python benchmarks/long_context_probe.py --distance 1024 frankenstein:whole:10 frankenstein:64000:50
    python benchmarks/long_context_probe.py --spans 8 frankenstein:whole:10

Cases are book:length:depth[:seed] as long_context.py makes them (seed 0 unless given) and must already be in --home
(default bench_out/long_home, filled by long_context.py): a case that is not is skipped, so the
prefill always ran at the shipped scheme (core/settings.RemapScheme) and only the decode changes.
Each variant is a configuration of the shipped layer (core/layer.py), passed as values: a decode
scheme (`Engine.prepare(..., decode_scheme=...)`) or a Retriever wrapped around the opened ones.
--distance N: retrieved and sink keys attended at distance N instead of the scheme's (the keys are
  stored pre-RoPE, so the decode may pick any distance; the exact flat index ranks in that frame).
--shared: every retrieved key and the sinks attended at the distance, as the prefill does (the decode
  before retrieved keys were ordered; the shipped decode places them in document order beyond it).
--recall EF[,EF..]: answer with the graph index (built if missing; with --shared at one distance) and report, for every
  decode query, the graph's recall of the exact top-k at each search width EF (issue 5's measure on
  a remapped entry).
--spans M: instead of each head's top-k keys, every key of its top-M 64-key spans ranked by
  q_glob . (mean pre-RoPE key of the span), as InfLLM's block memory does (at one distance).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dataclasses import replace  # noqa: E402

import torch  # noqa: E402

from accuracy import make_engine  # noqa: E402
from core.cluster import Zones  # noqa: E402
from long_context import NEEDLE_QUESTION, book_text, cut, needle  # noqa: E402

SPAN = 64


class SpanRetriever:
    """Retrieves whole spans: every key of the M spans whose mean pre-RoPE key scores highest
    (probe only). Wraps a core/layer.Retriever and keeps its offloaded K/V."""

    def __init__(self, base, n_spans: int):
        self.base, self.n_spans, self.n = base, n_spans, base.n
        self.kf = self.span_means = None

    def zones(self, q, k: int, scale: float):  # q: [KVH, M, D] in the global frame; k is ignored (whole spans)
        if self.kf is None:
            KVH, _, D = self.base.k.shape
            self.kf = self.base.k.float()                                          # [KVH, N, D]
            ns = self.n // SPAN
            self.span_means = self.kf[:, :ns * SPAN].reshape(KVH, ns, SPAN, D).mean(2)  # [KVH, ns, D]
        top = torch.einsum("hmd,hsd->hms", q, self.span_means).topk(self.n_spans, dim=-1).indices
        ids = (top[..., None] * SPAN + torch.arange(SPAN)).flatten(-2)               # [KVH, M, n_spans*SPAN]
        h = torch.arange(q.shape[0])[:, None, None]
        return Zones(ids, torch.einsum("hmd,hmkd->hmk", q, self.kf[h, ids]), None)

    def gather_values(self, ids):
        return self.base.gather_values(ids)

    def gather_keys(self, ids):
        return self.base.gather_keys(ids)


class RecallRetriever:
    """The graph retriever, which first measures its recall of the exact top-k at each search
    width in `efs` (appended to `out`, one row per layer call), then searches as shipped (probe only)."""

    def __init__(self, base, efs: list[int], out: list):
        from core.index import FlatLayerIndex

        self.base, self.efs, self.out, self.n = base, efs, out, base.n
        self.flat = FlatLayerIndex(base.k)

    def zones(self, q, k: int, scale: float):
        index = self.base.index
        exact = self.flat.search(q, k)[0]                                            # [KVH, M, k]
        ef0, row = index.ef, []
        for ef in self.efs:
            index.ef = ef
            got = index.search(q, k)[0]
            row.append((got[..., :, None] == exact[..., None, :]).any(-1).float().mean().item())
        index.ef = ef0
        self.out.append(row)
        return self.base.zones(q, k, scale)

    def gather_values(self, ids):
        return self.base.gather_values(ids)

    def gather_keys(self, ids):
        return self.base.gather_keys(ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="+")
    ap.add_argument("--distance", type=int, default=0, help="default: the scheme's (2048)")
    ap.add_argument("--spans", type=int, default=0)
    ap.add_argument("--shared", action="store_true")
    ap.add_argument("--recall", default="", help="search widths, e.g. 175,1000 (graph index recall)")
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--home", default="bench_out/long_home")
    args = ap.parse_args()
    from core.documents import Document

    engine = make_engine(Path(args.home), max_tokens=32, index="graph" if args.recall else "flat", top_k=args.top_k)
    efs = [int(x) for x in args.recall.split(",")] if args.recall else []
    passed = 0
    for case in args.cases:
        book, length, d, seed = (case.split(":") + ["0"])[:4]
        hay = cut(engine.tokenizer, book_text(book), None if length == "whole" else int(length), int(seed))
        text, c = needle(hay, book, length, int(d), int(seed))
        doc = Document(text=text, name=case, kind="text")
        p = engine.prepare(doc)  # a cache hit: the prefill is untouched
        if not p.cache_hit:
            print(f"{case}: was not prefilled; prefilled now at the shipped scheme, rerun to probe", flush=True)
            continue
        if p.scheme is None:
            print(f"{case}: inside the model's window (no remapped positions to probe); skipped", flush=True)
            continue
        scheme = replace(p.scheme, distance=args.distance or p.scheme.distance,
                         ordered=not (args.shared or args.spans))
        p = engine.prepare(doc, decode_scheme=scheme)
        recalls: list = []
        if args.recall:
            p = replace(p, retrievers=tuple(RecallRetriever(r, efs, recalls) for r in p.retrievers))
        elif args.spans:
            p = replace(p, retrievers=tuple(SpanRetriever(r, args.spans) for r in p.retrievers))
        t = time.perf_counter()
        a = "".join(engine.ask(p, NEEDLE_QUESTION)).strip()
        ok = c in a
        passed += ok
        if recalls:
            r = torch.tensor(recalls)  # [layer calls, widths]
            print(f"{case} graph recall@{args.top_k} over {len(recalls)} layer calls: " + ", ".join(
                f"ef={ef} {m:.3f} (worst layer call {w:.3f})" for ef, m, w in zip(efs, r.mean(0), r.min(0).values)))
        print(f"{case} distance={scheme.distance} spans={args.spans} shared={args.shared} k={args.top_k}: {'PASS' if ok else 'fail'} "
              f"{a[:60]!r} ({time.perf_counter() - t:.0f} s)", flush=True)
    print(f"{passed}/{len(args.cases)} passed")


if __name__ == "__main__":
    main()
