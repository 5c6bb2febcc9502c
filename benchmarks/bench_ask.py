"""First ask vs repeated ask vs transformers' own generate (full attention, re-prefill every time).

    python benchmarks/bench_ask.py [--chars 26000] [--tokens 32] [--repeats 3]

One run, one machine, same model (the embedded SmolLM2-135M-Instruct, fp32, CPU unless CUDA),
same document (the start of Alice in Wonderland, ~7K tokens), same question, and the same number
of answer tokens for every method (end-of-text is ignored so the work is equal). Prints a
markdown table with ratios against the transformers baseline. Uses a temporary RA_HOME, so the
first ask really prefills.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core import data_home  # noqa: E402
from core import model as models  # noqa: E402
from core.documents import Document  # noqa: E402
from core.engine import AnswerStats, Engine, Settings  # noqa: E402
from core.prompt import build_prefix, question_ids  # noqa: E402

QUESTION = "What did Alice see when she looked down the rabbit hole?"


def machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {dev}")


def alice_start(chars: int) -> Document:
    """The document of these benchmarks: the first `chars` characters of Alice from chapter I."""
    text = (ROOT / "sample_docs" / "alice.txt").read_text(encoding="utf-8")
    start = text.index("CHAPTER I.")
    return Document(text=text[start:start + chars], name="alice-start", kind="text")


def hf_generate(model, tok, doc, n_tokens: int, repeats: int):
    """The baseline: transformers' own generate with full attention (SDPA), prefilling the prompt
    and question every time, exactly n_tokens answer tokens. -> (median seconds, output ids)"""
    ids = torch.tensor([build_prefix(tok, doc).ids.tolist() + question_ids(tok, QUESTION)])
    model.config._attn_implementation = "sdpa"
    times = []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens,
                                     min_new_tokens=n_tokens, do_sample=False)
            times.append(time.perf_counter() - t0)
    finally:
        model.config._attn_implementation = "ra"
    return sorted(times)[len(times) // 2], out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chars", type=int, default=26000, help="document length in characters")
    ap.add_argument("--tokens", type=int, default=32, help="answer tokens per ask")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions (the median is shown)")
    args = ap.parse_args()

    doc = alice_start(args.chars)
    ref = models.resolve(None)
    models_root = data_home() / "models"  # reuse the converted model; the document cache is temporary
    model, tok = models.load(ref, models_root, "cpu")

    with tempfile.TemporaryDirectory() as home:
        home = Path(home)
        (home / "models").symlink_to(models_root, target_is_directory=True)
        settings = Settings(max_tokens=args.tokens, stop_at_eos=False)

        # 1. first ask: prefill + index + answer
        t0 = time.perf_counter()
        engine = Engine(home, settings, loaded=(model, tok, ref.identity))
        prepared = engine.prepare(doc)
        st = AnswerStats()
        first_answer = "".join(engine.ask(prepared, QUESTION, st))
        first_s = time.perf_counter() - t0
        n_doc = prepared.entry.n_tokens

        # 2. repeated ask: a new Engine on the same store (as a new process would), no prefill
        rep = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            e2 = Engine(home, settings, loaded=(model, tok, ref.identity))
            p2 = e2.prepare(doc)
            assert p2.cache_hit
            st2 = AnswerStats()
            rep_answer = "".join(e2.ask(p2, QUESTION, st2))
            rep.append((time.perf_counter() - t0, p2.load_s, st2))
        rep.sort(key=lambda r: r[0])
        rep_s, rep_load_s, rep_st = rep[len(rep) // 2]

        # 2b. the same repeated ask with --attention full over the same cached KV
        full_settings = Settings(max_tokens=args.tokens, stop_at_eos=False, attention="full")
        e3 = Engine(home, full_settings, loaded=(model, tok, ref.identity))
        p3 = e3.prepare(doc)
        t0 = time.perf_counter()
        st3 = AnswerStats()
        "".join(e3.ask(p3, QUESTION, st3))
        full_cached_s = time.perf_counter() - t0

        # 3. transformers' own generate, full attention (SDPA), prefilling prompt + question each time
        hf_s, out = hf_generate(model, tok, doc, args.tokens, args.repeats)
        hf_answer = tok.decode(out[0, -args.tokens:], skip_special_tokens=True)

        # 4. whole commands, as a user runs them (imports and model load included)
        env = dict(os.environ, RA_HOME=str(home))
        cmd = [sys.executable, "-m", "ra_cli.main", "ask", "-", QUESTION, "-q", "-n", str(args.tokens)]
        t0 = time.perf_counter()
        subprocess.run(cmd, input=doc.text, text=True, env=env, cwd=ROOT, check=True, capture_output=True)
        cli_s = time.perf_counter() - t0

    per_tok = lambda s: 1000 * (s.answer_s - s.first_token_s) / max(s.answer_tokens - 1, 1)
    print(f"machine: {machine()}")
    print(f"model: SmolLM2-135M-Instruct (embedded), fp32; document: {n_doc:,} tokens; "
          f"answer: {args.tokens} tokens; median of {args.repeats}\n")
    print("| method | wall s | vs transformers generate | notes |")
    print("|---|---:|---:|---|")
    print(f"| transformers `generate`, full attention, re-prefill | {hf_s:.2f} | 1.00x | prompt + question prefilled every time |")
    print(f"| ra first ask (prefill + index + answer) | {first_s:.2f} | {hf_s / first_s:.2f}x | "
          f"prefill {prepared.prefill_s:.1f} s, index {prepared.index_s:.2f} s |")
    print(f"| ra repeated ask, retrieval attention (k=100) | {rep_s:.2f} | {hf_s / rep_s:.2f}x | "
          f"open store {rep_load_s:.2f} s, first token {rep_st.first_token_s:.2f} s, {per_tok(rep_st):.0f} ms/token |")
    print(f"| ra repeated ask, `--attention full` over the cached KV | {full_cached_s:.2f} | {hf_s / full_cached_s:.2f}x | "
          f"first token {st3.first_token_s:.2f} s, {per_tok(st3):.0f} ms/token |")
    print(f"| `ra ask` command, repeated (new process: imports + model load) | {cli_s:.2f} | {hf_s / cli_s:.2f}x | "
          f"whole command, stdin document |")
    print(f"\nanswers - ra first: {first_answer.strip()[:80]!r}; ra repeated: {rep_answer.strip()[:80]!r}; "
          f"transformers: {hf_answer.strip()[:80]!r}")


if __name__ == "__main__":
    main()
