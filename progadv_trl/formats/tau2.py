"""τ²-bench results files -> progadv trajectories.

A results file is `{"info", "tasks", "simulations": [{id, task_id, trial, seed, termination_reason,
reward_info: {reward, ...}, messages: [...]}]}`; messages have role system | user | assistant | tool, assistant and
user messages may carry `tool_calls: [{id, name, arguments, requestor}]`, tool messages are
`{id, content, requestor, error}`.

The conversation kept for scoring is the one the *agent* saw, because a step's advantage is read against the context
its action was taken in. In τ²-bench the orchestrator routes a user's tool call to the environment and its result
back to the user; the agent never receives either (tau2's `is_valid_agent_history_message`). So:

- assistant messages are the agent steps; their tool calls go into TRL's conversational form
  (`{"type": "function", "id", "function": {"name", "arguments": dict}}`), which the chat template renders in the
  model's own tool-call syntax; assistant-requested tool results are `tool` messages with `tool_call_id`; an
  assistant turn's reasoning, where the log has it (on the message, or in `raw_data`'s provider response), is kept as
  `reasoning_content`: it is part of the action and is scored;
- user tool calls and their results are kept, not dropped, in `metadata.user_tool_calls` (each with `before_step`,
  the agent step that followed them, `source_index` in the file's messages, and the user's text if the message had
  any), outside the scored context;
- tool errors stay in the context exactly as the agent read them (their content is not rewritten) and are listed in
  `metadata.tool_errors` with the agent step whose call failed and the tool message's index in the record;
- results files do not store the agent's system prompt; when a simulation has no system message, the domain policy
  (`info.environment_info.policy`, which tau2's agents put in their system prompt) stands in for it and
  `metadata.system_from_policy` says so;
- `group` is the task, `success` is reward >= 1 (tau2's own pass criterion) and the raw reward is kept in
  `metadata.reward`; a simulation without a reward is unlabelled (`success` None).
"""

from __future__ import annotations

from typing import Any

from ..trajectories import RecordError, TrajectoryError


def _bad(record: str, field: str, message: str) -> TrajectoryError:
    return TrajectoryError([RecordError(record, field, message)])


def _tools(info: dict) -> list[dict] | None:
    """The agent's tool schemas, when the run saved them (`environment_info.tool_defs`: name -> {name, doc, params})."""
    defs = (info.get("environment_info") or {}).get("tool_defs") if isinstance(info, dict) else None
    if not isinstance(defs, dict) or not defs:
        return None
    out = []
    for name, d in defs.items():
        d = d if isinstance(d, dict) else {}
        params = d.get("params") or {"type": "object", "properties": {}}
        out.append({"type": "function", "function": {"name": d.get("name") or name, "description": d.get("doc") or "",
                                                     "parameters": params}})  # fmt: skip
    return out


def _tool_call(tc: Any, record: str, where: str) -> dict:
    if not isinstance(tc, dict):
        raise _bad(record, where, f"must be an object, got {type(tc).__name__}")
    name = tc.get("name")
    if not isinstance(name, str) or not name:
        raise _bad(record, f"{where}.name", "must be a non-empty string")
    args = tc.get("arguments")
    if args is None:
        args = {}
    if not isinstance(args, (dict, str)):  # a JSON string is parsed (and checked) by the trajectory validator
        raise _bad(record, f"{where}.arguments", f"must be an object, got {type(args).__name__}")
    out = {"type": "function", "function": {"name": name, "arguments": args}}
    if tc.get("id"):
        out["id"] = tc["id"]
    return out


def _text(m: dict, record: str, where: str) -> str:
    c = m.get("content")
    if c is None:
        return ""  # a tool-call-only message, or an empty turn (still an action: the agent chose to end it)
    if not isinstance(c, str):
        raise _bad(record, f"{where}.content", f"must be a string, got {type(c).__name__}")
    return c


def _reasoning(m: dict, record: str, where: str) -> str | None:
    """An agent turn's reasoning where the log has it: on the message (`reasoning_content`, `reasoning`, `thinking`),
    or in the provider's response kept in `raw_data` (LiteLLM's `choices[0].message.reasoning_content`)."""
    raw = m.get("raw_data") if isinstance(m.get("raw_data"), dict) else {}
    choices = raw.get("choices") if isinstance(raw.get("choices"), list) else []
    inner = choices[0].get("message") if choices and isinstance(choices[0], dict) else None
    for src, prefix in ((m, where), (inner if isinstance(inner, dict) else {}, f"{where}.raw_data.choices[0].message")):
        for k in ("reasoning_content", "reasoning", "thinking"):
            r = src.get(k)
            if r in (None, ""):
                continue
            if not isinstance(r, str):
                raise _bad(record, f"{prefix}.{k}", f"must be a string, got {type(r).__name__}")
            return r
    return None


def convert_simulation(sim: Any, record: str, *, policy: str | None = None, tools: list[dict] | None = None,
                       extra_metadata: dict | None = None) -> dict:  # fmt: skip
    """One τ²-bench simulation -> one progadv record. `record` names it in errors (file and index)."""
    if not isinstance(sim, dict):
        raise _bad(record, "<simulation>", f"must be an object, got {type(sim).__name__}")
    msgs = sim.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad(record, "messages", "missing or empty")
    out: list[dict] = []
    user_tool_calls: list[dict] = []
    tool_errors: list[dict] = []
    step = -1  # index of the latest agent step
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(record, where, f"must be an object, got {type(m).__name__}")
        role = m.get("role")
        calls = m.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            raise _bad(record, f"{where}.tool_calls", f"must be a list, got {type(calls).__name__}")
        if role == "system":
            out.append({"role": "system", "content": _text(m, record, where)})
        elif role == "assistant":
            step += 1
            msg = {"role": "assistant", "content": _text(m, record, where)}
            if reasoning := _reasoning(m, record, where):
                msg["reasoning_content"] = reasoning  # part of the action: the model wrote it first in its turn
            if calls:
                msg["tool_calls"] = [_tool_call(tc, record, f"{where}.tool_calls[{j}]") for j, tc in enumerate(calls)]
            out.append(msg)
        elif role == "user" and calls:
            # Routed to the environment, never to the agent: kept beside the scored context (see module docstring).
            checked = [_tool_call(tc, record, f"{where}.tool_calls[{j}]") for j, tc in enumerate(calls)]
            entry = {"before_step": step + 1, "source_index": i, "results": [],  # source_index: in the results file
                     "tool_calls": [{"id": c.get("id"), **c["function"]} for c in checked]}  # fmt: skip
            text = _text(m, record, where)
            if text:
                entry["content"] = text
            user_tool_calls.append(entry)
        elif role == "user":
            out.append({"role": "user", "content": _text(m, record, where)})
        elif role == "tool":
            content = _text(m, record, where)
            if m.get("requestor") == "user":
                if not user_tool_calls:
                    raise _bad(record, f"{where}.requestor", "a user tool result with no user tool call before it")
                result = {"id": m.get("id"), "content": content, "error": bool(m.get("error"))}
                user_tool_calls[-1]["results"].append(result)
                continue
            if step < 0:
                raise _bad(record, where, "a tool result before any assistant message")
            msg = {"role": "tool", "content": content}
            if m.get("id"):
                msg["tool_call_id"] = m["id"]
            out.append(msg)
            if m.get("error"):
                tool_errors.append({"step": step, "message_index": len(out) - 1, "tool_call_id": m.get("id")})
        else:
            raise _bad(record, f"{where}.role", f"must be one of system, user, assistant, tool; got {role!r}")
    if step < 0:
        raise _bad(record, "messages", "no assistant message: there is no agent step to score")

    system_from_policy = bool(policy) and not any(m["role"] == "system" for m in out)
    if system_from_policy:
        out.insert(0, {"role": "system", "content": policy})
        for e in tool_errors:
            e["message_index"] += 1

    reward_info = sim.get("reward_info")
    reward = reward_info.get("reward") if isinstance(reward_info, dict) else None
    if reward is not None and (isinstance(reward, bool) or not isinstance(reward, (int, float))):
        raise _bad(record, "reward_info.reward", f"must be a number, got {reward!r}")
    task_id = sim.get("task_id")
    if task_id is None:
        raise _bad(record, "task_id", "missing: it names the task (the group of its trials)")
    sid = sim.get("id") or f"{task_id}/trial{sim.get('trial', 0)}"
    meta = {
        "source": "tau2",
        "task_id": str(task_id),
        "trial": sim.get("trial"),
        "seed": sim.get("seed"),
        "termination_reason": sim.get("termination_reason"),
        "reward": reward,
        "tool_errors": tool_errors,
        "user_tool_calls": user_tool_calls,
        "system_from_policy": system_from_policy,
        **(extra_metadata or {}),
    }
    rec = {"id": str(sid), "messages": out, "group": str(task_id), "metadata": meta}
    if reward is not None:
        rec["success"] = reward >= 1
    if tools:
        rec["tools"] = tools
    return rec


def convert_results(data: Any, name: str, *, skipped: list[RecordError] | None = None) -> list[tuple[dict, str]]:
    """A whole results file (already parsed) -> one (record, where) per simulation; `name` is the file, for errors.
    With `skipped`, a simulation that cannot be converted is added to it and the file goes on."""
    if not isinstance(data, dict) or not isinstance(data.get("simulations"), list):
        raise _bad(name, "simulations", 'missing: a τ²-bench results file is {"info", "tasks", "simulations": [...]}')
    info = data.get("info") if isinstance(data.get("info"), dict) else {}
    env = info.get("environment_info") if isinstance(info.get("environment_info"), dict) else {}
    agent = info.get("agent_info") if isinstance(info.get("agent_info"), dict) else {}
    policy = env.get("policy") if isinstance(env.get("policy"), str) else None
    extra = {"domain": env.get("domain_name"), "agent_llm": agent.get("llm")}  # whose logs these are
    extra = {k: v for k, v in extra.items() if v is not None}
    tools = _tools(info)
    recs = []
    for i, sim in enumerate(data["simulations"]):
        sid = sim.get("id") if isinstance(sim, dict) else None
        record = f"{name} simulations[{i}]" + (f" (id {sid!r})" if sid is not None else "")
        try:
            recs.append((convert_simulation(sim, record, policy=policy, tools=tools, extra_metadata=extra),
                         f"{name} simulations[{i}]"))  # validate_record adds the id
        except TrajectoryError as e:
            if skipped is None:
                raise
            skipped.extend(e.errors)
    return recs
