"""The engine: document -> (cached) prefix KV in the store -> answers with retrieval attention.

    engine = Engine(home, Settings())
    prepared = engine.prepare(load_document("book.pdf"))   # prefill once, or load from the store
    for piece in engine.ask(prepared, "Who is the narrator?"):
        print(piece, end="")

Device split (the same code on CPU and CUDA): the model and each question's static KV (sinks,
recent window, new tokens) live on `Settings.device`; the offloaded KV (memory-mapped store
arrays) and the indexes stay on the CPU, and only retrieved rows are copied to the device.
No CLI imports here: progress and notices go through the callbacks given to Engine.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import attention  # noqa: F401  registers the "ra" attention implementation with transformers
from .documents import Document
from .store import Entry, EntryWriter, Store, StoreKey


@dataclass
class Settings:
    model: str | None = None       # None: the embedded default
    device: str = "auto"           # auto | cpu | cuda
    dtype: str = "auto"            # auto (fp32 on CPU, bf16 on CUDA) | float32 | bfloat16 | float16
    attention: str = "retrieval"   # retrieval | full (exact baseline over the same cached KV)
    index: str = "auto"            # auto | flat | hnsw | graph  (auto: see Engine.index_kind)
    top_k: int = 100
    sink: int = 128
    recent: int = 512
    chunk_size: int = 1024
    kv_dtype: str = "float16"
    max_tokens: int = 256
    stop_at_eos: bool = True       # False: always generate max_tokens (benchmarks)
    query_samples: int = 512       # prefill positions whose queries are kept (more for long documents)
    trust_remote_code: bool = False


# `--index auto` switches from exact flat search to the graph index at this many offloaded keys
# per head: benchmarks/index_recall.py measured flat at ~6 ms per 1K keys per decode step (all
# layers) against ~110 ms for the graph at 100K keys (recall 0.92, attention mass 0.99); below
# ~16K keys exact search costs about as little and is exact. BENCHMARKS.md has the numbers.
AUTO_GRAPH_MIN_KEYS = 16_384


@dataclass
class Prepared:
    """A document whose prefix KV is in the store, opened for answering."""

    doc: Document
    entry: Entry
    cache_hit: bool
    prefill_s: float = 0.0
    index_s: float = 0.0
    load_s: float = 0.0
    index_kind: str = "flat"       # the index actually used (`auto` resolved)
    layer_state: list = field(default_factory=list)  # per layer: (OffloadedKV, index) reused across questions


@dataclass
class AnswerStats:
    question_tokens: int = 0       # everything fed before the answer: earlier turns + this question
    answer_tokens: int = 0
    answer_s: float = 0.0
    first_token_s: float = 0.0
    answer_ids: list = field(default_factory=list)  # the generated tokens (kept for the next turn)


class OffloadedKV:
    """One layer's offloaded K/V: [KVH, N, D] views of the store's memory maps (CPU)."""

    def __init__(self, keys: np.ndarray, values: np.ndarray):
        import torch

        self.k = torch.from_numpy(keys)
        self.v = torch.from_numpy(values)
        self.heads = torch.arange(keys.shape[0])[:, None, None]

    def gather_values(self, ids):
        """ids: [KVH, M, k] -> v: [KVH, M, k, D] (store dtype, CPU)."""
        return self.v[self.heads, ids]

    def gather_keys(self, ids):
        """ids: [KVH, M, k] -> k: [KVH, M, k, D] (store dtype, CPU)."""
        return self.k[self.heads, ids]


class Engine:
    def __init__(self, home: Path, settings: Settings | None = None, progress=None, notice=None, loaded=None):
        """progress(stage, done, total) and notice(message) report long work; both optional.
        loaded=(model, tokenizer, identity) uses an already loaded model (tests, benchmarks)."""
        from . import model as models

        self.home = Path(home)
        self.s = settings or Settings()
        self.progress = progress or (lambda *a: None)
        self.notice = notice or (lambda *a: None)
        self.store = Store(self.home / "store")
        t = time.perf_counter()
        if loaded is None:
            self.ref = models.resolve(self.s.model)
            self.device = models.pick_device(self.s.device)
            self.dtype = models.pick_dtype(self.s.dtype, self.device)
            self.model, self.tokenizer = models.load(self.ref, self.home / "models", self.device, self.dtype,
                                                     self.s.trust_remote_code, self.notice)
        else:
            self.model, self.tokenizer, identity = loaded
            self.ref = models.ModelRef(identity, "loaded", identity, identity)
            p = next(self.model.parameters())
            self.device, self.dtype = p.device.type, p.dtype
        self.load_s = time.perf_counter() - t
        cfg = self.model.config
        self.n_layers = cfg.num_hidden_layers
        self.q_heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.q_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.q_heads
        self.max_positions = getattr(cfg, "max_position_embeddings", None)

    # ------------------------------------------------------------------ documents -> store

    def key(self, doc: Document) -> StoreKey:
        from .prompt import PROMPT_VERSION

        from .longctx import SCHEME

        return StoreKey(text_sha256=doc.sha256, model=self.ref.identity, prompt=PROMPT_VERSION,
                        compute_dtype=str(self.dtype).replace("torch.", ""), kv_dtype=self.s.kv_dtype,
                        positions=SCHEME)

    def static_sizes(self, entry: Entry) -> tuple[int, int]:
        """(sink, recent) for an entry under the current settings. A long document's local window
        (true positions) is at least longctx.LOCAL tokens, as in its prefill."""
        from .longctx import LOCAL

        return self.s.sink, max(self.s.recent, LOCAL) if entry.remapped else self.s.recent

    def split(self, entry: Entry) -> tuple[int, int]:
        """The offloaded range [a, b) of an entry under the current settings."""
        return entry.split(*self.static_sizes(entry))

    def prepare(self, doc: Document) -> Prepared:
        """Open the document's store entry, prefilling and indexing it first if it is not cached."""
        key = self.key(doc)
        entry = self.store.open(key)
        hit = entry is not None
        prefill_s = 0.0
        if not hit:
            with self.store.lock(key):  # another process may be building the same entry
                entry = self.store.open(key)
                hit = entry is not None
                if not hit:
                    t = time.perf_counter()
                    self._build_entry(doc, key)
                    prefill_s = time.perf_counter() - t
                    entry = self.store.open(key)
        if entry.remapped:
            self.notice(f"{doc.name}: {entry.n_tokens:,} tokens, past the model's {self.max_positions:,}-token "
                        f"window: remapped positions (local window + retrieved keys beyond a fixed distance)")
        t = time.perf_counter()
        kind = self.index_kind(entry)
        index_dir = entry.ensure_index(self.store, kind, *self.static_sizes(entry),
                                       lambda d, n: self.progress("index", d, n))
        index_s = time.perf_counter() - t
        prepared = Prepared(doc=doc, entry=entry, cache_hit=hit, prefill_s=prefill_s, index_s=index_s, index_kind=kind)
        t = time.perf_counter()
        prepared.layer_state = self._open_layers(entry, index_dir, kind)
        prepared.load_s = time.perf_counter() - t
        return prepared

    def query_count(self, n_tokens: int) -> int:
        """Prefill positions whose queries an entry keeps to build a graph index from: 4% of a long
        document (index_recall.py: 4,096 of 100K positions lift recall@100 by ~0.02 over 1,024 at
        equal keys scored, mostly through better entry keys), at least `query_samples`, at most
        8,192 (35 KB a position for SmolLM2: 4% of them is 6% of the fp16 K+V)."""
        return max(self.s.query_samples, min(8192, n_tokens // 25))

    def index_kind(self, entry: Entry) -> str:
        """The index for this entry: as asked, or for `auto` exact flat search on short documents
        and the query-aware graph on long ones (fp16 stores, which are the default). Documents past
        the model's window (remapped positions) keep exact search: there the graph at its default
        width missed passcodes exact search finds (2 of whole Alice's 3; BENCHMARKS.md)."""
        if self.s.index != "auto":
            return self.s.index
        a, b = self.split(entry)
        long = b - a >= AUTO_GRAPH_MIN_KEYS and entry.keys.dtype == np.float16
        return "graph" if long and not entry.remapped else "flat"

    def _build_entry(self, doc: Document, key: StoreKey) -> None:
        from . import longctx
        from .generation import QueryCapture, prefill
        from .prompt import build_prefix

        prefix = build_prefix(self.tokenizer, doc)
        n = len(prefix.ids)
        remap = longctx.needs_remap(n, self.max_positions)
        if remap and not longctx.supports(self.model):
            from .documents import DocumentError

            raise DocumentError(
                f"{doc.name} is {n:,} tokens; {self.ref.spec} handles at most {self.max_positions:,} "
                f"(prompt and answer included) and has no RoPE module to remap positions with")
        if remap:
            self.notice(f"{doc.name} is {n:,} tokens, past the model's {self.max_positions:,}-token window: "
                        f"prefilling in chunks with remapped positions ({longctx.LOCAL:,}-token local window, "
                        f"top-{longctx.PREFILL_TOPK} far keys per {longctx.BLOCK} tokens)")
        q_pos = np.unique(np.linspace(0, n - 1, num=min(self.query_count(n), n)).astype(np.int64))
        with self.store.staging() as tmp:
            t = time.perf_counter()
            w = EntryWriter(tmp, n, self.n_layers, self.kv_heads, self.q_heads, self.head_dim, self.s.kv_dtype, q_pos)
            capture = QueryCapture(q_pos, w.write_queries)
            report = lambda d, total: self.progress("prefill", d, total)
            if remap:  # keys stored pre-RoPE, queries in the global frame (core/longctx.py)
                longctx.prefill_long(self.model, prefix.ids, min(self.s.chunk_size, 512), w, capture, report)
            else:
                prefill(self.model, prefix.ids, self.s.chunk_size, w.write_kv, capture, report)
            manifest = {
                "format": key.format, "key": key.__dict__, "digest": key.digest,
                "document": {"name": doc.name, "kind": doc.kind, "chars": len(doc.text),
                             "page_starts": doc.page_starts, "files": doc.files},
                "model": {"spec": self.ref.spec, "identity": self.ref.identity,
                          "layers": self.n_layers, "q_heads": self.q_heads, "kv_heads": self.kv_heads,
                          "head_dim": self.head_dim},
                "n_tokens": n, "prefill_s": round(time.perf_counter() - t, 3), "chunk_size": self.s.chunk_size,
                "positions": ({"scheme": longctx.SCHEME, "keys": "pre-rope", "window": self.max_positions,
                               "sink": longctx.SINK, "local": longctx.LOCAL, "distance": longctx.DISTANCE,
                               "prefill_topk": longctx.PREFILL_TOPK, "block": longctx.BLOCK}
                              if remap else {"scheme": "exact", "keys": "post-rope"}),
                "created": time.time(),
            }
            w.finish(manifest, prefix.ids, prefix.sources, doc.text)
            self.store.commit(tmp, self.store.path(key))

    def _open_layers(self, entry: Entry, index_dir: Path, kind: str) -> list:
        import torch

        from .index import open_layer_index

        layers = []
        a, b = self.split(entry)
        for layer in range(entry.n_layers):
            off = OffloadedKV(entry.keys[layer, :, a:b], entry.values[layer, :, a:b])
            index = None
            if b > a and self.s.attention != "full":  # full attention reads the KV, not the index
                keys32 = off.k.float() if kind == "flat" else None
                index = open_layer_index(kind, index_dir, layer, keys32, b - a, entry.head_dim, entry.kv_heads,
                                         keys_f16=entry.keys[layer, :, a:b])
            layers.append((off, index))
        return layers

    # ------------------------------------------------------------------ answering

    def build_cache(self, prepared: Prepared):
        """A fresh transformers Cache for one question: RetrievalLayers, or the whole KV for `full`."""
        import torch
        from transformers.cache_utils import DynamicLayer

        from .attention import RetrievalCache, RetrievalLayer

        e = prepared.entry
        a, b = self.split(e)
        rope = None
        if e.remapped:
            from .longctx import RemappedRetrievalLayer, Rope

            rope = Rope(self.model)
        layers = []
        for layer, (off, index) in enumerate(prepared.layer_state):
            to_dev = lambda arr: torch.from_numpy(np.ascontiguousarray(arr)).to(self.device, self.dtype)[None]
            if self.s.attention == "full":
                k = to_dev(e.keys[layer])
                if rope is not None:  # plain positions (the baseline that fails past the window)
                    k = rope.rotate(k.float(), torch.arange(e.n_tokens, device=k.device)).to(self.dtype)
                dl = DynamicLayer()
                dl.update(k, to_dev(e.values[layer]))
                layers.append(dl)
                continue
            if self.s.attention != "retrieval":
                raise ValueError(f"unknown attention {self.s.attention!r} (retrieval or full)")
            if rope is not None:
                # the local window rotated back to its true positions; sinks stay pre-RoPE (global)
                k_loc = rope.rotate(to_dev(e.keys[layer, :, b:]).float(), torch.arange(b, e.n_tokens, device=self.device))
                f32 = lambda arr: torch.from_numpy(np.ascontiguousarray(arr)).to(self.device, torch.float32)
                layers.append(RemappedRetrievalLayer(k_loc.to(self.dtype), to_dev(e.values[layer, :, b:]),
                                                     f32(e.keys[layer, :, :a]), f32(e.values[layer, :, :a]),
                                                     off, index, self.s.top_k, e.n_tokens, rope))
                continue
            k = np.concatenate([e.keys[layer, :, :a], e.keys[layer, :, b:]], axis=1)  # [KVH, S, D]
            v = np.concatenate([e.values[layer, :, :a], e.values[layer, :, b:]], axis=1)
            layers.append(RetrievalLayer(to_dev(k), to_dev(v), off, index, self.s.top_k, e.n_tokens))
        return RetrievalCache(layers)

    def ask(self, prepared: Prepared, question: str, stats: AnswerStats | None = None, on_logits=None,
            history: list | None = None):
        """Stream the answer to `question` as text pieces. Fills `stats` if given.

        history: earlier turns of a conversation about this document, [(question, answer_ids)];
        they are run again on top of the document's cache (a few hundred tokens, no document
        prefill), so the answer sees the conversation."""
        from .generation import TextStream, generate
        from .prompt import followup_ids, question_ids, stop_ids

        stats = stats if stats is not None else AnswerStats()
        turns = list(history or []) + [(question, None)]
        q: list[int] = []
        for i, (text, answer_ids) in enumerate(turns):
            q += question_ids(self.tokenizer, text) if i == 0 else followup_ids(self.tokenizer, text)
            if answer_ids is not None:
                q += list(answer_ids)
        stats.question_tokens = len(q)
        n = prepared.entry.n_tokens
        window = None if prepared.entry.remapped else self.max_positions  # a remapped entry has no limit
        if window and n + len(q) + 1 > window:
            from .documents import DocumentError

            raise DocumentError(f"the conversation no longer fits in the model's {self.max_positions:,} tokens "
                                f"(document {n:,} + {len(q):,}); start over (/reset)")
        max_new = min(self.s.max_tokens, window - n - len(q)) if window else self.s.max_tokens
        cache = self.build_cache(prepared)
        stream = TextStream(self.tokenizer)
        t = time.perf_counter()
        for tok in generate(self.model, cache, q, n, max_new,
                            stop_ids(self.tokenizer, self.model.config) if self.s.stop_at_eos else set(),
                            on_logits):
            if stats.answer_tokens == 0:
                stats.first_token_s = time.perf_counter() - t
            stats.answer_tokens += 1
            stats.answer_ids.append(tok)
            stats.answer_s = time.perf_counter() - t
            piece = stream.push(tok)
            if piece:
                yield piece
        stats.answer_s = time.perf_counter() - t
