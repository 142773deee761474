"""Failure attribution: which step of a failed run is named as the mistake, and how often that is right.

Accuracy is measured on failed trajectories with a labelled `failure_step` (an assistant-turn index), beside the
chance of naming a uniformly random step. The threshold rule's threshold is chosen by k-fold CV, never on the
trajectories it is scored on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..config import ATTRIBUTION_RULES
from .labels import is_success
from .stats import fold_ids

if TYPE_CHECKING:
    from ..scoring import TrajectoryScore


def attribute_failure(step_values, rule: str = "min_cumsum", threshold: float = 0.0) -> int:
    """The predicted decisive step (0-based assistant-turn index) of one failed trajectory.

    min_cumsum: where the cumulative advantage reaches its minimum (the end of the worst run of steps);
    min_step: the lowest single step; threshold: the first step below `threshold`, or the lowest step when none
    is. NaN steps (cut by truncation) add nothing to the cumulative sum and are never predicted. Ties go to the
    earliest step. Raises ValueError when no step has a value.
    """
    v = np.asarray(step_values, dtype=np.float64)
    ok = ~np.isnan(v)
    if not ok.any():
        raise ValueError("no step has a value (every step NaN or no steps)")
    if rule == "min_cumsum":
        c = np.cumsum(np.where(ok, v, 0.0))
        return int(np.argmin(np.where(ok, c, np.inf)))
    if rule == "min_step":
        return int(np.argmin(np.where(ok, v, np.inf)))
    if rule == "threshold":
        below = np.flatnonzero(ok & (v < threshold))
        return int(below[0]) if below.size else int(np.argmin(np.where(ok, v, np.inf)))
    raise ValueError(f"rule must be one of {ATTRIBUTION_RULES}, got {rule!r}")


def _valid_label(f, n_steps: int) -> bool:
    return isinstance(f, (int, np.integer)) and not isinstance(f, bool) and 0 <= f < n_steps


def _attribution_cases(scores, method, threshold):
    """[(step values, labelled failure step)] of failed trajectories whose label indexes one of their steps."""
    cases, invalid = [], 0
    for ts in scores:
        if ts.failure_step is None or is_success(ts, threshold) is not False:
            continue
        v = ts.method_steps(method)
        f = ts.failure_step
        if not _valid_label(f, v.size) or np.isnan(v).all():
            invalid += 1
            continue
        cases.append((v, int(f)))
    return cases, invalid


def _accuracy(preds: Sequence[int], labels: Sequence[int]) -> dict:
    p, f = np.asarray(preds), np.asarray(labels)
    if p.size == 0:
        return {"exact": None, "within1": None, "mae": None, "n": 0}
    d = np.abs(p - f)
    return {"exact": float((d == 0).mean()), "within1": float((d <= 1).mean()), "mae": float(d.mean()), "n": int(p.size)}


def _best_threshold(cases) -> float:
    """Threshold with the best exact accuracy (then lowest MAE) among quantiles of the cases' step values."""
    vals = np.concatenate([v[~np.isnan(v)] for v, _ in cases])
    cands = np.unique(np.quantile(vals, np.linspace(0.02, 0.98, 49)))
    best, best_key = float(cands[0]), None
    for t in cands:
        acc = _accuracy([attribute_failure(v, "threshold", t) for v, _ in cases], [f for _, f in cases])
        key = (acc["exact"], -acc["mae"])
        if best_key is None or key > best_key:
            best, best_key = float(t), key
    return best


def failure_attribution(
    scores: Sequence[TrajectoryScore],
    method: str = "progress_advantage",
    rule: str = "min_cumsum",
    *,
    threshold: float | str = 0.0,
    k: int = 5,
    seed: int = 0,
    success_threshold: float | None = None,
) -> dict:
    """Exact accuracy, accuracy within +-1 step and mean absolute error of `attribute_failure` on failed
    trajectories with a labelled `failure_step`; `n` counts them (`n_invalid`: labels outside the steps).

    For rule "threshold", `threshold="cv"` chooses it by k-fold cross-validation: on the k-1 other folds the
    quantile of their step values with the best exact accuracy, applied to the held-out fold; `thresholds` lists
    the per-fold choices. A fixed number is used as is (0.0 suits progress advantage: a step worse than expected).
    """
    if rule not in ATTRIBUTION_RULES:
        raise ValueError(f"rule must be one of {ATTRIBUTION_RULES}, got {rule!r}")
    cases, invalid = _attribution_cases(scores, method, success_threshold)
    labels = [f for _, f in cases]
    out = {"method": method, "rule": rule}
    if rule == "threshold" and threshold == "cv":
        kk = min(k, len(cases))
        if kk < 2:
            out.update(_accuracy([], []), n_invalid=invalid, threshold="cv", skipped="fewer than 2 labelled failures")
            return out
        folds = fold_ids(len(cases), kk, seed)
        preds, chosen = [0] * len(cases), []
        for j in range(kk):
            t = _best_threshold([c for c, fo in zip(cases, folds) if fo != j])
            chosen.append(t)
            for i in np.flatnonzero(folds == j):
                preds[i] = attribute_failure(cases[i][0], "threshold", t)
        out.update(_accuracy(preds, labels), n_invalid=invalid, threshold="cv", thresholds=chosen, k=kk)
        return out
    if isinstance(threshold, str):
        raise ValueError(f"threshold must be a number or 'cv', got {threshold!r}")
    preds = [attribute_failure(v, rule, threshold) for v, _ in cases]
    out.update(_accuracy(preds, labels), n_invalid=invalid)
    if rule == "threshold":
        out["threshold"] = float(threshold)
    return out


def attribution_chance(scores: Sequence[TrajectoryScore], *, success_threshold: float | None = None) -> dict:
    """Expected exact / within-1 / MAE of naming a uniformly random step, over the same labelled failures."""
    ex, w1, mae, n = [], [], [], 0
    for ts in scores:
        f = ts.failure_step
        if f is None or is_success(ts, success_threshold) is not False:
            continue
        n_steps = len(ts.steps)
        if not _valid_label(f, n_steps):
            continue
        d = np.abs(np.arange(n_steps) - f)
        ex.append(1 / n_steps)
        w1.append(float((d <= 1).mean()))
        mae.append(float(d.mean()))
        n += 1
    if not n:
        return {"exact": None, "within1": None, "mae": None, "n": 0}
    return {"exact": float(np.mean(ex)), "within1": float(np.mean(w1)), "mae": float(np.mean(mae)), "n": n}
