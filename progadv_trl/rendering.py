"""Rendering a trajectory to token ids and action spans with the model's own chat template, truncation, and the
check that two tokenizers read the same ids.

Rendering uses the model's own chat template on the whole conversation, once, and tokenizes once. The action span
of a step is the text the model generated for that turn (content, tool calls, end-of-turn token), found by rendering
the conversation up to the turn with `add_generation_prompt=True` (where the model starts writing) and up to and
including the turn (where it stopped). Tokenizing messages one by one and concatenating misaligns at boundaries.
"""

from __future__ import annotations

import bisect
import json
import os
import warnings
from dataclasses import dataclass

from .trajectories import RecordError, Trajectory

class ChatTemplateError(ValueError):
    """The chat template cannot give exact action spans for this conversation."""

    def __init__(self, message: str, record: str = "", field: str = "messages"):
        super().__init__(message)
        self.record, self.field = record, field


@dataclass
class Rendered:
    """A trajectory as the model reads it: token ids and, per assistant turn, the [start, end) of its own tokens."""

    input_ids: list[int]
    spans: list[tuple[int, int]]  # per step; (s, s) when truncation dropped every token of the step
    message_indices: list[int]
    truncated_steps: frozenset[int] = frozenset()
    truncation: dict | None = None  # None when nothing was cut

    @property
    def n_steps(self) -> int:
        return len(self.spans)


def _record(traj: Trajectory) -> str:
    return f"{traj.source} (id {traj.id!r})" if traj.source else f"id {traj.id!r}"


def _template(tokenizer, messages, tools, traj: Trajectory, **kw) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False, **kw)
    except Exception as e:  # jinja raises on conversations a template does not accept (role order, arg types)
        raise ChatTemplateError(f"{traj.label}: the chat template cannot render it: {e}", _record(traj)) from None


def _char_span(traj: Trajectory, tokenizer, full: str, mi: int) -> tuple[int, int]:
    """[start, end) in the rendered text of what the model wrote in message `mi` (an assistant turn)."""
    msgs, tools = traj.messages, traj.tools
    before = _template(tokenizer, msgs[:mi], tools, traj, add_generation_prompt=True) if mi > 0 else None
    upto = _template(tokenizer, msgs[: mi + 1], tools, traj)
    if before is None:
        # A conversation that opens with the assistant: its turn starts where the template's header ends.
        before = upto[: upto.find(msgs[mi]["content"])] if msgs[mi]["content"] else ""
    if not full.startswith(before) or not full.startswith(upto) or len(upto) < len(before):
        raise ChatTemplateError(
            f"{traj.label}: the chat template renders message {mi} differently in the whole conversation "
            "than in its prefix (e.g. it strips the reasoning of earlier turns), so action spans cannot be located "
            "exactly. Use a prefix-preserving template, e.g. TRL's trl/chat_templates/*_training.jinja (qwen3_training "
            "for Qwen3), as TRL itself does for multi-turn training",
            _record(traj),
            f"messages[{mi}]",
        )
    # The action ends at the end-of-turn token; whitespace the template writes after it was not generated.
    end = len(upto.rstrip())
    return len(before), max(end, len(before))


def _token_span(starts: list[int], ends: list[int], cs: int, ce: int) -> tuple[int, int]:
    """Tokens overlapping characters [cs, ce) (offsets are monotone, so bisect)."""
    s = bisect.bisect_right(ends, cs)
    return s, bisect.bisect_left(starts, ce, lo=s)


def render(traj: Trajectory, tokenizer, max_length: int | None = None) -> Rendered:
    """Render with the chat template once, tokenize once, and locate every assistant turn's action span.

    Locating a span renders the conversation up to that turn, so a trajectory of n turns costs O(n^2) template
    work. When `max_length` will cut the middle out anyway, only the turns that survive are located: the first
    (where the kept head ends) and, by bisection over the monotone turn ends, the ones reaching into the kept tail.
    """
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    full = _template(tokenizer, traj.messages, traj.tools, traj)
    try:
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    except Exception as e:  # noqa: BLE001 - the tokenizer's own failure, named for the record
        raise ChatTemplateError(f"{traj.label}: the tokenizer cannot encode it: {type(e).__name__}: {e}", _record(traj)) from None
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    starts, ends = [o[0] for o in offsets], [o[1] for o in offsets]
    asst = traj.assistant_message_indices
    cache: dict[int, tuple[int, int]] = {}

    def span(j: int) -> tuple[int, int]:  # token span of step j (its assistant message asst[j])
        if j not in cache:
            cache[j] = _token_span(starts, ends, *_char_span(traj, tokenizer, full, asst[j]))
        return cache[j]

    if max_length is None or len(ids) <= max_length or not asst:
        r = Rendered(ids, [span(j) for j in range(len(asst))], asst)
        return r if max_length is None or len(ids) <= max_length else truncate(r, max_length)
    n = len(ids)
    head = min(span(0)[0], max_length // 2)  # as `truncate` computes it
    tail_start = n - (max_length - head)
    lo, hi = 1, len(asst)  # first step whose last token is in the kept tail
    while lo < hi:
        mid = (lo + hi) // 2
        upto = _template(tokenizer, traj.messages[: asst[mid] + 1], traj.tools, traj)  # where step mid ends
        if bisect.bisect_left(starts, len(upto.rstrip())) > tail_start:
            hi = mid
        else:
            lo = mid + 1
    # Steps before `lo` (but the first) lie wholly inside the dropped middle, since no action precedes `head`:
    # one token of that range stands for each, which `truncate` marks dropped exactly as it would the real span.
    spans = [span(j) if (j == 0 or j >= lo) else (tail_start - 1, tail_start) for j in range(len(asst))]
    return truncate(Rendered(ids, spans, asst), max_length)


def render_all(trajectories: list[Trajectory], tokenizer, max_length: int | None = None, *, on_error: str = "raise"):
    """(kept trajectories, their renderings, RecordErrors): with on_error="skip", a trajectory the chat template
    cannot render is left out and named instead of ending the run."""
    kept, rendered, errors = [], [], []
    for t in trajectories:
        try:
            rendered.append(render(t, tokenizer, max_length))
            kept.append(t)
        except ChatTemplateError as e:
            if on_error != "skip":
                raise
            errors.append(RecordError(e.record or _record(t), e.field, str(e).removeprefix(f"{t.label}: ")))
    return kept, rendered, errors


def position_limit(max_length: int | None, *models) -> tuple[int | None, str]:
    """(the length to cut trajectories to, why): `max_length`, or the fewest positions any of `models` was built for
    (`config.max_position_embeddings`) when `max_length` is None or more. A model run past its positions scores
    garbage without a word; cut there, the lost steps are flagged like any truncation. A `max_length` larger than
    the positions is lowered with a warning. Why: "max_length" or "max_position_embeddings"."""
    sizes = [getattr(getattr(m, "config", None), "max_position_embeddings", None) for m in models if m is not None]
    positions = min((n for n in sizes if isinstance(n, int) and not isinstance(n, bool) and n >= 2), default=None)
    if positions is None or (max_length is not None and max_length <= positions):
        return max_length, "max_length"
    if max_length is not None:
        warnings.warn(f"max_length {max_length} is more than the model's {positions} positions "
                      f"(max_position_embeddings): trajectories are cut to {positions} tokens", stacklevel=2)  # fmt: skip
    return positions, "max_position_embeddings"


def truncate(r: Rendered, max_length: int) -> Rendered:
    """Keep the start (system prompt and task, at most half the budget) and the most recent context.

    A step that lost some of its own tokens is marked truncated and scored on what is left; a step that lost all of
    them gets no advantage (NaN), never a silent 0. Steps after the cut keep their tokens but read a shortened
    context: they are listed under `context_cut_steps`.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    n = len(r.input_ids)
    first_action = r.spans[0][0] if r.spans else n
    head = min(first_action, max_length // 2)
    tail_start = n - (max_length - head)
    ids = r.input_ids[:head] + r.input_ids[tail_start:]

    def remap(p: int) -> int:  # old position -> new position, for positions that are kept
        return p if p < head else p - (tail_start - head)

    spans, cut, dropped, context_cut = [], set(), [], []
    for i, (s, e) in enumerate(r.spans):
        kept = [p for p in range(s, e) if p < head or p >= tail_start]
        if len(kept) < e - s:
            cut.add(i)
        if not kept:
            dropped.append(i)
            spans.append((0, 0))
            continue
        if kept[0] < head <= kept[-1]:  # a step straddling the cut: keep its tail part only, contiguous
            kept = [p for p in kept if p >= tail_start]
            cut.add(i)
        if kept[0] >= tail_start and i not in cut:
            context_cut.append(i)
        spans.append((remap(kept[0]), remap(kept[-1]) + 1))
    info = {
        "original_tokens": n,
        "kept_tokens": len(ids),
        "dropped_tokens": n - len(ids),
        "dropped_range": [head, tail_start],
        "truncated_steps": sorted(cut),
        "dropped_steps": dropped,
        "context_cut_steps": context_cut,
    }
    return Rendered(ids, spans, r.message_indices, frozenset(cut), info)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer compatibility


class TokenizerMismatchError(ValueError):
    pass


# A conversation that exercises what tokenizer classes disagree on: tool calls (JSON), non-ASCII text (accents
# composed and decomposed, CJK, emoji), digit runs and decimals, contractions, runs of spaces and newlines.
PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search_flights",
            "description": "Find flights; prices in EUR.",
            "parameters": {
                "type": "object",
                "properties": {"origin": {"type": "string"}, "destination": {"type": "string"}, "seats": {"type": "integer"}},
                "required": ["origin", "destination"],
            },
        },
    }
]
PROBE_MESSAGES = [
    {"role": "system", "content": "You are a careful travel agent. Today is 2024-03-15; it's 09:41."},
    {"role": "user", "content": "Réservez 2 billets Zürich → 東京 for <= 1234.50 €, s'il vous plaît. I'll pay 100%! Cafe\u0301 na\u00efve 😀"},
    {
        "role": "assistant",
        "content": "Checking flight 0042 first.",
        "tool_calls": [
            {"type": "function", "function": {"name": "search_flights", "arguments": {"origin": "Zürich", "destination": "東京", "seats": 2}}}
        ],
    },
    {"role": "tool", "content": '{"flights": [{"id": "LX160", "price": 987.65, "départ": "07:45"}, {"id": "NH210", "price": 1203}]}'},
    {"role": "assistant", "content": "Found LX160 at 987.65 € — départ 07:45.\n\n    Shall I book it?\tYes/No  "},
]


def probe_text(tokenizer) -> str:
    """The probe conversation rendered with `tokenizer`'s chat template (plain text when it has none or fails)."""
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(PROBE_MESSAGES, tools=PROBE_TOOLS, tokenize=False)
        except Exception:  # noqa: BLE001 - a template without tool support still gets the plain probe
            pass
    return "\n".join(m["content"] for m in PROBE_MESSAGES) + "\n" + json.dumps(PROBE_TOOLS, ensure_ascii=False)


def probe_ids(tokenizer, text: str | None = None) -> list[int]:
    """Token ids of the probe, tokenized as `render` tokenizes (one call, no special tokens added)."""
    return list(tokenizer(probe_text(tokenizer) if text is None else text, add_special_tokens=False)["input_ids"])


def probe_fingerprint(tokenizer) -> str:
    """sha256 of the probe's ids: two tokenizers with the same fingerprint read the probe identically."""
    import hashlib

    return hashlib.sha256(json.dumps(probe_ids(tokenizer)).encode()).hexdigest()


def check_same_tokenizer(a, b, names: tuple[str, str] = ("policy", "reference"), hint: str | None = None) -> None:
    """Policy and reference must read the same token ids: same vocabulary, the same chat template, and the same ids
    for the same text. The last catches two classes reading the same files differently (transformers 5 builds
    Qwen2Tokenizer's normalizer and pre-tokenizer in code, while a directory without config.json loads the
    tokenizer.json as it is)."""
    why = "Progress advantage compares the two models token by token, so they must share one tokenizer."
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        only_a = sorted(set(va) - set(vb))[:5]
        only_b = sorted(set(vb) - set(va))[:5]
        moved = [t for t in set(va) & set(vb) if va[t] != vb[t]][:5]
        raise TokenizerMismatchError(
            f"the {names[0]} and {names[1]} tokenizers differ: vocabulary sizes {len(va)} vs {len(vb)}; "
            f"only in {names[0]}: {only_a}; only in {names[1]}: {only_b}; different ids: {moved}. {hint or why}"
        )
    ta, tb = getattr(a, "chat_template", None), getattr(b, "chat_template", None)
    if ta and tb and ta != tb:
        raise TokenizerMismatchError(
            f"the {names[0]} and {names[1]} tokenizers have different chat templates, so the same conversation would "
            f"be rendered to different tokens. "
            + (hint or f"Save the {names[1]} with the {names[0]}'s chat template, or pass one tokenizer for both.")
        )
    text = probe_text(a if ta else b)  # one text: the question is only how each tokenizer splits it
    ia, ib = probe_ids(a, text), probe_ids(b, text)
    if ia != ib:
        i = next((k for k, (x, y) in enumerate(zip(ia, ib)) if x != y), min(len(ia), len(ib)))
        pa, pb = a.decode(ia[i : i + 3]), b.decode(ib[i : i + 3])
        raise TokenizerMismatchError(
            f"the {names[0]} tokenizer ({type(a).__name__}) and the {names[1]} tokenizer ({type(b).__name__}) split "
            f"the same text into different tokens: {len(ia)} vs {len(ib)} tokens for a probe conversation with tool "
            f"calls, non-ASCII text and digits, first differing at token {i} ({pa!r} vs {pb!r}). {hint or why}"
        )


def render_step(traj: Trajectory, tokenizer, message_index: int) -> tuple[list[int], tuple[int, int]]:
    """(token ids of the whole conversation, [start, end) of assistant message `message_index`'s own tokens): what
    `render` gives for that one step, locating only its span (one step's template work, not every turn's). The agent
    loop (`session.py`) scores a candidate next turn this way, so its span is the one `render` finds for it."""
    full = _template(tokenizer, traj.messages, traj.tools, traj)
    try:
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    except Exception as e:  # noqa: BLE001 - the tokenizer's own failure, named for the record
        raise ChatTemplateError(f"{traj.label}: the tokenizer cannot encode it: {type(e).__name__}: {e}", _record(traj)) from None
    offsets = enc["offset_mapping"]
    starts, ends = [o[0] for o in offsets], [o[1] for o in offsets]
    return list(enc["input_ids"]), _token_span(starts, ends, *_char_span(traj, tokenizer, full, message_index))


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


def render_next(traj: Trajectory, tokenizer, state: Tokens, before: str) -> tuple[Tokens, tuple[int, int]]:
    """`render_step` for the last message of `traj` (the candidate next turn of the agent loop): its token span in the
    whole conversation, tokenized as an extension of `state` (the tokens of the conversation before it), with
    `before` the template's text of that conversation with the generation prompt (the same for every candidate)."""
    full = _template(tokenizer, traj.messages, traj.tools, traj)
    if not full.startswith(before):
        raise ChatTemplateError(
            f"{traj.label}: the chat template renders the conversation differently once the next turn is added (e.g. "
            "it strips the reasoning of earlier turns), so the turn's span cannot be located exactly. Use a "
            "prefix-preserving template, e.g. TRL's trl/chat_templates/*_training.jinja",
            _record(traj), f"messages[{len(traj.messages) - 1}]",
        )  # fmt: skip
    toks = tokenize(tokenizer, full, state, traj.label)
    cs, ce = len(before), len(full.rstrip())  # as `_char_span`: the turn ends at its end-of-turn token
    return toks, _token_span(toks.starts, toks.ends, cs, max(ce, cs))
