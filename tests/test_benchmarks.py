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


def test_index_recall_benchmark_json_smoke(smol, ra_home, tmp_path):
    """issue 5's benchmark on a tiny capture (2,000 real keys, one layer): one JSON object per
    (index, setting) with the promised fields. (Flat's recall and scanned fraction are 1 by the
    benchmark's own definition of the truth, so they are not asserted here.)"""
    r = subprocess.run([sys.executable, "benchmarks/index_recall.py", "--keys", "2000", "--work", str(tmp_path / "ir"),
                        "--layers", "3", "--ef", "100", "--hnsw-ef", "100", "--heldout", "16", "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["index"], x["setting"]) for x in rows] == [
        ("flat", "exact"), ("cluster", "r=0.018 e=0.0"), ("cluster", "r=0.018 e=0.232"), ("graph", "ef=100"),
        ("hnsw-raw", "ef=100"), ("hnsw-centred", "ef=100")]
    for x in rows:
        assert {"index", "setting", "keys_per_head", "recall_at_100", "scanned_fraction", "step_ms"} <= set(x)
        assert x["keys_per_head"] == 2000 and 0 < x["scanned_fraction"] <= 1 and 0 <= x["recall_at_100"] <= 1
    graph = rows[3]
    assert graph["scanned_fraction"] < 1.0  # the graph did not score every key
    assert graph["recall_at_100"] > 0.5  # and still found most of the exact top-100
    retrieved, estimated = rows[1], rows[2]
    assert retrieved["scanned_fraction"] < 1.0 and retrieved["out_err"] > estimated["out_err"] > 0


def test_run_all_covers_every_benchmarks_md_command():
    """`benchmarks/run_all.sh` is the one command behind BENCHMARKS.md: every script (and
    subcommand) a section of BENCHMARKS.md names must be one of its steps."""
    import re

    md = (ROOT / "BENCHMARKS.md").read_text()
    sh = (ROOT / "benchmarks" / "run_all.sh").read_text()
    cited = set(re.findall(r"python benchmarks/(\w+\.py)(?: (needle|ruler|qa|sweep|plot|report))?", md))
    steps = set(re.findall(r"python benchmarks/(\w+\.py)(?: (needle|ruler|qa|sweep|plot|report))?", sh))
    assert cited, "no commands found in BENCHMARKS.md"
    # not steps: gpu_check.py needs a GPU; compare_answers.py compares the runs of two commits
    missing = {f"{s} {sub}".strip() for s, sub in cited - steps if s not in ("gpu_check.py", "compare_answers.py")}
    assert not missing, f"BENCHMARKS.md cites commands run_all.sh does not run: {sorted(missing)}"
    assert "gpu_check" in sh  # needs a GPU: run_all.sh says so instead of running it
    r = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "run_all.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_decode_profile_smoke(smol, ra_home):
    """benchmarks/decode_profile.py on a short document: it answers from the store and splits the
    profiled answer into its parts (shares only; no time is asserted)."""
    r = subprocess.run([sys.executable, "benchmarks/decode_profile.py", "--chars", "3000", "--tokens", "4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ms/token (the baseline)" in r.stdout
    for part in ("linear layers", "retrieval scores", "vocabulary projection", "rest ("):
        assert f"| {part}" in r.stdout, r.stdout


def test_long_context_configs_name_an_index_and_its_budgets():
    """long_context.py's --configs: ra:K over --index, full, or an index with budgets (the same
    spec as accuracy.py's --indexes), so a patched command is never needed to compare indexes."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from long_context import configs

    got = dict(configs("ra:100,full,cluster:s=65536:r=0:e=1", index="flat"))
    assert got["ra:100"] == {"attention": "retrieval", "top_k": 100, "index": "flat"}
    assert got["full"] == {"attention": "full"}
    assert got["cluster:s=65536:r=0:e=1"] == {"attention": "retrieval", "top_k": 100, "index": "cluster",
                                             "retrieve": 0.0, "estimate": 1.0, "scan_max": 65536}


def test_every_benchmark_script_imports():
    """Each benchmarks/*.py loads (its imports resolve): a script broken by a change elsewhere
    fails here, not on the next benchmark run. One process, nothing run."""
    names = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__")
    code = "import importlib, sys\nsys.path.insert(0, '.')\n" + "".join(
        f"importlib.import_module('benchmarks.{n}')\n" for n in names)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(names) > 10
