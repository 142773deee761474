"""The demo world: an airline customer-service desk in the spirit of tau^2-bench's airline domain, sized for a tiny model.

A customer asks to cancel a reservation. The agent has three tools, `get_reservation`, `cancel_reservation` and
`issue_refund` (each takes `{"id": ...}`), and may answer in plain text (refusing, or confirming at the end). The
written policy (the system prompt) is one line:

    look the reservation up first and retry if the lookup times out; cancel and then refund only if the reservation is
    insured or was booked within 24 hours; otherwise refuse.

What makes it a test of decisions rather than of text:
- the right answer depends on what the tool returned (insured? booked within 24 h?);
- it is stochastic: a lookup times out at random and must be retried, and after a timeout the customer may give up and
  hang up (the same action can lead to different states);
- cancelling is irreversible: once `cancel_reservation` succeeded, nothing the agent says afterwards undoes it.

Ground truth comes from the world itself. In every state the policy names exactly one correct action
(`Episode.expected()`); an episode succeeds when the agent took the correct action at every step and ended the
conversation itself. The first agent step whose action differs from the policy's is the decisive mistake
(`failure_step`, 0-based among assistant turns, `failure_kind="decision"`); a failure without such a step (the
customer hung up after a timeout, or timeouts ran the episode out of turns) is a failure of luck
(`failure_kind="luck"`, `failure_step=None`).

Messages are in TRL's conversational format with tool calls as `[{"type": "function", "function": {"name", "arguments":
{...}}}]`; rendered with TRL's Qwen2.5 chat template they become `<tool_call>{"name": ..., "arguments": ...}</tool_call>`.
Records carry no `tools` schema: the one-line system prompt describes the tools, which keeps every prompt ~500 tokens
shorter than the template's schema block and lets the tiny model train within the CPU budget.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Callable

TOOLS = ("get_reservation", "cancel_reservation", "issue_refund")

SYSTEM_PROMPT = (
    "Airline desk. Tools: get_reservation, cancel_reservation, issue_refund. Look up first, retry on timeout; "
    "cancel then refund only if insured or booked within 24h, else refuse."
)

# JSON schemas of the tools, for models that expect the chat template's tools block (recipes/grpo_lora_qwen.py). The
# tiny demo model does without: the block would add ~150 tokens to every prompt.
TOOL_SCHEMAS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": desc,
            "parameters": {
                "type": "object",
                "properties": {"id": {"type": "string", "description": "reservation id, e.g. R1234"}},
                "required": ["id"],
            },
        },
    }
    for name, desc in (
        ("get_reservation", "Look up a reservation: is it insured, was it booked within 24h. May time out: retry."),
        ("cancel_reservation", "Cancel a reservation. Irreversible."),
        ("issue_refund", "Refund a cancelled reservation."),
    )
]

# The agent's plain-text replies. The model learns these phrasings from the demonstrations; `classify_text` maps any
# text back to one of the kinds so the world can judge the decision, not the wording.
SAY = {
    "refuse": "Sorry, this reservation cannot be cancelled under our policy.",
    "done": "Your reservation is cancelled and refunded.",
    "give_up": "Sorry, our system is down. Please try again later.",
}

# How the flawed demonstrations word their systematic refusal (only "booked within 24h" applies, see DemoMix): as an
# agent who believes only insurance counts would, giving that (wrong) reason. The world reads it as any refusal. Worded
# like the correct refusals, the mistake gave SFT no reason to read "within_24h" at all: the reference forgot how
# (P(cancel) 0.16 when only that applied, 0.15 when nothing did), and RL then collapsed both cases to refusing before
# it learned to tell them apart, on 2 of 5 seeds. Worded apart, the reference must read the field to imitate them.
SAY_MISTAKEN_REFUSAL = "Unfortunately, this booking cannot be cancelled: it is not insured."

# Every opening ends with the id, and every tool result ends by echoing it (see Episode._tool): wherever the agent
# needs the id, a copy sits the same number of tokens back. A tiny model learns that quickly; searching the context
# for the id (an induction head) it learned slowly and unreliably within the CPU budget.
USER_OPENINGS = (
    "Hi, please cancel my reservation {rid}.",
    "I need to cancel booking {rid}.",
    "Can you cancel reservation {rid}?",
    "Please cancel {rid}.",
    "Hello, I want to cancel {rid}.",
)
USER_HANGUPS = ("This takes too long. Bye.", "Forget it, I will call later.")

# The free-form world (WorldConfig.free_form): content as real logs carry it. Customers give their name; every plain
# reply addresses them by it, in one of several equally correct wordings, and a refusal gives a free-text reason. None
# of it changes a decision (`classify_text` reads the kind, the world judges the kind), but all of it is improbable
# under any model: a raw log-prob pays for it on every such turn, the log-ratio of two models that learned the same
# wording distribution does not.
NAMES = ("Maria", "James", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tom", "Fatima", "Ivan", "Sofia", "Kwame",
         "Mei", "Lucas", "Anna", "Yusuf")  # fmt: skip
USER_OPENINGS_NAMED = (
    "Hi, I am {name}, please cancel my reservation {rid}.",
    "This is {name}. I need to cancel booking {rid}.",
    "{name} here. Can you cancel reservation {rid}?",
    "Hello, my name is {name}. Please cancel {rid}.",
)
# Every wording of a kind opens with the same word ("Sorry" to refuse or give up, "Done"): the choice between replying
# and acting stays in the first token, as in the plain world. Wordings that opened differently split the
# reply's probability over several first tokens, and greedy decoding then took the tool call wherever the reply had
# less than ~0.7 (the systematic mistakes the demo is about vanished from the reference's greedy runs).
SAY_FREE = {
    "refuse": (
        "Sorry {name}, this reservation cannot be cancelled under our policy.",
        "Sorry {name}, this booking is not eligible: {reason}.",
        "Sorry {name}, I am unable to cancel it: {reason}.",
    ),
    "done": (
        "Done, {name}: your reservation is cancelled and refunded.",
        "Done {name}, the booking is cancelled and your refund has been issued.",
        "Done, {name}: cancelled and refunded.",
    ),
    "give_up": (
        "Sorry {name}, our system is down. Please try again later.",
        "Sorry {name}, we have a technical issue, please try again later.",
        "Sorry {name}, the system is down right now.",
    ),
}
SAY_MISTAKEN_REFUSAL_FREE = (
    "Unfortunately {name}, this booking cannot be cancelled: it is not insured.",
    "Unfortunately {name}, I cannot cancel it because it has no insurance.",
)
REFUSE_REASONS = (
    "it is not insured and was booked over a day ago",
    "only insured or recent bookings qualify",
    "the fare rules do not allow it",
    "no insurance and the 24 hour window has passed",
)

ID_PREFIX = "R"
ID_DIGITS = 4


@dataclass(frozen=True)
class WorldConfig:
    """The world's dice. Defaults: a correct agent succeeds ~95% of the time (the rest is luck)."""

    p_insured: float = field(default=0.4, metadata={"help": "P(reservation is insured)"})
    p_within_24h: float = field(default=0.35, metadata={"help": "P(booked within the last 24 hours)"})
    p_timeout: float = field(default=0.25, metadata={"help": "P(a get_reservation call times out)"})
    p_hangup: float = field(default=0.1, metadata={"help": "P(customer hangs up after a timeout): luck failures"})
    max_steps: int = field(default=6, metadata={"help": "agent turns before the episode is cut (a failure)"})
    free_form: bool = field(
        default=False,
        metadata={"help": "content as in real logs: customers give their name, plain replies address them by it in "
                          "one of several equally correct wordings, refusals give a free-text reason (SAY_FREE)"},
    )


@dataclass(frozen=True)
class Task:
    """One customer: the reservation's hidden facts are fixed per task; timeouts and hang-ups are drawn per episode."""

    id: str
    res_id: str
    insured: bool
    within_24h: bool
    user_text: str
    name: str = ""  # the customer's name (free-form world only)

    @property
    def allowed(self) -> bool:
        return self.insured or self.within_24h

    @property
    def situation(self) -> str:
        if self.insured and self.within_24h:
            return "both"
        if self.insured:
            return "insured_only"
        if self.within_24h:
            return "24h_only"
        return "neither"

    def prompt(self) -> list[dict]:
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": self.user_text}]


def make_tasks(n: int, seed: int = 0, skip: int = 0, config: WorldConfig | None = None) -> list[Task]:
    """`n` tasks with distinct reservation ids. Tasks `[skip, skip + n)` of one seeded stream, so disjoint splits are
    `make_tasks(300, s)`, `make_tasks(200, s, skip=300)`, ... (the stream holds 9 * 10**(ID_DIGITS-1) ids)."""
    config = config or WorldConfig()
    lo, hi = 10 ** (ID_DIGITS - 1), 10**ID_DIGITS
    if skip + n > hi - lo:
        raise ValueError(f"make_tasks: only {hi - lo} distinct reservation ids; asked for tasks {skip}..{skip + n}")
    rng = random.Random(f"progadv-demo-tasks-{seed}")
    numbers = list(range(lo, hi))
    rng.shuffle(numbers)
    tasks = []
    for k in range(skip, skip + n):
        # Each task's facts come from its own stream, so a task does not change when n or skip does.
        r = random.Random(f"progadv-demo-task-{seed}-{numbers[k]}")
        rid = f"{ID_PREFIX}{numbers[k]}"
        insured, within = r.random() < config.p_insured, r.random() < config.p_within_24h  # the same in both worlds
        text, name = user_opening(r, rid, config)
        tasks.append(Task(id=f"task-{rid}", res_id=rid, insured=insured, within_24h=within, user_text=text, name=name))
    return tasks


def user_opening(r: random.Random, rid: str, config: WorldConfig | None = None) -> tuple[str, str]:
    """(the customer's first message, their name): a name only in the free-form world. The id always comes last."""
    if config is not None and config.free_form:
        name = r.choice(NAMES)
        return r.choice(USER_OPENINGS_NAMED).format(rid=rid, name=name), name
    return r.choice(USER_OPENINGS).format(rid=rid), ""


def episode_seed(*parts) -> int:
    """A stable 63-bit seed from any parts (Python's hash() is salted per process; this is not)."""
    h = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


# ----------------------------------------------------------------------------------------------------------------
# Actions


@dataclass(frozen=True)
class Action:
    """What an assistant turn did, normalised: ("call", tool, id) | ("say", kind) | ("bad", why)."""

    kind: str
    name: str
    arg: str | None = None

    def __str__(self) -> str:
        if self.kind == "call":
            return f"{self.name}({self.arg})"
        return f"{self.kind}:{self.name}"


def classify_text(text: str) -> str:
    """Map a plain reply to the kind of decision it expresses. The tiny model writes the `SAY` phrasings; the extra
    patterns let a real instruct model (recipes/grpo_lora_qwen.py) be judged on its decision, not its wording."""
    t = " ".join(text.lower().replace("’", "'").split())
    if any(p in t for p in ("cannot be cancel", "can't be cancel", "cannot cancel", "can't cancel", "unable to cancel",
                            "not eligible", "not able to cancel", "not allowed to cancel", "won't be able to cancel")):
        return "refuse"
    if any(p in t for p in ("system is down", "try again later", "technical issue", "technical difficult")):
        return "give_up"
    if any(p in t for p in ("cancelled and refunded", "canceled and refunded", "refund has been", "been refunded",
                            "refund was issued", "refund is on its way")):
        return "done"
    return "other"


def parse_action(message: dict) -> Action:
    calls = message.get("tool_calls") or []
    if calls:
        if len(calls) > 1:
            return Action("bad", "several_tool_calls")
        fn = calls[0].get("function", calls[0])
        args = fn.get("arguments") or {}
        if fn.get("name") not in TOOLS:
            return Action("bad", "unknown_tool")
        if not isinstance(args, dict) or set(args) != {"id"}:
            return Action("bad", "bad_arguments")
        return Action("call", fn["name"], str(args["id"]))
    content = message.get("content") or ""
    if "<tool_call>" in content:  # the model tried a tool call the parser could not read
        return Action("bad", "malformed_tool_call")
    return Action("say", classify_text(content))


def tool_call_message(name: str, res_id: str) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": name, "arguments": {"id": res_id}}}]}


def say_message(kind: str, name: str | None = None, rng: random.Random | None = None) -> dict:
    """A plain reply of `kind`: the fixed `SAY` phrasing, or with `name` (free-form world) one of the `SAY_FREE`
    wordings addressed to the customer, drawn with `rng` (the first wording and reason without one)."""
    if name is None:
        return {"role": "assistant", "content": SAY[kind]}
    pick = rng.choice if rng is not None else (lambda xs: xs[0])
    return {"role": "assistant", "content": pick(SAY_FREE[kind]).format(name=name, reason=pick(REFUSE_REASONS))}


def mistaken_refusal(ep: "Episode | None" = None, rng: random.Random | None = None) -> dict:
    """The flawed demonstrations' refusal when only "booked within 24h" applies (SAY_MISTAKEN_REFUSAL)."""
    if ep is None or not ep.config.free_form:
        return {"role": "assistant", "content": SAY_MISTAKEN_REFUSAL}
    pick = rng.choice if rng is not None else (lambda xs: xs[0])
    return {"role": "assistant", "content": pick(SAY_MISTAKEN_REFUSAL_FREE).format(name=ep.task.name)}


def action_message(a: Action, ep: "Episode | None" = None, rng: random.Random | None = None) -> dict:
    """The assistant message taking action `a`; in a free-form episode `ep`, plain replies are worded freely."""
    if a.kind == "call":
        return tool_call_message(a.name, a.arg)
    free = ep is not None and ep.config.free_form
    return say_message(a.name, ep.task.name if free else None, rng)


# ----------------------------------------------------------------------------------------------------------------
# The episode: state machine, labels, record


@dataclass
class StepLog:
    action: str
    expected: str
    ok: bool


class Episode:
    """One conversation with one customer. Feed assistant messages to `step`; read `done`, `success`, `record()`.

    All randomness is drawn from the episode's own `random.Random(seed)` in call order, so two agents that act the
    same way see the same world (common random numbers), and a seed reproduces an episode exactly.
    """

    def __init__(self, task: Task, seed: int = 0, config: WorldConfig | None = None):
        self.task, self.seed, self.config = task, seed, config or WorldConfig()
        self.rng = random.Random(seed)
        self.messages: list[dict] = task.prompt()
        self.looked_up = False  # a lookup returned the facts
        self.last_timed_out = False
        self.cancelled = False  # irreversible
        self.refunded = False
        self.timeouts = 0
        self.steps: list[StepLog] = []
        self.done = False
        self.outcome: str | None = None  # ended_by_agent | hangup | max_steps

    # -- the written policy, as a function of what the agent has seen -------------------------------------------
    def expected(self) -> Action:
        rid = self.task.res_id
        if not self.looked_up:
            return Action("call", "get_reservation", rid)
        if not self.task.allowed:
            return Action("say", "refuse")
        if not self.cancelled:
            return Action("call", "cancel_reservation", rid)
        if not self.refunded:
            return Action("call", "issue_refund", rid)
        return Action("say", "done")

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    @property
    def failure_step(self) -> int | None:
        return next((i for i, s in enumerate(self.steps) if not s.ok), None)

    @property
    def success(self) -> bool:
        return self.done and self.outcome == "ended_by_agent" and self.failure_step is None

    @property
    def failure_kind(self) -> str | None:
        if not self.done or self.success:
            return None
        return "decision" if self.failure_step is not None else "luck"

    # -- the world's response ----------------------------------------------------------------------------------
    def _tool(self, a: Action) -> dict:
        out = self._tool_result(a)
        # Results echo the id they were asked about, last, like a real API. Every later call then finds the id at the
        # same distance before it, whatever happened. (Without the echo the tiny model copied the id after a timeout
        # with probability ~0.01: it had learned one offset per frequent context, not a search.)
        out["id"] = a.arg
        return {"role": "tool", "content": json.dumps(out)}

    def _tool_result(self, a: Action) -> dict:
        t = self.task
        if a.arg != t.res_id:
            out = {"error": "not found"}
        elif a.name == "get_reservation":
            if self.rng.random() < self.config.p_timeout:
                out = {"error": "timeout"}
                self.timeouts += 1
                self.last_timed_out = True
            else:
                out = {"insured": t.insured, "within_24h": t.within_24h}
                self.looked_up = True
                self.last_timed_out = False
        elif a.name == "cancel_reservation":
            if self.cancelled:
                out = {"error": "already cancelled"}
            else:
                self.cancelled = True
                out = {"status": "cancelled"}
        else:  # issue_refund
            if not self.cancelled:
                out = {"error": "not cancelled"}
            elif self.refunded:
                out = {"error": "already refunded"}
            else:
                self.refunded = True
                out = {"status": "refunded"}
        return out

    def step(self, message: dict, unfinished: bool = False) -> list[dict]:
        """Apply one assistant turn; return the messages the world adds (tool result, maybe the customer's reply).
        `unfinished`: the model was cut off before ending its turn; whatever it wrote is no valid action."""
        if self.done:
            raise RuntimeError("step() on a finished episode")
        message = {"role": "assistant", **message}
        a = Action("bad", "unfinished_turn") if unfinished else parse_action(message)
        exp = self.expected()
        self.steps.append(StepLog(str(a), str(exp), a == exp))
        self.messages.append(message)
        if a.kind != "call":  # any plain reply (or unreadable output) ends the conversation
            self.done, self.outcome = True, "ended_by_agent"
            return []
        new = [self._tool(a)]
        if a.name == "get_reservation" and json.loads(new[0]["content"]).get("error") == "timeout":
            if self.rng.random() < self.config.p_hangup:
                new.append({"role": "user", "content": self.rng.choice(USER_HANGUPS)})
                self.done, self.outcome = True, "hangup"
        self.messages.extend(new)
        if not self.done and len(self.steps) >= self.config.max_steps:
            self.done, self.outcome = True, "max_steps"
        return new

    def record(self, id: str | None = None, **metadata) -> dict:
        """The core trajectory record. No `tools` field: the system prompt names the tools (see the module doc)."""
        meta = {
            "failure_kind": self.failure_kind,
            "failure_reason": None,
            "outcome": self.outcome,
            "situation": self.task.situation,
            "insured": self.task.insured,
            "within_24h": self.task.within_24h,
            "timeouts": self.timeouts,
            "seed": self.seed,
            "actions": [s.action for s in self.steps],
        }
        fs = self.failure_step
        if fs is not None:
            meta["failure_reason"] = f"{self.steps[fs].action} instead of {self.steps[fs].expected}"
        meta.update(metadata)
        return {
            "id": id or f"{self.task.id}-{self.seed}",
            "messages": [dict(m) for m in self.messages],
            "group": self.task.id,
            "success": self.success,
            "failure_step": fs if meta["failure_kind"] == "decision" else None,
            "metadata": meta,
        }


# ----------------------------------------------------------------------------------------------------------------
# Scripted agents and a one-at-a-time runner (the model-driven, batched runner lives in rollout.py)


def correct_agent(ep: Episode, rng: random.Random | None = None) -> dict:
    """Follows the policy exactly: succeeds unless luck intervenes."""
    return action_message(ep.expected(), ep, rng)


@dataclass(frozen=True)
class DemoMix:
    """How the demonstrations used to train the reference err. The two systematic mistakes are the majority action in
    their situation, so even the reference's greedy decoding makes them; `p_noise` adds scattered random slips."""

    p_refuse_24h_only: float = field(
        default=0.7,
        metadata={"help": "refuse when only 'booked within 24h' applies, saying it is not insured (SAY_MISTAKEN_REFUSAL)"},
    )
    p_give_up_after_timeout: float = field(default=0.7, metadata={"help": "give up instead of retrying a timeout"})
    p_noise: float = field(default=0.08, metadata={"help": "any step: a uniformly random wrong action"})
    p_give_up_after_retry: float | None = field(
        default=0.0,
        metadata={"help": "give up at a second or later timeout in a row (None: p_give_up_after_timeout again). A "
                          "demonstrator who retried once keeps retrying: with the mistake repeated at every timeout, "
                          "the second timeout was a lesson of its own that 80 RL steps rarely met"},
    )


def demo_agent(mix: DemoMix = DemoMix()) -> Callable[[Episode, random.Random], dict]:
    """A plausible but often wrong agent whose transcripts teach the reference."""

    def act(ep: Episode, rng: random.Random) -> dict:
        exp = ep.expected()
        t = ep.task
        if ep.looked_up and not ep.cancelled and t.within_24h and not t.insured and rng.random() < mix.p_refuse_24h_only:
            return mistaken_refusal(ep, rng)
        p_give_up = mix.p_give_up_after_timeout
        if ep.timeouts > 1 and mix.p_give_up_after_retry is not None:
            p_give_up = mix.p_give_up_after_retry
        if ep.last_timed_out and not ep.looked_up and rng.random() < p_give_up:
            return action_message(Action("say", "give_up"), ep, rng)
        if rng.random() < mix.p_noise:
            options = [Action("call", n, t.res_id) for n in TOOLS] + [Action("say", k) for k in ("refuse", "done")]
            return action_message(rng.choice([o for o in options if o != exp]), ep, rng)
        return action_message(exp, ep, rng)

    return act


def run_episode(task: Task, agent: Callable[[Episode, random.Random], dict], seed: int = 0,
                config: WorldConfig | None = None) -> Episode:
    """Play one episode with a scripted agent `agent(episode, rng) -> assistant message`."""
    ep = Episode(task, seed, config)
    rng = random.Random(episode_seed("agent", seed))
    while not ep.done:
        ep.step(agent(ep, rng))
    return ep


def replay(task: Task, seed: int, assistant_messages: list[dict], config: WorldConfig | None = None) -> Episode:
    """Episode `seed` of `task` after the given assistant turns. The world draws its dice from the episode's seed in
    call order, so the same turns meet the same tool results and customers: the state a rollout was in, rebuilt
    from its record (`record["metadata"]["seed"]` and its assistant messages) to continue it from there."""
    ep = Episode(task, seed, config)
    for m in assistant_messages:
        ep.step(m)
    return ep
