"""Citations read off the attention itself: the passages an answer attended to.

Retrieval attention already computes, at every decoding step and in every layer, the logits of
each key a query head reads (the static zone's, the retrieved keys', the estimated clusters') and
the log-sum-exp of the merged softmax. A key's share of that head's attention is then one
exponential, `exp(scale * logit - lse)`: no second pass over the document. `Tally` adds those
shares up over the answer, per (layer, query head, passage), and per token.

Passages are the units a person can check in seconds (`passages`): paragraphs of a text (long ones
cut at a sentence end near `max_chars`), the same inside each page of a PDF (never across a page),
blocks of at most `max_lines` lines of each file of a codebase (cut at a blank line where one is
near; never across a file). Every document token maps to one passage through the store's
per-token character offsets (`sources.npy`); template tokens and tokens that are only whitespace
map to none.

`Tally.scores` turns the tally into one score per passage by the rule `RULE`, chosen on held-out
cases by benchmarks/citations.py (BENCHMARKS.md says which rules were measured and how they did):
"contrast" takes, at every (step, layer, head) of the answer, what the head gives each passage
beyond what it gave it at the question's first token (`start`: where it read before any of the
question was seen, mostly the document's last passages for a local head), keeps the 2% of those
that peak highest (a head reading one place, as when the answer copies from it) and adds them up.
"peaks" is the same without the start subtracted: it ties on the needles and puts a PDF's last
page first on questions about earlier pages. The rules over the summed mass (`unit_scores`) lost
to locality: heads that read the recent window at every step put the last passages first.
`rank` lists the best passages as `Source`s: location, score (the share of the answer's attention
on the document that the passage received), snippet and the evidence words inside it (the words
whose tokens received the most attention).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

MAX_CHARS = 600     # a text passage: a paragraph, or a piece of one this long at most
MIN_CHARS = 80      # a shorter paragraph (a heading) joins the next one on its page
MAX_LINES = 12      # a code passage: at most this many lines of one file
PEAK_RULES = ("peaks", "contrast")  # rules over each step's head distributions (`head_steps`)
RULES = PEAK_RULES + ("sum", "heads", "peaked", "late", "peaked-late")
RULE = "contrast"   # benchmarks/citations.py: the rule chosen on the held-out cases (BENCHMARKS.md)
PEAK_FRACTION = 0.02  # "peaks", "contrast": the share of an answer's (step, layer, head)s that count
PEAK_TOP = 8        # "peaks", "contrast": the passages kept of each (step, layer, head)

_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE_END = re.compile(r"[.!?;:][\"')\]]*\s")
_SPACES = np.array([ord(c) for c in " \t\n\r\f\v\u00a0\u2028\u2029\u3000"], np.uint32)


# ----------------------------------------------------------------------------- passages

@dataclass
class Passages:
    """The document cut into passages U: [start, end) character ranges of the text (trimmed of
    whitespace), each inside page (or file) `pages[i]`. Passage i's territory, [cover[i],
    limits[i]), runs on to the next passage or the end of its page: a token belongs to the passage
    whose territory holds its first non-space character."""

    kind: str
    text: str
    page_starts: list
    files: list
    starts: np.ndarray   # int64 [U]
    ends: np.ndarray     # int64 [U]
    pages: np.ndarray    # int64 [U]
    cover: np.ndarray    # int64 [U] start of each territory (the passage's start)
    limits: np.ndarray   # int64 [U] end of each territory (the next passage, or its page's or file's end)

    def __len__(self) -> int:
        return len(self.starts)

    def line_range(self, i: int) -> tuple[int, int]:
        """1-based first and last line of passage i: in its file for code, in the text otherwise."""
        base = self.page_starts[self.pages[i]] if self.kind == "code" else 0
        first = self.text.count("\n", base, int(self.starts[i])) + (0 if self.kind == "code" else 1)
        return first, first + self.text.count("\n", int(self.starts[i]), int(self.ends[i]))

    def location(self, i: int, name: str) -> dict:
        """{path, page | line_start/line_end, char_start, char_end} of passage i of document `name`."""
        loc = {"path": name}
        if self.kind == "code" and self.files:
            loc["path"] = f"{name.rstrip('/')}/{self.files[self.pages[i]]}"
        if self.kind == "pdf":
            loc["page"] = int(self.pages[i]) + 1
        else:
            loc["line_start"], loc["line_end"] = self.line_range(i)
        loc["char_start"], loc["char_end"] = int(self.starts[i]), int(self.ends[i])
        return loc


def _trim(text: str, a: int, b: int) -> tuple[int, int]:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


def _cut_long(text: str, a: int, b: int, max_chars: int) -> list[tuple[int, int]]:
    """[a, b) in pieces of at most max_chars, each ending at a sentence end (else a space) in its
    second half where there is one."""
    out = []
    while b - a > max_chars:
        window = text[a + max_chars // 2:a + max_chars]
        ends = [m.end() for m in _SENTENCE_END.finditer(window)]
        cut = a + max_chars // 2 + ends[-1] if ends else -1
        if cut < 0:
            space = window.rfind(" ")
            cut = a + max_chars // 2 + space + 1 if space >= 0 else a + max_chars
        out.append(_trim(text, a, cut))
        a = cut
    out.append(_trim(text, a, b))
    return [(s, e) for s, e in out if e > s]


def _text_passages(text: str, a: int, b: int, max_chars: int, min_chars: int) -> list[tuple[int, int]]:
    """Paragraphs of text[a:b] (blank-line separated), short ones joined to the next, long ones cut."""
    paras, start = [], a
    for m in _PARAGRAPH.finditer(text, a, b):
        paras.append(_trim(text, start, m.start()))
        start = m.end()
    paras.append(_trim(text, start, b))
    paras = [(s, e) for s, e in paras if e > s]
    joined = []
    for s, e in paras:
        if joined and joined[-1][1] - joined[-1][0] < min_chars and e - joined[-1][0] <= max_chars:
            joined[-1] = (joined[-1][0], e)
        else:
            joined.append((s, e))
    return [piece for s, e in joined for piece in _cut_long(text, s, e, max_chars)]


def _code_passages(text: str, a: int, b: int, max_lines: int) -> list[tuple[int, int]]:
    """Blocks of at most max_lines lines of one file text[a:b] (its first line is the file's
    header, left out), cut at the last blank line of a block's second half where there is one."""
    nl = text.find("\n", a, b)
    if nl < 0:
        return []
    lines, pos = [], nl + 1  # (start, end) of each line after the header
    while pos < b:
        end = text.find("\n", pos, b)
        end = b if end < 0 else end
        lines.append((pos, end))
        pos = end + 1
    out, i = [], 0
    while i < len(lines):
        j = min(i + max_lines, len(lines))
        if j < len(lines):
            blanks = [k for k in range(i + max_lines // 2, j) if not text[lines[k][0]:lines[k][1]].strip()]
            j = blanks[-1] + 1 if blanks else j
        s, e = _trim(text, lines[i][0], lines[j - 1][1])
        if e > s:
            out.append((s, e))
        i = j
    return out


def passages(kind: str, text: str, page_starts=None, files=None, max_chars: int = MAX_CHARS,
             min_chars: int = MIN_CHARS, max_lines: int = MAX_LINES) -> Passages:
    """Cut a document's text into passages (see the module docstring); page_starts: where each
    page (a PDF's) or file (a codebase's) begins, [0] for a plain text."""
    page_starts = list(page_starts or [0])
    bounds = page_starts + [len(text)]
    starts, ends, pages = [], [], []
    for p in range(len(page_starts)):
        a, b = bounds[p], bounds[p + 1]
        units = _code_passages(text, a, b, max_lines) if kind == "code" else _text_passages(text, a, b, max_chars,
                                                                                            min_chars)
        for s, e in units:
            starts.append(s)
            ends.append(e)
            pages.append(p)
    starts_a = np.array(starts, np.int64)
    pages_a = np.array(pages, np.int64)
    # territories: from a passage's start to the next passage's start or the end of its page,
    # whichever comes first (a code file's header line, before its first passage, is nobody's)
    cover = starts_a.copy()
    page_end = np.array(bounds[1:], np.int64)[pages_a] if len(pages_a) else np.zeros(0, np.int64)
    nxt = np.r_[starts_a[1:], len(text)] if len(starts_a) else starts_a
    limits = np.minimum(nxt, page_end)
    return Passages(kind, text, page_starts, list(files or []), starts_a, np.array(ends, np.int64), pages_a,
                    cover, limits)


def token_units(offsets, passages: Passages) -> np.ndarray:
    """The passage of every token: offsets [n] (a token's first character in the text, -1 for a
    template token) -> int64 [n] in [0, U], U meaning none (template, whitespace only, a file's
    header line). A token's text runs to the next token's start (the last one's to the end of the
    text); it belongs to the passage whose territory holds its first non-space character."""
    text = passages.text
    off = np.asarray(offsets, np.int64)
    U = len(passages)
    out = np.full(off.shape, U, np.int64)
    doc = np.flatnonzero(off >= 0)
    if U == 0 or len(doc) == 0:
        return out
    chars = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    where = np.where(np.isin(chars, _SPACES), len(text), np.arange(len(text)))
    next_solid = np.r_[np.minimum.accumulate(where[::-1])[::-1], len(text)]  # [len + 1]
    a = np.minimum(off[doc], len(text))
    b = np.maximum(np.r_[a[1:], len(text)], a)
    first = next_solid[a]                                        # the token's first non-space character
    i = np.searchsorted(passages.cover, first, side="right") - 1
    ok = (first < b) & (i >= 0)
    ok[ok] &= first[ok] < passages.limits[i[ok]]
    out[doc[ok]] = i[ok]
    return out


# ----------------------------------------------------------------------------- the tally

def unit_runs(units, nowhere: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """units [n] (each token's passage; `nowhere`: none) as core/attention_f16.scatter_shares reads
    them: (starts [R + 1] int64, each run's unit [R] int64, skip [S] int64, nowhere). A run is a
    maximal stretch of tokens whose passage tokens all share one unit; the `nowhere` tokens inside
    it (`skip`: whitespace that cuts a passage, template tokens) are summed into the nowhere column
    on their own and left out of the run's sum. In document order a passage is one run, so a step
    sums a few long runs (whitespace alone cut a text passage into runs of ~8 tokens); any order
    works (runs of one)."""
    units = np.asarray(units, np.int64)
    skip = np.flatnonzero(units == nowhere).astype(np.int64)
    solid = np.flatnonzero(units != nowhere)
    if not len(solid):                                           # no passage token (or no token)
        return np.array([0, len(units)] if len(units) else [0], np.int64), \
            np.full(1 if len(units) else 0, nowhere, np.int64), skip, nowhere
    su = units[solid]
    first = solid[np.r_[0, np.flatnonzero(np.diff(su)) + 1]]   # each run's first passage token
    starts = np.r_[0, first[1:], len(units)].astype(np.int64)  # leading nowhere tokens join the first run
    return starts, units[first].copy(), skip, nowhere


class Tally:
    """Attention mass of one answer, summed over its decoding steps.

    mass [L, Hq, U + 1] per (layer, query head, passage; column U: template and whitespace tokens),
    tokens [n + 1] per token over every layer and head (for the evidence words; n: nowhere).
    The document's tokens sit in two zones: `static_tokens` [S] (the static rows that are document
    tokens, in StaticKV's order) and the offloaded range starting at `offload_start`. A clustered
    index's estimated clusters are summed per cluster and spread over their members at the end
    (`finish`), which needs the layers' indexes (`clusters`: per layer, one with order/offsets/sizes,
    or None); they count in `mass` and `tokens`, not in the per-step peaks (an estimate is spread
    evenly: it never peaks). Where the retrieved keys are a scan's top-k, a few of them can sit in
    an estimated cluster: the estimate is spread over all its members, those included, so they get
    one more member's share of it than the attention gave them (the tally is for ranking passages). Per step, the `head_steps` of each peak rule in `rules` are kept
    (`scores` of a peak rule not kept is an error); the rules over `mass` need nothing kept."""

    def __init__(self, n_layers: int, q_heads: int, units: np.ndarray, static_tokens: np.ndarray,
                 offload_start: int, n_offloaded: int, clusters=(), keep_steps: bool = False,
                 rules=(RULE,)):
        """keep_steps: also keep each step's mass (`steps_mass`, [steps, L, Hq, U + 1]; benchmarks);
        rules: the rules `scores` will be asked for (benchmarks: `RULES`)."""
        import torch

        self.units = torch.from_numpy(np.asarray(units, np.int64))       # [n] -> [0, U]
        self.n = len(units)
        self.U = int(self.units.max()) if self.n else 0                  # the "nowhere" column
        self.mass = torch.zeros(n_layers, q_heads, self.U + 1, dtype=torch.float64)
        self.tokens = torch.zeros(self.n + 1, dtype=torch.float64)
        self.static_tokens = torch.from_numpy(np.asarray(static_tokens, np.int64))
        self.static_units = self.units[self.static_tokens]
        self.offload_start, self.n_offloaded = offload_start, n_offloaded
        self.offload_units = self.units[offload_start:offload_start + n_offloaded]
        self.runs = unit_runs(units, self.U)                               # scatter_shares' view of units
        self.offload_runs = unit_runs(self.offload_units.numpy(), self.U)  # ... and of the offloaded range's
        self.clusters = tuple(clusters)
        self.cluster_mass: dict[int, object] = {}                      # layer -> [KVH, G, C] per member
        self.steps = 0
        self.keep_steps, self._kept = keep_steps, []
        self.heads = {r: ([], [], []) for r in rules if r in PEAK_RULES}  # per rule, per step: head_steps of its mass [L, Hq, ...]
        self._step = torch.zeros(n_layers, q_heads, self.U + 1)  # the step being recorded
        self.start = torch.zeros(n_layers, q_heads, self.U + 1)  # the question's first token's mass ("contrast")
        self._open = False
        self._rows, self._start_rows = [], []  # the step's query rows per layer (see _row)
        self._kdoc, self._keys, self.scale = [], None, 1.0  # the static document keys: per layer [KVH, D, S], then stacked
        self._doc_logits = None  # document_logits' buffer [L, Hq, n], made at its first use
        self._doc_lse = None     # ... and record_document's lse of each layer's row [L, Hq]
        self._token_sums = {}    # scatter_shares' per-token sums [L, n or N] (fp64) by their first
                                 # token (0: every document token; offload_start), added to `tokens` in finish

    def record(self, layer: int, q, k_static, lse, sel, scale: float) -> None:
        """One layer's step: q [KVH, G, T, D] (the last row, T-1, is the one that predicts the next
        token), k_static [KVH, S, D] (its first len(static_tokens) rows are document tokens),
        lse [KVH, G, T] of the merged softmax, sel a core/layer.Selection or None. On the first
        step (the question's prefill) its first row is also kept as `start`."""
        import torch

        from dataclasses import replace

        KVH, G, T, D = q.shape
        if q.device.type != "cpu":  # a GPU's step: added up on the host (a copy per layer, with sources only)
            q, lse = q.cpu(), lse.cpu()
            if sel is not None:
                est = sel.estimate and replace(sel.estimate, logits=sel.estimate.logits.cpu())
                sel = replace(sel, ids=sel.ids.cpu(), logits=sel.logits.cpu(), values=None, estimate=est)
        if layer == 0:  # a new step: the last one's mass is complete
            self._flush()
            self.steps += 1
        if sel is not None and sel.estimate is not None:
            pe = torch.exp(sel.estimate.logits[:, :, -1].double() * scale - lse[:, :, -1, None])  # [KVH, G, C]
            prev = self.cluster_mass.get(layer)
            self.cluster_mass[layer] = pe if prev is None else prev + pe
        if self._keys is None and len(self._kdoc) == layer:  # the static document rows do not change during an answer
            self._kdoc.append(k_static[:, :len(self.static_tokens)].float().cpu().transpose(1, 2).contiguous())
        self._rows.append(self._row(T - 1, q, lse, sel))  # this step's query row, added up in _flush
        if self.steps == 1 and T > 1:
            self._start_rows.append(self._row(0, q, lse, sel))
        self.scale = scale
        self._open = True

    def rows(self, T: int) -> tuple[int, ...]:
        """The query rows of a T-token step that `record` reads: the last (it predicts the next
        token) and, on the question's step, the first too (`start`). An attention that keeps
        logits for the tally need keep only these (Retriever.partial_kept)."""
        return (0, T - 1) if T > 1 and self.steps <= 1 else (T - 1,)

    def document_logits(self, layer: int, kv_heads: int):
        """Layer `layer`'s rows of the buffer a decode step's attention writes every document
        token's unscaled logit into, in document order ([KVH, G, n] fp32, a view; record_document
        reads it)."""
        import torch

        if layer == 0:  # a new step: the last one is added up before its logits are overwritten
            self._flush()
        if self._doc_logits is None:
            self._doc_logits = torch.empty(self.mass.shape[0], self.mass.shape[1], self.n)  # [L, Hq, n]
            self._doc_lse = torch.empty(self.mass.shape[0], self.mass.shape[1])              # [L, Hq]
        return self._doc_logits[layer].view(kv_heads, -1, self.n)

    def record_document(self, layer: int, lse, scale: float) -> None:
        """`record` for a decode step whose attention wrote the logits of every document token in
        document order into `document_logits(layer)` (core/attention_f16.step_attention): lse
        [KVH, G, 1] of the whole softmax. (The step before was added up when layer 0 asked for its
        buffer.)"""
        if layer == 0:
            self.steps += 1
        self._doc_lse.numpy()[layer] = lse.cpu().numpy().reshape(-1)  # numpy's assignment: a tenth of torch's
        self._rows.append(("document", layer))
        self.scale = scale
        self._open = True

    def _token_sum(self, start: int, n: int):
        """The fp64 [L, n] buffer scatter_shares adds the shares of tokens start.. into (made once)."""
        import torch

        if start not in self._token_sums:
            self._token_sums[start] = torch.zeros(self.mass.shape[0], n, dtype=torch.float64)
        return self._token_sums[start]

    @staticmethod
    def _row(row: int, q, lse, sel):
        """What one layer's query row adds, kept until the step ends: (q [KVH, G, D], lse [KVH, G],
        retrieved ids [KVH, G, K] (-1: a pad; None: every offloaded key in order, the `exact`
        kind) and logits [KVH, G, K] (-inf at a pad), or None, None: nothing retrieved)."""
        KVH, G, T, D = q.shape
        if sel is None:
            return q[:, :, row], lse[:, :, row].float(), None, None
        K = sel.logits.shape[-1]
        ids = None if sel.every else sel.ids.reshape(KVH, G, T, K)[:, :, row].clone()
        kept = row if sel.rows is None else sel.rows.index(row)  # logits kept for some rows only
        # copies: a view would keep the layer's whole [KVH, G, T, K] logits alive until the step ends
        return q[:, :, row], lse[:, :, row].float(), ids, sel.logits[:, :, kept].clone()

    def _add(self, rows, out, tokens: bool) -> None:
        """Add every layer's query row's shares of the merged softmax to `out` [L, Hq, U + 1] (per
        passage) and, with `tokens`, to `tokens` (per document token), all layers at once: the
        static document rows' (their logits computed again here, from the keys kept in `_kdoc`)
        and the retrieved keys' (a pad: logit -inf, share 0)."""
        import torch

        from .attention_f16 import scatter_shares  # numba: imported where it is used

        L = len(rows)
        if isinstance(rows[0][0], str):  # record_document: every document token's logit, in order
            assert [r[1] for r in rows] == list(range(L))                         # layers 0..L-1, in order
            scatter_shares(self._doc_logits[:L], self._doc_lse[:L], self.scale, self.runs, out[:L],
                           self._token_sum(0, self.n)[:L] if tokens else None)
            return
        if self._keys is None:  # every layer has been recorded once: stack their keys, once
            self._keys, self._kdoc = torch.stack(self._kdoc), None                # [L, KVH, D, S]
        q = torch.stack([r[0] for r in rows])                                     # [L, KVH, G, D]
        lse = torch.stack([r[1] for r in rows])[..., None]                        # [L, KVH, G, 1]
        Hq = q.shape[1] * q.shape[2]
        p = torch.exp(torch.matmul(q, self._keys[:L]) * self.scale - lse).reshape(L, Hq, -1)  # [L, Hq, S]
        out[:L].index_add_(2, self.static_units, p)
        if tokens:
            self.tokens.index_add_(0, self.static_tokens, p.double().sum((0, 1)))
        if rows[0][3] is None:  # nothing retrieved
            return
        if rows[0][2] is None:  # every offloaded key, in order (`exact`): by runs of one passage
            logits = torch.stack([r[3] for r in rows]).reshape(L, Hq, -1)      # [L, Hq, N]
            scatter_shares(logits, lse.reshape(L, Hq), self.scale, self.offload_runs, out[:L],
                           self._token_sum(self.offload_start, logits.shape[-1])[:L] if tokens else None)
            return
        K = max(r[2].shape[-1] for r in rows)  # the clustered index retrieves unequal numbers
        pad = lambda x, value: torch.nn.functional.pad(x, (0, K - x.shape[-1]), value=value)
        ids = torch.stack([pad(r[2], -1) for r in rows]).clamp_min(0).reshape(L, Hq, K)
        logits = torch.stack([pad(r[3], float("-inf")) for r in rows])          # [L, KVH, G, K]
        p = torch.exp(logits * self.scale - lse).reshape(L, Hq, K)
        out[:L].scatter_add_(2, self.offload_units[ids], p)
        if tokens:
            self.tokens.index_add_(0, ids.reshape(-1) + self.offload_start, p.reshape(-1).double())

    def _flush(self) -> None:
        """Add the step just finished to `mass` and keep its head_steps (all layers at once)."""
        if not self._open:
            return
        if self._start_rows:
            self._add(self._start_rows, self.start, False)
            self._start_rows = []
        self._add(self._rows, self._step, True)
        self._rows = []
        self.mass += self._step
        for rule, kept in self.heads.items():
            for xs, x in zip(kept, head_steps(self._step, base=self.start if rule == "contrast" else None)):
                xs.append(x)
        if self.keep_steps:
            self._kept.append(self._step.clone())
        self._step.zero_()
        self._open = False

    def finish(self) -> "Tally":
        """Close the last step; spread the estimated clusters' mass over their members (once, after
        the answer)."""
        import torch

        self._flush()
        for start, sums in self._token_sums.items():  # scatter_shares' per-token sums, once
            self.tokens[start:start + sums.shape[1]] += sums.sum(0)
        self._token_sums = {}
        for layer, pe in self.cluster_mass.items():
            idx = self.clusters[layer]
            KVH, G, C = pe.shape
            for h in range(KVH):
                sizes = idx.sizes[h]                                            # [C]
                members = idx.order[h]                                          # [N] grouped by cluster
                per = torch.repeat_interleave(pe[h], sizes, dim=1)               # [G, N] each member's share
                self.mass[layer, h * G:(h + 1) * G].scatter_add_(
                    1, self.offload_units[members].expand(G, -1), per)
                self.tokens.index_add_(0, members + self.offload_start, per.sum(0))
        self.cluster_mass = {}
        return self

    def scores(self, rule: str = RULE):
        """One score per passage, float64 [U] summing to 1 (see `unit_scores`, `peak_scores`)."""
        if rule in PEAK_RULES:
            if rule not in self.heads:
                raise ValueError(f"this tally does not keep the {rule!r} rule's steps (rules=...)")
            stack = lambda xs: np.stack([x.numpy() for x in xs]) if xs else np.zeros((0, 0))
            return peak_scores(*(stack(xs) for xs in self.heads[rule]), self.U)
        return unit_scores(self.mass.numpy(), rule)

    def steps_mass(self):
        """[steps, L, Hq, U + 1]: each step's own mass (keep_steps, after `finish`; estimated
        clusters not included)."""
        import torch

        return torch.stack(self._kept)


def _distribution(mass):
    """Each head's distribution over the passages (torch [..., U + 1] -> [..., U]; the last column,
    nowhere, dropped; a head with no mass on the document: zeros)."""
    import torch

    m = mass[..., :-1]
    tot = m.sum(-1, keepdim=True)
    return torch.where(tot > 0, m / tot.clamp_min(1e-300), torch.zeros_like(m))


def head_steps(step_mass, top: int = PEAK_TOP, base=None):
    """What the peak rules keep of one step's mass [..., Hq, U + 1] (torch): each head's
    distribution over the passages ("peaks"), or what it gives a passage beyond its distribution
    in `base` (same shape; "contrast": clamped at 0), as its peak share [..., Hq] and its `top`
    passages (ids, shares [..., Hq, top]). A head with no mass on the document: peak 0."""
    import torch

    p = _distribution(step_mass)
    if base is not None:
        p = (p - _distribution(base).to(p.dtype)).clamp_min(0)
    shares, ids = p.topk(min(top, p.shape[-1]), dim=-1)
    peak = shares[..., 0] if shares.shape[-1] else torch.zeros(p.shape[:-1], dtype=p.dtype)
    return peak.float(), ids.int(), shares.float()


def peak_scores(peaks, ids, shares, U: int, fraction: float = PEAK_FRACTION):
    """The "peaks" rule: of every (step, layer, head) of an answer, the `fraction` whose
    distribution over the passages peaks highest (the moments a head reads one place), each
    adding its distribution (top passages) to the scores. peaks [...], ids/shares [..., top]
    (numpy) -> float64 [U] summing to 1 (zeros when nothing peaked)."""
    peaks = np.asarray(peaks, np.float64).reshape(-1)
    out = np.zeros(U)
    if peaks.size == 0 or U == 0 or peaks.max() <= 0:
        return out
    chosen = (peaks >= np.quantile(peaks, 1.0 - fraction)) & (peaks > 0)
    top = np.asarray(ids).reshape(len(peaks), -1)[chosen]
    np.add.at(out, top.reshape(-1), np.asarray(shares, np.float64).reshape(len(peaks), -1)[chosen].reshape(-1))
    return out / out.sum()


def unit_scores(mass, rule: str):
    """One score per passage from mass [L, Hq, U + 1] (numpy or torch; the last column, nowhere,
    is dropped) by a rule that needs only the summed mass: each head's distribution over the
    passages, weighted by the rule, summed ("peaks" needs each step's: `Tally.scores`):
      sum           the raw mass, every head and layer alike
      heads         each head's distribution normalised to 1 (every head one vote)
      peaked        as heads, each weighted by how far its distribution is from uniform
                    (1 - entropy / log U)
      late          sum over the second half of the layers
      peaked-late   peaked over the second half of the layers
    Returns float64 [U], summing to 1 (zeros when no passage received any mass)."""
    m = np.asarray(mass, np.float64)[..., :-1]
    L, H, U = m.shape
    if rule in ("late", "peaked-late"):
        m = m[L // 2:]
    if rule == "sum" or rule == "late":
        s = m.sum((0, 1))
    else:
        tot = m.sum(-1, keepdims=True)
        p = np.divide(m, tot, out=np.zeros_like(m), where=tot > 0)
        if rule == "heads":
            w = (tot > 0).astype(np.float64)
        elif rule in ("peaked", "peaked-late"):
            logp = np.log(np.where(p > 0, p, 1.0))
            ent = -(p * logp).sum(-1, keepdims=True)
            w = np.where(tot > 0, 1.0 - ent / max(np.log(U), 1e-12), 0.0)
        else:
            raise ValueError(f"unknown rule {rule!r}; one of {', '.join(RULES)}")
        s = (w * p).sum((0, 1))
    total = s.sum()
    return s / total if total > 0 else s


# ----------------------------------------------------------------------------- sources

@dataclass
class Source:
    """One cited passage: where it is, its score, its text, and the evidence words in it."""

    location: dict
    score: float
    snippet: str
    evidence: list

    def record(self) -> dict:
        """The `--json` form: {path, page | line_start, line_end, char_start, char_end, score, snippet, evidence}."""
        return {**self.location, "score": round(self.score, 4), "snippet": self.snippet, "evidence": self.evidence}


def label(record: dict) -> str:
    """"path, page N" or "path:a-b" of a source record."""
    if "page" in record:
        return f"{record['path']}, page {record['page']}"
    a, b = record["line_start"], record["line_end"]
    return f"{record['path']}:{a}" + (f"-{b}" if b > a else "")


_WORD = re.compile(r"\w+")


def _evidence(text: str, a: int, b: int, token_mass: np.ndarray, offsets: np.ndarray, top: int = 3):
    """The `top` words of text[a:b] whose tokens received the most mass: [(start, end)] in text."""
    lo, hi = np.searchsorted(offsets, [a, b])
    if hi <= lo:
        return []
    order = np.argsort(-token_mass[lo:hi], kind="stable")
    spans = []
    for j in order[:4 * top]:
        if token_mass[lo + j] <= 0:
            break
        c = int(offsets[lo + j])
        m = next((m for m in _WORD.finditer(text, max(a, c - 40), min(b, c + 40)) if m.start() <= c < m.end()
                  or c <= m.start() < c + 2), None)
        if m and (m.start(), m.end()) not in spans:
            spans.append((m.start(), m.end()))
        if len(spans) == top:
            break
    return sorted(spans)


def rank(tally: Tally, passages: Passages, offsets, name: str, top: int = 5, rule: str = RULE,
         max_snippet: int = 320) -> list[Source]:
    """The `top` passages by `unit_scores`, best first, as Sources (none without any mass).
    offsets: the per-token first characters (sources[:, 0]) the tally's tokens index."""
    scores = tally.scores(rule)
    order = [int(i) for i in np.argsort(-scores, kind="stable")[:top] if scores[i] > 0]
    off = np.asarray(offsets, np.int64)
    doc = off >= 0
    doc_off = off[doc]
    token_mass = tally.tokens.numpy()[:tally.n][doc]
    text = passages.text
    out = []
    for i in order:
        a, b = int(passages.starts[i]), int(passages.ends[i])
        marks = _evidence(text, a, b, token_mass, doc_off)
        lo, hi = a, b
        if hi - lo > max_snippet:  # a window around the evidence
            centre = marks[0][0] if marks else a
            lo = max(a, min(centre - max_snippet // 3, b - max_snippet))
            hi = min(b, lo + max_snippet)
        snippet = text[lo:hi]
        if passages.kind != "code":
            snippet = snippet.replace("\n", " ").replace("\t", " ")  # one line; offsets unchanged
        out.append(Source(passages.location(i, name), float(scores[i]),
                          ("…" if lo > a else "") + snippet + ("…" if hi < b else ""), [text[s:e] for s, e in marks]))
    return out
