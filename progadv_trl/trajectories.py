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
    return out


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
        group = rec.get("group")
        if group is not None and not isinstance(group, (str, int)):
            raise _Bad("group", f"must be a string or an integer, got {type(group).__name__}")
        success = rec.get("success")
        if success is not None:
            if not isinstance(success, (bool, int, float)) or (isinstance(success, float) and math.isnan(success)):
                raise _Bad("success", f"must be a boolean or a number (a reward), got {success!r}")
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
    )


def _iter_source(source) -> Iterable[tuple[str, Any, bool]]:
    """(where, record, from_columnar) for every record of a path, a list, or a datasets.Dataset."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"trajectory file not found: {path}")
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            # Through `datasets`, which decodes its own Arrow JSON extension columns (how datasets>=5 stores messages).
            import datasets

            for i, rec in enumerate(datasets.Dataset.from_parquet(str(path))):
                yield f"{path.name} row {i}", rec, True
            return
        if suffix == ".json":
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                yield f"{path.name}", _Unparsable(f"not valid JSON ({e.msg} at line {e.lineno})"), False
                return
            if isinstance(data, dict) and "messages" in data:
                data = [data]
            if not isinstance(data, list):
                yield f"{path.name}", _Unparsable("a .json file must hold a list of trajectories"), False
                return
            for i, rec in enumerate(data):
                yield f"{path.name} index {i}", rec, False
            return
        # .jsonl and anything else: one JSON object per line
        with path.open() as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    rec = _Unparsable(f"not valid JSON ({e.msg} at column {e.colno})")
                yield f"{path.name} line {n}", rec, False
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
    def __init__(self, why: str):
        self.why = why


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
                raise TrajectoryError([RecordError(where, "<record>", rec.why)])
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


def _template(tokenizer, messages, tools, traj_id=None, **kw) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False, **kw)
    except Exception as e:  # jinja raises on conversations a template does not accept (role order, arg types)
        raise ChatTemplateError(f"trajectory {traj_id!r}: the chat template cannot render it: {e}") from None


def render(traj: Trajectory, tokenizer, max_length: int | None = None) -> Rendered:
    """Render with the chat template once, tokenize once, and locate every assistant turn's action span."""
    msgs, tools = traj.messages, traj.tools
    full = _template(tokenizer, msgs, tools, traj.id)
    char_spans = []
    for mi in traj.assistant_message_indices:
        before = _template(tokenizer, msgs[:mi], tools, traj.id, add_generation_prompt=True) if mi > 0 else None
        upto = _template(tokenizer, msgs[: mi + 1], tools, traj.id)
        if before is None:
            # A conversation that opens with the assistant: its turn starts where the template's header ends.
            before = upto[: upto.find(msgs[mi]["content"])] if msgs[mi]["content"] else ""
        if not full.startswith(before) or not full.startswith(upto) or len(upto) < len(before):
            raise ChatTemplateError(
                f"trajectory {traj.id!r}: the chat template renders message {mi} differently in the whole conversation "
                "than in its prefix (e.g. it strips the reasoning of earlier turns), so action spans cannot be located "
                "exactly. Use a prefix-preserving template, e.g. TRL's trl/chat_templates/*_training.jinja (qwen3_training "
                "for Qwen3), as TRL itself does for multi-turn training"
            )
        # The action ends at the end-of-turn token; whitespace the template writes after it was not generated.
        end = len(upto.rstrip())
        char_spans.append((len(before), max(end, len(before))))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    spans = []
    k = 0
    for cs, ce in char_spans:
        while k < len(ids) and offsets[k][1] <= cs:
            k += 1
        s = k
        while k < len(ids) and offsets[k][0] < ce:
            k += 1
        spans.append((s, k))
    rendered = Rendered(list(ids), spans, traj.assistant_message_indices)
    if max_length is not None and len(ids) > max_length:
        rendered = truncate(rendered, max_length)
    return rendered


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


def check_same_tokenizer(a, b, names: tuple[str, str] = ("policy", "reference")) -> None:
    """Policy and reference must read the same token ids: same vocabulary and the same chat template."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        only_a = sorted(set(va) - set(vb))[:5]
        only_b = sorted(set(vb) - set(va))[:5]
        moved = [t for t in set(va) & set(vb) if va[t] != vb[t]][:5]
        raise TokenizerMismatchError(
            f"the {names[0]} and {names[1]} tokenizers differ: vocabulary sizes {len(va)} vs {len(vb)}; "
            f"only in {names[0]}: {only_a}; only in {names[1]}: {only_b}; different ids: {moved}. "
            "Progress advantage compares the two models token by token, so they must share one tokenizer."
        )
    ta, tb = getattr(a, "chat_template", None), getattr(b, "chat_template", None)
    if ta and tb and ta != tb:
        raise TokenizerMismatchError(
            f"the {names[0]} and {names[1]} tokenizers have different chat templates, so the same conversation would "
            f"be rendered to different tokens. Save the {names[1]} with the {names[0]}'s chat template, or pass one "
            "tokenizer for both."
        )
