"""Compare two runs' answers case by case: the same (case, config) must give the same answer.

    python benchmarks/compare_answers.py BEFORE.jsonl AFTER.jsonl

For a change that must not change behaviour (issue 15's refactor): run the same harness command
(accuracy.py or long_context.py with --jsonl) before and after it, then compare. Prints each
differing answer and a summary line; exits 1 if any answer differs or a case is missing.
"""
from __future__ import annotations

import json
import sys


def rows(path: str) -> dict:
    out = {}
    for line in open(path, encoding="utf-8"):
        r = json.loads(line)
        out[(r.get("task"), r["case"], r["config"])] = r["answer"]
    return out


def main(before: str, after: str) -> int:
    a, b = rows(before), rows(after)
    same = sum(a[k] == b[k] for k in a if k in b)
    missing = sorted(set(a) ^ set(b))
    for k in sorted(k for k in a if k in b and a[k] != b[k]):
        print(f"DIFFERS {k}: {a[k]!r} -> {b[k]!r}")
    for k in missing:
        print(f"ONLY IN {'before' if k in a else 'after'}: {k}")
    print(f"{same}/{len(a)} answers identical; {len(missing)} (case, config) pairs in one run only")
    return 0 if same == len(a) == len(b) else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
