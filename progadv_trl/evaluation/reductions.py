"""Choosing token/step reductions without scoring on the data that chose them.

`reduction_grid` names every token x step reduction as a `ScoringConfig` (for `ProgressScorer.score_many`, one
set of forward passes); `candidate_reductions` rescores stored token log-ratios without the models;
`choose_reduction` picks one by k-fold cross-validation (or a labelled validation split) and reports the held-out
figure of the *choice*. `choose_variant` picks a member of the progress-advantage family by the same protocol.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..config import PAPER_TOKEN_REDUCTIONS, SELECTION_METRICS, STEP_REDUCTIONS, TOKEN_REDUCTIONS, ScoringConfig
from .labels import is_success, labelled_arrays
from .prediction import success_prediction
from .selection import best_of_n, labelled_groups
from .stats import assign_folds, auroc

if TYPE_CHECKING:
    from ..scoring import TrajectoryScore


def reduction_grid(base: ScoringConfig | None = None) -> dict[str, ScoringConfig]:
    """Every token x step reduction, named "token/step" (e.g. "sum/sum", "paper_min/last"); other fields from
    `base`."""
    base = base or ScoringConfig()
    return {
        f"{t}/{s}": dataclasses.replace(base, token_reduction=t, step_reduction=s)
        for t in TOKEN_REDUCTIONS + PAPER_TOKEN_REDUCTIONS
        for s in STEP_REDUCTIONS
    }


def candidate_reductions(
    scores: Sequence[TrajectoryScore],
    token_reductions: Sequence[str] = TOKEN_REDUCTIONS,
    step_reductions: Sequence[str] = STEP_REDUCTIONS,
    beta: float = 1.0,
) -> dict[str, list[TrajectoryScore]]:
    """{"token/step": rescored copies} for `choose_reduction`, from each trajectory's stored per-token log-ratios
    (score with `with_token_ratios=True`), without running the models again. Baselines are kept as they are.
    The paper_* token reductions need each model's log-probs separately, so they are not offered here.
    """
    from ..scoring import aggregate, reduce_steps

    out = {}
    for ts in scores:
        if ts.token_log_ratios is None:
            raise ValueError(f"trajectory {ts.id!r}: field 'token_log_ratios' is missing; score with with_token_ratios=True")
    for tr in token_reductions:
        if tr not in TOKEN_REDUCTIONS:
            raise ValueError(f"token reduction must be one of {TOKEN_REDUCTIONS}, got {tr!r}")
        for sr in step_reductions:
            rescored = []
            for ts in scores:
                adv = [beta * aggregate(np.asarray(r, dtype=np.float64), tr) for r in ts.token_log_ratios]
                steps = [dataclasses.replace(st, advantage=a) for st, a in zip(ts.steps, adv)]
                rescored.append(dataclasses.replace(ts, steps=steps, score=reduce_steps(np.array(adv), sr)))
            out[f"{tr}/{sr}"] = rescored
    return out


def selection_metric(scores: Sequence[TrajectoryScore], metric: str, seed: int = 0, threshold=None) -> float:
    """Progress advantage's figure on `metric` (one of SELECTION_METRICS), NaN where undefined."""
    if metric == "auroc":
        s, y, _ = labelled_arrays(scores, "progress_advantage", threshold)
        return auroc(s, y) if s.size else float("nan")
    if metric == "spearman":
        v = success_prediction(scores, n_boot=0, success_threshold=threshold)["spearman"]
        return float("nan") if v is None else v
    if metric == "best_of_n":
        v = best_of_n(scores, "progress_advantage", seed, n_boot=0, success_threshold=threshold)["success"]
        return float("nan") if v is None else v
    raise ValueError(f"metric must be one of {SELECTION_METRICS}, got {metric!r}")


def _argbest(values: dict[str, float]) -> str | None:
    """Highest finite value; ties go to the first candidate (caller's order), so the choice is deterministic."""
    best, bv = None, -math.inf
    for name, v in values.items():
        if math.isfinite(v) and v > bv:
            best, bv = name, v
    return best


def _none_if_nan(v: float) -> float | None:
    return None if math.isnan(v) else v


def choose_reduction(
    candidates: Mapping[str, Sequence[TrajectoryScore]],
    metric: str = "auroc",
    k: int = 5,
    seed: int = 0,
    *,
    validation: Sequence[str] | None = None,
    folds: Mapping[str, int] | None = None,
    success_threshold: float | None = None,
) -> dict:
    """Choose a token/step reduction for progress advantage, and say how well the *choice* does on unseen data.

    `candidates` maps a name (e.g. "sum/sum", "mean/min_cumsum") to the scores of the same trajectories under
    that reduction; `ProgressScorer.score_many(trajs, reduction_grid(config))` or `candidate_reductions` build
    them. Trajectories are matched by id. `metric`: "auroc" or "spearman" (success prediction) or "best_of_n"
    (kept-rollout success).

    k-fold cross-validation (default): trajectories are split into k folds (stratified by success for
    auroc/spearman; whole groups per fold for best_of_n, so a group is never split). For each fold, every
    candidate is scored on the other k-1 folds only, the best is chosen (ties: first in `candidates` order), and
    that choice is scored on the held-out fold. `out_of_fold` is the mean of those held-out figures (for best_of_n,
    the mean over held-out groups) - the honest estimate of "tune the reduction, then use it". `per_fold` lists
    each fold's choice and held-out figure. `chosen` is the reduction picked on all the data, to use on *new*
    data; `in_sample` gives every candidate's figure on all the data and is optimistic for the chosen one.

    `validation` (a list of ids) replaces CV: choose on those trajectories, report the figure on the rest.
    `folds` (id -> fold number) fixes the folds, e.g. to reproduce a split.
    """
    if not candidates:
        raise ValueError("choose_reduction needs at least one candidate")
    if metric not in SELECTION_METRICS:
        raise ValueError(f"metric must be one of {SELECTION_METRICS}, got {metric!r}")
    names = list(candidates)
    by_id = {name: {ts.id: ts for ts in candidates[name]} for name in names}
    ids = [ts.id for ts in candidates[names[0]]]
    for name in names[1:]:
        if set(by_id[name]) != set(ids):
            raise ValueError(f"candidate {name!r} does not score the same trajectory ids as {names[0]!r}")
    if metric == "best_of_n":
        groups = labelled_groups(candidates[names[0]], success_threshold)
        ids = [ts.id for g in groups.values() for ts in g]
    else:
        ids = [i for i in ids if is_success(by_id[names[0]][i], success_threshold) is not None]

    def subset(name, keep):
        return [by_id[name][i] for i in keep]

    def figure(name, keep):
        return selection_metric(subset(name, keep), metric, seed, success_threshold)

    def score_all(keep):
        return {n: figure(n, keep) for n in names}

    out = {"metric": metric, "candidates": names, "n": len(ids)}
    in_sample = score_all(ids)
    out["in_sample"] = {n: _none_if_nan(v) for n, v in in_sample.items()}
    out["chosen"] = _argbest(in_sample)

    if validation is not None:
        val = set(validation)
        fit_ids = [i for i in ids if i in val]
        test_ids = [i for i in ids if i not in val]
        pick = _argbest(score_all(fit_ids))
        held = figure(pick, test_ids) if pick else float("nan")
        out.update(
            how=f"chosen on a labelled validation split (n={len(fit_ids)}), scored on the rest (n={len(test_ids)})",
            chosen=pick,
            held_out=_none_if_nan(held),
            n_validation=len(fit_ids),
            n_held_out=len(test_ids),
        )
        return out

    fold_of = assign_folds(candidates[names[0]], ids, metric, k, seed, folds, success_threshold)
    per_fold, weights, values = [], [], []
    for j in sorted(set(fold_of.values())):
        train = [i for i in ids if fold_of[i] != j]
        test = [i for i in ids if fold_of[i] == j]
        train_vals = score_all(train)
        pick = _argbest(train_vals)
        held = figure(pick, test) if pick else float("nan")
        n_units = len({str(by_id[names[0]][i].group) for i in test}) if metric == "best_of_n" else len(test)
        per_fold.append({
            "fold": int(j), "chosen": pick, "held_out": _none_if_nan(held),
            "train": {n: _none_if_nan(v) for n, v in train_vals.items()},
            "n_train": len(train), "n_held_out": len(test),
        })  # fmt: skip
        if math.isfinite(held):
            values.append(held)
            weights.append(n_units if metric == "best_of_n" else 1)
    oof = float(np.average(values, weights=weights)) if values else None
    out.update(
        how=f"{len(per_fold)}-fold cross-validation on {metric}: chosen on k-1 folds, scored on the held-out fold",
        k=len(per_fold),
        out_of_fold=oof,
        per_fold=per_fold,
        fold_of=fold_of,
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Choosing a member of the progress-advantage family (progress_advantage or a variant): the same protocol


def variant_candidates(scores: Sequence[TrajectoryScore]) -> dict[str, list[TrajectoryScore]]:
    """{member: copies of the scores whose progress_advantage (score and step advantages) is that member's}, for
    every member of the progress-advantage family the scores carry (progress_advantage first, then the variants
    in `available_methods` order), so `choose_reduction` can choose among them unchanged."""
    from ..config import in_family
    from .labels import available_methods, method_available

    out = {}
    for m in available_methods(scores):
        if not in_family(m) or not method_available(scores, m):
            continue
        out[m] = [
            dataclasses.replace(
                ts, score=ts.method_score(m),
                steps=[dataclasses.replace(st, advantage=float(a)) for st, a in zip(ts.steps, ts.method_steps(m))],
            )
            for ts in scores
        ]  # fmt: skip
    return out


def choose_variant(
    scores: Sequence[TrajectoryScore],
    metric: str = "auroc",
    k: int = 5,
    seed: int = 0,
    *,
    validation: Sequence[str] | None = None,
    folds: Mapping[str, int] | None = None,
    success_threshold: float | None = None,
) -> dict:
    """Choose one member of the progress-advantage family by k-fold cross-validation (or a validation split) on
    `metric`, exactly as `choose_reduction` chooses a reduction: each fold's choice is made on the other folds and
    scored on it, so `out_of_fold` is never computed on the data that made the choice; `chosen` (picked on all
    the data) is the one to use on new data. Score with `ScoringConfig(support=True)` so the variants are there."""
    cands = variant_candidates(scores)
    res = choose_reduction(
        cands, metric, k, seed, validation=validation, folds=folds, success_threshold=success_threshold
    )
    res["what"] = "progress-advantage variant (progress_advantage or a progress_advantage_... variant)"
    return res
