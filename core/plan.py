"""What a job needs before it runs: weights, K/V, index, workspaces, for retrieval and for full
attention, and whether each fits a GPU of a given size (`ra plan`). Pure arithmetic over a model's
config: imports neither torch nor transformers, needs no weights.

The model is read from a config.json, a model directory, a Hugging Face id already in the local
cache, or a .gguf file's metadata. Every number is the arithmetic of what ra allocates:

  weights          parameters x dtype bytes (embedding, per layer q/k/v/o, MLP, norms, head)
  kv_per_token     2 (K and V) x layers x KV heads x head_dim x dtype bytes
  full attention   the device holds the weights, the whole K/V (document + question + answer)
                   and one chunk's activations (core/generation.prefill keeps every layer's K/V)
  retrieval        prefill (core/generation.prefill_layerwise): weights + every token's hidden
                   state + one layer's K/V + one chunk's activations + two chunks' K/V and sampled
                   queries on their way to the host (core/outbox.py); decode: weights + the static
                   K/V (sinks, recent window, question and answer) + one step's workspace. The
                   offloaded K/V stays in the store (page cache), the index on the host; but
                   `flat` on a GPU (what `auto` picks there) is searched on the device
                   (core/device.py): every offloaded key in fp8 on the device, plus one layer's
                   keys widened to bf16 and a block of ROWS query rows' scores and candidate keys
                   while a step searches
  host             retrieval: the opened index's in-memory tables (core/cluster.py: centroids,
                   sizes, value sums, order); flat on the GPU: the offloaded K and V copied into
                   pinned memory, which the device reads the chosen rows of
  disk             the store entry: fp16 K/V + prefill queries + the index files

`activations(c)`: the hidden state, the q/k/v/o projections and the MLP's intermediates of c
tokens in the model dtype (SDPA/flash attention builds no score matrix), plus fp32 logits of one
token. tests/test_plan.py checks these against tensors allocated for a small model.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UsageError
from .settings import DEFAULTS

GiB = 1024 ** 3
DEVICE_ROWS = 256  # core/device.ROWS: query rows a device search scores at once (no torch import here)
DEVICE_WIDEN = 2  # core/device.WIDEN: candidates per query row, x k
DTYPE_BYTES = {"bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "float32": 4, "fp32": 4}


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only transformer that the plan needs."""

    layers: int
    hidden: int
    intermediate: int
    q_heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False
    max_positions: int = 0
    qkv_bias: bool = False

    @classmethod
    def from_config(cls, c: dict) -> "Shape":
        c = c.get("text_config", c)
        try:
            heads = c["num_attention_heads"]
            return cls(layers=c["num_hidden_layers"], hidden=c["hidden_size"], intermediate=c["intermediate_size"],
                       q_heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
                       head_dim=c.get("head_dim") or c["hidden_size"] // heads, vocab=c["vocab_size"],
                       tied=bool(c.get("tie_word_embeddings", False)),
                       max_positions=c.get("max_position_embeddings", 0),
                       qkv_bias=bool(c.get("attention_bias", c.get("model_type") == "qwen2")))
        except KeyError as e:
            raise UsageError(f"the model config has no {e.args[0]!r}: not a decoder-only transformer ra can plan") from None

    def params(self) -> int:
        H, D = self.hidden, self.head_dim
        attn = H * self.q_heads * D + 2 * H * self.kv_heads * D + self.q_heads * D * H
        attn += (self.q_heads + 2 * self.kv_heads) * D if self.qkv_bias else 0
        per_layer = attn + 3 * H * self.intermediate + 2 * H
        return self.vocab * H * (1 if self.tied else 2) + self.layers * per_layer + H

    def kv_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def activations(self, tokens: int, dtype_bytes: int) -> int:
        H, D = self.hidden, self.head_dim
        per_token = 4 * H + (self.q_heads + 2 * self.kv_heads) * D + self.q_heads * D + 3 * self.intermediate
        return tokens * per_token * dtype_bytes + self.vocab * 4


def _gguf_shape(path: Path) -> Shape:
    from gguf import GGUFReader

    r = GGUFReader(str(path))

    def field(name):
        f = r.fields.get(name)
        if f is None:
            return None
        v = f.parts[f.data[0]]
        return int(v[0]) if len(v) == 1 else v

    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    heads = field(f"{arch}.attention.head_count")
    hidden = field(f"{arch}.embedding_length")
    vocab = len(r.fields["tokenizer.ggml.tokens"].data)
    tied = not any(t.name == "output.weight" for t in r.tensors)
    return Shape(layers=field(f"{arch}.block_count"), hidden=hidden, intermediate=field(f"{arch}.feed_forward_length"),
                 q_heads=heads, kv_heads=field(f"{arch}.attention.head_count_kv") or heads,
                 head_dim=field(f"{arch}.attention.key_length") or hidden // heads, vocab=vocab, tied=tied,
                 max_positions=field(f"{arch}.context_length") or 0)


def read_shape(spec: str | None) -> tuple[str, Shape]:
    """(what was read, Shape) for a config.json, a model directory, a cached hub id, a .gguf, or
    None/"embedded" (the embedded SmolLM2's GGUF)."""
    from .errors import ModelError

    if spec in (None, "embedded", "smollm2-135m-instruct"):
        from .model import embedded_gguf

        path = embedded_gguf()
        return str(path), _gguf_shape(path)
    p = Path(spec).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if p.suffix == ".gguf" and p.is_file():
        return str(p), _gguf_shape(p)
    if p.is_file():
        try:
            return str(p), Shape.from_config(json.loads(p.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise UsageError(f"{spec} is not a JSON model config") from None
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(spec, "config.json")
        if isinstance(found, str):
            return found, Shape.from_config(json.loads(Path(found).read_text(encoding="utf-8")))
        raise ModelError(f"{spec} is not in the local Hugging Face cache (ra plan downloads nothing): "
                         "give its config.json or model directory")
    raise UsageError(f"{spec}: no such file or directory")


def parse_size(text: str) -> int:
    """'24GiB', '24G', '80 GB', '1.5TiB', '512MiB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"not a size: {text!r} (e.g. 24GiB, 80GB)")
    base = 1024 if (m.group(3) or not m.group(2)) else 1000
    return int(float(m.group(1)) * base ** "BKMGT".index((m.group(2) or "B").upper()))


@dataclass(frozen=True)
class PlanInput:
    tokens: int                 # document tokens
    capacity: int = 512         # question + answer tokens after the document
    dtype_bytes: int = 2        # model weights and device K/V (bf16 on CUDA)
    store_bytes: int = 2        # stored K/V (fp16)
    chunk: int = DEFAULTS.chunk_size  # prefill chunk; the rest as ra's Settings (one place for the defaults)
    sink: int = DEFAULTS.sink
    recent: int = DEFAULTS.recent
    top_k: int = DEFAULTS.top_k
    retrieve: float = DEFAULTS.retrieve
    index: str = "flat"         # flat (searched on the GPU) | cluster | exact (on the host)
    scan_max: int = DEFAULTS.scan_max  # cluster index: up to this many offloaded keys per head it also scans every key
    query_samples: int = DEFAULTS.query_samples

    @classmethod
    def of(cls, n: int, s, dtype_bytes: int, remap: bool = False) -> "PlanInput":
        """The plan's input for a job of n document tokens under core/settings.Settings `s` on a
        GPU: `auto` is `flat` there (searched on the device); a remapped document (past the
        window) is searched on the host (no index bytes on the device: the cluster arithmetic)
        and keeps its wider local window (Engine.static_sizes)."""
        index = "flat" if s.index == "auto" else s.index
        return cls(n, capacity=s.max_tokens + 256, dtype_bytes=dtype_bytes, chunk=s.chunk_size, sink=s.sink,
                   recent=max(s.recent, s.remap.local) if remap else s.recent, top_k=s.top_k,
                   index="cluster" if remap and index == "flat" else index)


def plan(shape: Shape, x: PlanInput, gpu_memory: int | None = None) -> dict:
    """The plan as a dict: per-part bytes for `retrieval` and `full`, each with `peak_bytes` and
    (given gpu_memory) `fits`."""
    L, KVH, D = shape.layers, shape.kv_heads, shape.head_dim
    n, w = x.tokens, x.dtype_bytes
    weights = shape.params() * w
    act = shape.activations(min(x.chunk, n), w)
    kv_tok = shape.kv_per_token(w)
    full_kv = kv_tok * (n + x.capacity)
    # retrieval
    hidden = n * shape.hidden * w
    one_layer = n * 2 * KVH * D * w
    static_tokens = min(n, x.sink + x.recent) + x.capacity
    static = kv_tok * static_tokens
    offloaded = max(0, n - x.sink - x.recent)
    clusters = math.ceil(offloaded / 16)
    retrieved = max(x.top_k, math.ceil(x.retrieve * clusters) * 16)  # keys per query head and step
    step = shape.q_heads * (clusters + retrieved) * 4 + shape.q_heads * retrieved * D * 4 * 2  # scores + K/V rows, one layer
    heads = L * KVH
    device_index = 0
    if x.index == "flat":  # core/device.DeviceRetriever: fp8 keys on the device; a step widens one layer's to bf16
        device_index = heads * offloaded * D
        step = max(step, KVH * offloaded * D * 2 + KVH * DEVICE_ROWS * offloaded * 2  # + scores of ROWS rows
                   + KVH * DEVICE_ROWS * DEVICE_WIDEN * x.top_k * D * (x.store_bytes + 4))  # + their keys, as stored and fp32
    decode_ws = shape.activations(1, w) + step
    # on their way to the host (core/outbox.Outbox at its default depth, 4 sends in flight, K/V and a
    # chunk's sampled queries in turn): two chunks' K/V in the store dtype and their queries in fp32,
    # held on the device until copied (every chunk has samples: they are spread evenly over the document)
    c = min(x.chunk, n)
    samples = max(x.query_samples, min(8192, n // 25))  # prefill queries kept (core/engine.Engine.query_count)
    copy_out = 2 * (c * 2 * KVH * D * x.store_bytes + shape.q_heads * (math.ceil(min(n, samples) * c / n) + 1) * D * 4)
    prefill_peak = weights + hidden + one_layer + act + copy_out
    decode_peak = weights + static + device_index + decode_ws
    if x.index == "flat":  # the offloaded K and V in pinned host memory
        host_index = heads * offloaded * D * x.store_bytes * 2
    elif x.index == "exact":  # a question's fp32 conversion of one layer's offloaded K and V (core/layer.Retriever.partial;
        host_index = KVH * offloaded * D * 4 * 2  # a decode step reads the stored fp16 as it is)
    else:  # core/cluster.ClusterLayerIndex: fp32 centroids + log sizes, int64 sizes/offsets/order; value sums mapped
        host_index = heads * (clusters * (D * 4 + 4 + 8 + 8) + offloaded * 8)
        if offloaded <= x.scan_max:  # its exact zone is a scan: an fp32 copy of the keys, and each key's cluster
            host_index += heads * offloaded * (D * 4 + 8)
    queries = L * shape.q_heads * samples * D * x.store_bytes
    index_disk = 0 if x.index in ("flat", "exact") else heads * (clusters * (2 * D * 4 + 4 + 8) + offloaded * 4)
    disk = shape.kv_per_token(x.store_bytes) * n + queries + index_disk + n * 8
    out = {
        "model": asdict(shape), "tokens": n, "params": shape.params(),
        "retrieval": {"weights_bytes": weights, "static_kv_bytes": static, "static_tokens": static_tokens,
                      "prefill_hidden_bytes": hidden, "prefill_layer_kv_bytes": one_layer,
                      "prefill_activation_bytes": act, "prefill_copy_out_bytes": copy_out,
                      "decode_workspace_bytes": decode_ws,
                      "prefill_peak_bytes": prefill_peak, "decode_peak_bytes": decode_peak,
                      "peak_bytes": max(prefill_peak, decode_peak), "device_index_bytes": device_index,
                      "host_index_bytes": host_index,
                      "disk_bytes": disk, "index": x.index, "keys_retrieved_per_head": retrieved},
        "full": {"weights_bytes": weights, "kv_bytes": full_kv, "activation_bytes": act,
                 "peak_bytes": weights + full_kv + act, "disk_bytes": disk},
    }
    if gpu_memory is not None:
        out["gpu_memory_bytes"] = gpu_memory
        for mode in ("retrieval", "full"):
            out[mode]["fits"] = out[mode]["peak_bytes"] <= gpu_memory
    return out


def explain(p: dict) -> str:
    """The plan as a few human lines (what `ra plan` prints without --json)."""
    g = lambda b: f"{b / GiB:.2f} GiB"
    r, f = p["retrieval"], p["full"]
    cap = p.get("gpu_memory_bytes")
    verdict = lambda m: "" if cap is None else ("  fits" if m["fits"] else f"  DOES NOT FIT in {g(cap)}")
    lines = [
        f"model: {p['params'] / 1e9:.2f}B parameters, {p['model']['layers']} layers, {p['model']['kv_heads']} KV heads "
        f"x {p['model']['head_dim']}; document: {p['tokens']:,} tokens",
        f"retrieval attention: peak {g(r['peak_bytes'])}{verdict(r)}",
        f"  prefill: weights {g(r['weights_bytes'])} + hidden states {g(r['prefill_hidden_bytes'])} + one layer's K/V "
        f"{g(r['prefill_layer_kv_bytes'])} + chunk {g(r['prefill_activation_bytes'])} + copy-out "
        f"{g(r['prefill_copy_out_bytes'])} = {g(r['prefill_peak_bytes'])}",
        f"  decode:  weights + static K/V {g(r['static_kv_bytes'])} ({r['static_tokens']:,} tokens)"
        + (f" + fp8 keys to search {g(r['device_index_bytes'])}" if r["device_index_bytes"] else "")
        + f" + workspace {g(r['decode_workspace_bytes'])} = {g(r['decode_peak_bytes'])}",
        f"  host: {r['index']} index {g(r['host_index_bytes'])}{' (the offloaded K/V, pinned)' if r['index'] == 'flat' else ''}; disk: {g(r['disk_bytes'])} (store entry)",
        f"full attention: peak {g(f['peak_bytes'])}{verdict(f)}",
        f"  weights {g(f['weights_bytes'])} + K/V {g(f['kv_bytes'])} + chunk {g(f['activation_bytes'])}",
    ]
    c = p.get("conversion")
    if c:  # a .gguf: converted once, tensor by tensor (core/gguf_convert.py)
        lines.append(f"first use converts the GGUF to {c['dtype']}: host memory {g(c['host_bytes'])} at peak, "
                     f"disk {g(c['disk_bytes'])}")
    return "\n".join(lines)


def refusal(p: dict, mode: str, available: int) -> str | None:
    """Why a job of plan `p` in `mode` (retrieval | full) would run out of `available` device
    bytes, as one line, or None if it fits. The engine asks this before a prefill on CUDA."""
    need = p[mode]["peak_bytes"]
    if need <= available:
        return None
    other = "full" if mode == "retrieval" else "retrieval"
    need_other = p[other]["peak_bytes"]
    hint = f"; {other} attention would need {need_other / GiB:.1f} GiB" if need_other <= available else ""
    return (f"{p['tokens']:,} tokens need about {need / GiB:.1f} GiB of GPU memory with {mode} attention "
            f"(weights {p[mode]['weights_bytes'] / GiB:.1f} GiB) and {available / GiB:.1f} GiB is free{hint} "
            f"(`ra plan` shows the parts)")
