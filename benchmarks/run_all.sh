#!/usr/bin/env bash
# Every number in BENCHMARKS.md, one command after another (many hours on the 2-core CPU machine: the sum of the run times given in BENCHMARKS.md).
#
#   bash benchmarks/run_all.sh [OUT]       # OUT defaults to bench_out/; tables land in OUT/results/
#
# Each step prints the markdown table BENCHMARKS.md quotes into OUT/results/<step>.md (progress and
# logs into <step>.log). Steps share their stores under OUT (each case is prefilled once, and a
# rerun reuses them), so run one copy at a time, on an otherwise quiet machine for the timings.
# Optional steps are skipped with a line saying why: the GPU check (no CUDA device) and the
# llama.cpp peer (llama-cpp-python not installed; it is never an ra dependency).
# Needs the bench extra: pip install -e ".[bench]".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench_out}
R=$OUT/results
mkdir -p "$R"
failed=0
# the --jsonl files are appended to; an earlier run's rows would be counted twice, so set them aside
old=$(ls "$OUT"/*.jsonl 2>/dev/null)
if [ -n "$old" ]; then
    keep="$OUT/previous-$(date +%Y%m%d-%H%M%S)"
    mkdir -p "$keep" && mv $old "$keep"/ && echo "earlier JSONL results moved to $keep" >&2
fi

step() {  # step NAME command...: stdout -> NAME.md, stderr -> NAME.log
    local name=$1; shift
    echo "== $name: $*" >&2
    if ! "$@" >"$R/$name.md" 2>"$R/$name.log"; then
        echo "   FAILED (see $R/$name.log)" >&2
        failed=1
    fi
}

# a repeated question vs transformers' generate (7K tokens), and by document length
step bench_ask python benchmarks/bench_ask.py
step repeat_vs_length python benchmarks/repeat_vs_length.py --sizes 1000,2000,4000,7500
step store_cost python benchmarks/store_cost.py
step serve_ask python benchmarks/serve_ask.py
step decode_profile python benchmarks/decode_profile.py
step decode_profile_exact python benchmarks/decode_profile.py --index exact
# the one-token steps on a bf16 copy of the weights (--step-dtype, issue 20): speed, then the serve ratio with it
step step_dtype python benchmarks/step_dtype.py --runs 5
step exact_step python benchmarks/exact_step.py
step serve_ask_bf16 python benchmarks/serve_ask.py --step-dtype bfloat16
step serve_ask_fp32 python benchmarks/serve_ask.py --step-dtype float32
# host memory of the layer-by-layer prefill vs the chunked one at 32K (issue 17)
step prefill_memory python benchmarks/prefill_memory.py --tokens 32768 --work "$OUT/prefill_memory"
# host memory of converting a GGUF (issue 17): the embedded file, and its blocks repeated 8 times (878M parameters)
step gguf_convert python benchmarks/gguf_convert.py --shards 2048,64
step gguf_convert_x8 python benchmarks/gguf_convert.py --blocks-times 8 --shards 2048,256
step index_cost python benchmarks/index_cost.py --indexes flat,cluster --runs 5
# the exact kind (every offloaded key attended), what auto picks inside the window since issue 16's last change
step index_cost_exact python benchmarks/index_cost.py --indexes flat,cluster,exact --runs 5
step citations_dev python benchmarks/citations.py needle --seeds 3 --home "$OUT/cit_home" --steps "$OUT/cit_dev" --jsonl "$OUT/cit_dev.jsonl"
step citations_rules python benchmarks/citations.py rules --steps "$OUT/cit_dev"
step citations_needle python benchmarks/citations.py needle --seeds 0,1,2 --home "$OUT/cit_home" --jsonl "$OUT/cit_needle.jsonl"
step cit_exact python benchmarks/citations.py needle --seeds 0,1,2 --index exact --home "$OUT/acc_exact" --jsonl "$OUT/cit_exact.jsonl"
step cit_distract python benchmarks/citations.py needle --seeds 0,1,2 --index exact --distractors 3 --home "$OUT/cit_distract" --jsonl "$OUT/cit_distract.jsonl"
step citations_ruler python benchmarks/citations.py ruler --lengths 2000,4000,7500 --seeds 0,1,2 --home "$OUT/cit_home" --jsonl "$OUT/cit_ruler.jsonl"
step citations_qa python benchmarks/citations.py qa --home "$OUT/cit_home" --jsonl "$OUT/cit_qa.jsonl"
step citations_cost python benchmarks/citations.py cost --length 7500 --runs 9 --max-tokens 64 --index exact
step citations_cost_busy python benchmarks/citations.py cost --length 7500 --runs 9 --max-tokens 64 --index exact --busy
step threads_busy_1 env OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python benchmarks/citations.py cost --length 7500 --runs 3 --max-tokens 64 --index exact --busy
step threads_quiet_1 env OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python benchmarks/citations.py cost --length 7500 --runs 3 --max-tokens 64 --index exact
step threads_busy_2 python benchmarks/citations.py cost --length 7500 --runs 3 --max-tokens 64 --index exact --busy

# accuracy against full attention on the same cached KV
step needle python benchmarks/accuracy.py needle --home "$OUT/acc_home" --jsonl "$OUT/needle.jsonl"
step needle_report python benchmarks/accuracy.py report --jsonl "$OUT/needle.jsonl"
step sweep python benchmarks/accuracy.py sweep --home "$OUT/acc_home" --lengths 2000,4000 --seeds 1 \
    --depths 0,75 --jsonl "$OUT/sweep.jsonl"
step ruler python benchmarks/accuracy.py ruler --indexes flat,cluster --home "$OUT/acc_home" --jsonl "$OUT/ruler.jsonl"
step qa python benchmarks/accuracy.py qa --indexes flat,cluster --home "$OUT/acc_home" --jsonl "$OUT/qa.jsonl"
step needle_exact python benchmarks/accuracy.py needle --lengths 1000,2000 --seeds 3 --indexes exact --home "$OUT/acc_exact" --jsonl "$OUT/needle_exact.jsonl"
step needle_exact4k python benchmarks/accuracy.py needle --lengths 4000 --seeds 3 --indexes exact --home "$OUT/acc_exact" --jsonl "$OUT/needle_exact4k.jsonl"
step needle_exact_rest python benchmarks/accuracy.py needle --lengths 6000,7500 --seeds 3 --indexes exact --home "$OUT/acc_exact" --jsonl "$OUT/needle_exact_rest.jsonl"
step ruler_exact python benchmarks/accuracy.py ruler --indexes exact --home "$OUT/acc_home" --jsonl "$OUT/ruler_exact.jsonl"
step qa_exact python benchmarks/accuracy.py qa --indexes exact --home "$OUT/acc_home" --jsonl "$OUT/qa_exact.jsonl"
# the same three sets with the one-token steps on a bf16 copy of the weights (full attention stays fp32: the baseline)
step needle_step python benchmarks/accuracy.py needle --lengths 1000,2000,4000 --seeds 3 --indexes exact --step-dtype bfloat16 --home "$OUT/acc_exact" --jsonl "$OUT/needle_step.jsonl"
step ruler_step python benchmarks/accuracy.py ruler --indexes exact --step-dtype bfloat16 --home "$OUT/acc_home" --jsonl "$OUT/ruler_step.jsonl"
step qa_step python benchmarks/accuracy.py qa --indexes exact --step-dtype bfloat16 --home "$OUT/acc_home" --jsonl "$OUT/qa_step.jsonl"
# the default decode (block steps, the fp16 attention of `exact`) on the whole harness
step needle_blocks python benchmarks/accuracy.py needle --lengths 1000,2000,4000,6000,7500 --seeds 3 --indexes exact --step-dtype blocks --home "$OUT/acc_exact" --jsonl "$OUT/needle_blocks.jsonl"
step ruler_blocks python benchmarks/accuracy.py ruler --indexes exact --step-dtype blocks --home "$OUT/acc_home" --jsonl "$OUT/ruler_blocks.jsonl"
step qa_blocks python benchmarks/accuracy.py qa --indexes exact --step-dtype blocks --home "$OUT/acc_home" --jsonl "$OUT/qa_blocks.jsonl"
step needle_graph python benchmarks/accuracy.py needle --indexes flat,graph \
    --home "$OUT/acc_home" --jsonl "$OUT/needle_graph.jsonl"
# the clustered index (issue 16): the grid with scan top-k + estimated clusters (R=0.018 E=0.232;
# the default R=0.1 E=1 in the _short and _rest steps), budgets at 7.5K; then whole clusters as the exact zone (s=0): RetroInfer's
# budgets on the grid, a sweep at 7.5K, the grid at R=0.1 E=0.4
step needle_cluster python benchmarks/accuracy.py needle --seeds 3 --indexes flat,cluster:r=0.018:e=0.232 \
    --home "$OUT/acc_home" --jsonl "$OUT/needle_cluster.jsonl"
step needle_cluster_rest python benchmarks/accuracy.py needle --lengths 1000,6000,7500 --seeds 3 \
    --indexes cluster:r=0.1:e=1 --home "$OUT/acc_home" --jsonl "$OUT/needle_cluster_rest.jsonl"
step needle_cluster_scan_sweep python benchmarks/accuracy.py needle --lengths 7500 --seeds 3 \
    --indexes flat,cluster:r=0:e=1,cluster:r=0:e=0.232 --home "$OUT/acc_home" --jsonl "$OUT/needle_cluster_scan.jsonl"
step needle_cluster_scan_short python benchmarks/accuracy.py needle --lengths 2000,4000 --seeds 3 \
    --indexes cluster:r=0.018:e=1,cluster:r=0.1:e=1 --home "$OUT/acc_home" --jsonl "$OUT/needle_cluster_short.jsonl"
step needle_cluster_whole python benchmarks/accuracy.py needle --seeds 3 --indexes flat,cluster:s=0:r=0.018:e=0.232 \
    --home "$OUT/acc_home" --jsonl "$OUT/needle_cluster_whole.jsonl"
step needle_cluster_sweep python benchmarks/accuracy.py needle --lengths 7500 --seeds 3 \
    --indexes cluster:s=0:r=0.018:e=0,cluster:s=0:r=0.05:e=0.232,cluster:s=0:r=0.1:e=0.4 --home "$OUT/acc_home" --jsonl "$OUT/needle_cluster_sweep.jsonl"
step needle_cluster_r01 python benchmarks/accuracy.py needle --seeds 3 --indexes cluster:s=0:r=0.1:e=0.4 \
    --home "$OUT/acc_home" --jsonl "$OUT/needle_cluster_r01.jsonl"

# the query-aware index and decode latency vs length (KV captured from real text past 8K)
step index_recall python benchmarks/index_recall.py --work "$OUT/index_recall" --plot benchmarks/index_recall.png
# the clustered index at 100K keys per head: build vs the prefill (capture) of the same run, search vs the graph
step index_recall_cluster python benchmarks/index_recall.py --work "$OUT/index_recall_cluster" \
    --indexes graph,hnsw-centred,cluster --cluster-budgets 0.018:0.232,0.018:1,0.05:1,0.1:1
step index_recall_cluster_b python benchmarks/index_recall.py --work "$OUT/index_recall_cluster" \
    --indexes graph,cluster --ef 175 --cluster-budgets 0.018:0.232,0.018:1,0.005:0.232,0.005:1,0.01:0.232,0.1:1
step index_recall_cluster_c python benchmarks/index_recall.py --work "$OUT/index_recall_cluster" \
    --indexes graph,cluster --ef 175 --cluster-budgets 0.003:0.232,0.004:0.232,0.005:0.232
# the same after the build took numpy's argmax, its own capture (prefill) in the same run
step index_recall_cluster_d python benchmarks/index_recall.py --work "$OUT/index_recall_cluster_d" \
    --indexes graph,cluster --ef 175 --cluster-budgets 0.003:0.232,0.005:0.232,0.1:1
step decode_scaling python benchmarks/decode_scaling.py --sizes 1024,4096,16384,32768,65536,131072 --steps 8 \
    --indexes exact,flat,cluster,graph --graph-max 32768 --rss-min 16384 --work "$OUT/decode_scaling" \
    --plot benchmarks/decode_scaling.png --json "$OUT/decode_scaling.json"

# whole books past the embedded model's 8K window
L=(--home "$OUT/long_home" --jsonl "$OUT/long.jsonl")
step long_alice python benchmarks/long_context.py needle --book alice --lengths whole --depths 10,50,90 "${L[@]}"
step long_frank python benchmarks/long_context.py needle --book frankenstein --lengths whole --depths 10,50,90 "${L[@]}"
step long_plot python benchmarks/long_context.py plot "${L[@]}"
step long_lengths python benchmarks/long_context.py needle --book frankenstein --lengths 8000,16000,32000 \
    --depths 10,50,90 "${L[@]}"
step long_64k python benchmarks/long_context.py needle --book frankenstein --lengths 64000 --depths 10,50,90 \
    --configs ra:100 "${L[@]}"
step long_first16k python benchmarks/long_context.py needle --book frankenstein --lengths whole --depths 10 \
    --first 16000 --configs ra:100 "${L[@]}"
step long_cluster python benchmarks/long_context.py needle --book alice --lengths whole --depths 10,50,90 \
    --configs ra:100,cluster:s=1000000:r=0:e=1:d=0,cluster:s=1000000:r=0:e=0.232:d=0,cluster:s=0:r=0.018:e=1:d=0,cluster:s=0:r=0.018:e=0.232:d=0,cluster:s=0:r=0.05:e=1:d=0 \
    --home "$OUT/long_home" --jsonl "$OUT/alice_cluster.jsonl"
step long_cluster_distance python benchmarks/long_context.py needle --book alice --lengths whole --depths 10,50,90 \
    --configs cluster:s=1000000:r=0:e=1:d=0,cluster:s=1000000:r=0:e=1:d=2400,cluster:s=1000000:r=0:e=1:d=4096,cluster:s=1000000:r=0:e=1:d=6144,cluster:s=1000000:r=0:e=0.232:d=6144,cluster:s=1000000:r=0:e=1:d=8000 \
    --home "$OUT/long_home" --jsonl "$OUT/est_distance.jsonl"
E=(--configs ra:100,cluster:s=1000000:r=0:e=1:d=0,cluster:s=1000000:r=0:e=1:d=2400,cluster:s=1000000:r=0:e=1:d=4096 \
   --home "$OUT/long_home" --jsonl "$OUT/heldout_est.jsonl")
step heldout_est_alice python benchmarks/long_context.py needle --book alice --lengths whole --depths 30,70 --seed 1 "${E[@]}"
step heldout_est_sherlock python benchmarks/long_context.py needle --book sherlock --lengths 16000,32000 --depths 25,75 "${E[@]}"
step past_cluster python benchmarks/long_context.py needle --book frankenstein --lengths 16000,32000 --depths 10,50,90 \
    --configs ra:100,cluster:s=1000000:r=0:e=1,cluster --home "$OUT/long_home" --jsonl "$OUT/past_cluster.jsonl"
step past_cluster_more python benchmarks/long_context.py needle --book frankenstein --lengths 64000,whole --depths 10,50,90 \
    --configs ra:100,cluster:s=1000000:r=0:e=1,cluster --home "$OUT/long_home" --jsonl "$OUT/past_cluster.jsonl"
step past_cluster_sherlock python benchmarks/long_context.py needle --book sherlock --lengths 64000 --depths 30,70 \
    --configs ra:100,cluster:s=1000000:r=0:e=1,cluster --home "$OUT/long_home" --jsonl "$OUT/past_cluster.jsonl"
step long_graph python benchmarks/long_context.py needle --book alice --lengths whole --depths 10,50,90 \
    --configs ra:100 --index graph --home "$OUT/long_home" --jsonl "$OUT/long_graph.jsonl"
step long_report python benchmarks/long_context.py report --jsonl "$OUT/long.jsonl"
step long_control python benchmarks/long_context.py plot --control --configs ra:100,full --home "$OUT/long_home" \
    --jsonl "$OUT/plot_control.jsonl"
C="alice:whole:10 alice:whole:50 alice:whole:90 frankenstein:16000:10 frankenstein:16000:50 frankenstein:16000:90
   frankenstein:32000:10 frankenstein:32000:50 frankenstein:32000:90 frankenstein:64000:10 frankenstein:64000:50
   frankenstein:64000:90 frankenstein:whole:10 frankenstein:whole:50 frankenstein:whole:90"
for d in 1024 1536 2048; do
    step "probe_distance_$d" python benchmarks/long_context_probe.py --home "$OUT/long_home" --shared --distance $d $C
done
step probe_ordered python benchmarks/long_context_probe.py --home "$OUT/long_home" $C
step probe_spans python benchmarks/long_context_probe.py --home "$OUT/long_home" --spans 8 \
    frankenstein:64000:10 frankenstein:64000:50 frankenstein:whole:10
step probe_recall python benchmarks/long_context_probe.py --home "$OUT/long_home" --shared --recall 175,1000 \
    alice:whole:10 alice:whole:50 alice:whole:90
# held-out needles (fixed before they were run): one distance (the prefill's, and the decode before) vs ordered
H=(--configs ra:100 --home "$OUT/long_home" --jsonl "$OUT/heldout.jsonl")
step heldout_16k32k python benchmarks/long_context.py needle --book sherlock --lengths 16000,32000 --depths 25,75 "${H[@]}"
step heldout_alice python benchmarks/long_context.py needle --book alice --lengths whole --depths 30,70 --seed 1 "${H[@]}"
step heldout_64k python benchmarks/long_context.py needle --book sherlock --lengths 64000 --depths 30,70 "${H[@]}"
HC="sherlock:16000:25 sherlock:16000:75 sherlock:32000:25 sherlock:32000:75 alice:whole:30:1 alice:whole:70:1
    sherlock:64000:30 sherlock:64000:70"
step heldout_ordered python benchmarks/long_context_probe.py --home "$OUT/long_home" $HC
step heldout_shared python benchmarks/long_context_probe.py --home "$OUT/long_home" --shared $HC

# optional peers and devices
if python -c "import llama_cpp" 2>/dev/null; then
    step llama_cpp_peer python benchmarks/llama_cpp_peer.py
else
    echo "== llama_cpp_peer: skipped (pip install llama-cpp-python to run it)" >&2
fi
if python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    # issue 17's device check: 8B-shaped random model, 128K tokens, 24 GiB cap (~6.5 min on an H100)
    step gpu_check python benchmarks/gpu_check.py
else
    echo "== gpu_check: skipped (no CUDA device)" >&2
fi
exit $failed
