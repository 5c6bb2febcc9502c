"""Citations (core/citations.py): passages, the token -> passage map, the attention tally against
an independent float64 softmax, and `ra ask --sources` / `--json` through real `ra` processes
(a codebase with a planted fact)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from core import citations
from core.documents import Document, load_document
from core.prompt import build_prefix

from conftest import ROOT, SAMPLES

SCALE = 0.3


def _units_of(tok, doc):
    """(passages, token -> passage, offsets) of a document through the real prompt builder."""
    prefix = build_prefix(tok, doc)
    offsets = prefix.sources[:, 0].astype(np.int64)
    P = citations.passages(doc.kind, doc.text, doc.page_starts, doc.files)
    return P, citations.token_units(offsets, P), offsets, prefix


def _check_tokens_inside(tok, doc, P, units, offsets, prefix):
    """Every mapped token's first non-space character is inside its passage's territory, on the
    passage's page/file, and its text (where it decodes to whole characters) is in the passage's."""
    U = len(P)
    mapped = 0
    for t in np.flatnonzero(offsets >= 0):
        u, off = units[t], offsets[t]
        if u == U:
            continue
        while doc.text[off].isspace():
            off += 1
        mapped += 1
        assert P.cover[u] <= off < P.limits[u]
        assert doc.page_of(off) == P.pages[u]
        piece = tok.decode([int(prefix.ids[t])]).strip()
        if piece and "\ufffd" not in piece:
            assert piece in doc.text[P.cover[u]:P.limits[u]], (piece, u)
    assert mapped > 0.5 * (offsets >= 0).sum()
    assert (units[offsets < 0] == U).all()  # template tokens map nowhere


def test_text_passages_are_paragraphs_and_multibyte_tokens_map_back(smol):
    tok = smol[1]
    paras = ["Chapter 1", "Naïve café owners in Zürich serve crème brûlée — 日本語のテキスト — and 🎉 emoji "
             "for 100 € apiece. " * 3, "A short one.", "x" * 20 + " word" * 200, "Last paragraph, ünïcödé."]
    text = "\n\n".join(paras) + "\n"
    doc = Document(text=text, name="t.txt", kind="text")
    P, units, offsets, prefix = _units_of(tok, doc)
    spans = [text[a:b] for a, b in zip(P.starts, P.ends)]
    # the heading joins its paragraph; the short one stays (no next paragraph fits with it); the
    # long one is cut in pieces of at most MAX_CHARS; none crosses a blank line
    assert spans[0].startswith("Chapter 1\n\nNaïve café")
    assert all(len(s) <= citations.MAX_CHARS for s in spans)
    assert all("\n\n" not in s for s in spans[1:])
    squeeze = lambda t: "".join(t.split())
    assert "".join(squeeze(s) for s in spans) == squeeze(text)  # nothing lost, nothing twice
    _check_tokens_inside(tok, doc, P, units, offsets, prefix)
    # locations: 1-based lines, characters of the text
    loc = P.location(len(P) - 1, "t.txt")
    assert loc["line_start"] == loc["line_end"] == text[:P.starts[-1]].count("\n") + 1
    assert text[loc["char_start"]:loc["char_end"]] == "Last paragraph, ünïcödé."


def test_pdf_passages_never_cross_a_page(smol, tmp_path):
    """A paragraph running over a page break becomes two passages, one per page; a real PDF's
    passages each sit on one page and name it."""
    tok = smol[1]
    intro, another = "An introduction that is long enough to be a passage of its own. " * 2, "Another paragraph. " * 6
    first, second = "The first half of a sentence that runs on", "to the next page and ends here."
    page1 = intro.strip() + "\n\n" + first
    page2 = second + "\n\n" + another.strip()
    text = page1 + "\n\n" + page2
    doc = Document(text=text, name="p.pdf", kind="pdf", page_starts=[0, len(page1) + 2])
    P, units, offsets, prefix = _units_of(tok, doc)
    spans = [(text[a:b], int(p)) for a, b, p in zip(P.starts, P.ends, P.pages)]
    # the sentence is cut at the page break: page 1's passage ends with its first half, page 2's
    # starts with the rest, although both halves are short enough to be joined
    i = next(i for i, (t, p) in enumerate(spans) if t.endswith(first))
    assert spans[i][1] == 0 and spans[i + 1][0].startswith(second) and spans[i + 1][1] == 1
    assert P.location(i, "p.pdf")["page"] == 1 and P.location(i + 1, "p.pdf")["page"] == 2
    _check_tokens_inside(tok, doc, P, units, offsets, prefix)

    real = load_document(str(SAMPLES / "R-intro.pdf"))
    P = citations.passages(real.kind, real.text, real.page_starts)
    for a, b, p in zip(P.starts, P.ends, P.pages):
        assert real.page_of(a) == real.page_of(b - 1) == p
    assert len(set(P.pages.tolist())) == len(real.page_starts)  # every page has text here


def test_code_passages_are_line_ranges_of_one_file(smol, tmp_path):
    from core.codebase import load_directory

    src = tmp_path / "repo"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text("".join(f"x{i} = 'é{i}'\n" + ("\n" if i % 7 == 6 else "") for i in range(30)))
    (src / "pkg" / "b.py").write_text("def f():\n    return '日本'\n")
    doc = load_directory(str(src))
    P, units, offsets, prefix = _units_of(smol[1], doc)
    assert doc.files == ["pkg/a.py", "pkg/b.py"]
    for i in range(len(P)):
        loc = P.location(i, str(src))
        path = src / loc["path"].removeprefix(str(src) + "/")
        lines = path.read_text().splitlines()
        # the passage's text is exactly those lines of that file
        assert doc.text[loc["char_start"]:loc["char_end"]] == "\n".join(lines[loc["line_start"] - 1:loc["line_end"]]).strip()
        assert loc["line_end"] - loc["line_start"] < citations.MAX_LINES
    assert P.location(len(P) - 1, str(src)) == {"path": f"{src}/pkg/b.py", "line_start": 1, "line_end": 2,
                                               "char_start": int(P.starts[-1]), "char_end": int(P.ends[-1])}
    _check_tokens_inside(smol[1], doc, P, units, offsets, prefix)
    header = doc.text.index("==> pkg/b.py <==")
    assert all(units[t] == len(P) for t in np.flatnonzero((offsets >= header) & (offsets < header + 10)))


def _layer_with_tally(KVH, G, a, N, R, D, top_k, seed, index="flat", tmp_path=None, estimate=0.0):
    """A DocumentLayer over a document of a + N + R tokens (a sinks, N offloaded, R recent) whose
    tally maps token i to passage i // 3."""
    from core.index import ExactLayerIndex, FlatLayerIndex, kind
    from core.layer import DocumentLayer, ExactPositions, Retriever, StaticKV

    rng = np.random.default_rng(seed)
    n = a + N + R
    k = rng.standard_normal((KVH, n, D)).astype(np.float32) + 1.5 * rng.standard_normal((KVH, 1, D)).astype(np.float32)
    v = rng.standard_normal((KVH, n, D)).astype(np.float32)
    k_off, v_off = np.ascontiguousarray(k[:, a:a + N]), np.ascontiguousarray(v[:, a:a + N])
    if index in ("flat", "exact"):
        idx = (FlatLayerIndex if index == "flat" else ExactLayerIndex)(torch.from_numpy(k_off))
    else:
        from core.cluster import build_cluster_dir

        build_cluster_dir(lambda l: k_off[None][l], lambda l: v_off[None][l], 1, tmp_path, None, size=4, segment=32)
        idx = kind("cluster").open(tmp_path, 0, k_off, retrieve=0.1, estimate=estimate)
    static_k = torch.from_numpy(np.concatenate([k[:, :a], k[:, a + N:]], 1))
    static_v = torch.from_numpy(np.concatenate([v[:, :a], v[:, a + N:]], 1))
    units = np.arange(n) // 3
    units[1] = units.max() + 1  # a token mapped nowhere (the template)
    tally = citations.Tally(1, KVH * G, units, np.r_[np.arange(a), np.arange(a + N, n)], a, N,
                            [idx if index == "cluster" else None], rules=citations.RULES)
    layer = DocumentLayer(StaticKV(static_k[None], static_v[None], a + R + 2), Retriever(k_off, v_off, idx),
                          ExactPositions(), top_k, n, 0, tally)
    return layer, tally, k, units, idx


def _reference_weights(q, keys_of_head, new_k, scale):
    """float64 softmax weights of one query over the listed keys plus the new tokens' keys."""
    logits = np.array([scale * float(np.dot(q, kk)) for kk in list(keys_of_head) + list(new_k)], np.float64)
    w = np.exp(logits - logits.max())
    return w / w.sum()


@pytest.mark.parametrize("top_k,index", [(3, "flat"), (10**6, "flat"), (3, "exact")])
def test_tally_equals_softmax_weights_of_the_keys_attended(top_k, index):
    """Each document token's tallied mass, over two decoding steps, equals its weight in one
    float64 softmax over exactly the keys the step attended (static + retrieved + new tokens),
    per head and passage; with every key retrieved (or the `exact` kind, whatever k) that is full
    attention's weight."""
    KVH, G, a, N, R, D = 2, 3, 4, 20, 5, 8
    layer, tally, k, units, _ = _layer_with_tally(KVH, G, a, N, R, D, top_k, seed=1, index=index)
    n, U = a + N + R, tally.U
    ref_tokens = np.zeros(n)
    ref_units = np.zeros((KVH * G, U + 1))
    ref_start = np.zeros((KVH * G, U + 1))
    new_keys = [[] for _ in range(KVH)]
    for step in range(2):
        T = 3 if step == 0 else 1  # a 3-token "question" (rows 0 and 2 are tallied), then one answer token
        k_new, v_new = torch.randn(1, KVH, T, D), torch.randn(1, KVH, T, D)
        key, value = layer.update(k_new, v_new)
        for h in range(KVH):
            new_keys[h] += list(k_new[0, h].numpy())
        q = torch.randn(1, KVH * G, T, D)
        layer.attend(q, key, value, SCALE)
        if step == 0:  # the question's first row (causal: it sees the first new key only) is `start`
            ids0 = layer.last.ids.reshape(KVH, G, T, -1)[:, :, 0]
            for h in range(KVH * G):
                kv, g = divmod(h, G)
                toks = list(range(a)) + [a + int(i) for i in sorted(set(ids0[kv, g].tolist())) if i >= 0] + list(range(a + N, n))
                w = _reference_weights(q[0, h, 0].double().numpy(), k[kv, toks], new_keys[kv][:1], SCALE)
                for t, wt in zip(toks, w[:len(toks)]):
                    ref_start[h, units[t]] += wt
        ids = layer.last.ids.reshape(KVH, G, T, -1)[:, :, -1]
        for h in range(KVH * G):
            kv, g = divmod(h, G)
            got = sorted(set(int(i) for i in ids[kv, g] if i >= 0))
            toks = list(range(a)) + [a + i for i in got] + list(range(a + N, n))
            w = _reference_weights(q[0, h, -1].double().numpy(), k[kv, toks], new_keys[kv], SCALE)
            for t, wt in zip(toks, w[:len(toks)]):
                ref_tokens[t] += wt
                ref_units[h, units[t]] += wt
            if top_k >= N or index == "exact":
                assert len(got) == N
    tally.finish()
    assert tally.steps == 2 and set(tally.heads) == set(citations.PEAK_RULES)
    assert all(len(kept[0]) == 2 for kept in tally.heads.values())
    np.testing.assert_allclose(tally.tokens.numpy()[:n], ref_tokens, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(tally.mass[0].numpy(), ref_units, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(tally.start[0].numpy(), ref_start, rtol=1e-5, atol=1e-7)
    # the converse: with the query's weight wrong (another scale) the same check fails
    assert not np.allclose(tally.tokens.numpy()[:n] * 1.1, ref_tokens, rtol=1e-5, atol=1e-7)


def test_tally_spreads_estimated_clusters_over_their_members(tmp_path):
    """With the clustered index estimating: a member of an estimated cluster gets the weight of
    the cluster's mean key in one float64 softmax over static keys, retrieved keys and stand-ins."""
    KVH, G, a, N, R, D = 1, 2, 2, 48, 3, 6
    layer, tally, k, units, idx = _layer_with_tally(KVH, G, a, N, R, D, 4, seed=3, index="cluster",
                                                    tmp_path=tmp_path, estimate=0.3)
    k_new = torch.randn(1, KVH, 1, D)
    key, value = layer.update(k_new, torch.randn(1, KVH, 1, D))
    q = torch.randn(1, KVH * G, 1, D)
    layer.attend(q, key, value, SCALE)
    assert layer.last.estimate is not None
    tally.finish()
    order, offsets = idx.order[0].numpy(), idx.offsets[0].numpy()
    ref = np.zeros(a + N + R)
    for g in range(G):
        ids = sorted(int(i) for i in layer.last.ids[0, g] if i >= 0)
        est = np.flatnonzero(np.isfinite(layer.last.estimate.logits[0, g, 0].numpy()))
        toks = list(range(a)) + [a + i for i in ids] + list(range(a + N, a + N + R))
        keys = list(k[0, toks])
        members = [order[offsets[j]:offsets[j + 1]] for j in est]
        for m in members:
            keys += [k[0, a + m].mean(0)] * len(m)
        w = _reference_weights(q[0, g, 0].double().numpy(), keys, k_new[0, 0].numpy(), SCALE)
        for t, wt in zip(toks, w):
            ref[t] += wt
        i = len(toks)
        for m in members:
            for member in m:
                ref[a + member] += w[i]
                i += 1
    np.testing.assert_allclose(tally.tokens.numpy()[:a + N + R], ref, rtol=1e-5, atol=1e-8)


def test_unit_scores_rules():
    rng = np.random.default_rng(0)
    mass = rng.random((4, 3, 11))
    mass[:, :, 2] += 5.0  # passage 2 gets most everywhere
    for rule in [r for r in citations.RULES if r not in citations.PEAK_RULES]:
        s = citations.unit_scores(mass, rule)
        assert s.shape == (10,) and math.isclose(s.sum(), 1.0) and s.argmax() == 2
    assert (citations.unit_scores(np.zeros((2, 2, 4)), "sum") == 0).all()
    with pytest.raises(ValueError):
        citations.unit_scores(mass, "nope")


def test_peaks_rule_counts_the_moments_a_head_reads_one_place():
    """Every head at every step spreads its mass with a bias to the last passages (locality);
    once, one head reads passage 3 alone. The summed mass ranks a last passage first; "peaks"
    ranks passage 3 first, with the score computed by hand below."""
    S, L, H, U = 20, 4, 5, 10
    rng = np.random.default_rng(0)
    steps = rng.random((S, L, H, U + 1)) * 0.1
    steps[..., U - 3:U] += 0.3                    # locality: the last passages, always
    steps[7, 2, 1, :] = 0.0
    steps[7, 2, 1, 3] = 1.0                       # one head, one step: passage 3 only
    summed = citations.unit_scores(steps.sum(0), "sum")
    assert summed.argmax() >= U - 3
    peak, ids, shares = (t.numpy() for t in citations.head_steps(torch.from_numpy(steps), top=U))
    got = citations.peak_scores(peak, ids, shares, U, fraction=0.01)
    assert got.argmax() == 3
    # by hand: the top 1% of the S*L*H head-steps by their peak share, their full distributions
    flat = steps[..., :U].reshape(-1, U)
    p = flat / flat.sum(1, keepdims=True)
    keep = p.max(1) >= np.quantile(p.max(1), 0.99)
    ref = p[keep].sum(0)
    np.testing.assert_allclose(got, ref / ref.sum(), rtol=1e-6)


def test_contrast_rule_discounts_what_a_head_reads_before_the_question():
    """Locality heads peak on the last passage at every step, as they already did at the
    question's first token (`start`); one head reads passage 3 at a few steps. "peaks" ranks the
    last passage first; "contrast" (each head's distribution minus its start, clamped at 0)
    ranks passage 3 first, with the score computed by hand below."""
    S, L, H, U = 20, 3, 4, 8
    rng = np.random.default_rng(1)
    start = rng.random((L, H, U + 1)) * 0.05
    start[:, :, U - 1] += 1.0                       # locality: the last passage, before any question
    steps = start[None] + rng.random((S, L, H, U + 1)) * 0.05
    steps[3:6, 1, 2, 3] += 0.6                      # one head, three steps: passage 3 too
    peaks = citations.peak_scores(*(t.numpy() for t in citations.head_steps(torch.from_numpy(steps))), U, 0.05)
    assert peaks.argmax() == U - 1
    got = citations.peak_scores(*(t.numpy() for t in citations.head_steps(
        torch.from_numpy(steps), base=torch.from_numpy(start))), U, 0.05)
    assert got.argmax() == 3
    # by hand: per (step, layer, head), its distribution minus start's, clamped; the top 5% by peak
    p = steps[..., :U] / steps[..., :U].sum(-1, keepdims=True)
    b = start[..., :U] / start[..., :U].sum(-1, keepdims=True)
    ex = np.clip(p - b[None], 0, None).reshape(-1, U)
    keep = ex.max(1) >= np.quantile(ex.max(1), 0.95)
    top = np.argsort(-ex, 1)[:, :citations.PEAK_TOP]
    ref = np.zeros(U)
    for row in np.flatnonzero(keep):
        ref[top[row]] += ex[row, top[row]]
    np.testing.assert_allclose(got, ref / ref.sum(), rtol=1e-5)


def _ra(args, home, timeout=600):
    env = {**os.environ, "RA_HOME": str(home), "RA_NO_SERVER": "1"}
    return subprocess.run([sys.executable, "-m", "ra_cli.main", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def test_codebase_fact_is_cited_by_file_and_line(ra_home, tmp_path):
    """`ra index` a small codebase with one planted fact, then `ra ask --json`: the file:line
    range of the fact is among the top 3 sources; `--sources` prints it on stderr."""
    repo = tmp_path / "repo"
    (repo / "app").mkdir(parents=True)
    for i, name in enumerate(["cli.py", "db.py", "http.py", "util.py"]):
        body = "".join(f"def {name[:-3]}_helper_{j}(x):\n    return x * {j + i}\n\n" for j in range(12))
        (repo / "app" / name).write_text(f'"""The {name[:-3]} module."""\n\n' + body)
    cfg = (repo / "app" / "config.py")
    cfg.write_text('"""Settings."""\n\nDEBUG = False\nLOG_LEVEL = "info"\n\n'
                   '# the port the server listens on\nSERVER_PORT = 48213\n\nTIMEOUT_S = 30\n')
    r = _ra(["index", str(repo)], ra_home)
    assert r.returncode == 0, r.stderr
    r = _ra(["ask", str(repo), "Which port does the server listen on? Answer with the number.", "--json", "-n", "24"], ra_home)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert "48213" in rec["answer"]
    top = rec["sources"][:3]
    assert set(top[0]) >= {"path", "line_start", "line_end", "char_start", "char_end", "score", "snippet"}
    hits = [s for s in top if s["path"] == f"{repo}/app/config.py" and s["line_start"] <= 7 <= s["line_end"]]
    assert hits, top
    assert "SERVER_PORT = 48213" in hits[0]["snippet"]
    r = _ra(["ask", str(repo), "Which port does the server listen on? Answer with the number.", "--sources", "-n", "24"], ra_home)
    assert r.returncode == 0, r.stderr
    assert "48213" in r.stdout and "sources" not in r.stdout
    assert "app/config.py:" in r.stderr


def test_pdf_question_is_cited_by_its_page(ra_home, tmp_path):
    """Four pages of the sample PDF (R-intro pages 9-12) through real `ra ask --json`: the answer
    to a question about `help.search` comes with a page that explains it among the top 3 sources
    (the "peaks" rule put the last page, next to the question, in all three)."""
    from pypdf import PdfReader, PdfWriter

    w = PdfWriter()
    for page in PdfReader(SAMPLES / "R-intro.pdf").pages[8:12]:
        w.add_page(page)
    pdf = tmp_path / "r-intro-9-12.pdf"
    with open(pdf, "wb") as f:
        w.write(f)
    doc = load_document(str(pdf))
    holds = {doc.page_of(i) + 1 for i in range(len(doc.text)) if doc.text.startswith("help.search", i)}
    assert holds and 4 not in holds  # the last page does not mention it
    r = _ra(["ask", str(pdf), "What does the help.search command do?", "--json", "-n", "48"], ra_home)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert "help" in rec["answer"].lower()
    pages = [s["page"] for s in rec["sources"][:3]]
    assert holds & set(pages), (holds, pages, rec["answer"])


def test_sources_options_are_checked(ra_home):
    r = _ra(["ask", str(SAMPLES / "alice-ch1-2.txt"), "Who?", "--sources=file"], ra_home)
    assert r.returncode == 2 and "--sources" in r.stderr and "Traceback" not in r.stderr
    r = _ra(["ask", str(SAMPLES / "alice-ch1-2.txt"), "Who?", "--sources", "--attention", "full"], ra_home)
    assert r.returncode == 2 and "retrieval attention" in r.stderr


def test_scatter_shares_equals_the_plain_computation():
    """core/attention_f16.scatter_shares (the tally's step over every document key, numba) against
    exp and index_add in torch (float64)."""
    from core.attention_f16 import scatter_shares
    from core.citations import unit_runs

    g = torch.Generator().manual_seed(3)
    L, R, n, U = 4, 9, 1037, 12
    logits = torch.randn(L, R, n, generator=g) * 4
    lse = torch.logsumexp(logits.double() * 0.125, -1).float() + 0.3  # the whole softmax holds other keys too
    units = torch.sort(torch.randint(0, U - 1, (n,), generator=g)).values
    units[::37] = U - 1  # "nowhere" tokens (template, whitespace) inside passages, as a real document has
    units[:5] = U - 1    # ... and before the first passage (the template)
    out = torch.rand(L, R, U, generator=g)
    want_p = torch.exp(logits.double() * 0.125 - lse.double()[..., None])
    want = out.double().index_add(2, units, want_p)
    tokens = torch.rand(L, n, generator=g, dtype=torch.float64)
    want_tokens = tokens + want_p.sum(1)
    scatter_shares(logits, lse, 0.125, unit_runs(units.numpy(), U - 1), out, tokens)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tokens.double(), want_tokens, rtol=1e-5, atol=1e-6)
    shuffled = torch.randperm(n, generator=g)  # units in no order (runs of one): the same sums
    out2 = torch.zeros(L, R, U)
    scatter_shares(logits[..., shuffled], lse, 0.125, unit_runs(units[shuffled].numpy(), U - 1), out2)
    want2 = torch.zeros(L, R, U, dtype=torch.float64).index_add(2, units, want_p)
    torch.testing.assert_close(out2.double(), want2, rtol=1e-5, atol=1e-6)
    out4 = torch.zeros(L, R, U)  # no passage token at all: everything to the nowhere column
    scatter_shares(logits, lse, 0.125, unit_runs(np.full(n, U - 1), U - 1), out4)
    torch.testing.assert_close(out4[..., -1].double(), want_p.sum(-1), rtol=1e-5, atol=1e-6)
    assert bool((out4[..., :-1] == 0).all())
    # a document short enough to be all static offloads nothing: no runs, nothing added
    out3 = torch.ones(L, R, U)
    scatter_shares(torch.zeros(L, R, 0), lse, 0.125, unit_runs(np.zeros(0, np.int64), U - 1), out3, torch.zeros(L, 0, dtype=torch.float64))
    assert bool((out3 == 1).all())
