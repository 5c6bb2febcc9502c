"""What the store's safety costs: prefill checkpoints, checksums at open and `ra cache verify`.

    python benchmarks/store_cost.py [--chars 26000]

One run, one machine, the embedded SmolLM2 (fp32, CPU), the start of Alice (~7K tokens). Prefills
the same document three times into fresh data directories, with no checkpoint, with the default
interval (30 s) and with a checkpoint after every layer (--checkpoint-s 0), and reports each
against the first (the baseline, same run). Then times, on the finished entry: opening it with
sizes only, opening it with every checksum (what `ra ask` does for entries up to 1 GiB), the full
`verify` (entry and index), and reading its files once (cat to /dev/null: the floor any check
pays). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_ask import machine  # noqa: E402
from core import model as models  # noqa: E402
from core.documents import Document  # noqa: E402
from core.engine import Engine, Settings  # noqa: E402
from core.store import Entry  # noqa: E402


def best(f, repeats=5) -> float:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        out.append(time.perf_counter() - t)
    return min(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chars", type=int, default=26000)
    args = ap.parse_args()
    text = (ROOT / "sample_docs" / "alice.txt").read_text(encoding="utf-8")
    start = text.index("CHAPTER I.")
    doc = Document(text=text[start:start + args.chars], name="alice-start", kind="text")
    tmp = Path(tempfile.mkdtemp(prefix="ra-store-cost-"))
    ref = models.resolve(None)
    model, tok = models.load(ref, tmp / "models", "cpu")
    rows, base, entry_path = [], None, None
    for label, every in (("no checkpoint", float("inf")), ("default: every 30 s", 30.0),
                         ("after every layer (0 s)", 0.0)):
        engine = Engine(tmp / label.split()[0], Settings(checkpoint_s=every, index="flat"), loaded=(model, tok, ref.identity))
        t = time.perf_counter()
        p = engine.prepare(doc)
        s = time.perf_counter() - t
        base = base or s
        rows.append((f"prefill + flat index, {label}", s, s / base))
        entry_path, n = p.entry.path, p.entry.n_tokens
        del p
    size = sum(f.stat().st_size for f in entry_path.rglob("*") if f.is_file())
    read = best(lambda: subprocess.run(f"cat {entry_path}/*.npy {entry_path}/indexes/*/* > /dev/null", shell=True))
    checks = [("open: sizes and small files", lambda: Entry(entry_path)),
              ("open: every checksum (ra ask, entries <= 1 GiB)", lambda: Entry(entry_path, verify_bytes=1 << 40)),
              ("ra cache verify (entry + index)", lambda: Entry(entry_path).verify())]
    print(f"machine: {machine()}; document: {n:,} tokens; entry: {size / 2**20:.1f} MiB\n")
    print("| step | seconds | vs baseline |\n|---|---|---|")
    for name, s, r in rows:
        print(f"| {name} | {s:.2f} | {r:.3f}x |")
    print(f"| read the entry's files once (cat > /dev/null, page cache), the baseline below | {read:.4f} | 1x |")
    for name, f in checks:
        s = best(f)
        print(f"| {name} | {s:.4f} | {s / read:.2f}x |")


if __name__ == "__main__":
    main()
