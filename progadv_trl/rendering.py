"""Rendering a trajectory to token ids and action spans with the model's own chat template, truncation, and the
check that two tokenizers read the same ids.

Two ways to render (`ScoringConfig.rendering`; "auto" picks per trajectory):
- whole: the whole conversation rendered once, tokenized once. The action span of a step is the text the model
  generated for that turn (reasoning, content, tool calls, end-of-turn token), found by rendering the conversation up
  to the turn with `add_generation_prompt=True` (where the model starts writing) and up to and including the turn
  (where it stopped). Exact only when the template is prefix-preserving: every earlier turn reads the same in the
  whole as in the prefix. Tokenizing messages one by one and concatenating misaligns at boundaries.
- as generated: for a template that rewrites history (Qwen3, gpt-oss, Phi-3, Nemotron 3 drop the reasoning of earlier
  turns), the whole conversation is not what the model read. Step t is then its own row: the context the model read,
  `render(messages[:t], add_generation_prompt=True)`, followed by the turn as the template writes it when it is the
  latest one (`render(messages[:t + 1])` past that context, reasoning included); the prompt is tokenized alone, as
  the model read it, and the turn alone after it. Where the template does not write the latest turn after its
  generation prompt, `latest_turn` rebuilds it (a prefill, a rewritten history) or refuses it, never guesses.
  `prefix.Chain` runs a trajectory's rows over one KV cache, so shared context is computed once.

Nothing dropped silently: a step whose tool calls, content or reasoning the template writes nowhere in its span is
flagged in `Rendered.dropped` (the score's `steps[i].dropped`); `strict=True` refuses it.
"""

from __future__ import annotations

import bisect
import json
import warnings
from dataclasses import dataclass, field

from .config import RENDERINGS
from .trajectories import RecordError, Trajectory


class ChatTemplateError(ValueError):
    """The chat template cannot give exact action spans for this conversation."""

    def __init__(self, message: str, record: str = "", field: str = "messages"):
        super().__init__(message)
        self.record, self.field = record, field


class NotPrefixPreserving(ChatTemplateError):
    """The template renders an earlier turn differently once later turns follow: "auto" scores it as generated."""


@dataclass
class Rendered:
    """A trajectory as the model reads it: token ids and, per assistant turn, the [start, end) of its own tokens.

    As generated (`rows` set): step t is scored in `rows[t]` (its context + its tokens, one span), and `spans[t]` is
    that row's span; `input_ids` is the last row's ids (the longest context)."""

    input_ids: list[int]
    spans: list[tuple[int, int]]  # per step; (s, s) when truncation dropped every token of the step
    message_indices: list[int]
    truncated_steps: frozenset[int] = frozenset()
    truncation: dict | None = None  # None when nothing was cut
    rows: list["Rendered"] | None = None  # as generated: one row per step
    dropped: dict[int, list[str]] = field(default_factory=dict)  # step -> what the template rendered nowhere

    @property
    def n_steps(self) -> int:
        return len(self.spans)


def _record(traj: Trajectory) -> str:
    return f"{traj.source} (id {traj.id!r})" if traj.source else f"id {traj.id!r}"


def _string_args(messages: list[dict]) -> list[dict]:
    """Tool-call arguments as JSON strings, for templates that concatenate them as text (DeepSeek-V3)."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [{**tc, "function": {**tc["function"], "arguments": json.dumps(tc["function"]["arguments"], ensure_ascii=False)}}
                     if isinstance(tc["function"].get("arguments"), dict) else tc for tc in m["tool_calls"]]  # fmt: skip
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


def _reasoning_keys(tokenizer, messages: list[dict]) -> list[dict]:
    """Each message's `reasoning_content` also under the key the template reads (gpt-oss reads `thinking`)."""
    tpl = getattr(tokenizer, "chat_template", None) or ""
    if "reasoning_content" in tpl or "thinking" not in tpl:
        return messages
    return [{**m, "thinking": m["reasoning_content"]} if m.get("reasoning_content") else m for m in messages]


def chat_text(tokenizer, messages, tools=None, **kw) -> str:
    """`apply_chat_template(..., tokenize=False)` with reasoning under the template's key; a template that fails on
    tool-call arguments given as a dict (it concatenates them as a string) gets them as a JSON string."""
    messages = _reasoning_keys(tokenizer, messages)
    try:
        return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False, **kw)
    except Exception:
        if not any(isinstance(tc["function"].get("arguments"), dict) for m in messages for tc in m.get("tool_calls") or ()):
            raise
        return tokenizer.apply_chat_template(_string_args(messages), tools=tools or None, tokenize=False, **kw)


def _template(tokenizer, messages, tools, traj: Trajectory, **kw) -> str:
    try:
        return chat_text(tokenizer, messages, tools, **kw)
    except Exception as e:  # jinja raises on conversations a template does not accept (role order, arg types)
        raise ChatTemplateError(f"{traj.label}: the chat template cannot render it: {e}", _record(traj)) from None


def _turn_text(traj: Trajectory, tokenizer, mi: int) -> tuple[str, str]:
    """(the context the model read before message `mi`, the template's rendering with `mi` as the latest turn)."""
    msgs, tools = traj.messages, traj.tools
    upto = _template(tokenizer, msgs[: mi + 1], tools, traj)
    if mi > 0:
        return _template(tokenizer, msgs[:mi], tools, traj, add_generation_prompt=True), upto
    # A conversation that opens with the assistant: its turn starts where the template's header ends.
    c = msgs[mi]["content"]
    return (upto[: upto.find(c)] if c and c in upto else ""), upto


def _char_span(traj: Trajectory, tokenizer, full: str, mi: int) -> tuple[int, int]:
    """[start, end) in the rendered text of what the model wrote in message `mi` (an assistant turn)."""
    before, upto = _turn_text(traj, tokenizer, mi)
    if not full.startswith(before) or not full.startswith(upto) or len(upto) < len(before):
        if not upto.startswith(before):
            latest_turn(traj, mi, before, upto)  # refuses the turns that cannot be rebuilt at all
        raise NotPrefixPreserving(
            f"{traj.label}: the chat template renders message {mi} differently in the whole conversation "
            "than in its prefix (e.g. it strips the reasoning of earlier turns), so the whole conversation is not what "
            "the model read. Score it as generated (rendering='auto' or 'as_generated': each step in its own context), "
            "or use a prefix-preserving template, e.g. TRL's trl/chat_templates/*_training.jinja (qwen3_training for "
            "Qwen3)",
            _record(traj),
            f"messages[{mi}]",
        )
    # The action ends at the end-of-turn token; whitespace the template writes after it was not generated.
    end = len(upto.rstrip())
    return len(before), max(end, len(before))


def latest_turn(traj: Trajectory, mi: int, before: str, upto: str) -> str:
    """What the model wrote after `before` (the generation prompt) for message `mi`, from `upto` (the template's
    rendering with `mi` the latest turn): usually `upto` past `before`. Two templates write it otherwise, and the turn
    is still exact:
    - a prefill (DeepSeek-R1 distills, DeepSeek-V3: the prompt ends "<think>\n", the turn is rendered without its
      reasoning): when `content` holds the model's raw output, `<think>` block included, the model wrote `content`
      past the prefill, then the template's end of turn;
    - a rewrite of the history the prompt holds (gpt-oss drops the analysis of an earlier tool-call turn once the
      latest turn is a final answer): the turn is cut out of `upto` after the prompt's own tail (the previous
      message and the assistant header), found there unchanged.
    Anything else is refused: the tokens the model produced cannot be rebuilt from the record."""
    if upto.startswith(before):
        return upto[len(before) :]
    P = next((k for k, (a, b) in enumerate(zip(before, upto)) if a != b), min(len(before), len(upto)))
    prefill, rendered = before[P:], upto[P:]
    content = traj.messages[mi].get("content") or ""
    answer = content.split("</think>")[-1]
    if "</think>" in content and content.startswith(prefill) and rendered.startswith(answer):
        return content[len(prefill) :] + rendered[len(answer) :]
    prev = traj.messages[mi - 1].get("content") if mi > 0 else None
    at = before.rfind(prev) if isinstance(prev, str) and prev else -1
    if at > P:
        # the longest tail of the prompt, from the previous message on, that `upto` holds unchanged after P
        lo, hi = P, at  # before[hi:] is found, or nothing is; the found tails grow as the start moves left
        if upto.find(before[hi:], P) >= 0:
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if upto.find(before[mid:], P) >= 0 else (mid + 1, hi)
            tail = before[hi:]
            return upto[upto.find(tail, P) + len(tail) :]
    raise ChatTemplateError(
        f"{traj.label}: the chat template does not write message {mi} as a continuation of its own generation prompt "
        f"(the prompt ends {before[max(0, P - 30):][:60]!r}, the rendered turn reads {upto[max(0, P - 30):][:60]!r} "
        "there), so the tokens the model produced for it cannot be rebuilt from the record; it is refused rather than "
        "scored as a sequence the model did not produce. A template that prefills the turn (\"<think>\\n\") needs the "
        "model's raw output in `content`, its <think> block included",
        _record(traj),
        f"messages[{mi}]",
    )


def _think_parts(content: str) -> tuple[str, str]:
    """(reasoning, answer) of a content that carries `<think>...</think>` (the DeepSeek-R1 style)."""
    if "</think>" not in content:
        return "", content
    head, _, tail = content.partition("</think>")
    return head.split("<think>")[-1], tail


def dropped_parts(message: dict, text: str) -> list[str]:
    """What of an assistant `message` its rendered turn `text` holds nowhere: "reasoning", "content", "tool_calls"."""
    think, answer = _think_parts(message.get("content") or "")
    out = []
    reasoning = (message.get("reasoning_content") or think).strip()
    if reasoning and reasoning not in text:
        out.append("reasoning")
    if answer.strip() and answer.strip() not in text:
        out.append("content")
    if any(tc["function"]["name"] not in text for tc in message.get("tool_calls") or ()):
        out.append("tool_calls")
    return out


def _token_span(starts: list[int], ends: list[int], cs: int, ce: int) -> tuple[int, int]:
    """Tokens overlapping characters [cs, ce) (offsets are monotone, so bisect)."""
    s = bisect.bisect_right(ends, cs)
    return s, bisect.bisect_left(starts, ce, lo=s)


def render(traj: Trajectory, tokenizer, max_length: int | None = None, *, rendering: str = "auto",
           strict: bool = False) -> Rendered:
    """Token ids and action spans of `traj`: the whole conversation once ("whole"), each step in the context the model
    read ("as_generated"), or whole where the template is prefix-preserving for this conversation and as generated
    where it is not ("auto"). `strict`: a step whose message the template renders only in part is refused."""
    if rendering not in RENDERINGS:
        raise ValueError(f"rendering must be one of {RENDERINGS}, got {rendering!r}")
    if rendering == "as_generated":
        r = render_as_generated(traj, tokenizer, max_length)
    else:
        try:
            r = render_whole(traj, tokenizer, max_length)
        except NotPrefixPreserving:
            if rendering == "whole":
                raise
            r = render_as_generated(traj, tokenizer, max_length)
    if strict and r.dropped:
        j, lost = next(iter(sorted(r.dropped.items())))
        mi = r.message_indices[j]
        raise ChatTemplateError(
            f"{traj.label}: the chat template renders the {' and '.join(lost)} of message {mi} nowhere in the turn, "
            f"so the step would be scored without {'them' if len(lost) > 1 else 'it'} (strict: refused)",
            _record(traj), f"messages[{mi}].{lost[0]}",
        )  # fmt: skip
    return r


def render_as_generated(traj: Trajectory, tokenizer, max_length: int | None = None) -> Rendered:
    """One row per step: the context the model read before it + its own tokens (module docstring). Each row is cut
    to `max_length` like a whole conversation (`truncate`); the trajectory's `truncation` merges the rows' records."""
    rows, dropped = [], {}
    asst = traj.assistant_message_indices
    for j, mi in enumerate(asst):
        ids, span, turn = _generated_row(traj, tokenizer, mi)
        if lost := dropped_parts(traj.messages[mi], turn):
            dropped[j] = lost
        row = Rendered(ids, [span], [mi])
        if max_length is not None and len(ids) > max_length:
            row = truncate(row, max_length)
        rows.append(row)
    cut = [r.truncation for r in rows if r.truncation]
    info = None
    if cut:  # per step, whether its own tokens or its context were cut
        info = {"original_tokens": max(c["original_tokens"] for c in cut), "kept_tokens": max_length,
                "truncated_steps": [j for j, r in enumerate(rows) if r.truncated_steps],
                "dropped_steps": [j for j, r in enumerate(rows) if r.truncation and r.truncation["dropped_steps"]],
                "context_cut_steps": [j for j, r in enumerate(rows) if r.truncation and not r.truncated_steps]}  # fmt: skip
    return Rendered(rows[-1].input_ids if rows else [], [r.spans[0] for r in rows], asst,
                    frozenset(j for j, r in enumerate(rows) if r.truncated_steps), info, rows, dropped)  # fmt: skip


def _generated_row(traj: Trajectory, tokenizer, mi: int) -> tuple[list[int], tuple[int, int], str]:
    """(ids, span, the turn's text) of message `mi` as generated: the prompt tokenized alone, as the model read it,
    then the turn's own text tokenized alone (its tokens were sampled after the prompt's, never merged across it;
    whitespace the template writes after the end-of-turn token was not generated)."""
    before, upto = _turn_text(traj, tokenizer, mi)
    turn = latest_turn(traj, mi, before, upto).rstrip()
    ctx, own = _encode(traj, tokenizer, before)[0], _encode(traj, tokenizer, turn)[0]
    return ctx + own, (len(ctx), len(ctx) + len(own)), turn


def _encode(traj: Trajectory, tokenizer, text: str) -> tuple[list[int], list[int], list[int]]:
    """(ids, token start offsets, token end offsets) of `text`, tokenized once as `render` does."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except Exception as e:  # noqa: BLE001 - the tokenizer's own failure, named for the record
        raise ChatTemplateError(f"{traj.label}: the tokenizer cannot encode it: {type(e).__name__}: {e}", _record(traj)) from None
    offsets = enc["offset_mapping"]
    return list(enc["input_ids"]), [o[0] for o in offsets], [o[1] for o in offsets]


def render_whole(traj: Trajectory, tokenizer, max_length: int | None = None) -> Rendered:
    """Render with the chat template once, tokenize once, and locate every assistant turn's action span.

    Locating a span renders the conversation up to that turn, so a trajectory of n turns costs O(n^2) template
    work. When `max_length` will cut the middle out anyway, only the turns that survive are located: the first
    (where the kept head ends) and, by bisection over the monotone turn ends, the ones reaching into the kept tail.
    """
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    full = _template(tokenizer, traj.messages, traj.tools, traj)
    ids, starts, ends = _encode(traj, tokenizer, full)
    asst = traj.assistant_message_indices
    cache: dict[int, tuple[int, int]] = {}

    dropped: dict[int, list[str]] = {}

    def span(j: int) -> tuple[int, int]:  # token span of step j (its assistant message asst[j])
        if j not in cache:
            cs, ce = _char_span(traj, tokenizer, full, asst[j])
            if lost := dropped_parts(traj.messages[asst[j]], full[cs:ce]):
                dropped[j] = lost
            cache[j] = _token_span(starts, ends, cs, ce)
        return cache[j]

    if max_length is None or len(ids) <= max_length or not asst:
        r = Rendered(ids, [span(j) for j in range(len(asst))], asst, dropped=dropped)
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
    return truncate(Rendered(ids, spans, asst, dropped=dropped), max_length)


def render_all(trajectories: list[Trajectory], tokenizer, max_length: int | None = None, *, on_error: str = "raise",
               rendering: str = "auto", strict: bool = False):
    """(kept trajectories, their renderings, RecordErrors): with on_error="skip", a trajectory the chat template
    cannot render is left out and named instead of ending the run."""
    kept, rendered, errors = [], [], []
    for t in trajectories:
        try:
            rendered.append(render(t, tokenizer, max_length, rendering=rendering, strict=strict))
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
            return chat_text(tokenizer, PROBE_MESSAGES, PROBE_TOOLS)
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
    """(token ids of the conversation up to and including assistant message `message_index`, [start, end) of that
    message's own tokens) for the latest turn: its generation prompt, then the turn (its as-generated row), one step's
    template work. The agent loop (`session.py`) scores a candidate next turn this way: the figures `render` gives
    that step as generated, and whole too wherever the tokenizer merges nothing across the prompt's end."""
    ids, span, _ = _generated_row(traj, tokenizer, message_index)
    return ids, span
