"""The store: complete entries only, nothing unpickled, sources that point back into the text,
and no second prefill of a cached document."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import book_text
from core.documents import Document
from core.engine import AnswerStats, Engine, Settings
from core.store import Store


def _doc(n=2500):
    return Document(text=book_text(n), name="alice-part", kind="text")


def test_entry_layout_and_no_pickle(smol, tmp_path):
    engine = Engine(tmp_path, Settings(index="hnsw", sink=8, recent=16), loaded=smol)
    p = engine.prepare(_doc())
    d = p.entry.path
    m = json.loads((d / "manifest.json").read_text())
    from core.manifest import Manifest

    assert Manifest.read(d) == p.entry.manifest and m["positions"] == {"scheme": "exact", "keys": "post-rope"}
    L, KVH, P, D = p.entry.keys.shape
    assert (L, KVH, D) == (30, 3, 64) and P == m["n_tokens"]
    for name in ("tokens", "sources", "keys", "values", "queries", "query_positions"):
        arr = np.load(d / f"{name}.npy", allow_pickle=False, mmap_mode="r")  # raises on pickled data
        assert arr.dtype != object
    assert np.load(d / "keys.npy", mmap_mode="r").dtype == np.float16
    idx = p.entry.index_dir("hnsw", 8, 16)
    assert len(list(idx.glob("*.hnsw"))) == L * KVH and (idx / "means.npy").exists()
    assert not any(engine.store.tmp.iterdir())


def test_sources_point_into_the_text(smol, tmp_path):
    model, tok, _ = smol
    engine = Engine(tmp_path, Settings(), loaded=smol)
    doc = _doc()
    p = engine.prepare(doc)
    src, ids = p.entry.sources, p.entry.tokens
    doc_rows = np.nonzero(src[:, 0] >= 0)[0]
    assert len(doc_rows) > 400 and src[: doc_rows[0], 0].max() == -1  # template head first
    text = p.entry.text
    for row in doc_rows[::37]:
        piece = tok.decode([int(ids[row])])
        assert text[src[row, 0]:].startswith(piece.lstrip()) or text[src[row, 0]:].lstrip().startswith(piece.strip())


def test_pdf_tokens_know_their_page(smol, tmp_path):
    from conftest import SAMPLES
    from core.documents import load_document

    doc = load_document(str(SAMPLES / "R-intro.pdf"))
    assert doc.kind == "pdf" and len(doc.page_starts) == 113
    small = Document(text=doc.text[: doc.page_starts[3] + 200], name="r3", kind="pdf", page_starts=doc.page_starts[:4])
    p = Engine(tmp_path, Settings(), loaded=smol).prepare(small)
    pages = p.entry.sources[:, 1]
    assert set(pages[pages >= 0].tolist()) == {0, 1, 2, 3}
    assert np.all(np.diff(pages[pages >= 0]) >= 0)  # pages only go forward


def test_failed_prefill_leaves_no_entry(smol, tmp_path):
    class Boom(Exception):
        pass

    def progress(stage, done, total):
        if stage == "prefill" and done > 0:
            raise Boom()

    engine = Engine(tmp_path, Settings(chunk_size=256), progress=progress, loaded=smol)
    with pytest.raises(Boom):
        engine.prepare(_doc())
    assert list(engine.store.entries.iterdir()) == []
    assert list(engine.store.tmp.iterdir()) == []
    engine.progress = lambda *a: None
    assert engine.prepare(_doc()).cache_hit is False  # and the next try builds it normally


def test_killed_writer_leftovers_are_cleaned(tmp_path):
    # a temp dir from a process that no longer exists (as after kill -9) is removed on open
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)
    store = Store(tmp_path / "store")
    stale = store.tmp / f"{dead}-deadbeef"
    stale.mkdir()
    (stale / "keys.npy").write_bytes(b"partial")
    mine = store.tmp / f"{os.getpid()}-alive000"
    mine.mkdir()
    Store(tmp_path / "store")
    assert not stale.exists() and mine.exists()


def test_second_ask_does_no_prefill_and_answers_the_same(smol, tmp_path):
    """A new Engine (as in a new process) on the same data directory: the document never goes
    through the model again; only the question and answer tokens do. (Counted at the token
    embedding, which every path through the model starts with: the chunked prefill, the
    layer-by-layer prefill, which embeds the whole document once, and each decode step.)"""
    model, tok, identity = smol
    seen = []
    hook = model.base_model.embed_tokens.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    try:
        s = Settings(max_tokens=12)
        first = Engine(tmp_path, s, loaded=smol)
        p1 = first.prepare(_doc())
        assert not p1.cache_hit and sum(seen) == p1.entry.n_tokens  # the prefill: every token once
        st1 = AnswerStats()
        a1 = "".join(first.ask(p1, "Who is late?", st1))
        seen.clear()
        second = Engine(tmp_path, Settings(max_tokens=12), loaded=smol)
        p2 = second.prepare(_doc())
        assert p2.cache_hit and seen == []  # opening a cached document runs no model forward at all
        st2 = AnswerStats()
        a2 = "".join(second.ask(p2, "Who is late?", st2))
        assert a2 == a1 and a2.strip()
        # question tokens in one forward, then one forward per generated token
        assert seen[0] == st2.question_tokens and set(seen[1:]) <= {1}
        assert sum(seen) < 100 < p2.entry.n_tokens
    finally:
        hook.remove()


def test_auto_index_is_exact_for_short_documents_and_graph_for_long(smol, tmp_path):
    """`--index auto`: every key attended (`exact`) under the key threshold, the query-aware graph at or above it
    (built from the entry's own prefill queries, memory-mapped files, answering works)."""
    s = Settings(sink=8, recent=16, max_tokens=4)
    engine = Engine(tmp_path, s, loaded=smol)
    assert engine.settings.index == "auto"
    p = engine.prepare(_doc())
    assert p.index_kind == "exact" and p.retrievers[0].exact
    n_off = p.entry.n_tokens - 24
    p = engine.prepare(_doc(), s.but(graph_min_keys=n_off))
    assert p.index_kind == "graph" and p.cache_hit
    idx = p.entry.index_dir("graph", 8, 16)
    assert np.load(idx / "graph.npy", mmap_mode="r").shape[:3] == (30, 3, n_off)
    answer = "".join(engine.ask(p, "Who is the story about?"))
    assert answer.strip()
    assert p.retrievers[0].index.searched > 0  # the graph, not flat, answered


def test_settings_are_frozen_once_a_document_is_opened(smol, tmp_path):
    """Changing sink/recent/attention after opening cannot mis-partition the keys: the settings
    cannot be changed in place, and opening again with others gives a fresh, consistent open
    (full -> retrieval included, which builds the index it needs)."""
    import dataclasses

    s = Settings(sink=8, recent=16, max_tokens=4, attention="full")
    engine = Engine(tmp_path, s, loaded=smol)
    p = engine.prepare(_doc())
    with pytest.raises(dataclasses.FrozenInstanceError):
        engine.settings.sink = 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.settings.attention = "retrieval"
    assert p.index_kind is None and p.retrievers == ()  # full attention opened no index
    full = "".join(engine.ask(p, "Who is late?"))
    q = engine.prepare(_doc(), s.but(attention="retrieval", sink=32, recent=64, top_k=10**6))
    assert q.cache_hit and q.settings.sink == 32 and q.split == (32, q.entry.n_tokens - 64)
    assert q.retrievers[0].n == q.entry.n_tokens - 96
    ra = "".join(engine.ask(q, "Who is late?"))
    assert ra == full  # every offloaded key retrieved: the same answer as full attention
    assert "".join(engine.ask(p, "Who is late?")) == full  # the first open is untouched by the second
    from core.errors import UsageError

    with pytest.raises(UsageError, match="other model"):
        engine.prepare(_doc(), s.but(model="other.gguf"))


def test_repeated_ask_on_a_cached_document_retrieves(smol, tmp_path):
    """A cache hit with the flat index answers with retrieval attention (not full attention over
    the reloaded KV): every layer asked its index for top-k keys at every step, and with k = 4 the
    logits differ from full attention's over the same entry."""
    s = Settings(max_tokens=3, top_k=4, index="flat", stop_at_eos=False)
    Engine(tmp_path, s, loaded=smol).prepare(_doc())
    engine = Engine(tmp_path, s, loaded=smol)  # as a new process would
    p = engine.prepare(_doc())
    assert p.cache_hit and p.index_kind == "flat"
    searched = []

    class Counting:
        exact = False

        def __init__(self, r):
            self.r, self.n = r, r.n

        def zones(self, q, k, scale):
            searched.append(k)
            return self.r.zones(q, k, scale)

        def gather_values(self, ids):
            return self.r.gather_values(ids)

    import dataclasses

    counted = dataclasses.replace(p, retrievers=tuple(Counting(r) for r in p.retrievers))
    logits = []
    "".join(engine.ask(counted, "Who is late?", on_logits=lambda l: logits.append(l.clone())))
    assert searched == [4] * (30 * 3)  # 30 layers x 3 steps, top-4 each
    full = []
    "".join(engine.ask(engine.prepare(_doc(), s.but(attention="full")), "Who is late?",
                       on_logits=lambda l: full.append(l.clone())))
    assert (logits[0] - full[0]).abs().max() > 1e-2


def test_an_entry_directory_without_its_manifest_is_rebuilt_in_place(smol, tmp_path):
    """A directory left without manifest.json (a removal that raced an index build, or a hand
    edit) is listed as damaged, and the next prepare replaces it with a complete entry."""
    from core.store import EntryInfo

    engine = Engine(tmp_path, Settings(sink=8, recent=16, max_tokens=4), loaded=smol)
    doc = _doc(1200)
    path = engine.store.path(engine.key(doc))
    (path / "indexes" / "flat-s8-r16").mkdir(parents=True)
    (info,) = engine.store.infos()
    assert info.manifest is None and "has no manifest.json" in info.problem
    p = engine.prepare(doc)
    assert not p.cache_hit and p.entry.path == path and (path / "manifest.json").exists()
    assert EntryInfo.read(path).manifest is not None and not any(engine.store.tmp.iterdir())
