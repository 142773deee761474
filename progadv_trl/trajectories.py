"""Trajectories: the record format, and loading with record-level validation (errors name the file, record, field).

A trajectory is TRL's conversational format plus a few optional fields:

    {"id", "messages": [{"role": system|user|assistant|tool, "content", "tool_calls"?, "reasoning_content"?}],
     "tools"?, "group"?, "success"?, "failure_step"?, "metadata"?}

Agent steps are the assistant turns; `failure_step` indexes them (0-based), not the messages. An assistant turn's
reasoning is part of its action: `reasoning_content` (Qwen3, Nemotron, GLM...; `reasoning` and `thinking` are read
as the same), or `<think>...</think>` inside `content` (the DeepSeek-R1 style), as the model's template expects it.

Rendering with the chat template (token ids, action spans, truncation, tokenizer checks) lives in `rendering.py`.
"""

from __future__ import annotations

import codecs
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

ROLES = ("system", "user", "assistant", "tool")
# Where logs put an assistant turn's reasoning; loaded as `reasoning_content` (the key most templates read).
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


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
    # Reasoning is what the model wrote first in its turn: dropping it would score a sequence it did not produce.
    for k in REASONING_KEYS:
        r = m.get(k)
        if r is None or r == "":
            continue
        if role != "assistant":
            raise _Bad(f"{where}.{k}", f"only assistant messages carry reasoning (role is {role!r})")
        if not isinstance(r, str):
            raise _Bad(f"{where}.{k}", f"must be a string, got {type(r).__name__}")
        if out.get("reasoning_content", r) != r:
            raise _Bad(f"{where}.{k}", "differs from the message's other reasoning field: give one")
        out["reasoning_content"] = r
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


def validate_messages(messages: Any, where: str, start: int = 0) -> list[dict]:
    """Checked copies of conversation messages (not a whole record: no assistant turn needed), numbered from
    `start` in errors, which name `where` and the field (e.g. "messages[4].tool_calls[0].function.arguments")."""
    try:
        if not isinstance(messages, list):
            raise _Bad("messages", f"must be a list of messages, got {type(messages).__name__}")
        return [_check_message(m, start + i, False) for i, m in enumerate(messages)]
    except _Bad as e:
        raise TrajectoryError([RecordError(where, e.field, e.message)]) from None


def as_trajectories(items) -> list[Trajectory]:
    """Trajectory objects from anything `load_trajectories` takes (validated; raises on the first bad record)."""
    if isinstance(items, list) and all(isinstance(t, Trajectory) for t in items):
        return items
    return load_trajectories(items, on_error="raise").trajectories
