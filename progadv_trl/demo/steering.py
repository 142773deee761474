"""Step-level selection in the demo world: an agent samples K candidate turns at every step of a held-out episode and
keeps the one a method ranks highest (the critic in the agent loop, `session.py`), next to the agent alone and to
trajectory-level best-of-K over as many sampled turns.

    block = step_selection(critic, models, tokenizer, cfg)     # summary.json's "step_selection"

Pairing: every method plays the same tasks with the same world seed, so two methods that chose alike so far are in
the same state and face the same dice; candidates are sampled once per distinct state (memoised), so methods that
reach the same state choose among the same K candidates. Success per task is then compared method against method
(`evaluation.fair.compare_outcomes`: paired bootstrap against the best baseline).

Methods: progress advantage and each variant (support statistics on), the policy and reference log-probs (mean over
the candidate's tokens), self-certainty, DeepConf (the candidate's mean token confidence: within one turn its tail and
bottom-10% forms are the same number, so one name stands for both) and a seeded uniform pick; with `reward_models`
({name: RewardModel}, demo/reward_models.py) also each trained reward model, choosing by its value after the candidate
turn (`RewardModel.score_candidates`), a baseline like the others and compared with progress advantage head to head.
"""

from __future__ import annotations

import json
import zlib

import numpy as np
import torch

from ..config import PLAUSIBLE, VARIANTS
from ..session import from_step
from .rollout import decode_turn, encode, end_of_turn, generate_turns, play, render
from .world import Action, Episode, episode_seed, parse_action

STEP_BASELINES = ("policy_logprob", "reference_logprob", "self_certainty", "deepconf_tail")
STEER_METHODS = ("progress_advantage", PLAUSIBLE, *VARIANTS, *STEP_BASELINES, "random")
# Trajectory-level best-of-K ranks whole episodes by each method's trajectory score (the theory's sum for progress
# advantage; the baselines' own trajectory scores).
TRAJECTORY_METHODS = ("progress_advantage", PLAUSIBLE, *VARIANTS, "policy_logprob", "reference_logprob", "self_certainty",
                      "deepconf_tail", "deepconf_bottom10")  # fmt: skip
BUDGETS = (4, 8)
AGENT_ROLES = {"reference": "off-policy: the critic steering another model",
               "mid": "mid-training: a GRPO checkpoint part-way through, steered by its own critic",
               "policy": "on-policy: the RL policy steered by its own critic"}
AGENTS = ("reference", "mid", "policy")  # the mid-training checkpoint when the run saved one


def _random_pick(k: int, seed: int, task_id: str, step: int) -> int:
    return int(np.random.default_rng([seed, zlib.crc32(f"{task_id}/{step}".encode())]).integers(k))


@torch.no_grad()
def steer(critic, agent, tokenizer, tasks, *, k: int, methods=STEER_METHODS, seed: int = 0, world=None,
          max_new_tokens: int = 24, temperature: float = 1.0, batch_size: int = 256,
          reward_models: dict | None = None) -> tuple[dict, dict]:
    """Play every task once per method, choosing each turn among K sampled candidates by that method (a reward
    model's name among `methods` chooses by that model of `reward_models`).

    Returns ({method: [Episode]}, stats {"states", "candidates"}). All methods advance in lockstep; the distinct
    states of a round are expanded together (one batched generation, one scoring call for all their candidates)."""
    from ..evaluation.selection import pick_best

    eos = end_of_turn(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    eps = {m: [Episode(t, episode_seed(seed, "steer", t.id), world) for t in tasks] for m in methods}
    memo: dict[tuple[int, str], tuple[list, list]] = {}
    labels: dict[tuple[int, str], list[bool]] = {}
    actions: dict[tuple[int, str], list[str]] = {}  # "expected -> taken", for the diagnosis of wrong picks
    gen = torch.Generator().manual_seed(episode_seed(seed, "steer-sample", k))
    was = agent.training
    agent.eval()
    try:
        while True:
            active = [(m, i) for m in methods for i, ep in enumerate(eps[m]) if not ep.done]
            if not active:
                break
            need: dict[tuple[int, str], list[dict]] = {}
            expected: dict[tuple[int, str], Action] = {}
            state = {(m, i): (i, json.dumps(eps[m][i].messages, sort_keys=True)) for m, i in active}
            for m, i in active:
                msgs, key = eps[m][i].messages, state[(m, i)]
                if key not in memo:
                    need.setdefault(key, msgs)
                    expected[key] = eps[m][i].expected()
            keys = list(need)
            contexts = [encode(tokenizer, render(tokenizer, need[key], True)) for key in keys]
            gens, per = [], max(1, batch_size // k)  # each state's K candidates: one prefill, K sampled turns
            for s in range(0, len(contexts), per):
                g, _ = generate_turns(agent, contexts[s : s + per], eos_id=eos, pad_id=pad, repeat=k,
                                      max_new_tokens=max_new_tokens, temperature=temperature, generator=gen)
                gens += g
            # Every candidate of every new state, scored in ONE engine call: the figures a critic session gives them
            # (tests/test_session.py checks the two agree), without hundreds of tiny per-state passes.
            new = {key: [decode_turn(tokenizer, g, eos)[:2] for g in gens[j * k : (j + 1) * k]] for j, key in enumerate(keys)}
            recs = [{"id": f"s{j}c{c}", "messages": need[key] + [msg]}
                    for j, key in enumerate(keys) for c, (msg, _) in enumerate(new[key])]  # fmt: skip
            scores = critic.score(recs, support=True) if recs else []
            # each reward model's value after each candidate: the last step of its conversation, as
            # `RewardModel.score_candidates` gives it, batched over every state of the round
            rm_values = {name: [r["steps"][-1] for r in rm.score_records(recs)] for name, rm in (reward_models or {}).items()
                         if name in methods and recs}  # fmt: skip
            for j, key in enumerate(keys):
                memo[key] = (new[key], [from_step(ts, len(ts.steps) - 1) for ts in scores[j * k : (j + 1) * k]])
                for name, v in rm_values.items():  # a baseline of the candidate, read by method_score like the others
                    for c, cs in enumerate(memo[key][1]):
                        cs.baselines[name] = v[j * k + c]
                # the world's verdict on each candidate: the one correct action at this state, or a mistake
                labels[key] = [ended and parse_action(msg) == expected[key] for msg, ended in new[key]]
                actions[key] = [f"{expected[key]} -> {parse_action(msg) if ended else 'unfinished'}" for msg, ended in new[key]]
            for m, i in active:
                ep = eps[m][i]
                cands, res = memo[state[(m, i)]]
                step = ep.n_steps
                if m == "random":
                    pick = _random_pick(k, seed, ep.task.id, step)
                else:
                    pick = pick_best([r.method_score(m) for r in res], f"{ep.task.id}/{step}", seed)
                msg, ended = cands[pick]
                ep.step(msg, unfinished=not ended)
    finally:
        agent.train(was)
    ranking = candidate_ranking({key: memo[key][1] for key in memo}, labels, [m for m in methods if m != "random"], actions)
    return eps, {"states": len(memo), "candidates": len(memo) * k, "candidate_ranking": ranking}


def candidate_ranking(results: dict, labels: dict, methods, actions: dict | None = None) -> dict:
    """How well each method orders the candidates at one state, the theory's own question: over every state whose K
    candidates hold both the correct action and a mistake, the share of (correct, mistake) pairs the method ranks
    correctly (ties count half): a within-state AUROC, pooled over pairs. In this world a mistake fails the episode,
    so correct > mistake is the order of Q*; V*(s), the KL offset and the luck to come are the same for both sides.
    With `actions` ({key: ["expected -> taken" per candidate]}): `wrong_picks`, per method, what its top candidate
    was at those states when it was a mistake (counts)."""
    out = {"states_with_a_choice": 0, "pairs": 0, "methods": {}, "wrong_picks": {m: {} for m in methods}}
    wins = {m: 0.0 for m in methods}
    for key, res in results.items():
        y = np.asarray(labels[key], dtype=bool)
        if y.all() or not y.any():
            continue
        out["states_with_a_choice"] += 1
        out["pairs"] += int(y.sum() * (~y).sum())
        for m in methods:
            v = np.array([r.method_score(m) for r in res], dtype=np.float64)
            v = np.where(np.isnan(v), -np.inf, v)
            diff = v[y][:, None] - v[~y][None, :]
            wins[m] += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
            top = int(np.argmax(v))
            if actions is not None and not y[top]:
                w = out["wrong_picks"][m]
                w[actions[key][top]] = w.get(actions[key][top], 0) + 1
    for m in methods:
        out["methods"][m] = wins[m] / out["pairs"] if out["pairs"] else None
    return out


def trajectory_best_of_k(critic, records: list[dict], ks=BUDGETS, methods=TRAJECTORY_METHODS, seed: int = 0,
                         reward_models: dict | None = None) -> dict:
    """{k: {method: per-task success of the episode the method keeps among the first k}} (tasks in record order),
    plus {k: {"sampled": per-task mean success}}: the agent alone, sampled. A reward model ranks by its trajectory
    score."""
    from ..evaluation.selection import pick_best

    scores = critic.score(records, support=True)
    if reward_models:
        from .reward_models import add_reward_model_scores

        add_reward_model_scores(scores, records, reward_models)
    by_task: dict[str, list[tuple[dict, object]]] = {}
    for rec, ts in zip(records, scores):
        by_task.setdefault(rec["group"], []).append((rec, ts))
    out = {}
    for k in ks:
        per = {m: [] for m in methods}
        per["sampled"] = []
        for g, items in by_task.items():
            items = items[:k]
            y = [float(r["success"]) for r, _ in items]
            per["sampled"].append(float(np.mean(y)))
            for m in methods:
                per[m].append(y[pick_best([ts.method_score(m) for _, ts in items], g, seed)])
        out[k] = per
    return out


def step_selection(critic, models: dict, tokenizer, cfg, *, ks=BUDGETS, n_boot: int | None = None,
                   reward_models: dict | None = None) -> dict:
    """summary.json's "step_selection" block: per agent (reference: the critic steering another model, off-policy;
    mid: a checkpoint part-way through GRPO steered by its own critic; policy: on-policy) and budget K, held-out
    success per method (step-level and trajectory-level best-of-K), the agent alone (greedy; sampled), and each
    family member minus the best baseline with its paired 95 % interval. `critic`: one critic for every agent, or
    {agent: critic}. `reward_models` ({name: RewardModel}): each is one more method (a baseline) at both levels, and
    progress advantage minus it is under each comparison's "versus"."""
    from ..evaluation.fair import compare_outcomes

    tasks = cfg.tasks("eval")[: cfg.steer_tasks]
    n_boot = cfg.n_boot if n_boot is None else n_boot
    rms = dict(reward_models or {})
    step_methods = (*STEER_METHODS[:-1], *rms, STEER_METHODS[-1])  # the reward models before "random"
    kw = dict(seed=cfg.seed, world=cfg.world, max_new_tokens=cfg.max_new_tokens, methods=step_methods, reward_models=rms)
    cmp = dict(n_boot=n_boot, seed=cfg.seed, versus=tuple(rms))
    block = {"tasks": len(tasks), "split": f"the first {len(tasks)} tasks of the eval split", "budgets": list(ks),
             "methods": list(step_methods), "agents": {}}  # fmt: skip
    critics = critic if isinstance(critic, dict) else {name: critic for name in models}
    for name in (a for a in AGENTS if a in models and a in critics):
        agent, critic = models[name], critics[name]
        # the agent alone on the same tasks and world seeds: greedy, and max(ks) sampled episodes per task
        greedy = play(agent, tokenizer, [Episode(t, episode_seed(cfg.seed, "steer", t.id), cfg.world) for t in tasks],
                      greedy=True, max_new_tokens=cfg.max_new_tokens)  # fmt: skip
        eps = [Episode(t, episode_seed(cfg.seed, "steer", t.id), cfg.world) for t in tasks for _ in range(max(ks))]
        g = torch.Generator().manual_seed(episode_seed(cfg.seed, "steer-alone", name))
        sampled = play(agent, tokenizer, eps, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, generator=g)
        recs = [te.record(id=f"steer-{name}-{te.episode.task.id}-{j % max(ks)}") for j, te in enumerate(sampled)]
        traj = trajectory_best_of_k(critic, recs, ks, methods=(*TRAJECTORY_METHODS, *rms), seed=cfg.seed, reward_models=rms)
        entry = {"greedy": float(np.mean([te.episode.success for te in greedy]))}
        for k in ks:
            eps_k, stats = steer(critic, agent, tokenizer, tasks, k=k, temperature=cfg.temperature, **kw)
            step = {m: [float(ep.success) for ep in v] for m, v in eps_k.items()}
            decision = {m: int(sum(ep.failure_kind == "decision" for ep in v)) for m, v in eps_k.items()}
            entry[f"k{k}"] = {
                "sampled": float(np.mean(traj[k]["sampled"])),
                "step": {m: float(np.mean(v)) for m, v in step.items()},
                "step_decision_failures": decision,
                "step_comparison": _verdicts(compare_outcomes(step, **cmp)),
                "trajectory": {m: float(np.mean(v)) for m, v in traj[k].items() if m != "sampled"},
                "trajectory_comparison": _verdicts(compare_outcomes(
                    {m: v for m, v in traj[k].items() if m != "sampled"}, **cmp)),
                "step_minus_trajectory_pa": float(np.mean(step["progress_advantage"]) - np.mean(traj[k]["progress_advantage"])),
                **stats,
            }  # fmt: skip
        block["agents"][name] = entry
    return block


def _verdicts(c: dict) -> dict:
    """The comparison without the per-method copies of the success figures (they are in "step" / "trajectory")."""
    out = {key: c.get(key) for key in ("best_baseline", "best_untrained_baseline", "difference", "difference_ci", "verdict", "family")}
    if c.get("versus"):  # progress advantage minus each trained reward model, paired
        out["versus"] = c["versus"]
    return out


def format_step_selection(block: dict) -> list[str]:
    """Lines for the demo's printout and report: per agent and K, PA / best baseline / random / alone."""
    lines = [f"step-level selection ({block['split']}; K candidates sampled at every step, one kept):"]
    for name, e in block["agents"].items():
        for k in block["budgets"]:
            r = e[f"k{k}"]
            c = r["step_comparison"]
            ci = c.get("difference_ci")
            best = c.get("best_baseline")
            lines.append(
                f"  {name:9s} K={k}: PA {r['step']['progress_advantage']:.3f}, {best} {r['step'].get(best, float('nan')):.3f}, "
                f"random {r['step']['random']:.3f}; alone greedy {e['greedy']:.3f}, sampled {r['sampled']:.3f}; "
                f"trajectory best-of-{k} PA {r['trajectory']['progress_advantage']:.3f}. PA - {best} "
                f"{c.get('difference', float('nan')):+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")
                + f" {c.get('verdict')}"
            )  # fmt: skip
            for b, v in (c.get("versus") or {}).items():
                ci = v.get("difference_ci")
                lines.append(f"    PA - {b} (step) {v['difference']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")
                             + f" {v['verdict']}")  # fmt: skip
            cr = r.get("candidate_ranking") or {}
            if cr.get("pairs"):
                lines.append(f"    within-state ranking of (correct, mistake) candidate pairs ({cr['pairs']} pairs): "
                             + ", ".join(f"{m} {v:.3f}" for m, v in cr["methods"].items() if v is not None))  # fmt: skip
    return lines


def step_selection_markdown(block: dict) -> list[str]:
    """A table per agent: success per method at each K (step-level; trajectory-level best-of-K), the agent alone,
    and each family member minus the best baseline with its paired interval and verdict."""
    from ..evaluation import markdown_table

    md = [f"Held-out success on {block['split']}, one episode per task and method (same world seeds); at every step the "
          "agent samples K candidate turns and keeps the one the method ranks highest. Trajectory-level best-of-K: K "
          "whole episodes sampled, the one the method ranks highest kept.", ""]  # fmt: skip
    for name, e in block["agents"].items():
        ks = block["budgets"]
        header = ["method"] + [f"step K={k}" for k in ks] + [f"trajectory best-of-{k}" for k in ks]
        rows = []
        for m in block["methods"]:
            rows.append([m] + [_cell(e[f"k{k}"]["step"].get(m)) for k in ks]
                        + [_cell(e[f"k{k}"]["trajectory"].get(m)) for k in ks])  # fmt: skip
        rows.append(["(agent alone: greedy / sampled)"] + [f"{e['greedy']:.3f} / {e[f'k{k}']['sampled']:.3f}" for k in ks]
                    + ["" for _ in ks])  # fmt: skip
        for k in ks:
            c = e[f"k{k}"]["step_comparison"]
            pairs = [(m, c.get("best_baseline"), d) for m, d in (c.get("family") or {}).items()]
            pairs += [("progress_advantage", b, d) for b, d in (c.get("versus") or {}).items()]
            for m, b, d in pairs:
                ci = d.get("difference_ci")
                rows.append([f"({m} - {b}, step K={k})", f"{d['difference']:+.3f}"
                             + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "") + f" {d['verdict']}"] + [""] * (2 * len(ks) - 1))  # fmt: skip
        md += [f"**{name}** ({AGENT_ROLES.get(name, name)})", "",
               markdown_table(header, rows), ""]  # fmt: skip
    return md


def _cell(x) -> str:
    return "-" if x is None else f"{x:.3f}"
