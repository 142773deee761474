"""The critic in the agent loop: a session (append + score K candidates over cached conversations) against scoring the
K whole conversations with `critic.score` at every turn. Called by `run.py` (part "session"); keys:

- step_session_speedup: time of path B / time of path A over one episode of >= 10 agent turns with K = 4 candidates
  at every turn (the realistic shape). A: one `CriticSession`, `score(K candidates)` then `append(chosen turn)` and
  `append(tool result)` at each turn. B: `ProgressScorer.score` of the K (state + candidate) conversations at each
  turn (the engine shares their common prompt within the call, so B reads each state once per turn, not K times).
  Asserted: both paths give the same advantages (1e-4).
- step_session_bound: tokens B's forward passes read / tokens A's read (both models); step_session_fraction_of_bound:
  the first over the second (target >= 0.7 on a CPU).
- append_s_per_1k_tokens: {"1k": s, "4k": s}: seconds per 1k appended tokens (a ~512-token tool result) at a
  context of ~1k and ~4k tokens (both models).
- kv_copy_s_4k / kv_copy_share_of_score: seconds to materialise K = 4 copies of both models' 4k-token caches (what
  a batch of K rows over an expanded cache does in every layer's concatenation), and that over the time of one
  packed `score` of 4 candidates at that context: what the packed row saves.
"""

from __future__ import annotations

import random
import time

import numpy as np
import torch

import workload as W


def _episode(tok, min_turns: int = 12, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(messages of one long agent episode with tool calls and results, its tools): the realistic shape's group
    generator, grown until it has `min_turns` agent turns."""
    (rec,) = W.agent_group(seed, 1, tok, min_tokens=2500, max_tokens=3500, seed=seed)
    msgs = rec["messages"]
    assert sum(m["role"] == "assistant" for m in msgs) >= min_turns, "episode too short for the benchmark"
    return msgs, rec["tools"]


def _alternatives(turn: dict, rng: random.Random, k: int) -> list[dict]:
    """The real turn and k - 1 other tool calls of the same shape (other tools, other arguments)."""
    out = [turn]
    while len(out) < k:
        name = rng.choice([t[0] for t in W._TOOLS[: W.N_TOOLS]])
        out.append({"role": "assistant", "content": rng.choice(["", "Let me check that."]),
                    "tool_calls": [{"type": "function", "function": {"name": name, "arguments": W._args(name, rng, "u_1")}}]})  # fmt: skip
    return out


def bench_session(ctx, args, k: int = 4) -> dict:
    from progadv_trl.engine import ProgressScorer
    from progadv_trl.prefix import _common_prefix
    from progadv_trl.rendering import render
    from progadv_trl.scoring import ScoringConfig
    from progadv_trl.session import CriticSession
    from progadv_trl.trajectories import as_trajectories

    pol, ref, tok = ctx["pol"], ctx["ref"], ctx["tok"]
    scorer = ProgressScorer(pol, tok, ref, config=ScoringConfig(beta=1.0), compute_baselines=False)
    msgs, tools = _episode(tok)
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"][1:]  # states with a conversation behind them
    rng = random.Random(0)
    cands = {i: _alternatives(msgs[i], rng, k) for i in turns}

    def path_a():
        s = CriticSession(scorer, msgs[: turns[0]], tools)
        out, last = [], turns[0]
        for i in turns:
            if i > last:
                s.append(msgs[last:i])
            out.append([r.advantage for r in s.score(cands[i])])
            last = i
        return out, s.tokens_read

    def path_b():
        out, read = [], 0
        for i in turns:
            recs = [{"id": f"t{i}c{j}", "messages": msgs[:i] + [c], "tools": tools} for j, c in enumerate(cands[i])]
            scores = scorer.score(recs)
            out.append([ts.steps[-1].advantage for ts in scores])
            ids = [render(t, tok).input_ids for t in as_trajectories(recs)]
            P = _common_prefix(ids)
            read += 2 * (P + sum(len(x) - P for x in ids))  # both models: the shared state once, each continuation
        return out, read

    path_a()  # warm-up (allocator, template compilation); B, the long path, warms itself up
    ta, (adv_a, read_a) = _timed(path_a)
    tb, (adv_b, read_b) = _timed(path_b)
    ta2, _ = _timed(path_a)
    tb2, _ = _timed(path_b)
    ta, tb = min(ta, ta2), min(tb, tb2)
    diff = max(abs(x - y) for ra, rb in zip(adv_a, adv_b) for x, y in zip(ra, rb))
    assert diff < 1e-4, f"session and whole-conversation advantages differ by {diff}"
    out = {
        "step_session_turns": len(turns), "step_session_k": k, "step_session_episode_tokens": len(render(
            as_trajectories([{"id": "e", "messages": msgs, "tools": tools}])[0], tok).input_ids),
        "step_session_a_s": ta, "step_session_b_s": tb, "step_session_speedup": tb / ta,
        "step_session_tokens_a": read_a, "step_session_tokens_b": read_b, "step_session_bound": read_b / read_a,
        "step_session_max_abs_diff": diff,
    }  # fmt: skip
    out["step_session_fraction_of_bound"] = out["step_session_speedup"] / out["step_session_bound"]
    out.update(_append_and_copy(scorer, tok, tools, k))
    return out


def _append_and_copy(scorer, tok, tools, k: int) -> dict:
    from progadv_trl.session import CriticSession

    rng = random.Random(1)
    sys_msg = {"role": "system", "content": W._POLICY}
    res = {"append_s_per_1k_tokens": {}}

    def blob(n_tokens: int) -> str:
        text = ""
        while len(tok(text, add_special_tokens=False).input_ids) < n_tokens:
            text += W._tool_result("search_direct_flight", rng)
        return text

    for label, ctx_tokens in (("1k", 1000), ("4k", 4000)):
        state = [sys_msg, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Let me check."},
                 {"role": "tool", "content": blob(ctx_tokens - 600)}]  # fmt: skip
        s = CriticSession(scorer, state, tools)
        new = [{"role": "assistant", "content": "One more."}, {"role": "tool", "content": blob(512)}]
        before = (list(s.messages), list(s._ids), dict(s._kv))
        times, added = [], 0
        for _ in range(3):
            s.messages, s._ids, s._kv = list(before[0]), list(before[1]), dict(before[2])
            n0 = s.tokens_read
            dt, _ = _timed(lambda: s.append(new))
            times.append(dt)
            added = (s.tokens_read - n0) // 2
        res["append_s_per_1k_tokens"][label] = min(times) / added * 1000
        res[f"append_context_tokens_{label}"] = len(before[1])
        if label == "4k":
            cands = [{"role": "assistant", "content": f"Option {j}: flight HAT{100 + j} is available."} for j in range(k)]
            t_score = min(_timed(lambda: s.score(cands))[0] for _ in range(3))

            def copies():
                for who in ("policy", "reference"):
                    for kk, vv in s._kv[who]:
                        kk.expand(k, -1, -1, -1).contiguous(), vv.expand(k, -1, -1, -1).contiguous()

            t_copy = min(_timed(copies)[0] for _ in range(3))
            res["kv_copy_s_4k"], res["score_k4_s_4k"] = t_copy, t_score
            res["kv_copy_share_of_score"] = t_copy / t_score
    return res


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out
