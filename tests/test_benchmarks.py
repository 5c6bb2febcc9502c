"""The evaluation harness in its reduced form (a few cells): it runs end to end on the embedded
model and reports both attentions from one shared prefill. The full runs are documented commands
in BENCHMARKS.md, not tests."""
import json
import subprocess
import sys

from conftest import ROOT


def test_accuracy_harness_smoke(smol, ra_home, tmp_path):
    out = tmp_path / "rows.jsonl"
    r = subprocess.run([sys.executable, "benchmarks/accuracy.py", "all", "--quick", "--jsonl", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {row["task"] for row in rows} == {"needle", "multikey", "qa"}
    assert {row["config"] for row in rows} == {"ra k=100", "full"}
    needle = {row["config"]: row for row in rows if row["task"] == "needle"}
    # a 1K-token haystack: full attention finds the passcode, and so does retrieval attention
    assert needle["full"]["passed"] and needle["ra k=100"]["passed"]
    assert "### Needle in a haystack" in r.stdout and "| 1000 | 1/1 | 1/1 |" in r.stdout
