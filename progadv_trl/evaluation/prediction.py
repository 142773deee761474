"""Success prediction: how well a trajectory's score ranks successes above failures (AUROC, Spearman)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy import stats

from .labels import labelled_arrays
from .stats import auroc, auroc_stat, bootstrap_ci, spearman_stat

if TYPE_CHECKING:
    from ..scoring import TrajectoryScore


def success_prediction(
    scores: Sequence[TrajectoryScore],
    method: str = "progress_advantage",
    n_boot: int = 1000,
    seed: int = 0,
    *,
    success_threshold: float | None = None,
) -> dict:
    """AUROC of the score for success and Spearman's rho against the raw `success` value, each with a 95 % CI.

    AUROC: sklearn's `roc_auc_score` (ties count half); its interval is a stratified bootstrap (positives and
    negatives resampled separately, so each resample has both classes). Spearman: `scipy.stats.spearmanr` against
    the raw label (the reward when `success` is a float, 0/1 for a bool); paired bootstrap interval. Only labelled
    trajectories with a finite score count; `n` and `n_pos` say how many. Undefined figures are None.
    """
    s, y, r = labelled_arrays(scores, method, success_threshold)
    n, n_pos = int(s.size), int(y.sum())
    out = {"method": method, "n": n, "n_pos": n_pos, "auroc": None, "auroc_ci": None, "spearman": None,
           "spearman_ci": None}  # fmt: skip
    if n_pos > 0 and n - n_pos > 0:
        out["auroc"] = auroc(s, y)
        pos, neg = s[y == 1], s[y == 0]
        out["auroc_ci"] = bootstrap_ci((pos, neg), auroc_stat, paired=False, n_boot=n_boot, seed=seed)
    if n >= 3 and np.ptp(s) > 0 and np.ptp(r) > 0:
        out["spearman"] = float(stats.spearmanr(s, r).statistic)
        out["spearman_ci"] = bootstrap_ci((s, r), spearman_stat, paired=True, n_boot=n_boot, seed=seed)
    return out
