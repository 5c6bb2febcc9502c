"""The engine: document -> (cached) prefix KV in the store -> answers with retrieval attention.

    engine = Engine(home, Settings())                      # loads the model once
    prepared = engine.prepare(load_document("book.pdf"))   # prefill once, or load from the store
    for piece in engine.ask(prepared, "Who is the narrator?"):
        print(piece, end="")
    again = engine.prepare(doc, engine.settings.but(top_k=400))  # other settings: open again (cheap; a
                                                          # GPU's device retrievers are shared)

A token's K/V: prefill (core/generation.py, core/longctx.py past the window) -> the entry's
keys.npy / values.npy (core/store.py, manifest core/manifest.py) -> split at open time into the
static zone and the offloaded range, which an index of core/index.py searches -> one
core/layer.DocumentLayer per model layer merges the static and retrieved partials for each answer.

Device split (the same code on CPU and CUDA): the model and each question's static KV (sinks,
recent window, new tokens) live on `Settings.device`; the offloaded KV (memory-mapped store
arrays) and the indexes stay on the CPU, and only retrieved rows are copied to the device.
No CLI imports here: progress and notices go through the callbacks given to Engine.
"""
from __future__ import annotations

import errno
import shutil
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import xxhash

from .documents import Document
from .errors import DocumentTooLong, RaError, StoreError, UsageError
from .manifest import DocumentInfo, Manifest, ModelInfo
from .settings import RemapScheme, Settings
from .store import DamagedEntry, Entry, EntryWriter, Store, StoreKey
from .units import human_size


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _to_numpy(t) -> np.ndarray:
    """A tensor's bytes as numpy (bfloat16 as its int16 bit pattern: numpy has no bfloat16)."""
    import torch

    t = t.detach()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).cpu().numpy()


def _from_numpy(a: np.ndarray, device):
    """The inverse of `_to_numpy`."""
    import torch

    # a copy in torch's own (64-byte aligned) memory, as a fresh run's tensors are: without MKL's
    # conditional numerical reproducibility its results can depend on the alignment of the inputs,
    # and a resumed prefill must write the same bytes as an uninterrupted one
    t = torch.from_numpy(a).to(device, copy=True)
    return t.view(torch.bfloat16) if a.dtype == np.int16 else t

# settings fixed when the engine loads its model: a document cannot be opened with others
MODEL_FIELDS = ("model", "device", "dtype", "step_dtype", "trust_remote_code")


@dataclass(frozen=True)
class Prepared:
    """A document whose prefix KV is in the store, opened for answering with `settings`. Everything
    `Engine.ask` reads is here and fixed: to ask with other settings, prepare the document again."""

    doc: Document
    entry: Entry
    settings: Settings
    cache_hit: bool
    split: tuple[int, int]         # the offloaded range [a, b) of the entry's tokens
    index_kind: str | None         # the index actually used (`auto` resolved); None for full attention
    scheme: RemapScheme | None     # the remap scheme the answer is decoded with (None inside the window)
    retrievers: tuple = ()         # per layer: a core/layer.Retriever (empty for full attention)
    prefill_s: float = 0.0
    index_s: float = 0.0
    load_s: float = 0.0
    lease: object = None           # core/store.Lease: the entry is not removed while this is open


@dataclass
class AnswerStats:
    question_tokens: int = 0       # everything fed before the answer: earlier turns + this question
    answer_tokens: int = 0
    answer_s: float = 0.0
    first_token_s: float = 0.0
    answer_ids: list = field(default_factory=list)  # the generated tokens (kept for the next turn)
    sources: list | None = None    # with ask(sources=N): the passages the answer attended to (core/citations.Source)
    tally: object = None           # ... and the attention mass they were ranked from (core/citations.Tally)

    @property
    def ms_per_token(self) -> float:
        """Decode ms per answer token: the answer after its first token (which also runs the question)."""
        return 1000 * (self.answer_s - self.first_token_s) / max(self.answer_tokens - 1, 1)


class Engine:
    """One loaded model and the store; opens documents (`prepare`) and answers about them (`ask`)."""

    def __init__(self, home: Path, settings: Settings | None = None, progress=None, notice=None, loaded=None,
                 confirm=None):
        """settings: the engine's model-level settings and the defaults for documents it opens.
        progress(stage, done, total) and notice(message) report long work; both optional.
        confirm(question) -> bool is asked before a prefill past `Settings.confirm_tokens` (default: yes).
        loaded=(model, tokenizer, identity) uses an already loaded model (tests, benchmarks)."""
        from . import attention
        from . import model as models

        attention.register()  # the "ra" attention implementation (core/attention.py explains the hook)
        self.home = Path(home)
        self.settings = (settings or Settings()).check()
        self.progress = progress or (lambda *a: None)
        self.notice = notice or (lambda *a: None)
        self.confirm = confirm or (lambda question: True)
        self.store = Store(self.home / "store")
        # device retrievers by (entry, created, layer, span): another prepare of an open document
        # shares them (each holds the layer's keys on the GPU in fp8 and its K/V pinned on the host)
        self._on_device = weakref.WeakValueDictionary()
        self.store.check_writable()  # before the model loads, not after a long prefill
        s = self.settings
        t = time.perf_counter()
        if loaded is None:
            self.ref = models.resolve(s.model)
            self.device = models.pick_device(s.device)
            self.dtype = models.pick_dtype(s.dtype, self.device)
            self._check_step_dtype(s)  # before a load that may take minutes
            self.model, self.tokenizer = models.load(self.ref, self.home / "models", self.device, self.dtype,
                                                     s.trust_remote_code, self.notice, self.progress)
        else:
            self.model, self.tokenizer, identity = loaded
            self.ref = models.ModelRef(identity, "loaded", identity, identity)
            p = next(self.model.parameters())
            self.device, self.dtype = p.device.type, p.dtype
        self._check_step_dtype(s)
        gguf_on_cpu = self.ref.identity.startswith("gguf:") and self.device == "cpu" and str(self.dtype) == "torch.float32"
        self.step_dtype = models.pick_step_dtype(s.step_dtype, self.dtype, gguf_on_cpu)
        self._step_model = None  # made at the first answer that needs it (step_model)
        self.load_s = time.perf_counter() - t
        cfg = self.model.config
        self.n_layers = cfg.num_hidden_layers
        self.q_heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.q_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.q_heads
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        self._passages: dict = {}  # entry path -> its passages (citations), the last four entries

    def _check_step_dtype(self, s: Settings) -> None:
        if s.step_dtype == "blocks" and (self.device != "cpu" or str(self.dtype) != "torch.float32"):
            raise UsageError("--step-dtype blocks runs on the CPU over float32 weights (--device cpu --dtype float32)")

    def _blocks_file(self) -> Path | None:
        """Where a GGUF's blocks are kept: in its fp32 conversion under this data directory (found
        by the GGUF's hash, so an engine given a loaded model finds it too), or None."""
        if not self.ref.identity.startswith("gguf:"):
            return None
        short = self.ref.identity.split(":")[1][:12]
        for d in sorted((self.home / "models").glob(f"*-{short}")):
            if (d / "ra-model.json").exists():
                return d / "ra-blocks.safetensors"
        return None

    def step_model(self, s: Settings):
        """The model of the one-token decode steps: the model itself, or once made and kept, its
        copy in `step_dtype` (core/model.step_copy). Full attention always steps in `dtype`: it is
        the exact baseline, and its cache holds the whole KV in that dtype."""
        if self.step_dtype == self.dtype or s.attention == "full":
            return self.model
        if self._step_model is None and self.step_dtype == "blocks":
            from .blocks import block_copy

            # a converted GGUF's blocks are kept beside its conversion, made by the first process
            kept = self._blocks_file()
            if kept is not None and not kept.exists():
                self.notice("first answer with this model: finding its 4/8-bit weight blocks for the decode step "
                            "(kept for next time) and compiling ra's CPU kernels (once per install)")
            self._step_model, done, total = block_copy(self.model, kept)
            from .fused import fuse_layers

            fuse_layers(self._step_model)  # Llama layers over Q4 blocks: a one-token step as kernel calls
            if done < total:
                self.notice(f"--step-dtype blocks: {done} of {total} linear layers are 4/8-bit blocks; "
                            "the others step in float32")
        elif self._step_model is None:
            from .model import step_copy

            self._step_model = step_copy(self.model, self.step_dtype)
        return self._step_model

    # ------------------------------------------------------------------ documents -> store

    def key(self, doc: Document, s: Settings | None = None) -> StoreKey:
        """The store key of `doc` under settings `s` (default the engine's): everything that changes
        the cached tokens or K/V."""
        from .prompt import PROMPT_VERSION

        s = s or self.settings
        return StoreKey(text_sha256=doc.sha256, model=self.ref.identity, prompt=PROMPT_VERSION,
                        compute_dtype=str(self.dtype).replace("torch.", ""), kv_dtype=s.kv_dtype,
                        positions=s.remap.name)

    def static_sizes(self, entry: Entry, s: Settings) -> tuple[int, int]:
        """(sink, recent) for an entry under settings s. A long document's local window (true
        positions) is at least its scheme's `local` tokens, as in its prefill."""
        return s.sink, max(s.recent, entry.manifest.scheme.local) if entry.remapped else s.recent

    def prepare(self, doc: Document, settings: Settings | None = None, decode_scheme: RemapScheme | None = None
                ) -> Prepared:
        """Open the document's store entry with `settings` (default the engine's), prefilling and
        indexing it first if it is not cached. decode_scheme: decode a remapped entry with another
        scheme than the one it was prefilled with (probes; e.g. `ordered=False`)."""
        s = (settings or self.settings).check()
        changed = [f for f in MODEL_FIELDS if getattr(s, f) != getattr(self.settings, f)]
        if changed:
            raise UsageError(f"this engine was loaded with other {', '.join(changed)}; make another Engine")
        key = self.key(doc, s)
        lease = self.store.lease(key.digest)  # held while answering: `ra cache rm/gc` leave the entry alone
        entry = self._open(key, s)
        hit = entry is not None
        prefill_s = 0.0
        if not hit:
            wait = lambda: self.notice(f"{doc.name}: another ra process is preparing this document; waiting for it")
            with self.store.locked(key.digest, wait):  # one prefill per document, whoever asks first
                entry = self._open(key, s, locked=True)
                hit = entry is not None
                if not hit:
                    t = time.perf_counter()
                    self._build_entry(doc, key, s)
                    prefill_s = time.perf_counter() - t
                    entry = self.store.open(key)
        scheme = None
        if entry.remapped:
            scheme = decode_scheme or replace(entry.manifest.scheme, ordered=s.remap.ordered,
                                              estimate_distance=s.remap.estimate_distance)
            self.notice(f"{doc.name}: {entry.n_tokens:,} tokens, past the model's {self.max_positions:,}-token "
                        f"window: remapped positions (local window + retrieved keys beyond a fixed distance)")
        sizes = self.static_sizes(entry, s)
        split = entry.split(*sizes)
        kind, index_s, retrievers, load_s = None, 0.0, (), 0.0
        if s.attention == "retrieval":  # full attention reads the whole KV, not an index
            kind = self.index_kind(entry, s)
            if entry.remapped and kind == "cluster":
                # past the window the clustered index scans every key and attends only the top-k
                # exactly, the rest estimated: the retrieved keys sit at ordered distances beyond
                # the scheme's `distance`, and its whole-cluster mode (past scan_max) and retrieve
                # fraction, chosen inside the window, answered nothing on 5 of 5 needles at 32K-64K
                # where this found what flat finds on 17 of 17 (BENCHMARKS.md, "The clustered index")
                s = s.but(scan_max=max(s.scan_max, entry.n_tokens), retrieve=0.0)
            t = time.perf_counter()
            index_dir = self._checked(key, s, lambda: entry.ensure_index(
                self.store, kind, *sizes, lambda d, n: self.progress("index", d, n), s.rebuild, self.notice,
                s.checkpoint_s))
            index_s = time.perf_counter() - t
            t = time.perf_counter()
            retrievers = self._open_retrievers(entry, split, index_dir, kind, s)
            load_s = time.perf_counter() - t
        return Prepared(doc=doc, entry=entry, settings=s, cache_hit=hit, split=split, index_kind=kind, scheme=scheme,
                        retrievers=retrievers, prefill_s=prefill_s, index_s=index_s, load_s=load_s, lease=lease)

    def _open(self, key: StoreKey, s: Settings, locked: bool = False) -> Entry | None:
        """The checked entry of `key`, or None. A damaged one is, without the entry's lock, a miss
        (the caller takes the lock and opens again); with it, removed to be rebuilt. With
        `rebuild` off, an error."""
        try:
            return self._checked(key, s, lambda: self.store.open(key))
        except DamagedEntry as e:
            if locked:  # still damaged under the lock: nobody rebuilt it meanwhile
                self.notice(f"{e}; rebuilding it")
                self.store.discard(key.digest, force=True)
            return None

    def _checked(self, key: StoreKey, s: Settings, step):
        """Run `step`; a DamagedEntry is re-raised for rebuilding, or as the final error without `rebuild`."""
        try:
            return step()
        except DamagedEntry as e:
            if s.rebuild:
                raise
            raise StoreError(f"{e}; not answering from it (--no-rebuild): `ra cache rm {key.digest[:12]}`, "
                             f"or ask without --no-rebuild") from None

    def query_count(self, n_tokens: int, s: Settings) -> int:
        """Prefill positions whose queries an entry keeps to build a graph index from: 4% of a long
        document (index_recall.py: 4,096 of 100K positions lift recall@100 by ~0.02 over 1,024 at
        equal keys scored, mostly through better entry keys), at least `query_samples`, at most
        8,192 (35 KB a position for SmolLM2: 4% of them is 6% of the fp16 K+V)."""
        return max(s.query_samples, min(8192, n_tokens // 25))

    def index_kind(self, entry: Entry, s: Settings) -> str:
        """The index for this entry: as asked, or for `auto`:
          - a document inside the model's window with fewer than `s.graph_min_keys` (16K)
            offloaded keys per head: `exact`, every offloaded key attended (one fused partial; core/layer.py).
            Where every key is read anyway this costs less per step than the flat scan's top-k or
            the clustered index's scan + estimate, and its answers are full attention's
            (BENCHMARKS.md, "exact");
          - a longer one: the query-aware graph (fp16 stores, the default; else flat);
          - on a GPU: flat, searched on the device (core/device.py: fp8 scores there, only the
            chosen rows read from pinned host memory), where the host's indexes put the CPU and a
            round trip per layer on every step's path;
          - a document past the model's window (remapped positions): exact flat search, where the
            graph at its default width missed passcodes exact search finds (2 of whole Alice's 3)
            and the clustered index finds what flat finds (7 of 9 needles each) with its estimated
            clusters at RemapScheme.estimate_distance, no more, at the estimate's extra cost
            (BENCHMARKS.md, "The clustered index")."""
        if s.index != "auto":
            if s.index == "exact" and entry.remapped:
                raise UsageError("--index exact attends every key at its true position: it is for documents inside "
                                 "the model's window (this one is past it; use auto, flat, cluster or graph)")
            return s.index
        if entry.remapped or self.device != "cpu":
            return "flat"
        a, b = entry.split(*self.static_sizes(entry, s))
        if b - a >= s.graph_min_keys:
            return "graph" if entry.keys.dtype == np.float16 else "flat"
        return "exact"

    def _build_entry(self, doc: Document, key: StoreKey, s: Settings) -> None:
        import torch

        from . import longctx
        from .generation import QueryCapture, layerwise_supported, prefill, prefill_layerwise
        from .outbox import Outbox
        from .prompt import build_prefix

        prefix = build_prefix(self.tokenizer, doc)
        n = len(prefix.ids)
        remap = longctx.needs_remap(n, self.max_positions)
        scheme = s.remap
        if remap and not longctx.supports(self.model):
            raise DocumentTooLong(
                f"{doc.name} is {n:,} tokens; {self.ref.spec} handles at most {self.max_positions:,} "
                f"(prompt and answer included) and has no RoPE module to remap positions with")
        if remap:
            self.notice(f"{doc.name} is {n:,} tokens, past the model's {self.max_positions:,}-token window: "
                        f"prefilling in chunks with remapped positions ({scheme.local:,}-token local window, "
                        f"top-{scheme.prefill_topk} far keys per {scheme.block} tokens)")
        if self.device == "cuda":
            self._refuse_if_too_big(n, s, remap)
        self._announce(doc, n, s)
        q_pos = np.unique(np.linspace(0, n - 1, num=min(self.query_count(n, s), n)).astype(np.int64))
        layerwise = not remap and layerwise_supported(self.model)
        chunk = min(s.chunk_size, 512) if remap else s.chunk_size
        # what a checkpoint is made of: "layers" (layer by layer), "tokens" (chunked, past the window)
        kind = "tokens" if remap else "layers" if layerwise else None
        partial = self.store.partial(key)  # kept across an interruption (we hold the entry's lock)
        meta = {"n_tokens": n, "chunk_size": chunk, "layers": self.n_layers, "scheme": scheme.name if remap else "",
                "query_positions": xxhash.xxh3_64(q_pos.astype(np.int32).tobytes()).hexdigest()}
        kept, state, extra = EntryWriter.resumable(partial, kind, meta) if kind else (0, {}, {})
        if not kept:
            shutil.rmtree(partial, ignore_errors=True)
        self._check_space(doc, partial, n, len(q_pos), s)
        partial.mkdir(exist_ok=True)
        w = None
        try:
            t = time.perf_counter()
            w = EntryWriter(partial, n, self.n_layers, self.kv_heads, self.q_heads, self.head_dim, s.kv_dtype, q_pos,
                            resume=kept > 0)
            if kept:
                w.resume_from(partial)
                self.notice(f"{doc.name}: resuming an interrupted prefill from " + (
                    f"layer {kept} of {self.n_layers} (the work of {n * kept // self.n_layers:,} of {n:,} tokens is kept)"
                    if kind == "layers" else f"token {kept:,} of {n:,}"))
            # the layer-by-layer prefill's copies to the host overlap its compute on a GPU (core/outbox.py)
            outbox = Outbox(self.device) if layerwise else None
            capture = QueryCapture(q_pos, w.write_queries, outbox)
            report = lambda d, total: self.progress("prefill", d, total)
            due = self._due(s)
            if remap:  # keys stored pre-RoPE, queries in the global frame (core/longctx.py)
                def on_chunk(end, layers):
                    if due():
                        k, v, loc = longctx.window_state(layers)
                        w.checkpoint_tokens(end, {"window_k": _to_numpy(k), "window_v": _to_numpy(v)},
                                            {"loc_start": loc}, meta)
                windows = (_from_numpy(state["window_k"], "cpu"), _from_numpy(state["window_v"], "cpu")) if kept else None
                longctx.prefill_long(self.model, prefix.ids, chunk, w, scheme, capture, report, resume_at=kept,
                                     windows=windows, loc_start=extra.get("loc_start", 0), on_chunk=on_chunk)
            elif layerwise:
                def on_layer(done, hidden):
                    w.checkpoint(done, _to_numpy(hidden), meta)
                hidden = _from_numpy(state["hidden"], self.device) if kept else None
                prefill_layerwise(self.model, prefix.ids, s.chunk_size, w.write_kv, capture, report,
                                  start_layer=kept, hidden=hidden, on_layer=on_layer, due=due,
                                  store_dtype=getattr(torch, s.kv_dtype), outbox=outbox)
            else:
                prefill(self.model, prefix.ids, s.chunk_size, w.write_kv, capture, report)
            manifest = Manifest(
                format=key.format, key=key.__dict__, digest=key.digest,
                document=DocumentInfo(doc.name, doc.kind, len(doc.text), doc.page_starts, doc.files),
                model=ModelInfo(self.ref.spec, self.ref.identity, self.n_layers, self.q_heads, self.kv_heads,
                                self.head_dim),
                n_tokens=n, prefill_s=round(time.perf_counter() - t, 3), chunk_size=s.chunk_size,
                positions={**scheme.as_manifest(), "window": self.max_positions} if remap
                else {"scheme": "exact", "keys": "post-rope"},
                created=time.time())
            w.finish(manifest, prefix.ids, prefix.sources, doc.text)
            self.store.commit(partial, self.store.path(key))
            EntryWriter.drop_checkpoint(self.store.path(key))
        except BaseException as e:
            if w is not None:
                w.abort()
            full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
            kept_now = w.kept if w is not None else 0
            if kept_now and not full:
                what = f"{kept_now} of {self.n_layers} layers" if kind == "layers" else f"{kept_now:,} of {n:,} tokens"
                self.notice(f"stopped: {what} of {doc.name}'s prefill are kept in {partial}; the same command "
                            f"resumes from there (`ra cache clear` drops it)")
            else:
                shutil.rmtree(partial, ignore_errors=True)
            if full:
                raise StoreError(f"the disk holding {self.store.root} is full: {doc.name}'s cache entry was not "
                                 f"written (nothing partial is left); free space or set RA_HOME elsewhere") from None
            if isinstance(e, OSError) and not isinstance(e, RaError):
                raise StoreError(f"cannot write {doc.name}'s cache entry in {self.store.root}: "
                                 f"{e.strerror or e}") from None
            raise

    @staticmethod
    def _due(s: Settings):
        """-> due(): True at most every `checkpoint_s` seconds (then the prefill checkpoints)."""
        last = [time.perf_counter()]

        def due() -> bool:
            if time.perf_counter() - last[0] < s.checkpoint_s:
                return False
            last[0] = time.perf_counter()
            return True
        return due

    def _announce(self, doc: Document, n: int, s: Settings) -> None:
        """Say how many tokens are about to be prefilled and about how long that takes here (the
        rate of this model's earlier prefills in the store); ask before a very long one."""
        done = [(i.manifest.n_tokens, i.manifest.prefill_s) for i in self.store.infos()
                if i.manifest and i.manifest.model.identity == self.ref.identity and i.manifest.prefill_s > 0]
        if done:
            rate = sum(t for t, _ in done) / sum(x for _, x in done)
            self.notice(f"{doc.name}: prefilling {n:,} tokens, about {_duration(n / rate)} here "
                        f"(at the {rate:,.0f} tokens/s of {len(done)} earlier prefill(s) with this model)")
        else:
            self.notice(f"{doc.name}: prefilling {n:,} tokens (the first with this model here: no rate to estimate from)")
        if n > s.confirm_tokens and not self.confirm(f"prefill {n:,} tokens of {doc.name}?"):
            raise UsageError(f"{doc.name}: not prefilled ({n:,} tokens is past the {s.confirm_tokens:,} that need a yes)")

    def _check_space(self, doc: Document, partial: Path, n: int, n_queries: int, s: Settings) -> None:
        """Refuse, with the sizes, an entry that will not fit in the free disk space."""
        item = np.dtype(s.kv_dtype).itemsize
        need = (2 * self.n_layers * self.kv_heads * n * self.head_dim + self.n_layers * self.q_heads * n_queries
                * self.head_dim) * item + n * 12 + 4 * len(doc.text) + 2 * n * self.model.config.hidden_size * 4
        have = sum(p.stat().st_size for p in partial.rglob("*") if p.is_file()) if partial.exists() else 0
        free = shutil.disk_usage(self.store.tmp).free
        if need - have > free:
            raise StoreError(f"{doc.name}: its cache entry needs about {human_size(need - have)} and the disk holding "
                             f"{self.store.root} has {human_size(free)} free; free space (`ra cache gc --max-size`) "
                             f"or set RA_HOME elsewhere")

    def _refuse_if_too_big(self, n: int, s: Settings, remap: bool = False) -> None:
        """Before a prefill on CUDA: refuse, with the plan's numbers, a job that would run out of GPU
        memory halfway (core/plan.py; what is already allocated, the weights, counts as available)."""
        import torch

        from .plan import PlanInput, Shape, plan, refusal

        free, total = torch.cuda.mem_get_info()
        available = free + torch.cuda.memory_allocated()
        # a process capped with torch.cuda.set_per_process_memory_fraction gets no more than its cap
        # (mem_get_info does not see it; the getter is missing from older torch builds)
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda: 1.0)()
        available = min(available, int(fraction * total))
        p = plan(Shape.from_config(self.model.config.to_dict()),
                 PlanInput.of(n, s, torch.finfo(self.dtype).bits // 8, remap))
        why = refusal(p, s.attention, available)
        if why:
            raise DocumentTooLong(why)

    def _open_retrievers(self, entry: Entry, split: tuple[int, int], index_dir: Path, kind: str, s: Settings) -> tuple:
        """Per layer: the offloaded K/V (memory-map views) and its opened index. Reads no K/V on the
        CPU; a GPU's device retrievers read every offloaded key once, and are shared by every
        prepare of the entry while one holds them."""
        from .index import kind as index_kind
        from .layer import Retriever

        a, b = split
        if b <= a:
            return ()
        k = index_kind(kind)
        options = {name: getattr(s, name) for name in k.options}
        if self.device == "cpu" or kind != "flat" or entry.remapped:
            return tuple(Retriever(entry.keys[layer], entry.values[layer],
                                   k.open(index_dir, layer, entry.keys[layer, :, a:b], **options), span=(a, b))
                         for layer in range(entry.n_layers))
        from .device import DeviceRetriever  # searched on the device (core/device.py)

        def on_device(layer):
            key = (str(entry.path), entry.manifest.created, layer, a, b)
            r = self._on_device.get(key)
            if r is None:
                r = DeviceRetriever(entry.keys[layer], entry.values[layer],
                                    k.open(index_dir, layer, entry.keys[layer, :, a:b], **options), (a, b), self.device)
                self._on_device[key] = r
            return r
        return tuple(on_device(layer) for layer in range(entry.n_layers))

    # ------------------------------------------------------------------ answering

    def build_cache(self, prepared: Prepared, capacity: int = 0, tally=None, whole_step: bool = True,
                    fuse: bool = True):
        """A fresh transformers Cache for one question: DocumentLayers, or the whole KV for `full`.
        capacity: tokens that will follow the document (question + answer), preallocated.
        tally: a core/citations.Tally every layer adds its attention mass to (retrieval only).
        whole_step: the `exact` kind's one-kernel decode step where it applies (False: its parts,
        merged; benchmarks/exact_step.py compares the two). fuse: with it, the whole layer's step in
        kernel calls where it applies (core/fused.py; False: transformers' layer around the step)."""
        import torch
        from transformers.cache_utils import DynamicLayer

        from .layer import DocumentLayer, ExactPositions, RaCache, RemappedPositions, StaticKV

        e, s = prepared.entry, prepared.settings
        a, b = prepared.split
        to_dev = lambda arr, dtype=self.dtype: torch.from_numpy(np.ascontiguousarray(arr)).to(self.device, dtype)
        rope = None
        if e.remapped:
            from .longctx import Rope

            rope = Rope(self.model)
        if s.attention == "full":
            layers = []
            for layer in range(e.n_layers):
                k = to_dev(e.keys[layer])[None]
                if rope is not None:  # plain positions (the baseline that fails past the window)
                    k = rope.rotate(k.float(), torch.arange(e.n_tokens, device=k.device)).to(self.dtype)
                dl = DynamicLayer()
                dl.update(k, to_dev(e.values[layer])[None])
                layers.append(dl)
            return RaCache(layers)
        policy = RemappedPositions(rope, prepared.scheme, s.trace) if rope is not None else ExactPositions(s.trace)
        layers = []
        for layer in range(e.n_layers):
            if rope is not None:
                # the local window rotated back to its true positions; sinks stay pre-RoPE (global)
                k_loc = rope.rotate(to_dev(e.keys[layer, :, b:]).float(), torch.arange(b, e.n_tokens, device=self.device))
                static = StaticKV(k_loc.to(self.dtype)[None], to_dev(e.values[layer, :, b:])[None],
                                  e.n_tokens - b + capacity,
                                  to_dev(e.keys[layer, :, :a], torch.float32), to_dev(e.values[layer, :, :a], torch.float32))
            else:
                k = np.concatenate([e.keys[layer, :, :a], e.keys[layer, :, b:]], axis=1)  # [KVH, S, D]
                v = np.concatenate([e.values[layer, :, :a], e.values[layer, :, b:]], axis=1)
                static = StaticKV(to_dev(k)[None], to_dev(v)[None], k.shape[1] + capacity)
            retriever = prepared.retrievers[layer] if prepared.retrievers else None
            layers.append(DocumentLayer(static, retriever, policy, s.top_k, e.n_tokens, layer, tally, s.trace,
                                        whole_step, fuse))
        return RaCache(layers)

    def passages(self, prepared: Prepared):
        """(core/citations.Passages, token -> passage [n], token first characters [n]) of an
        entry: computed once per entry (the text and the store's per-token offsets)."""
        from . import citations

        key = prepared.entry.path
        if key not in self._passages:
            e, info = prepared.entry, prepared.entry.manifest.document
            p = citations.passages(info.kind, e.text, info.page_starts, info.files)
            offsets = np.array(e.sources[:, 0], np.int64)
            if len(self._passages) >= 4:  # the documents asked about lately (`ra serve` holds several)
                self._passages.pop(next(iter(self._passages)))
            self._passages[key] = (p, citations.token_units(offsets, p), offsets)
        return self._passages[key]

    def tally(self, prepared: Prepared, keep_steps: bool = False, rules=None):
        """A core/citations.Tally for one answer about `prepared` (None for full attention: its
        weights are SDPA's, never seen); rules: those it can score (default: the shipped one)."""
        from .citations import RULE, Tally

        if prepared.settings.attention != "retrieval":
            return None
        e = prepared.entry
        a, b = prepared.split
        _, units, _ = self.passages(prepared)
        static = np.arange(b, e.n_tokens) if e.remapped else np.r_[np.arange(a), np.arange(b, e.n_tokens)]
        clusters = [r.index if hasattr(r.index, "order") else None for r in prepared.retrievers]  # cluster index
        return Tally(e.n_layers, self.q_heads, units, static, a, b - a, clusters, keep_steps, rules or (RULE,))

    def ask(self, prepared: Prepared, question: str, stats: AnswerStats | None = None, on_logits=None,
            history: list | None = None, sources: int = 0, tally=None):
        """Stream the answer to `question` as text pieces. Fills `stats` if given. Reads only
        `prepared` (its settings are frozen) and the question.

        sources: rank the `sources` passages the answer attended to most (core/citations.py) into
        `stats.sources` once the answer is done (retrieval attention only; 0: none). tally: one
        made by `self.tally` to fill instead of a fresh one (benchmarks keep each step's mass).

        history: earlier turns of a conversation about this document, [(question, answer_ids)];
        they are run again on top of the document's cache (a few hundred tokens, no document
        prefill), so the answer sees the conversation."""
        from .generation import TextStream, generate
        from .prompt import followup_ids, question_ids, stop_ids

        s = prepared.settings
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
            raise DocumentTooLong(f"the conversation no longer fits in the model's {self.max_positions:,} tokens "
                                  f"(document {n:,} + {len(q):,}); start over (/reset)")
        max_new = min(s.max_tokens, window - n - len(q)) if window else s.max_tokens
        tally = tally if tally is not None else self.tally(prepared) if sources else None
        cache = self.build_cache(prepared, len(q) + max_new, tally)
        stream = TextStream(self.tokenizer)
        step_model = self.step_model(s)  # made before the clock starts (a copy, once per engine)
        t = time.perf_counter()
        for tok in generate(self.model, cache, q, n, max_new,
                            stop_ids(self.tokenizer, self.model.config) if s.stop_at_eos else set(),
                            on_logits, step_model):
            if stats.answer_tokens == 0:
                stats.first_token_s = time.perf_counter() - t
            stats.answer_tokens += 1
            stats.answer_ids.append(tok)
            stats.answer_s = time.perf_counter() - t
            piece = stream.push(tok)
            if piece:
                yield piece
        stats.answer_s = time.perf_counter() - t
        if tally is not None:
            from .citations import rank

            passages, _, offsets = self.passages(prepared)
            stats.tally = tally.finish()
            stats.sources = rank(tally, passages, offsets, prepared.doc.name, top=sources)
