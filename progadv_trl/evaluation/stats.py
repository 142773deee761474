"""Statistics: AUROC, vectorised statistics for the bootstrap, 95 % bootstrap intervals (scipy) and folds.

Every interval is a `scipy.stats.bootstrap` BCa interval (the percentile interval of the same resamples where BCa
is undefined). The `*_stat` functions are vectorised along `axis`, as `scipy.stats.bootstrap(vectorized=True)`
needs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy import stats

from .labels import is_success

if TYPE_CHECKING:
    from ..scoring import TrajectoryScore

CONFIDENCE = 0.95


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC with ties counted half (sklearn's `roc_auc_score`); NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def auroc_stat(pos: np.ndarray, neg: np.ndarray, axis: int = -1) -> np.ndarray:
    """AUROC as the Mann-Whitney U over n_pos * n_neg pairs: P(pos > neg) + 0.5 P(pos == neg). Vectorised."""
    n_pos, n_neg = pos.shape[axis], neg.shape[axis]
    ranks = stats.rankdata(np.concatenate([pos, neg], axis=axis), axis=axis)  # average ranks: ties count half
    r_pos = np.take(ranks, np.arange(n_pos), axis=axis).sum(axis=axis)
    return (r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def spearman_stat(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's rho (Pearson of average ranks) along `axis`; NaN where either side is constant. Vectorised."""
    rx = stats.rankdata(x, axis=axis)
    ry = stats.rankdata(y, axis=axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    den = np.sqrt((rx * rx).sum(axis=axis) * (ry * ry).sum(axis=axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(axis=axis) / np.where(den > 0, den, 1.0), np.nan)


def mean_stat(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x.mean(axis=axis)


def ratio_stat(num: np.ndarray, den: np.ndarray, axis: int = -1) -> np.ndarray:
    """sum(num) / sum(den): e.g. successes over rollouts, pooled over groups."""
    return num.sum(axis=axis) / den.sum(axis=axis)


def bootstrap_ci(
    data: tuple[np.ndarray, ...],
    statistic: Callable,
    *,
    paired: bool,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> list[float] | None:
    """[low, high] of a `scipy.stats.bootstrap` BCa interval; None when n_boot is 0, a sample has fewer than two
    observations, or no resample is defined.

    `paired=False` with several samples resamples each one on its own: for AUROC over (positives, negatives) this
    is the stratified bootstrap, so no resample lacks a class. Data that cannot vary (every value equal) gives the
    degenerate interval [v, v] rather than scipy's NaN. Where BCa is undefined (e.g. NaN in some resamples) the
    percentile interval of the finite resamples is returned instead.
    """
    data = tuple(np.asarray(d, dtype=np.float64) for d in data)
    if n_boot <= 0 or any(d.size < 2 for d in data):  # one observation (e.g. a single failure) cannot vary
        return None
    point = float(statistic(*data, axis=-1))
    if all(np.all(d == d[0]) for d in data):
        return None if math.isnan(point) else [point, point]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's DegenerateDataWarning / NaN warnings: handled below
        res = stats.bootstrap(
            data,
            statistic,
            paired=paired,
            vectorized=True,
            n_resamples=n_boot,
            confidence_level=confidence,
            method="BCa",
            rng=np.random.default_rng(seed),
        )
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if math.isfinite(lo) and math.isfinite(hi):
        return [lo, hi]
    dist = np.asarray(res.bootstrap_distribution, dtype=np.float64)
    dist = dist[np.isfinite(dist)]
    if dist.size == 0:
        return None
    alpha = (1 - confidence) / 2
    return [float(np.quantile(dist, alpha)), float(np.quantile(dist, 1 - alpha))]


# ----------------------------------------------------------------------------------------------------------------
# Folds for cross-validated choices


def fold_ids(n: int, k: int, seed: int) -> np.ndarray:
    """Fold of each of n items: a seeded permutation dealt round-robin into k folds."""
    perm = np.random.default_rng(seed).permutation(n)
    folds = np.empty(n, dtype=int)
    folds[perm] = np.arange(n) % k
    return folds


def assign_folds(
    scores: Sequence[TrajectoryScore],
    ids: Sequence[str],
    metric: str,
    k: int,
    seed: int,
    folds: Mapping[str, int] | None = None,
    threshold: float | None = None,
) -> dict[str, int]:
    """{trajectory id: fold} for the ids to cross-validate over.

    `folds` given: used as is (every id must be in it). best_of_n: whole groups per fold, so a group is never
    split. Otherwise stratified: successes and failures are dealt round-robin separately, so every fold has both
    classes when possible.
    """
    if folds is not None:
        missing = [i for i in ids if i not in folds]
        if missing:
            raise ValueError(f"folds has no entry for trajectory {missing[0]!r}")
        return {i: int(folds[i]) for i in ids}
    by_id = {ts.id: ts for ts in scores}
    if metric == "best_of_n":
        gs = sorted({str(by_id[i].group) for i in ids})
        kk = max(2, min(k, len(gs)))
        gf = dict(zip(gs, fold_ids(len(gs), kk, seed)))
        return {i: int(gf[str(by_id[i].group)]) for i in ids}
    y = np.array([bool(is_success(by_id[i], threshold)) for i in ids])
    kk = max(2, min(k, len(ids)))
    out = {}
    for cls in (True, False):
        members = [i for i, yy in zip(ids, y) if yy == cls]
        rng = np.random.default_rng([seed, int(cls)])
        order = rng.permutation(len(members))
        for r, idx in enumerate(order):
            out[members[idx]] = int(r % kk)
    return out
