"""Host memory of the layer-by-layer prefill against the chunked one (issue 17's CPU must-show), at a
length the test suite cannot afford (tests/test_prefill.py runs the same at 4,096 tokens).

    python benchmarks/prefill_memory.py [--tokens 32768] [--work DIR]

Each kind runs in a fresh process (tests/prefill_memory.py: a tiny random Llama of the issue's
shape, 8 layers, 8 KV heads of 128 dims, writing a real store entry), which reports how much its
peak resident memory (VmHWM) grew during the prefill, with glibc returning large freed blocks at
once (MALLOC_MMAP_THRESHOLD_, as the test sets it). Prints a markdown table: growth, its ratio to
the document's full fp32 K/V, wall time, and the largest difference between the two stores' K/V.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run(kind: str, n: int, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # an earlier run's entry
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "prefill_memory.py"), kind, str(n), str(out)],
                       capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{kind}: {r.stderr[-2000:]}")
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "s": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--work", type=Path, default=None, help="where the two store entries go (default: a temp dir)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ra-prefill-memory-"))
    got = {kind: run(kind, args.tokens, work / kind) for kind in ("plain", "layerwise")}
    diff = 0.0
    for name in ("keys.npy", "values.npy"):
        a, b = (np.load(work / kind / name, mmap_mode="r") for kind in ("plain", "layerwise"))
        diff = max(diff, max(float(np.abs(a[l] - b[l]).max()) for l in range(a.shape[0])))
    full = got["plain"]["full_kv_fp32"]
    print(f"{args.tokens:,} tokens; the document's full K/V in fp32: {full / 2**20:,.0f} MiB\n")
    print("| prefill | peak RSS grew, MiB | / full K/V | wall s |")
    print("|---|---:|---:|---:|")
    for kind, label in (("plain", "chunked (`prefill`: every layer's K/V held)"),
                        ("layerwise", "layer by layer (`prefill_layerwise`)")):
        g = got[kind]
        print(f"| {label} | {g['grew'] / 2**20:,.0f} | {g['grew'] / full:.2f}x | {g['s']:.0f} |")
    print(f"\nlargest |K/V difference| between the two stores: {diff:.1e}")


if __name__ == "__main__":
    main()
