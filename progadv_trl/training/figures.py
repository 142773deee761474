"""Figures the callback logs: captured tensors -> per-rollout scores -> the numbers sent to `trainer.log`.

The math lives in `scoring.score_from_token_stats` (shared with the engine); application figures (AUROC, best-of-N,
attribution) come from `progadv_trl.evaluation`, so a figure logged in training means what `progadv evaluate`
reports. Nothing here runs a model or a collective.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import trl_hooks
from ..config import IMPLAUSIBLE_OFFSET, PLAUSIBLE, ScoringConfig
from ..scoring import TokenStats, TrajectoryScore, score_from_token_stats

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def turn_ids(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] 0/1 mask of model-written tokens -> turn index of each such token (contiguous runs), -1 elsewhere."""
    m = mask.bool()
    prev = torch.nn.functional.pad(m[:, :-1], (1, 0), value=False)
    ids = (m & ~prev).long().cumsum(dim=1) - 1
    return torch.where(m, ids, torch.full_like(ids, -1))


def batch_scores(batch: trl_hooks.RolloutBatch, config: ScoringConfig) -> tuple[list[TrajectoryScore], dict]:
    """One TrajectoryScore per rollout of a captured batch, plus token sums: (scores, {"lr_sum", "n", "k3_sum",
    "faulted"}).

    Rollouts with no model-written token (e.g. masked truncated completions) are left out. A rollout's `group` is
    its prompt (generation batch, row // num_generations); `success` is its reward. Tokens whose log-probs are not
    finite are left out of the sums (a NaN must not turn a logged figure into NaN); their rollouts carry `error`
    and are counted in "faulted".
    """
    pol, ref, mask = batch.policy_logps.double(), batch.ref_logps.double(), batch.mask
    ids = turn_ids(mask)
    m = mask.bool()
    ok = m & torch.isfinite(pol) & torch.isfinite(ref)
    diff = torch.where(ok, ref - pol, torch.zeros_like(pol))
    k3 = torch.exp(diff) - diff - 1  # GRPO's per-token kl estimator, to recompute its `kl` figure
    sums = {"lr_sum": float((-diff)[ok].sum()), "n": int(ok.sum()), "k3_sum": float(k3[ok].sum()),
            "faulted": int((m & ~ok).any(dim=1).sum())}  # fmt: skip
    out = []
    for b in range(mask.size(0)):
        sel = ids[b] >= 0
        if not bool(sel.any()):
            continue
        step = ids[b][sel].numpy()
        stats = TokenStats(step=step, policy_logp=pol[b][sel].numpy(), reference_logp=ref[b][sel].numpy())
        row = int(batch.rows[b]) if batch.rows is not None else b
        ts = score_from_token_stats(stats, int(step.max()) + 1, config, id=f"{batch.mode}-g{batch.generation}-r{row}")
        ts.group = f"{batch.mode}-g{batch.generation}-p{row // max(batch.num_generations, 1)}"
        if batch.rewards is not None and not math.isnan(float(batch.rewards[b])):
            ts.success = float(batch.rewards[b])
        ts.metadata = {"global_step": batch.global_step, "multi_turn": batch.multi_turn}
        out.append(ts)
    return out, sums


# ----------------------------------------------------------------------------------------------------------------
# Figures


def _finite(x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    return a[np.isfinite(a)]


def _step_values(ts: TrajectoryScore, method: str) -> np.ndarray:
    """Per-step values for the figures. The plausible variant's implausible steps are an ordering device
    (-(1e6 + shortfall)), not advantages: its figures are the plausible steps' advantages (the share of implausible
    steps is its own figure), and it has no trajectory-score mean."""
    if method == PLAUSIBLE:
        v = ts.method_steps(method)
        return np.where(v > -IMPLAUSIBLE_OFFSET / 2, v, np.nan)
    return ts.method_steps(method)


def step_figures(
    scores: list[TrajectoryScore], prefix: str, max_steps: int, by: str = "turn", method: str = "progress_advantage"
) -> dict:
    """Mean / quantiles / fraction positive of the step advantages, trajectory score mean, mean by step index, of
    `method` (the configured member of the progress-advantage family: a variant for the held-out set when one is
    configured); `out_of_support`: the share of steps flagged out of the reference's support, when computed;
    `implausible`: the share of steps that fail the policy's plausibility constraint, when the top-1 log-probs are."""
    out = {f"{prefix}rollouts": len(scores)}
    if not scores:
        return out
    from ..evaluation.labels import implausible_share, out_of_support_share

    steps = [_step_values(s, method) for s in scores]  # once per trajectory: the figures below all read them
    adv = _finite(np.concatenate(steps))
    traj = _finite([s.method_score(method) for s in scores]) if method != PLAUSIBLE else np.zeros(0)
    oos = out_of_support_share(scores)
    if oos is not None and oos["share"] is not None:
        out[f"{prefix}out_of_support"] = oos["share"]
    imp = implausible_share(scores)  # held-out scoring has it; TRL's training tensors carry no top-1 log-prob
    if imp is not None and imp["share"] is not None:
        out[f"{prefix}implausible"] = imp["share"]
    out[f"{prefix}steps_per_rollout"] = float(np.mean([len(s.steps) for s in scores]))
    if adv.size:
        out[f"{prefix}step_advantage_mean"] = float(adv.mean())
        out[f"{prefix}step_advantage_positive_frac"] = float((adv > 0).mean())
        for q, v in zip(QUANTILES, np.quantile(adv, QUANTILES)):
            out[f"{prefix}step_advantage_q{int(round(q * 100)):02d}"] = float(v)
    if traj.size:
        out[f"{prefix}score_mean"] = float(traj.mean())
    if any(len(s.steps) > 1 for s in scores) or by == "step":
        for i in range(max_steps):
            v = _finite([st[i] for st in steps if len(st) > i])
            if v.size:
                out[f"{prefix}step_advantage_by_{by}/{i}"] = float(v.mean())
    return out


def label_figures(scores: list[TrajectoryScore], prefix: str, *, success_threshold, attribution_rule, seed) -> dict:
    """AUROC, best-of-N and failure attribution per method (progadv_trl.evaluation, no bootstrap: cheap)."""
    from .. import evaluation as ev

    out = {}
    scores = ev.split_faults(scores)[0]  # a numeric fault is no score: out of every figure
    labelled = [s for s in scores if ev.is_success(s, success_threshold) is not None]
    if not labelled:
        return out
    out[f"{prefix}success_rate"] = float(np.mean([ev.is_success(s, success_threshold) for s in labelled]))
    methods = [m for m in ev.available_methods(labelled) if ev.method_available(labelled, m)]
    for m in methods:
        sp = ev.success_prediction(labelled, m, n_boot=0, seed=seed, success_threshold=success_threshold)
        if sp["auroc"] is not None:
            out[f"{prefix}auroc/{m}"] = sp["auroc"]
    grouped = [s for s in labelled if s.group is not None]
    if grouped:
        ref_done = False
        for m in methods:
            bon = ev.best_of_n(grouped, m, seed, n_boot=0, success_threshold=success_threshold)
            if bon["success"] is None:
                continue
            out[f"{prefix}best_of_n/{m}"] = bon["success"]
            if not ref_done:
                out[f"{prefix}best_of_n/random_pick"] = bon["random_pick"]
                out[f"{prefix}best_of_n/pass_at_n"] = bon["pass_at_n"]
                out[f"{prefix}best_of_n/groups"] = bon["n_groups"]
                ref_done = True
        # AUROC within each prompt group (both outcomes present), averaged: the ranking best-of-N relies on,
        # free of differences in prompt difficulty.
        by: dict[str, list] = {}
        for s in grouped:
            by.setdefault(str(s.group), []).append(s)
        for m in methods:
            vals = []
            for members in by.values():
                y = np.array([bool(ev.is_success(s, success_threshold)) for s in members])
                x = np.array([s.method_score(m) for s in members], dtype=np.float64)
                ok = np.isfinite(x)
                if ok.sum() >= 2 and y[ok].any() and not y[ok].all():
                    vals.append(ev.auroc(x[ok], y[ok]))
            if vals:
                out[f"{prefix}group_auroc/{m}"] = float(np.mean(vals))
    if any(s.failure_step is not None for s in labelled):
        for m in methods:
            fa = ev.failure_attribution(labelled, m, attribution_rule, success_threshold=success_threshold)
            if fa.get("exact") is not None:
                out[f"{prefix}attribution_exact/{m}"] = fa["exact"]
                out[f"{prefix}attribution_within1/{m}"] = fa["within1"]
        ch = ev.attribution_chance(labelled, success_threshold=success_threshold)
        if ch["exact"] is not None:
            out[f"{prefix}attribution_exact/chance"] = ch["exact"]
    return out


def steps_table(scores: list[TrajectoryScore], global_step: int):
    """One row per agent step: the per-step table written as parquet and sent to wandb/trackio."""
    import pandas as pd

    rows = []
    for s in scores:
        for st in s.steps:
            rows.append(
                {
                    "global_step": global_step,
                    "id": s.id,
                    "group": s.group,
                    "success": None if s.success is None else float(s.success),
                    "failure_step": s.failure_step,
                    "step": st.index,
                    "message_index": st.message_index,
                    "advantage": st.advantage,
                    "tokens": st.tokens,
                    "truncated": st.truncated,
                    "score": s.score,
                }
            )
    return pd.DataFrame(rows)


def token_figures(prefix: str, sums_by_rank: list[list[dict]], kind: str) -> dict:
    """Mean token log-ratio, and the trainer's own `kl` recomputed: per (micro-)batch a masked mean over all ranks,
    then the mean over the window's batches. GRPO uses the k3 estimator; RLOO the first-order one (the log-ratio)."""
    out = {}
    flat = [s for rank in sums_by_rank for s in rank]
    n = sum(s["n"] for s in flat)
    if n:
        out[f"{prefix}token_log_ratio_mean"] = sum(s["lr_sum"] for s in flat) / n
        out[f"{prefix}tokens"] = n
    faulted = sum(s.get("faulted", 0) for s in flat)
    if faulted:
        out[f"{prefix}numeric_faults"] = faulted
    lengths = {len(r) for r in sums_by_rank}
    key = "k3_sum" if kind == "grpo" else "lr_sum"
    if len(lengths) == 1 and next(iter(lengths)):
        per = []
        for j in range(next(iter(lengths))):
            k = sum(r[j][key] for r in sums_by_rank)
            c = sum(r[j]["n"] for r in sums_by_rank)
            per.append(k / max(c, 1))
        out[f"{prefix}kl"] = float(np.mean(per))
    return out
