"""Scoring as generated (a template that rewrites earlier turns) against its distinct-token bound. Called by `run.py`
(part "as_generated", the realistic shape); keys:

- as_generated_fraction_of_bound: the bound's time / the as-generated time over one agent episode of >= 12 turns,
  reasoning in every turn and a user turn every third agent turn (so Qwen3's template strips the reasoning of the
  turns before it), rendered with TRL's qwen3.jinja. The bound: every distinct token of the episode's rows
  (`generated.distinct_tokens`) computed once at the per-token cost of ONE plain pass, timed as the engine scoring
  the same episode whole with the prefix-preserving qwen3_training.jinja (same turns, same reasoning, one pass over
  the conversation, every action token through the output layer), scaled by distinct tokens / whole tokens. Target
  >= 0.7 on a CPU. Passes only (rendering is timed apart: as_generated_render_s).
- as_generated_sharing_speedup: time with every row run alone (share_prefix=False) / with the rows sharing one KV
  cache per model (prefix.Chain). Asserted: both give the same step advantages (1e-4).
- as_generated_distinct_tokens, as_generated_row_tokens (all rows' tokens), as_generated_whole_tokens, _turns.
"""

from __future__ import annotations

import copy
import time

import numpy as np

from session_bench import _episode


def episode_with_reasoning(tok, min_turns: int = 12, seed: int = 0) -> tuple[list[dict], list[dict]]:
    msgs, tools = _episode(tok, "realistic", seed)  # the realistic shape's episode (13 agent turns)
    assert sum(m["role"] == "assistant" for m in msgs) >= min_turns, "episode too short for the benchmark"
    out, k = [], 0
    for m in msgs:
        if m["role"] == "assistant":
            m = {**m, "reasoning_content": f"Turn {k}: what did the last tool say, and which call does the policy allow "
                                           "next? The trip change comes first; a refund only if no later date works."}  # fmt: skip
            k += 1
        out.append(m)
        if m["role"] == "tool" and k % 3 == 0:  # the user speaks: Qwen3 then drops the reasoning of earlier turns
            out.append({"role": "user", "content": "Thanks, please go on."})
    return out, tools


def bench_as_generated(ctx, args, repeat: int = 3) -> dict:
    from progadv_trl.demo.tiny import chat_template
    from progadv_trl.engine import ProgressScorer
    from progadv_trl.generated import distinct_tokens
    from progadv_trl.rendering import render
    from progadv_trl.trajectories import as_trajectories

    pol, ref = ctx["pol"], ctx["ref"]
    gen_tok, whole_tok = copy.copy(ctx["tok"]), copy.copy(ctx["tok"])
    gen_tok.chat_template, whole_tok.chat_template = chat_template("qwen3"), chat_template("qwen3_training")
    msgs, tools = episode_with_reasoning(ctx["tok"])
    (traj,) = as_trajectories([{"id": "episode", "messages": msgs, "tools": tools}])
    t0 = time.perf_counter()
    r = render(traj, gen_tok, rendering="auto")
    render_s = time.perf_counter() - t0
    assert r.rows is not None, "qwen3.jinja should rewrite this episode's history"
    w = render(traj, whole_tok, rendering="whole")
    shared = ProgressScorer(pol, gen_tok, ref, compute_baselines=False)
    alone = ProgressScorer(pol, gen_tok, ref, compute_baselines=False, share_prefix=False)
    whole = ProgressScorer(pol, whole_tok, ref, compute_baselines=False, share_prefix=False)

    def timed(scorer, rendered):
        t = time.perf_counter()
        st = scorer.token_stats([rendered])[0]
        return time.perf_counter() - t, st

    for s, x in ((shared, r), (whole, w)):  # warm-up
        timed(s, x)
    t_gen, t_whole = [], []
    for _ in range(repeat):  # interleaved, best of
        t, st_shared = timed(shared, r)
        t_gen.append(t)
        t_whole.append(timed(whole, w)[0])
    t_alone, st_alone = timed(alone, r)
    np.testing.assert_allclose(st_shared.log_ratio, st_alone.log_ratio, atol=1e-4, rtol=0)
    D, L = distinct_tokens(r.rows), len(w.input_ids)
    bound = min(t_whole) * D / L
    return {
        "as_generated_fraction_of_bound": bound / min(t_gen),
        "as_generated_s": min(t_gen),
        "as_generated_bound_s": bound,
        "as_generated_whole_s": min(t_whole),
        "as_generated_sharing_speedup": t_alone / min(t_gen),
        "as_generated_render_s": render_s,
        "as_generated_turns": r.n_steps,
        "as_generated_distinct_tokens": D,
        "as_generated_row_tokens": sum(len(x.input_ids) for x in r.rows),
        "as_generated_whole_tokens": L,
        "as_generated_action_tokens": int(st_shared.log_ratio.size),
    }
