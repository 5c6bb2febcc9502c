"""The prompt, split into a cacheable document prefix and a per-question suffix.

The model's own chat template is rendered once with two sentinels, then cut:

  prefix = <template head> "Read the document ... <document>\n" DOCUMENT "\n</document>\n\nQuestion: "
  suffix = QUESTION <template tail: end of turn, assistant header>

The three prefix pieces are tokenized separately, so the same document and model always give
the same prefix tokens, and the document's tokens carry exact character offsets (`sources`).
Special-token strings inside the document are tokenized as plain text (`split_special_tokens`),
so a document cannot end the user turn early.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PROMPT_VERSION = 1
INSTRUCTION = "Read the document below and answer the question after it.\n\n<document>\n"
DOC_SENTINEL = "\u2063RA-DOCUMENT\u2063"
Q_SENTINEL = "\u2063RA-QUESTION\u2063"


@dataclass
class Prefix:
    ids: np.ndarray       # int32 [P]
    sources: np.ndarray   # int32 [P, 2]: (char offset in the document text, page); -1 for template tokens


def _template_parts(tokenizer) -> tuple[str, str, str]:
    """(head, middle, tail) of the rendered chat around the document and the question."""
    content = f"{INSTRUCTION}{DOC_SENTINEL}\n</document>\n\nQuestion: {Q_SENTINEL}"
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True)
    else:  # a base model without a chat template
        rendered = content + "\nAnswer:"
    head, rest = rendered.split(DOC_SENTINEL)
    middle, tail = rest.split(Q_SENTINEL)
    return head, middle, tail


def _encode(tokenizer, text: str, **kw) -> list[int]:
    return tokenizer(text, add_special_tokens=False, **kw)["input_ids"]


def build_prefix(tokenizer, doc) -> Prefix:
    """Tokens of everything up to the end of the document, with each token's source."""
    head, middle, _ = _template_parts(tokenizer)
    h = _encode(tokenizer, head)
    enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
    m = _encode(tokenizer, middle)
    ids = np.array(h + enc["input_ids"] + m, dtype=np.int32)
    sources = np.full((len(ids), 2), -1, dtype=np.int32)
    starts = np.array([s for s, _ in enc["offset_mapping"]], dtype=np.int64)
    pages = np.searchsorted(np.array(doc.page_starts), starts, side="right") - 1
    sources[len(h):len(h) + len(starts), 0] = starts
    sources[len(h):len(h) + len(starts), 1] = np.maximum(pages, 0)
    return Prefix(ids=ids, sources=sources)


def question_ids(tokenizer, question: str) -> list[int]:
    """Tokens of the question and the template up to where the answer begins."""
    _, _, tail = _template_parts(tokenizer)
    return _encode(tokenizer, question.strip(), split_special_tokens=True) + _encode(tokenizer, tail)


def followup_ids(tokenizer, question: str) -> list[int]:
    """Tokens that end the previous answer's turn and ask a follow-up question (multi-turn)."""
    a_sentinel = "\u2063RA-ANSWER\u2063"
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": a_sentinel},
             {"role": "user", "content": Q_SENTINEL}], tokenize=False, add_generation_prompt=True)
        between, tail = rendered.split(a_sentinel)[1].split(Q_SENTINEL)
    else:
        between, tail = "\n\nQuestion: ", "\nAnswer:"
    return (_encode(tokenizer, between) + _encode(tokenizer, question.strip(), split_special_tokens=True)
            + _encode(tokenizer, tail))


def stop_ids(tokenizer, model_config) -> set[int]:
    ids = set()
    for source in (getattr(model_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return ids
