"""A repeated `ra ask` with `ra serve` warm vs without it: whole command and first answer byte.

    python benchmarks/serve_ask.py [--chars 26000] [--tokens 32] [--repeats 3] [--step-dtype auto]

One run, one machine: a temporary RA_HOME, the start of Alice (~7K tokens) indexed once, then
`ra ask -n TOKENS` in a new process each time, first with --no-server (the baseline: Python,
torch and the model load, the entry opened, the answer), then with `ra serve` running and warmed
by one ask (the command imports no torch; the server answers). Times are wall clock from the
command's start to its exit and to the first byte of the answer on stdout; the same answer in
both modes (checked). Prints a markdown table with ratios against the baseline.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_ask import QUESTION, machine  # noqa: E402


def timed(cmd, env) -> tuple[float, float, str]:
    """(seconds to exit, seconds to the first stdout byte, stdout) of one command."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    first = p.stdout.read(1)
    t_first = time.perf_counter() - t
    rest, err = p.communicate()
    total = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {err.decode()[-2000:]}")
    return total, t_first, (first + rest).decode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chars", type=int, default=26000)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--step-dtype", default="auto", help="ra's --step-dtype, in both modes (and for the server)")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="ra-serve-bench-"))
    env = dict(os.environ, RA_HOME=str(home))
    text = (ROOT / "sample_docs" / "alice.txt").read_text(encoding="utf-8")
    start = text.index("CHAPTER I.")
    doc = home / "alice-start.txt"
    doc.write_text(text[start:start + args.chars], encoding="utf-8")
    ra = [sys.executable, "-m", "ra_cli.main"]
    subprocess.run(ra + ["index", "-q", str(doc)], env=env, check=True)
    step = ["--step-dtype", args.step_dtype]
    ask = ra + ["ask", "-q", "-n", str(args.tokens), str(doc), QUESTION] + step
    rows = {}
    rows["without a server (--no-server)"] = [timed(ask + ["--no-server"], env) for _ in range(args.repeats)]
    server = subprocess.Popen(ra + ["serve", "--port", "0", "-q"] + step, env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (home / "serve.sock").exists():
            time.sleep(0.2)
        timed(ask, env)  # warm: the server opens the document
        rows["with `ra serve` warm"] = [timed(ask, env) for _ in range(args.repeats)]
    finally:
        server.terminate()
        server.wait(60)
    answers = {out for runs in rows.values() for _, _, out in runs}
    print(f"machine: {machine()}; document: {len(doc.read_text()):,} chars; answer: -n {args.tokens}; "
          f"--step-dtype {args.step_dtype}; "
          f"median of {args.repeats} new processes each; same answer in every run: {len(answers) == 1}\n")
    base = statistics.median(t for t, _, _ in rows["without a server (--no-server)"])
    print("| `ra ask` | whole command s | first answer byte s | whole command vs baseline |\n|---|---|---|---|")
    for name, runs in rows.items():
        total = statistics.median(t for t, _, _ in runs)
        first = statistics.median(f for _, f, _ in runs)
        print(f"| {name} | {total:.2f} | {first:.2f} | {total / base:.2f}x |")
    n = len(re.findall(r"\S+", next(iter(answers))))
    print(f"\nanswer ({n} words): {next(iter(answers)).strip()[:200]}")


if __name__ == "__main__":
    main()
