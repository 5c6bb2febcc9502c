"""Settings: one frozen value per engine and per opened document. Imports neither torch nor
transformers, so the CLI takes its defaults from here without loading them.

  Settings       what the user chooses (model, device, attention, index, split, ...). Frozen: to
                 ask with other settings, open the document again (cheap: memory maps).
  RemapScheme    how a document past the model's window is prefilled and decoded (core/longctx.py):
                 recorded in the entry's key and manifest, passed to the layers that use it.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace

from .errors import UsageError

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
STEP_DTYPES = DTYPES + ("blocks",)  # blocks: core/blocks.py
KV_DTYPES = ("float16", "float32")
ATTENTIONS = ("retrieval", "full")
INDEXES = ("flat", "exact", "hnsw", "graph", "cluster")  # core/index.py's KINDS, in its order (checked there)


DECODE_ONLY = ("ordered", "estimate_distance")  # RemapScheme fields the stored KV does not depend on


@dataclass(frozen=True)
class RemapScheme:
    """Remapped positions for a document past the model's window (InfLLM-style; core/longctx.py).

    sink          global sink tokens of the prefill (decoding uses Settings.sink)
    local         local window at true positions (decoding keeps at least this many recent tokens)
    distance      prefill: every global key's distance; decoding: the nearest retrieved key's
    prefill_topk  far keys retrieved per block of prefill queries, per query head
    block         prefill queries sharing one retrieval (their mean global query ranks the far keys)
    span, spans   far keys are summarised in spans of `span` tokens (min/max per dimension); the
                  `spans` spans of highest bound are scored exactly
    ordered       decoding: retrieved keys in document order beyond `distance` (else all at it)
    estimate_distance  decoding: where a clustered index's estimated clusters sit (0: at `distance`,
                  the frame they were chosen in). 4,096, beyond every retrieved key and sink: on 9
                  needles past the window 7 found, as with flat top-100, against 2 at `distance`
                  (BENCHMARKS.md, "The clustered index")
    """

    sink: int = 128
    local: int = 2048
    distance: int = 2048
    prefill_topk: int = 512
    block: int = 128
    span: int = 64
    spans: int = 32
    ordered: bool = True
    estimate_distance: int = 4096

    @property
    def name(self) -> str:
        """The scheme's name in the store key: two entries share KV only if it is equal. `ordered`
        and `estimate_distance` are decode-time choices (the stored KV does not depend on them), so
        they are not in the name."""
        return (f"remap-s{self.sink}-l{self.local}-d{self.distance}-k{self.prefill_topk}-b{self.block}"
                f"-p{self.span}x{self.spans}")

    @classmethod
    def parse(cls, name: str) -> "RemapScheme":
        m = re.fullmatch(r"remap-s(\d+)-l(\d+)-d(\d+)-k(\d+)-b(\d+)-p(\d+)x(\d+)", name)
        if not m:
            raise ValueError(f"not a remap scheme name: {name!r}")
        return cls(*map(int, m.groups()))

    def as_manifest(self) -> dict:
        return {"scheme": self.name, "keys": "pre-rope", **{k: v for k, v in asdict(self).items() if k not in DECODE_ONLY}}


@dataclass(frozen=True)
class Settings:
    """Everything the engine and an opened document are built with. The CLI's defaults are these."""

    model: str | None = None       # None: the embedded default
    device: str = "auto"           # auto | cpu | cuda
    dtype: str = "auto"            # auto (fp32 on CPU, bf16 on CUDA) | float32 | bfloat16 | float16
    step_dtype: str = "auto"       # weights of the one-token decode steps (core/model.step_copy): auto (blocks
                                   # for a GGUF on the CPU in fp32, else the same as dtype) | float32 | bfloat16
                                   # | float16 | blocks (fp32 weights that are a GGUF's 4/8-bit blocks, read as
                                   # blocks: core/blocks.py); the prefill, the question and --attention full
                                   # always run in `dtype`
    attention: str = "retrieval"   # retrieval | full (exact baseline over the same cached KV)
    index: str = "auto"            # auto | a kind of core/index.py KINDS (auto: see Engine.index_kind)
    graph_min_keys: int = 16_384   # `auto` picks the graph index from this many offloaded keys per head (below: exact)
    top_k: int = 100               # offloaded keys retrieved per query head and step
    retrieve: float = 0.1          # cluster index: at least this fraction of the keys (past scan_max: of the
                                   # clusters) attended exactly
    estimate: float = 1.0          # cluster index: this fraction of the clusters next estimated (core/cluster.py;
                                   # 1: every cluster not wholly retrieved). Both chosen on the needle grid
                                   # (BENCHMARKS.md, "The clustered index")
    scan_max: int = 16_384         # cluster index: up to this many offloaded keys per head, the exactly attended
                                   # keys are the true top-k (every key scored); past it, the best clusters
    sink: int = 128                # first document tokens kept static
    recent: int = 512              # last document tokens kept static
    chunk_size: int = 1024         # prefill chunk, in tokens
    kv_dtype: str = "float16"      # dtype of the stored K/V
    max_tokens: int = 256          # longest answer
    stop_at_eos: bool = True       # False: always generate max_tokens (benchmarks)
    query_samples: int = 512       # prefill positions whose queries are kept (more for long documents)
    trust_remote_code: bool = False
    rebuild: bool = True           # a damaged cache entry is rebuilt (False: an error)
    checkpoint_s: float = 30.0     # a layer-by-layer prefill checkpoints (for resume) at most this often
    confirm_tokens: int = 1_000_000  # prefills longer than this need a yes (a prompt, or --yes)
    trace: bool = False            # name a decode step's parts (ra.select / ra.copy / ra.attend) for
                                   # torch.profiler (benchmarks/gpu_check.py); off, they cost nothing
    remap: RemapScheme = field(default_factory=RemapScheme)  # documents past the model's window

    def check(self) -> "Settings":
        """Raise UsageError for a value no command could use; returns self."""
        def one_of(name, value, allowed):
            if value not in allowed:
                raise UsageError(f"--{name.replace('_', '-')} must be {', '.join(allowed[:-1])} or {allowed[-1]}, "
                                 f"not {value!r}")

        one_of("device", self.device, DEVICES)
        one_of("dtype", self.dtype, DTYPES)
        one_of("step_dtype", self.step_dtype, STEP_DTYPES)
        one_of("attention", self.attention, ATTENTIONS)
        one_of("index", self.index, ("auto",) + INDEXES)
        one_of("kv_dtype", self.kv_dtype, KV_DTYPES)
        for name, low in (("top_k", 1), ("sink", 0), ("recent", 0), ("chunk_size", 16), ("max_tokens", 1), ("scan_max", 0)):
            if getattr(self, name) < low:
                raise UsageError(f"--{name.replace('_', '-')} must be at least {low}, not {getattr(self, name)}")
        for name in ("retrieve", "estimate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UsageError(f"--{name} must be a fraction between 0 and 1, not {getattr(self, name)}")
        return self

    def but(self, **changes) -> "Settings":
        """A copy with some fields changed (Settings are frozen)."""
        return replace(self, **changes)


DEFAULTS = Settings()
