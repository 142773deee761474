"""Who&When failure-attribution cases -> progadv trajectories, and agent-level attribution accuracy.

A case is one JSON file: `history` (a list of `{role, content}`, plus `name` in the Algorithm-Generated split),
`question`, `ground_truth`, `mistake_agent`, `mistake_step` (a string holding a 0-based index into `history`) and
`mistake_reason`. Every case is a failed run: that is what the benchmark labels.

How the logs map onto one conversation, read from the real files (tests/fixtures/who_and_when/):

- Hand-Crafted (Magentic-One): `role` names the speaker, e.g. "Orchestrator (thought)", "Orchestrator (-> WebSurfer)",
  "WebSurfer"; the first message, role "human", is the person's task. The agent is the speaker without its
  parenthesised suffix, which is how `mistake_agent` names it ("Orchestrator").
- Algorithm-Generated (AG2 group chats): `role` is only "user" or "assistant" and the speaker is `name`, so an agent's
  turn can carry role "user". The first turn is an agent's (and can be the labelled mistake), so the case's
  `question` is put before it as the user's task: the first step is read against its task, as in Hand-Crafted.
- Every agent turn becomes an assistant step, in order, consecutive turns included (several agents speak in a row);
  the speaker is kept as the message's `name` and, per step, as the agent in `metadata.step_agents`.
- Code-execution output ("Computer_terminal" in AG2, "ComputerTerminal" in Magentic-One) is what a tool returned, not
  a decision, so it becomes context. It is a `user` message (with its `name`), not a `tool` message: no tool call
  precedes it, and templates that check tool calls against tool results refuse orphan tool messages. An agent
  addressing the terminal ("Orchestrator (-> ComputerTerminal)") is the agent's own turn: the speaker is read
  without its parenthesised suffix.
- A mistake labelled on a terminal's output (a few AG2 cases) is moved to the agent turn whose action produced that
  output: the last agent turn before it, the one whose code the terminal ran. `metadata.label_moved_from` records
  where the label was (`history_index`, `speaker`) and `metadata.label_history_index` where it is now, so an
  evaluation can keep or leave out such cases. A label on the human's task, or on output no agent turn precedes,
  cannot be mapped: the case is refused with that reason (`progadv convert` skips it and goes on).
- Empty or missing content is kept as "" (an empty turn is still the agent's action).
- `failure_step` is the labelled message's index among the agent steps; `mistake_step` (as an integer index into
  `history`), `mistake_agent`, `mistake_reason`, the split, the question and the ground truth go to `metadata`.
  The per-agent system prompts of Algorithm-Generated cases are left out: one conversation cannot hold several.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import PurePath
from typing import Any

from ..trajectories import RecordError, TrajectoryError

HAND_CRAFTED, ALGORITHM_GENERATED = "Hand-Crafted", "Algorithm-Generated"
HUMAN_ROLES = ("human", "user")  # the person who set the task (Hand-Crafted: role "human")
_SUFFIX = re.compile(r"\s*\(.*\)\s*$")


def _bad(record: str, field: str, message: str) -> TrajectoryError:
    return TrajectoryError([RecordError(record, field, message)])


def agent_of(speaker: str) -> str:
    """"Orchestrator (-> WebSurfer)" -> "Orchestrator": the agent as `mistake_agent` names it."""
    return _SUFFIX.sub("", speaker).strip() or speaker


def is_tool_output(speaker: str) -> bool:
    """Code-execution output: AG2's Computer_terminal, Magentic-One's ComputerTerminal. An agent's turn addressed to
    the terminal ("Orchestrator (-> ComputerTerminal)") is the agent's, so only the speaker itself is read."""
    return "terminal" in agent_of(speaker).lower()


def convert_case(case: Any, name: str) -> dict:
    """One Who&When case (already parsed) -> one progadv record. `name` is the file (e.g. "Hand-Crafted/42.json"):
    it names the case in errors and, without its suffix, gives the record's id."""
    if not isinstance(case, dict):
        raise _bad(name, "<case>", f"must be an object, got {type(case).__name__}")
    history = case.get("history")
    if not isinstance(history, list) or not history:
        raise _bad(name, "history", "missing or empty: a Who&When case needs its list of messages")
    for i, m in enumerate(history):
        if not isinstance(m, dict):
            raise _bad(name, f"history[{i}]", f"must be an object, got {type(m).__name__}")
    split = ALGORITHM_GENERATED if any("name" in m for m in history) else HAND_CRAFTED

    messages: list[dict] = []
    step_of: dict[int, int] = {}  # history index -> agent step
    speakers: list[str] = []
    speaker_of: list[str] = []  # per history index
    for i, m in enumerate(history):
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise _bad(name, f"history[{i}].role", f"must be a non-empty string, got {role!r}")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise _bad(name, f"history[{i}].content", f"must be a string, got {type(content).__name__}")
        # Algorithm-Generated: the speaker is `name`; a turn without one is the human's if its role says "user".
        speaker = m.get("name", role) if split == ALGORITHM_GENERATED else role
        if not isinstance(speaker, str) or not speaker:
            raise _bad(name, f"history[{i}].name", f"must name the speaker, got {speaker!r}")
        speaker_of.append(speaker)
        if speaker.lower() in HUMAN_ROLES and (split == HAND_CRAFTED or "name" not in m):
            messages.append({"role": "user", "content": content})
        elif is_tool_output(speaker):
            messages.append({"role": "user", "content": content, "name": speaker})
        else:
            step_of[i] = len(speakers)
            speakers.append(speaker)
            messages.append({"role": "assistant", "content": content, "name": speaker})
    if not speakers:
        raise _bad(name, "history", "no agent turn: there is no step to score")
    question = case.get("question")
    if messages[0]["role"] == "assistant" and isinstance(question, str) and question:
        messages.insert(0, {"role": "user", "content": question})

    raw = case.get("mistake_step")
    try:
        k = int(str(raw).strip())
    except ValueError:
        raise _bad(name, "mistake_step", f"must hold an integer index into history, got {raw!r}") from None
    if not 0 <= k < len(history):
        raise _bad(name, "mistake_step", f"is {k} but history has {len(history)} messages (0..{len(history) - 1})")
    moved_from = None
    if k not in step_of:
        who = speaker_of[k]
        before = [i for i in step_of if i < k]
        if not is_tool_output(who):
            raise _bad(name, "mistake_step", f"points at history[{k}] ({who!r}), the task, not an agent's turn")
        if not before:
            raise _bad(name, "mistake_step", f"points at history[{k}] ({who!r}), tool output with no agent turn "
                                             "before it to have produced it")  # fmt: skip
        moved_from, k = {"history_index": k, "speaker": who}, before[-1]
    mistake_agent = case.get("mistake_agent")
    if not isinstance(mistake_agent, str) or not mistake_agent:
        raise _bad(name, "mistake_agent", f"must be a non-empty string, got {mistake_agent!r}")

    meta = {
        "source": "whowhen",
        "split": split,
        "mistake_step": k if moved_from is None else moved_from["history_index"],  # the dataset's label
        "mistake_agent": mistake_agent,
        "mistake_reason": case.get("mistake_reason"),
        "step_agents": [agent_of(s) for s in speakers],
        "question": question,
        "ground_truth": case.get("ground_truth"),
        "question_ID": case.get("question_ID"),
        "level": case.get("level"),
    }
    if moved_from is not None:
        meta["label_moved_from"] = moved_from
        meta["label_history_index"] = k
    return {
        "id": f"{split}/{PurePath(name).stem}",
        "messages": messages,
        "success": False,  # every Who&When case is a failed run
        "failure_step": step_of[k],
        "metadata": meta,
    }


# ----------------------------------------------------------------------------------------------------------------
# Agent-level accuracy


def _cases(scores) -> tuple[list, int]:
    """Scored Who&When trajectories whose labels fit their steps; and how many were left out."""
    cases, skipped = [], 0
    for ts in scores:
        meta = ts.metadata if isinstance(ts.metadata, dict) else {}
        agents, target, f = meta.get("step_agents"), meta.get("mistake_agent"), ts.failure_step
        if not isinstance(agents, list) or target is None or f is None:
            continue  # not a Who&When record
        if len(agents) != len(ts.steps) or not 0 <= f < len(ts.steps):
            skipped += 1
            continue
        cases.append((ts, agents, target, f))
    return cases, skipped


def _mean(xs: list[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


def whowhen_attribution(
    scores: Sequence,
    *,
    rules: Sequence[str] = ("min_cumsum", "min_step"),
    methods: Sequence[str] | None = None,
    threshold: float = 0.0,
) -> dict:
    """Who&When's two accuracies for each method and rule, beside two baselines, over the same cases.

    step_accuracy: the predicted step (`evaluation.attribute_failure`) is the labelled one (`failure_step`);
    agent_accuracy: the predicted step's agent (`metadata.step_agents`) is `metadata.mistake_agent`. Baselines:
    `random_step` (expected accuracy of a uniformly random step: 1/n steps, and the share of steps the guilty agent
    took) and `first_step` (every mistake blamed on the first step). `scores` are `TrajectoryScore`s (their
    `metadata` is copied from the records by the scorer); records without Who&When labels are ignored, labels that
    do not fit the steps are counted in `n_skipped`, and a method with no finite step value for a case leaves it out
    of that method's `n`. Methods default to every one with a finite step value somewhere. JSON-safe (no NaN).
    """
    from ..evaluation.attribution import attribute_failure  # lazy: numpy; this module stays light

    cases, skipped = _cases(scores)
    rand_step = [1 / len(a) for _, a, _, _ in cases]
    rand_agent = [sum(x == t for x in a) / len(a) for _, a, t, _ in cases]
    first_step = [float(f == 0) for _, _, _, f in cases]
    first_agent = [float(a[0] == t) for _, a, t, _ in cases]
    if methods is None:
        methods = []
        for ts, *_ in cases:
            for m in ["progress_advantage", *ts.step_variants, *ts.step_baselines]:
                if m not in methods and any(math.isfinite(float(v)) for v in ts.method_steps(m)):
                    methods.append(m)
    res: dict = {}
    for m in methods:
        res[m] = {}
        for rule in rules:
            step_ok, agent_ok = [], []
            for ts, agents, target, f in cases:
                try:
                    p = attribute_failure(ts.method_steps(m), rule, threshold)
                except ValueError:  # no step has a value (truncated away, or a baseline not computed)
                    continue
                step_ok.append(float(p == f))
                agent_ok.append(float(agents[p] == target))
            res[m][rule] = {"step_accuracy": _mean(step_ok), "agent_accuracy": _mean(agent_ok), "n": len(step_ok)}
    return {
        "n": len(cases),
        "n_skipped": skipped,
        "rules": list(rules),
        "methods": res,
        "random_step": {"step_accuracy": _mean(rand_step), "agent_accuracy": _mean(rand_agent), "n": len(cases)},
        "first_step": {"step_accuracy": _mean(first_step), "agent_accuracy": _mean(first_agent), "n": len(cases)},
    }


def format_whowhen(res: dict) -> str:
    """A few lines for the terminal: step / agent accuracy per method and rule, then the two baselines."""
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    rows = [(f"{m} ({rule})", a) for m, by in res["methods"].items() for rule, a in by.items()]
    rows += [("(random step)", res["random_step"]), ("(first step)", res["first_step"])]
    w = max(len(r[0]) for r in rows)
    lines = [f"Who&When attribution: step accuracy / agent accuracy (n={res['n']} cases"
             + (f", {res['n_skipped']} skipped" if res["n_skipped"] else "") + ")"]  # fmt: skip
    lines += [f"  {name.ljust(w)}  {f(a['step_accuracy'])} / {f(a['agent_accuracy'])}  n={a['n']}" for name, a in rows]
    return "\n".join(lines)
