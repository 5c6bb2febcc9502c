"""Probes on already-prefilled long_context.py needle cases (issue 6): change only how the answer
is decoded and see which cases pass. Not part of `ra`; a diagnostic kept so its numbers in
BENCHMARKS.md can be reproduced.

    python benchmarks/long_context_probe.py --distance 1024 frankenstein:whole:10 frankenstein:64000:50
    python benchmarks/long_context_probe.py --spans 8 frankenstein:whole:10

Cases are book:length:depth[:seed] as long_context.py makes them (seed 0 unless given) and must already be in --home
(default bench_out/long_home, filled by long_context.py): a case that is not is skipped, so the
prefill always ran at the shipped distance (core/longctx.DISTANCE) and only the decode changes.
--distance N: retrieved and sink keys attended at distance N instead of DISTANCE (the keys are
  stored pre-RoPE, so the decode may pick any distance; the exact flat index ranks in that frame).
--shared: every retrieved key and the sinks attended at DISTANCE, as the prefill does (the decode
  before retrieved keys were ordered; the shipped decode places them in document order beyond DISTANCE).
--recall EF[,EF..]: answer with the graph index (built if missing; with --shared at one distance) and report, for every
  decode query, the graph's recall of the exact top-k at each search width EF (issue 5's measure on
  a remapped entry).
--spans M: instead of each head's top-k keys, every key of its top-M 64-key spans ranked by
  q_glob . (mean pre-RoPE key of the span), as InfLLM's block memory does.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from accuracy import make_engine  # noqa: E402
from core import longctx  # noqa: E402
from long_context import NEEDLE_QUESTION, book_text, cut, needle  # noqa: E402

SPAN = 64


def span_attend(n_spans: int):
    """A RemappedRetrievalLayer.attend that retrieves whole spans (probe only)."""
    def attend(self, query, key, value, scale):
        _, Hq, T, D = query.shape
        KVH = key.shape[1]
        q = query[0].float().reshape(KVH, Hq // KVH, T, D)
        L = self.get_seq_length()
        q_glob = self.rope.rotate(q, longctx.DISTANCE - torch.arange(L - T, L))
        if not hasattr(self, "span_means"):
            self.kf = self.offloaded.k.float()                                   # [KVH, N, D]
            ns = self.n_offloaded // SPAN
            self.span_means = self.kf[:, :ns * SPAN].reshape(KVH, ns, SPAN, D).mean(2)  # [KVH, ns, D]
        top = torch.einsum("hgtd,hsd->hgts", q_glob, self.span_means).topk(n_spans, dim=-1).indices
        ids = (top[..., None] * SPAN + torch.arange(SPAN)).flatten(-2)          # [KVH, G, T, M*SPAN]
        h = torch.arange(KVH)[:, None, None, None]
        s_sel = torch.einsum("hgtd,hgtkd->hgtk", q_glob, self.kf[h, ids])
        o = longctx.remapped_attention(q, q_glob, key[0].float(), value[0].float(), self.sink_k, self.sink_v,
                                       s_sel, self.offloaded.v[h, ids].float(), scale)
        return o.reshape(Hq, T, D).transpose(0, 1)[None].to(query.dtype).contiguous()
    return attend


def shared_attend(self, query, key, value, scale):
    """A RemappedRetrievalLayer.attend with every retrieved key and the sinks at DISTANCE (probe only)."""
    _, Hq, T, D = query.shape
    KVH = key.shape[1]
    q = query[0].float().reshape(KVH, Hq // KVH, T, D)
    L = self.get_seq_length()
    q_glob = self.rope.rotate(q, longctx.DISTANCE - torch.arange(L - T, L))
    k = min(self.top_k, self.n_offloaded)
    ids, scores = self.index.search(q_glob.reshape(KVH, -1, D), k)
    v_sel = self.offloaded.gather_values(ids).float().reshape(*q.shape[:3], k, D)
    o = longctx.remapped_attention(q, q_glob, key[0].float(), value[0].float(), self.sink_k, self.sink_v,
                                   scores.reshape(*q.shape[:3], k), v_sel, scale)
    return o.reshape(Hq, T, D).transpose(0, 1)[None].to(query.dtype).contiguous()


def recall_attend(efs: list[int], out: list, base):
    """A RemappedRetrievalLayer.attend that first measures the graph index's recall, then attends
    as `base` does (probe only)."""
    from core.index import FlatLayerIndex

    def attend(self, query, key, value, scale):
        _, Hq, T, D = query.shape
        KVH = key.shape[1]
        q = query[0].float().reshape(KVH, Hq // KVH, T, D)
        L = self.get_seq_length()
        q_glob = self.rope.rotate(q, longctx.DISTANCE - torch.arange(L - T, L)).reshape(KVH, -1, D)
        k = min(self.top_k, self.n_offloaded)
        if not hasattr(self, "flat"):
            self.flat = FlatLayerIndex(self.offloaded.k.float())
        exact = self.flat.search(q_glob, k)[0]                                   # [KVH, M, k]
        ef0, row = self.index.ef, []
        for ef in efs:
            self.index.ef = ef
            got = self.index.search(q_glob, k)[0]
            hit = (got[..., :, None] == exact[..., None, :]).any(-1).float().mean().item()
            row.append(hit)
        self.index.ef = ef0
        out.append(row)
        return base(self, query, key, value, scale)
    return attend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="+")
    ap.add_argument("--distance", type=int, default=longctx.DISTANCE)
    ap.add_argument("--spans", type=int, default=0)
    ap.add_argument("--shared", action="store_true")
    ap.add_argument("--recall", default="", help="search widths, e.g. 175,1000 (graph index recall)")
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--home", default="bench_out/long_home")
    args = ap.parse_args()
    from core.documents import Document

    engine = make_engine(Path(args.home))
    engine.s.max_tokens, engine.s.index, engine.s.top_k = 32, "graph" if args.recall else "flat", args.top_k
    efs = [int(x) for x in args.recall.split(",")] if args.recall else []
    passed = 0
    for case in args.cases:
        book, length, d, seed = (case.split(":") + ["0"])[:4]
        hay = cut(engine.tokenizer, book_text(book), None if length == "whole" else int(length), int(seed))
        text, c = needle(hay, book, length, int(d), int(seed))
        doc = Document(text=text, name=case, kind="text")
        saved = longctx.DISTANCE, longctx.RemappedRetrievalLayer.attend
        try:
            p = engine.prepare(doc)  # a cache hit: the prefill is untouched
            if not p.cache_hit:
                print(f"{case}: was not prefilled; prefilled now at the shipped distance, rerun to probe", flush=True)
                continue
            longctx.DISTANCE = args.distance
            recalls: list = []
            if args.recall:
                longctx.RemappedRetrievalLayer.attend = recall_attend(efs, recalls, shared_attend if args.shared
                                                                      else saved[1])
            elif args.spans:
                longctx.RemappedRetrievalLayer.attend = span_attend(args.spans)
            elif args.shared:
                longctx.RemappedRetrievalLayer.attend = shared_attend
            t = time.perf_counter()
            a = "".join(engine.ask(p, NEEDLE_QUESTION)).strip()
        finally:
            longctx.DISTANCE, longctx.RemappedRetrievalLayer.attend = saved
        ok = c in a
        passed += ok
        if recalls:
            r = torch.tensor(recalls)  # [layer calls, widths]
            print(f"{case} graph recall@{args.top_k} over {len(recalls)} layer calls: " + ", ".join(
                f"ef={ef} {m:.3f} (worst layer call {w:.3f})" for ef, m, w in zip(efs, r.mean(0), r.min(0).values)))
        print(f"{case} distance={args.distance} spans={args.spans} shared={args.shared} k={args.top_k}: {'PASS' if ok else 'fail'} "
              f"{a[:60]!r} ({time.perf_counter() - t:.0f} s)", flush=True)
    print(f"{passed}/{len(args.cases)} passed")


if __name__ == "__main__":
    main()
