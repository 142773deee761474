"""Incremental tokenization for the agent loop: the tokens of a conversation that extends one already tokenized,
for the cost of the new text (`session.py`'s appends). Its own module beside `rendering.py`, which it extends.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass

from .rendering import ChatTemplateError


@dataclass
class Tokens:
    """A rendered text, its token ids and each token's [start, end) characters: what `tokenize` extends."""

    text: str
    ids: list[int]
    starts: list[int]
    ends: list[int]


def _split_tokens(tokenizer) -> frozenset[int]:
    """Ids of the special tokens the tokenizer splits the text at before anything else runs (added, special, matched
    on the raw text, stripping nothing to their left): a text cut just before one of them tokenizes on each side as
    it does whole. ChatML's <|im_start|>, Llama 3's <|start_header_id|>, ..."""
    cached = getattr(tokenizer, "_progadv_split_tokens", None)
    if cached is not None:
        return cached
    out = frozenset(i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
                    if t.special and not t.lstrip and not t.single_word and not t.normalized)  # fmt: skip
    try:
        tokenizer._progadv_split_tokens = out
    except AttributeError:
        pass
    return out


def tokenize(tokenizer, text: str, base: Tokens | None = None, label: str = "") -> Tokens:
    """Tokens of `text`. With `base` (the tokens of an earlier text that `text` extends, e.g. the conversation before
    an appended message), only the part from the last split token (`_split_tokens`) inside their common prefix is
    tokenized: the same ids as tokenizing the whole, for the cost of the new text (the agent loop's appends and
    candidates, `session.py`). Without a split token to cut at, the whole text is tokenized."""
    j, cut = 0, 0
    if base is not None and base.ids:
        common = len(base.text) if text.startswith(base.text) else len(os.path.commonprefix([base.text, text]))
        split = _split_tokens(tokenizer)
        j = bisect.bisect_right(base.ends, common)  # tokens wholly inside the common text
        while j > 0 and base.ids[j - 1] not in split:
            j -= 1
        j = max(j - 1, 0)  # cut before the split token itself: it starts the tokenized tail
        cut = base.starts[j] if j else 0
    try:
        enc = tokenizer(text[cut:], add_special_tokens=False, return_offsets_mapping=True)
    except Exception as e:  # noqa: BLE001 - the tokenizer's own failure, named for the record
        raise ChatTemplateError(f"{label}: the tokenizer cannot encode it: {type(e).__name__}: {e}", label) from None
    ids = list(enc["input_ids"])
    if j and (not ids or ids[0] != base.ids[j]):  # the cut did not fall where expected: tokenize the whole
        return tokenize(tokenizer, text, None, label)
    starts = [s + cut for s, _ in enc["offset_mapping"]]
    ends = [e + cut for _, e in enc["offset_mapping"]]
    if not j:
        return Tokens(text, ids, starts, ends)
    return Tokens(text, base.ids[:j] + ids, base.starts[:j] + starts, base.ends[:j] + ends)
