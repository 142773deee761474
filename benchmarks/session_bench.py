"""The critic in the agent loop: a session (append + score K candidates over cached conversations) against scoring the
K whole conversations with `critic.score` at every turn. Called by `run.py` (part "session", on the realistic and
the decoder shapes); keys:

- step_session_speedup: time of path B / time of path A over one agent episode with K = 4 candidates at every agent
  turn (the realistic shape: 13 turns, 3.4k tokens; the decoder shape: 5 turns, 2.2k tokens with the realistic
  1.2k-token prompt, on the small, decoder-bound model, where per-call costs show). A: one `CriticSession`; at each turn `score(K candidates)`, then
  `append(chosen turn)` and `append(tool result)` as the agent loop does (two appends: lazy, they run with the next
  score). B: `ProgressScorer.score` of the K (state + candidate) conversations at each turn (the engine shares their
  common prompt within the call, so B reads each state once per turn, not K times). Asserted: both paths give the
  same advantages (1e-4). The two paths alternate, `--session-rounds` (3) times each; the median counts, CPU seconds
  beside wall seconds (`*_cputime`).
- step_session_bound: tokens B's forward passes read / tokens A's read (both models); step_session_fraction_of_bound:
  the first over the second (target >= 0.7 on a CPU). step_session_forward_calls: A's forward calls (both models).
  step_session_a_tokens_per_s / _b_: tokens each path's passes read per second (their ratio is the fraction of the
  bound); step_session_peak_memory_mb: each path's largest GPU allocation (GPU only).
- append_s_per_1k_tokens: {"1k": s, "4k": s}: seconds per 1k appended tokens (a ~512-token tool result), append and
  `flush()` (the new tokens run), at a context of ~1k and ~4k tokens (both models).
- kv_copy_s_4k / kv_copy_share_of_score: seconds to materialise K = 4 copies of both models' 4k-token caches (what
  a batch of K rows over an expanded cache does in every layer's concatenation), and that over the time of one
  packed `score` of 4 candidates at that context: what the packed row saves.
"""

from __future__ import annotations

import random
import statistics
import time

import torch

import workload as W

# The episodes: (min_tokens, max_tokens, agent_group keywords) of the one rollout: the realistic prompt (policy, six
# tool schemas, a task: 1.2k tokens) and tool-calling turns; 13 agent turns on the realistic shape, 5 on the decoder's.
EPISODES = {"realistic": (2500, 3500, {}), "decoder": (2000, 2300, {})}


def _episode(tok, shape: str, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(messages of one agent episode with tool calls and results, its tools): the shape's group generator, one
    rollout."""
    lo, hi, kw = EPISODES[shape]
    (rec,) = W.agent_group(seed, 1, tok, min_tokens=lo, max_tokens=hi, seed=seed, **kw)
    return rec["messages"], rec["tools"]


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
    msgs, tools = _episode(tok, ctx["shape"])
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]  # every agent turn is a state to steer
    assert len(turns) >= 5, "episode too short for the benchmark"
    rng = random.Random(0)
    cands = {i: _alternatives(msgs[i], rng, k) for i in turns}

    def path_a():
        s = CriticSession(scorer, msgs[: turns[0]], tools)
        out, last = [], turns[0]
        for i in turns:
            for m in msgs[last:i]:  # the chosen turn, the tool result: one append each, as the agent loop does
                s.append(m)
            out.append([r.advantage for r in s.score(cands[i])])
            last = i
        return out, s.tokens_read, s.forward_calls

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

    # warm-up (allocator, template compilation): the session's whole path, the engine on one conversation
    path_a()
    scorer.score([{"id": "w", "messages": msgs[: turns[-1]] + [cands[turns[-1]][0]], "tools": tools}])
    wall, cpu, peak = {"a": [], "b": []}, {"a": [], "b": []}, {}
    for _ in range(args.session_rounds):  # alternating: the machine's load drifts alike for both
        for name, fn in (("a", path_a), ("b", path_b)):
            w, c, res = _timed(fn, args.device, peak, name)
            wall[name].append(w)
            cpu[name].append(c)
            if name == "a":
                adv_a, read_a, calls_a = res
            else:
                adv_b, read_b = res
    ta, tb = statistics.median(wall["a"]), statistics.median(wall["b"])
    ca, cb = statistics.median(cpu["a"]), statistics.median(cpu["b"])
    diff = max(abs(x - y) for ra, rb in zip(adv_a, adv_b) for x, y in zip(ra, rb))
    assert diff < 1e-4, f"session and whole-conversation advantages differ by {diff}"
    bound = read_b / read_a
    out = {
        "step_session_turns": len(turns), "step_session_k": k, "step_session_episode_tokens": len(render(
            as_trajectories([{"id": "e", "messages": msgs, "tools": tools}])[0], tok).input_ids),
        "step_session_a_s": ta, "step_session_b_s": tb, "step_session_speedup": tb / ta,
        "step_session_a_cpu_s": ca, "step_session_b_cpu_s": cb, "step_session_speedup_cputime": cb / ca,
        "step_session_a_s_rounds": wall["a"], "step_session_b_s_rounds": wall["b"],
        "step_session_tokens_a": read_a, "step_session_tokens_b": read_b, "step_session_bound": bound,
        "step_session_forward_calls": calls_a, "step_session_max_abs_diff": diff,
        "step_session_a_tokens_per_s": read_a / ta, "step_session_b_tokens_per_s": read_b / tb,
        "step_session_peak_memory_mb": peak or None,
        "step_session_fraction_of_bound": tb / ta / bound, "step_session_fraction_of_bound_cputime": cb / ca / bound,
    }  # fmt: skip
    if ctx["shape"] == "realistic":
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
        s.flush()
        new = [{"role": "assistant", "content": "One more."}, {"role": "tool", "content": blob(512)}]
        before = (list(s.messages), s._state, list(s._kv_ids), dict(s._kv))
        times, added = [], 0

        def append_and_flush():
            s.append(new)
            s.flush()

        for _ in range(3):
            s.messages, s._state, s._kv_ids, s._kv = list(before[0]), before[1], list(before[2]), dict(before[3])
            n0 = s.tokens_read
            dt, _, _ = _timed(append_and_flush)
            times.append(dt)
            added = (s.tokens_read - n0) // 2
        res["append_s_per_1k_tokens"][label] = min(times) / added * 1000
        res[f"append_context_tokens_{label}"] = len(before[2])
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


def _timed(fn, device="cpu", peak: dict | None = None, label: str = ""):
    """(wall seconds, this process's CPU seconds, result); on a GPU the largest allocation goes to peak[label]."""
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
        if peak is not None:
            peak[label] = max(peak.get(label, 0.0), torch.cuda.max_memory_allocated() / 2**20)
    return time.perf_counter() - t, time.process_time() - c, out
