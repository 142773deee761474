"""Trajectories: the record format, loading with record-level validation, and rendering to token ids + action spans.

A trajectory is TRL's conversational format plus a few optional fields:

    {"id", "messages": [{"role": system|user|assistant|tool, "content", "tool_calls"?}], "tools"?, "group"?,
     "success"?, "failure_step"?, "metadata"?}

Agent steps are the assistant turns; `failure_step` indexes them (0-based), not the messages.

Rendering uses the model's own chat template on the whole conversation, once, and tokenizes once. The action span
of a step is the text the model generated for that turn (content, tool calls, end-of-turn token), found by rendering
the conversation up to the turn with `add_generation_prompt=True` (where the model starts writing) and up to and
including the turn (where it stopped). Tokenizing messages one by one and concatenating misaligns at boundaries.
"""

from __future__ import annotations

import bisect
import codecs
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Trajectory:
    id: str
    messages: list[dict]
    tools: list[dict] | None = None
    group: str | None = None
    success: bool | float | None = None
    failure_step: int | None = None
    metadata: dict | None = None
    # Where the record came from ("t.jsonl line 3"), for messages about it; not part of the record.
    source: str | None = field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        return f"trajectory {self.id!r} ({self.source})" if self.source else f"trajectory {self.id!r}"

    @property
    def assistant_message_indices(self) -> list[int]:
        return [i for i, m in enumerate(self.messages) if m["role"] == "assistant"]

    def to_dict(self) -> dict:
        d = {"id": self.id, "messages": self.messages}
        for k in ("tools", "group", "success", "failure_step", "metadata"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d


@dataclass
class RecordError:
    record: str  # "line 3", "index 2", ... plus the id when known
    field: str  # "messages[2].role", "failure_step", ...
    message: str

    def __str__(self) -> str:
        return f"{self.record}: field '{self.field}': {self.message}"


class TrajectoryError(ValueError):
    """Bad user input: one or more records failed validation. `errors` lists each record and field."""

    def __init__(self, errors: list[RecordError]):
        self.errors = list(errors)
        head = "; ".join(str(e) for e in self.errors[:5])
        more = f" (and {len(self.errors) - 5} more)" if len(self.errors) > 5 else ""
        super().__init__(head + more)


@dataclass
class LoadResult:
    trajectories: list[Trajectory]
    errors: list[RecordError] = field(default_factory=list)

    def summary(self) -> str:
        if not self.errors:
            return f"{len(self.trajectories)} trajectories"
        return f"{len(self.trajectories)} trajectories, {len(self.errors)} bad records skipped: " + "; ".join(
            str(e) for e in self.errors[:10]
        )


def skipped_report(errors: list[RecordError], limit: int = 100) -> str:
    """'skipped N invalid records:' and one line per record (the first `limit`), for --skip-invalid."""
    if not errors:
        return ""
    lines = [f"skipped {len(errors)} invalid record{'s' if len(errors) != 1 else ''}:"]
    lines += [f"  {e}" for e in errors[:limit]]
    if len(errors) > limit:
        lines.append(f"  ... and {len(errors) - limit} more")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Validation


class _Bad(Exception):
    def __init__(self, field: str, message: str):
        self.field, self.message = field, message


def _drop_none_keys(x):
    # `datasets` stores a list of dicts as a struct column: every key seen in any row appears in every row, filled
    # with None. Tool-call arguments loaded that way carry keys the model never wrote; drop them to render truly.
    if isinstance(x, dict):
        return {k: _drop_none_keys(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_drop_none_keys(v) for v in x]
    return x


def _check_tool_call(tc: Any, where: str, from_columnar: bool) -> dict:
    if not isinstance(tc, dict):
        raise _Bad(where, f"must be an object, got {type(tc).__name__}")
    fn = tc.get("function", tc if "name" in tc else None)
    if not isinstance(fn, dict):
        raise _Bad(f"{where}.function", "missing: a tool call needs {'function': {'name', 'arguments'}}")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise _Bad(f"{where}.function.name", "must be a non-empty string")
    args = fn.get("arguments", {})
    if args is None:
        args = {}
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise _Bad(f"{where}.function.arguments", f"is a string but not valid JSON ({e.msg})") from None
    if not isinstance(args, dict):
        raise _Bad(f"{where}.function.arguments", f"must be an object (or a JSON string of one), got {type(args).__name__}")
    if from_columnar:
        args = _drop_none_keys(args)
    out = {"type": tc.get("type") or "function", "function": {"name": name, "arguments": args}}
    if tc.get("id") is not None:
        out["id"] = tc["id"]
    return out


def _check_message(m: Any, i: int, from_columnar: bool) -> dict:
    where = f"messages[{i}]"
    if isinstance(m, str) and m.startswith("{"):  # a message stored as a JSON string (some parquet writers)
        try:
            m = json.loads(m)
        except json.JSONDecodeError:
            pass
    if not isinstance(m, dict):
        raise _Bad(where, f"must be an object with 'role' and 'content', got {type(m).__name__}")
    role = m.get("role")
    if role not in ROLES:
        raise _Bad(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
    content = m.get("content")
    tool_calls = m.get("tool_calls")
    if isinstance(content, list):  # [{"type": "text", "text": ...}] parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise _Bad(f"{where}.content", "only text parts are supported")
        content = "".join(p.get("text") or "" for p in content)
    if content is not None and not isinstance(content, str):
        raise _Bad(f"{where}.content", f"must be a string, got {type(content).__name__}")
    out = {"role": role, "content": content if content is not None else ""}
    if tool_calls is not None:
        if role != "assistant":
            raise _Bad(f"{where}.tool_calls", f"only assistant messages carry tool calls (role is {role!r})")
        if not isinstance(tool_calls, list):
            raise _Bad(f"{where}.tool_calls", f"must be a list, got {type(tool_calls).__name__}")
        if tool_calls:
            out["tool_calls"] = [_check_tool_call(tc, f"{where}.tool_calls[{j}]", from_columnar) for j, tc in enumerate(tool_calls)]
    elif content is None and role == "assistant":
        raise _Bad(f"{where}.content", "an assistant message needs content or tool_calls")
    for k in ("name", "tool_call_id"):
        if m.get(k) is not None:
            out[k] = m[k]
    _check_unicode(out, where)
    return out


def _check_unicode(x: Any, where: str) -> None:
    """JSON can spell an unpaired UTF-16 surrogate ("\\ud800") that is no Unicode text: the tokenizer would fail on
    it with a bare TypeError, so name the field here."""
    if isinstance(x, str):
        try:
            x.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _Bad(where, f"holds an unpaired surrogate {x[e.start]!r} at character {e.start}: not valid Unicode text") from None
    elif isinstance(x, dict):
        for k, v in x.items():
            _check_unicode(k, where)
            _check_unicode(v, f"{where}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            _check_unicode(v, f"{where}[{i}]")


def validate_record(rec: Any, where: str, *, from_columnar: bool = False) -> Trajectory:
    """One record -> Trajectory, or TrajectoryError naming `where` (and the id, when known) and the field."""
    rid = rec.get("id") if isinstance(rec, dict) else None
    label = f"{where} (id {rid!r})" if rid is not None else where
    try:
        if not isinstance(rec, dict):
            raise _Bad("<record>", f"must be a JSON object, got {type(rec).__name__}")
        if rid is not None and not isinstance(rid, (str, int)):
            raise _Bad("id", f"must be a string or an integer, got {type(rid).__name__}")
        msgs = rec.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise _Bad("messages", "missing or empty: a trajectory needs a non-empty list of messages")
        messages = [_check_message(m, i, from_columnar) for i, m in enumerate(msgs)]
        n_steps = sum(m["role"] == "assistant" for m in messages)
        if n_steps == 0:
            raise _Bad("messages", "no assistant message: there is no agent step to score")
        tools = rec.get("tools")
        if tools is not None:
            if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
                raise _Bad("tools", "must be a list of JSON-schema objects")
            if from_columnar:
                tools = _drop_none_keys(tools)
            _check_unicode(tools, "tools")
        group = rec.get("group")
        if group is not None and not isinstance(group, (str, int)):
            raise _Bad("group", f"must be a string or an integer, got {type(group).__name__}")
        success = rec.get("success")
        if success is not None:
            # Infinity parses as JSON in Python; an infinite reward would rank above everything in every metric.
            if not isinstance(success, (bool, int, float)) or not math.isfinite(success):
                raise _Bad("success", f"must be a boolean or a finite number (a reward), got {success!r}")
        fs = rec.get("failure_step")
        if fs is not None:
            if isinstance(fs, float) and fs.is_integer():
                fs = int(fs)
            if isinstance(fs, bool) or not isinstance(fs, int):
                raise _Bad("failure_step", f"must be an integer (0-based assistant-turn index), got {fs!r}")
            if not 0 <= fs < n_steps:
                raise _Bad("failure_step", f"is {fs} but the trajectory has {n_steps} assistant turns (0..{n_steps - 1})")
        meta = rec.get("metadata")
        if meta is not None and not isinstance(meta, dict):
            raise _Bad("metadata", f"must be an object, got {type(meta).__name__}")
    except _Bad as e:
        raise TrajectoryError([RecordError(label, e.field, e.message)]) from None
    return Trajectory(
        id=str(rid) if rid is not None else where.replace(" ", "-"),
        messages=messages,
        tools=tools,
        group=str(group) if group is not None else None,
        success=success,
        failure_step=fs,
        metadata=meta,
        source=where,
    )


def _parse_json(text: str, position: str) -> Any:
    """A parsed JSON value, or _Unparsable saying why (never an exception: one bad record must not end a run)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"column {e.colno}" if position == "column" else f"line {e.lineno} column {e.colno}"
        return _Unparsable(f"not valid JSON ({e.msg} at {where})")
    except RecursionError:  # json's C parser recurses once per nesting level
        return _Unparsable("not valid JSON here: nested too deeply")


def _decode(raw: bytes, what: str) -> str | _Unparsable:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return _Unparsable(
            f"not UTF-8 text (byte 0x{raw[e.start]:02x} at {what} {e.start + 1}): trajectories are UTF-8 JSON; "
            "is this a binary file?"
        )


def _iter_file(path: Path) -> Iterable[tuple[str, Any, bool]]:
    if not path.exists():
        raise FileNotFoundError(f"trajectory file not found: {path}")
    if path.is_dir():
        raise TrajectoryError([RecordError(path.name, "<file>", "is a directory, not a trajectory file")])
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        # Through `datasets`, which decodes its own Arrow JSON extension columns (how datasets>=5 stores messages).
        import datasets
        import pyarrow.parquet as pq

        try:
            pq.read_schema(str(path))  # first: `datasets` logs its own error (and a traceback) for a bad file
            ds = datasets.Dataset.from_parquet(str(path))
        except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a file that is not Parquet
            why = f"cannot be read as Parquet ({type(e).__name__}: {str(e)[:200]})"
            raise TrajectoryError([RecordError(path.name, "<file>", why)]) from None
        for i, rec in enumerate(ds):
            yield f"{path.name} row {i}", rec, True
        return
    try:
        f = path.open("rb")  # bytes: a bad byte costs its own line, not a UnicodeDecodeError for the whole file
    except OSError as e:
        raise TrajectoryError([RecordError(path.name, "<file>", f"cannot be read ({e.strerror})")]) from None
    with f:
        if suffix == ".json":
            text = _decode(f.read().removeprefix(codecs.BOM_UTF8), "offset")
            data = text if isinstance(text, _Unparsable) else _parse_json(text, "line")
            if isinstance(data, _Unparsable):
                yield path.name, data, False
                return
            if isinstance(data, dict) and "messages" in data:
                data = [data]
            if not isinstance(data, list):
                yield path.name, _Unparsable("a .json file must hold a list of trajectories"), False
                return
            if not data:
                yield path.name, _Unparsable("holds an empty list: no trajectories", "<file>"), False
            for i, rec in enumerate(data):
                yield f"{path.name} index {i}", rec, False
            return
        # .jsonl and anything else: one JSON object per line
        any_line = False
        for n, raw in enumerate(f, 1):
            if n == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # editors on Windows write one
            line = _decode(raw, "column")
            if isinstance(line, str):
                if not line.strip():
                    continue
                line = _parse_json(line, "column")
            any_line = True
            yield f"{path.name} line {n}", line, False
        if not any_line:
            yield path.name, _Unparsable("is empty: no trajectories", "<file>"), False


def _iter_source(source) -> Iterable[tuple[str, Any, bool]]:
    """(where, record, from_columnar) for every record of a path, a list, or a datasets.Dataset."""
    if isinstance(source, (str, os.PathLike)):
        yield from _iter_file(Path(source))
        return
    try:
        import datasets

        if isinstance(source, datasets.Dataset):
            for i, rec in enumerate(source):
                yield f"index {i}", rec, True
            return
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    if isinstance(source, (dict, Trajectory)):
        source = [source]
    for i, rec in enumerate(source):
        yield f"index {i}", rec, False


class _Unparsable:
    """A record that is not JSON (or a file with no records): it becomes a RecordError naming `field`."""

    def __init__(self, why: str, field: str = "<record>"):
        self.why, self.field = why, field


def load_trajectories(source, *, on_error: str = "raise") -> LoadResult:
    """Load and validate trajectories from a .jsonl/.json/.parquet path, a list of dicts, or a `datasets.Dataset`.

    on_error="raise": the first bad record raises TrajectoryError naming the record and field.
    on_error="skip": bad records are left out and listed in `LoadResult.errors`.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    out, errors, seen = [], [], {}
    for where, rec, columnar in _iter_source(source):
        try:
            if isinstance(rec, Trajectory):
                rec = rec.to_dict()
            if isinstance(rec, _Unparsable):
                raise TrajectoryError([RecordError(where, rec.field, rec.why)])
            traj = validate_record(rec, where, from_columnar=columnar)
            if traj.id in seen:
                raise TrajectoryError([RecordError(f"{where} (id {traj.id!r})", "id", f"duplicate of {seen[traj.id]}")])
            seen[traj.id] = where
            out.append(traj)
        except TrajectoryError as e:
            if on_error == "raise":
                raise
            errors.extend(e.errors)
    return LoadResult(out, errors)


def as_trajectories(items) -> list[Trajectory]:
    """Trajectory objects from anything `load_trajectories` takes (validated; raises on the first bad record)."""
    if isinstance(items, list) and all(isinstance(t, Trajectory) for t in items):
        return items
    return load_trajectories(items, on_error="raise").trajectories


# ----------------------------------------------------------------------------------------------------------------
# Rendering and action spans


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
