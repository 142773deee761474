"""What a score is for: best-of-N selection, success prediction (+ calibration) and failure attribution.

Inputs are `TrajectoryScore`s (see `scoring.py`); every method's score is "higher = more likely to succeed".
Honesty rules this module keeps:

- Every figure carries the n it was computed on, and intervals are 95 % bootstrap intervals from
  `scipy.stats.bootstrap` (BCa; the percentile interval of the same resamples where BCa is undefined).
- Nothing is tuned on the data it is scored on: token/step reductions are chosen by `choose_reduction` (k-fold
  cross-validation or a labelled validation split) and the attribution threshold by k-fold CV; calibration is
  fitted on one split and judged on the other.
- Reference points sit beside every method: the expected success of a random pick, oracle pass@N, mean@N, and
  the chance accuracy of naming a random step as the mistake.

Labels: `success` may be a bool or a float reward; a float counts as a success when it is > `success_threshold`
(0 by default). Unlabelled trajectories (`success` None) are left out of every metric that needs a label.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import numpy as np
from scipy import stats

from .scoring import METHODS, STEP_REDUCTIONS, TOKEN_REDUCTIONS, TrajectoryScore, aggregate, reduce_steps

ATTRIBUTION_RULES = ("min_cumsum", "min_step", "threshold")
SELECTION_METRICS = ("auroc", "spearman", "best_of_n")
CONFIDENCE = 0.95


# ----------------------------------------------------------------------------------------------------------------
# Labels


def success_value(ts: TrajectoryScore) -> float | None:
    """The raw label as a float (a bool becomes 0/1); None when unlabelled. Bad types name the record and field."""
    s = ts.success
    if s is None:
        return None
    if isinstance(s, (bool, np.bool_)):
        return float(s)
    if isinstance(s, (int, float, np.integer, np.floating)):
        s = float(s)
        return None if math.isnan(s) else s
    raise ValueError(f"trajectory {ts.id!r}: field 'success' must be a bool or a number, got {type(s).__name__} {s!r}")


def is_success(ts: TrajectoryScore, threshold: float | None = None) -> bool | None:
    """True/False, or None when unlabelled. A bool label is taken as is; a number succeeds when > threshold (0)."""
    if isinstance(ts.success, (bool, np.bool_)):
        return bool(ts.success)
    v = success_value(ts)
    if v is None:
        return None
    return v > (0.0 if threshold is None else threshold)


def method_available(scores: Sequence[TrajectoryScore], method: str) -> bool:
    """A method is evaluated only if some trajectory has a finite score for it (a baseline not computed is all NaN)."""
    return any(math.isfinite(ts.method_score(method)) for ts in scores)


# ----------------------------------------------------------------------------------------------------------------
# Bootstrap intervals (scipy), vectorised statistics


def _auroc_stat(pos: np.ndarray, neg: np.ndarray, axis: int = -1) -> np.ndarray:
    """AUROC as the Mann-Whitney U over n_pos * n_neg pairs: P(pos > neg) + 0.5 P(pos == neg). Vectorised."""
    n_pos, n_neg = pos.shape[axis], neg.shape[axis]
    ranks = stats.rankdata(np.concatenate([pos, neg], axis=axis), axis=axis)  # average ranks: ties count half
    r_pos = np.take(ranks, np.arange(n_pos), axis=axis).sum(axis=axis)
    return (r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _spearman_stat(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's rho (Pearson of average ranks) along `axis`; NaN where either side is constant. Vectorised."""
    rx = stats.rankdata(x, axis=axis)
    ry = stats.rankdata(y, axis=axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    den = np.sqrt((rx * rx).sum(axis=axis) * (ry * ry).sum(axis=axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(axis=axis) / np.where(den > 0, den, 1.0), np.nan)


def _mean_stat(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x.mean(axis=axis)


def _ratio_stat(num: np.ndarray, den: np.ndarray, axis: int = -1) -> np.ndarray:
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
# Best-of-N


def _groups(scores: Sequence[TrajectoryScore], threshold: float | None) -> dict[str, list[TrajectoryScore]]:
    """Labelled trajectories by `group`; groups with fewer than two labelled members leave nothing to select."""
    by = defaultdict(list)
    for ts in scores:
        if ts.group is not None and is_success(ts, threshold) is not None:
            by[str(ts.group)].append(ts)
    return {g: v for g, v in sorted(by.items()) if len(v) >= 2}


def best_of_n(
    scores: Sequence[TrajectoryScore],
    method: str = "progress_advantage",
    seed: int = 0,
    *,
    n_boot: int = 1000,
    success_threshold: float | None = None,
) -> dict:
    """Keep the highest-scoring rollout of every group; report how often the kept one succeeded.

    Ties for the top score are broken at random with `seed` (`success`), and `success_tie_expected` is the same
    figure averaged exactly over the tie-break. A NaN score (e.g. a fully truncated trajectory) ranks below every
    number, so all methods select from the same groups. Reference points over the same groups: `random_pick`
    (expected success of a uniformly random rollout = mean of the group success rates), `pass_at_n` (oracle: the
    group has a success), `mean_at_n` (success rate pooled over all rollouts; equals `random_pick` when groups
    have equal sizes). `gain_over_random` = mean over groups of (kept success - group success rate), with a
    paired interval. Intervals resample groups. `selected` maps group -> kept trajectory id.
    """
    groups = _groups(scores, success_threshold)
    rng = np.random.default_rng(seed)
    kept, kept_exp, rates, any_succ, n_succ, sizes, selected = [], [], [], [], [], [], {}
    for g, members in groups.items():
        y = np.array([float(is_success(t, success_threshold)) for t in members])
        s = np.array([t.method_score(method) for t in members], dtype=np.float64)
        s = np.where(np.isnan(s), -np.inf, s)
        top = np.flatnonzero(s == s.max())
        pick = int(top[0]) if top.size == 1 else int(rng.choice(top))
        selected[g] = members[pick].id
        kept.append(y[pick])
        kept_exp.append(y[top].mean())
        rates.append(y.mean())
        any_succ.append(float(y.max()))
        n_succ.append(y.sum())
        sizes.append(float(len(members)))
    out = {"method": method, "n_groups": len(groups), "n_trajectories": int(sum(sizes))}
    if not groups:
        out.update(
            success=None, success_ci=None, success_tie_expected=None, gain_over_random=None, gain_over_random_ci=None,
            random_pick=None, random_pick_ci=None, pass_at_n=None, pass_at_n_ci=None, mean_at_n=None,
            mean_at_n_ci=None, group_size={"min": None, "max": None, "mean": None}, selected={},
        )  # fmt: skip
        return out
    kept, kept_exp, rates = np.array(kept), np.array(kept_exp), np.array(rates)
    any_succ, n_succ, sizes = np.array(any_succ), np.array(n_succ), np.array(sizes)
    ci = dict(n_boot=n_boot, seed=seed)
    out.update(
        success=float(kept.mean()),
        success_ci=bootstrap_ci((kept,), _mean_stat, paired=False, **ci),
        success_tie_expected=float(kept_exp.mean()),
        gain_over_random=float((kept - rates).mean()),
        gain_over_random_ci=bootstrap_ci((kept - rates,), _mean_stat, paired=False, **ci),
        random_pick=float(rates.mean()),
        random_pick_ci=bootstrap_ci((rates,), _mean_stat, paired=False, **ci),
        pass_at_n=float(any_succ.mean()),
        pass_at_n_ci=bootstrap_ci((any_succ,), _mean_stat, paired=False, **ci),
        mean_at_n=float(n_succ.sum() / sizes.sum()),
        mean_at_n_ci=bootstrap_ci((n_succ, sizes), _ratio_stat, paired=True, **ci),
        group_size={"min": int(sizes.min()), "max": int(sizes.max()), "mean": float(sizes.mean())},
        selected=selected,
    )
    return out


def best_of_n_table(
    scores: Sequence[TrajectoryScore],
    methods: Sequence[str] = METHODS,
    seed: int = 0,
    *,
    n_boot: int = 1000,
    success_threshold: float | None = None,
) -> dict:
    """{"methods": {method: best_of_n(...)}, "reference": {random_pick, pass_at_n, mean_at_n, ...}}.

    Methods with no finite score anywhere are listed under "skipped".
    """
    res, skipped = {}, []
    for m in methods:
        if not method_available(scores, m):
            skipped.append(m)
            continue
        res[m] = best_of_n(scores, m, seed, n_boot=n_boot, success_threshold=success_threshold)
    ref = _reference_from(next(iter(res.values()))) if res else None
    return {"methods": res, "reference": ref, "skipped": skipped}


def _reference_from(bon: dict) -> dict:
    keys = ("n_groups", "n_trajectories", "group_size", "random_pick", "random_pick_ci", "pass_at_n", "pass_at_n_ci",
            "mean_at_n", "mean_at_n_ci")  # fmt: skip
    return {k: bon[k] for k in keys}


# ----------------------------------------------------------------------------------------------------------------
# Success prediction


def _labelled(scores, method, threshold):
    """(finite scores, binary labels, raw labels) of labelled trajectories with a finite score for `method`."""
    s, y, r = [], [], []
    for ts in scores:
        lab = is_success(ts, threshold)
        v = ts.method_score(method)
        if lab is None or not math.isfinite(v):
            continue
        s.append(v)
        y.append(float(lab))
        r.append(success_value(ts))
    return np.array(s, dtype=np.float64), np.array(y, dtype=np.float64), np.array(r, dtype=np.float64)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC with ties counted half (sklearn's `roc_auc_score`); NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


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
    s, y, r = _labelled(scores, method, success_threshold)
    n, n_pos = int(s.size), int(y.sum())
    out = {"method": method, "n": n, "n_pos": n_pos, "auroc": None, "auroc_ci": None, "spearman": None,
           "spearman_ci": None}  # fmt: skip
    if n_pos > 0 and n - n_pos > 0:
        out["auroc"] = auroc(s, y)
        pos, neg = s[y == 1], s[y == 0]
        out["auroc_ci"] = bootstrap_ci((pos, neg), _auroc_stat, paired=False, n_boot=n_boot, seed=seed)
    if n >= 3 and np.ptp(s) > 0 and np.ptp(r) > 0:
        out["spearman"] = float(stats.spearmanr(s, r).statistic)
        out["spearman_ci"] = bootstrap_ci((s, r), _spearman_stat, paired=True, n_boot=n_boot, seed=seed)
    return out


class Calibrator:
    """P(success) from a raw score: Platt scaling (sklearn LogisticRegression) or isotonic (IsotonicRegression).

    Fit on labelled data that you will not evaluate on. `predict` is plain numpy over the stored parameters, so
    `to_dict()` / `from_dict()` (JSON-serialisable; a bundle manifest can hold it) reproduce it exactly.
    Platt standardises the score first and is barely regularised (C=1e4), so it is a fit, not a prior.
    Isotonic picks its direction from the data (`increasing="auto"`), because on-policy scores can be inverted;
    outside the fitted range it clips.
    """

    KINDS = ("platt", "isotonic")

    def __init__(self, kind: str = "platt"):
        if kind not in self.KINDS:
            raise ValueError(f"calibration kind must be one of {self.KINDS}, got {kind!r}")
        self.kind = kind
        self.params: dict | None = None

    def fit(self, scores, labels) -> "Calibrator":
        s = np.asarray(scores, dtype=np.float64).ravel()
        y = np.asarray(labels, dtype=np.float64).ravel().astype(bool)
        keep = np.isfinite(s)
        s, y = s[keep], y[keep]
        if s.size == 0 or y.all() or not y.any():
            raise ValueError("calibration needs finite scores with both successes and failures")
        if self.kind == "platt":
            from sklearn.linear_model import LogisticRegression

            mu, sd = float(s.mean()), float(s.std()) or 1.0
            lr = LogisticRegression(C=1e4).fit(((s - mu) / sd)[:, None], y)
            self.params = {"mean": mu, "std": sd, "coef": float(lr.coef_[0, 0]), "intercept": float(lr.intercept_[0])}
        else:
            from sklearn.isotonic import IsotonicRegression

            iso = IsotonicRegression(out_of_bounds="clip", increasing="auto", y_min=0.0, y_max=1.0).fit(s, y)
            self.params = {
                "x": [float(v) for v in iso.X_thresholds_],
                "y": [float(v) for v in iso.y_thresholds_],
                "increasing": bool(iso.increasing_),
            }
        self.params["n"] = int(s.size)
        self.params["n_pos"] = int(y.sum())
        return self

    def predict(self, scores) -> np.ndarray:
        """P(success) in [0, 1]; NaN where the score is NaN."""
        if self.params is None:
            raise RuntimeError("Calibrator.predict called before fit")
        s = np.asarray(scores, dtype=np.float64)
        p = self.params
        if self.kind == "platt":
            z = p["coef"] * (s - p["mean"]) / p["std"] + p["intercept"]
            return 1.0 / (1.0 + np.exp(-z))
        x, y = np.asarray(p["x"]), np.asarray(p["y"])
        if x.size == 1:
            return np.where(np.isnan(s), np.nan, y[0])
        return np.where(np.isnan(s), np.nan, np.interp(s, x, y))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "params": self.params}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Calibrator":
        c = cls(d["kind"])
        c.params = dict(d["params"]) if d.get("params") is not None else None
        return c


def _split(y: np.ndarray, fit_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, eval), stratified by label when both classes have at least two members."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(y.size)
    strat = y if min(y.sum(), (1 - y).sum()) >= 2 else None
    return train_test_split(idx, train_size=fit_fraction, random_state=seed, stratify=strat)


def calibration_report(
    scores: Sequence[TrajectoryScore],
    method: str,
    *,
    kind: str = "platt",
    fit_fraction: float | None = 0.5,
    seed: int = 0,
    success_threshold: float | None = None,
) -> dict:
    """Fit a `Calibrator` on a seeded stratified split, judge it on the rest, and ship one fitted on all labels.

    Held-out figures: `brier` (mean squared error of P(success)), `brier_base_rate` (predicting the fit split's
    success rate for everyone: the bar to beat), `log_loss` and `ece` (10 equal-width bins). `calibrator` is
    refitted on every labelled trajectory, for use on new data; its held-out quality is the figures above.
    """
    s, y, _ = _labelled(scores, method, success_threshold)
    out = {"method": method, "kind": kind, "n": int(s.size), "n_pos": int(y.sum())}
    if s.size < 4 or y.sum() < 2 or (1 - y).sum() < 2:
        out["skipped"] = "needs at least two successes and two failures"
        return out
    if fit_fraction is not None:
        fi, ev = _split(y, fit_fraction, seed)
        if y[fi].all() or not y[fi].any():
            out["skipped"] = "the fit split has one class"
        else:
            cal = Calibrator(kind).fit(s[fi], y[fi])
            p = np.clip(cal.predict(s[ev]), 1e-12, 1 - 1e-12)
            base = float(y[fi].mean())
            out.update(
                n_fit=int(fi.size),
                n_eval=int(ev.size),
                brier=float(np.mean((p - y[ev]) ** 2)),
                brier_base_rate=float(np.mean((base - y[ev]) ** 2)),
                log_loss=float(-np.mean(y[ev] * np.log(p) + (1 - y[ev]) * np.log(1 - p))),
                ece=_ece(p, y[ev]),
            )
    out["calibrator"] = Calibrator(kind).fit(s, y).to_dict()
    return out


def _ece(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    err = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            err += m.mean() * abs(p[m].mean() - y[m].mean())
    return float(err)


# ----------------------------------------------------------------------------------------------------------------
# Failure attribution


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


def _attribution_cases(scores, method, threshold):
    """[(step values, labelled failure step)] of failed trajectories whose label indexes one of their steps."""
    cases, invalid = [], 0
    for ts in scores:
        if ts.failure_step is None or is_success(ts, threshold) is not False:
            continue
        v = ts.method_steps(method)
        f = ts.failure_step
        if not isinstance(f, (int, np.integer)) or isinstance(f, bool) or not 0 <= f < v.size or np.isnan(v).all():
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


def _fold_ids(n: int, k: int, seed: int) -> np.ndarray:
    """Fold of each of n items: a seeded permutation dealt round-robin into k folds."""
    perm = np.random.default_rng(seed).permutation(n)
    folds = np.empty(n, dtype=int)
    folds[perm] = np.arange(n) % k
    return folds


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
        folds = _fold_ids(len(cases), kk, seed)
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
        if not isinstance(f, (int, np.integer)) or isinstance(f, bool) or not 0 <= f < n_steps:
            continue
        d = np.abs(np.arange(n_steps) - f)
        ex.append(1 / n_steps)
        w1.append(float((d <= 1).mean()))
        mae.append(float(d.mean()))
        n += 1
    if not n:
        return {"exact": None, "within1": None, "mae": None, "n": 0}
    return {"exact": float(np.mean(ex)), "within1": float(np.mean(w1)), "mae": float(np.mean(mae)), "n": n}


# ----------------------------------------------------------------------------------------------------------------
# Choosing token/step reductions without scoring on the data that chose them


def _metric(scores: Sequence[TrajectoryScore], metric: str, seed: int, threshold) -> float:
    if metric == "auroc":
        s, y, _ = _labelled(scores, "progress_advantage", threshold)
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
    that reduction; `candidate_reductions` builds them from stored token log-ratios, or the caller rescores
    (`scoring.score_from_token_stats` with a `ScoringConfig`, or the engine). Trajectories are matched by id. `metric`: "auroc" or "spearman" (success prediction) or
    "best_of_n" (kept-rollout success).

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
        groups = _groups(candidates[names[0]], success_threshold)
        ids = [ts.id for g in groups.values() for ts in g]
    else:
        ids = [i for i in ids if is_success(by_id[names[0]][i], success_threshold) is not None]

    def subset(name, keep):
        return [by_id[name][i] for i in keep]

    def score_all(keep):
        return {n: _metric(subset(n, keep), metric, seed, success_threshold) for n in names}

    out = {"metric": metric, "candidates": names, "n": len(ids)}
    in_sample = score_all(ids)
    out["in_sample"] = {n: (None if math.isnan(v) else v) for n, v in in_sample.items()}
    out["chosen"] = _argbest(in_sample)

    if validation is not None:
        val = set(validation)
        fit_ids = [i for i in ids if i in val]
        test_ids = [i for i in ids if i not in val]
        pick = _argbest(score_all(fit_ids))
        held = _metric(subset(pick, test_ids), metric, seed, success_threshold) if pick else float("nan")
        out.update(
            how=f"chosen on a labelled validation split (n={len(fit_ids)}), scored on the rest (n={len(test_ids)})",
            chosen=pick,
            held_out=None if math.isnan(held) else held,
            n_validation=len(fit_ids),
            n_held_out=len(test_ids),
        )
        return out

    fold_of = _assign_folds(candidates[names[0]], ids, metric, k, seed, folds, success_threshold)
    per_fold, weights, values = [], [], []
    for j in sorted(set(fold_of.values())):
        train = [i for i in ids if fold_of[i] != j]
        test = [i for i in ids if fold_of[i] == j]
        train_vals = score_all(train)
        pick = _argbest(train_vals)
        held = _metric(subset(pick, test), metric, seed, success_threshold) if pick else float("nan")
        n_units = len({str(by_id[names[0]][i].group) for i in test}) if metric == "best_of_n" else len(test)
        per_fold.append({
            "fold": int(j), "chosen": pick, "held_out": None if math.isnan(held) else held,
            "train": {n: (None if math.isnan(v) else v) for n, v in train_vals.items()},
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
                steps = [replace(st, advantage=a) for st, a in zip(ts.steps, adv)]
                rescored.append(replace(ts, steps=steps, score=reduce_steps(np.array(adv), sr)))
            out[f"{tr}/{sr}"] = rescored
    return out


def _assign_folds(scores, ids, metric, k, seed, folds, threshold) -> dict[str, int]:
    if folds is not None:
        missing = [i for i in ids if i not in folds]
        if missing:
            raise ValueError(f"folds has no entry for trajectory {missing[0]!r}")
        return {i: int(folds[i]) for i in ids}
    by_id = {ts.id: ts for ts in scores}
    if metric == "best_of_n":
        gs = sorted({str(by_id[i].group) for i in ids})
        kk = max(2, min(k, len(gs)))
        gf = dict(zip(gs, _fold_ids(len(gs), kk, seed)))
        return {i: int(gf[str(by_id[i].group)]) for i in ids}
    # Stratified: deal successes and failures round-robin separately, so every fold has both when possible.
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


# ----------------------------------------------------------------------------------------------------------------
# Everything at once: the metrics.json structure


def _clean(x):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    return x


def evaluate(
    scores: Sequence[TrajectoryScore],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    methods: Sequence[str] = METHODS,
    calibration_split: float | None = 0.5,
    calibration: str = "platt",
    success_threshold: float | None = None,
    attribution_threshold: float | str = "cv",
    k: int = 5,
    reduction: Mapping | None = None,
    reduction_selection: Mapping | None = None,
) -> dict:
    """Every application metric for every available method: the content of `metrics.json` (JSON-safe, no NaN).

    Per method: `best_of_n`, `success_prediction`, `calibration` (held-out quality when `calibration_split` is
    not None, plus a calibrator fitted on all labels), `failure_attribution` for each rule (the threshold rule's
    threshold chosen by k-fold CV unless `attribution_threshold` is a number), and, when trajectories carry
    `metadata["failure_kind"]` in {"decision", "luck"}, `success_prediction_by_failure_kind` (successes plus only
    that kind of failure). Top level: the best-of-N reference points, attribution chance, the counts, and
    `reduction` (how the scores were reduced and how that was chosen: pass it; the default says "as scored").
    `reduction_selection` (a `choose_reduction` result) is stored as given.
    """
    scores = list(scores)
    for ts in scores:
        success_value(ts)  # raise early, naming the record, on a malformed label
    labelled = [ts for ts in scores if is_success(ts, success_threshold) is not None]
    kinds = {_failure_kind(ts) for ts in labelled if is_success(ts, success_threshold) is False}
    kinds = sorted(kd for kd in kinds if kd in ("decision", "luck"))
    bon = best_of_n_table(scores, methods, seed, n_boot=n_boot, success_threshold=success_threshold)
    res = {
        "n_trajectories": len(scores),
        "n_labelled": len(labelled),
        "n_success": sum(bool(is_success(ts, success_threshold)) for ts in labelled),
        "success_threshold": success_threshold,
        "seed": seed,
        "n_boot": n_boot,
        "interval": f"{int(CONFIDENCE * 100)}% bootstrap (scipy BCa; percentile where BCa is undefined)"
        if n_boot
        else None,
        "reduction": dict(reduction) if reduction is not None else {"chosen_by": "as scored (not tuned here)"},
        "best_of_n_reference": bon["reference"],
        "attribution_chance": attribution_chance(scores, success_threshold=success_threshold),
        "methods": {},
        "skipped_methods": bon["skipped"],
    }
    if reduction_selection is not None:
        res["reduction_selection"] = {k_: v for k_, v in reduction_selection.items() if k_ != "fold_of"}
    for m, b in bon["methods"].items():
        b = {k_: v for k_, v in b.items() if k_ not in _REFERENCE_KEYS}
        entry = {
            "best_of_n": b,
            "success_prediction": success_prediction(
                scores, m, n_boot, seed, success_threshold=success_threshold
            ),
            "calibration": calibration_report(
                scores, m, kind=calibration, fit_fraction=calibration_split, seed=seed,
                success_threshold=success_threshold,
            ),
            "failure_attribution": {
                rule: failure_attribution(
                    scores, m, rule, threshold=attribution_threshold if rule == "threshold" else 0.0, k=k,
                    seed=seed, success_threshold=success_threshold,
                )
                for rule in ATTRIBUTION_RULES
            },
        }  # fmt: skip
        if kinds:
            entry["success_prediction_by_failure_kind"] = {
                kd: success_prediction(
                    [
                        ts
                        for ts in scores
                        if is_success(ts, success_threshold)
                        or (is_success(ts, success_threshold) is False and _failure_kind(ts) == kd)
                    ],
                    m,
                    n_boot,
                    seed,
                    success_threshold=success_threshold,
                )
                for kd in kinds
            }
        res["methods"][m] = entry
    return _clean(res)


def _failure_kind(ts: TrajectoryScore):
    return ts.metadata.get("failure_kind") if isinstance(ts.metadata, Mapping) else None


_REFERENCE_KEYS = ("random_pick", "random_pick_ci", "pass_at_n", "pass_at_n_ci", "mean_at_n", "mean_at_n_ci",
                   "group_size", "selected")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Tables


def _fmt(v, ci=None, n=None, digits=2) -> str:
    if v is None:
        cell = "-"
    else:
        cell = f"{v:.{digits}f}"
        if ci is not None:
            cell += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    if n is not None:
        cell += f" n={n}"
    return cell


def _rows(metrics: Mapping) -> tuple[list[str], list[list[str]]]:
    """Method rows x metric columns; reference rows (random pick, pass@N, mean@N, chance) beside them."""
    header = ["method", "best-of-N success", "AUROC", "Spearman"] + [f"attr exact/±1 ({r})" for r in ATTRIBUTION_RULES]
    rows = []
    for m, e in metrics.get("methods", {}).items():
        b, sp, fa = e["best_of_n"], e["success_prediction"], e["failure_attribution"]
        row = [m, _fmt(b["success"], b["success_ci"], b["n_groups"]), _fmt(sp["auroc"], sp["auroc_ci"], sp["n"]),
               _fmt(sp["spearman"], sp["spearman_ci"], sp["n"])]  # fmt: skip
        for r in ATTRIBUTION_RULES:
            a = fa[r]
            row.append(("-" if a["exact"] is None else f"{a['exact']:.2f}/{a['within1']:.2f}") + f" n={a['n']}")
        rows.append(row)
    ref = metrics.get("best_of_n_reference") or {}
    ch = metrics.get("attribution_chance") or {}
    blank = ["", ""]
    if ref:
        ng = ref.get("n_groups")
        rows.append(["(random pick)", _fmt(ref["random_pick"], ref["random_pick_ci"], ng), *blank, "", "", ""])
        rows.append(["(oracle pass@N)", _fmt(ref["pass_at_n"], ref["pass_at_n_ci"], ng), *blank, "", "", ""])
        rows.append(["(mean@N)", _fmt(ref["mean_at_n"], ref["mean_at_n_ci"], ref.get("n_trajectories")), *blank, "",
                     "", ""])  # fmt: skip
    if ch and ch.get("n"):
        cell = f"{ch['exact']:.2f}/{ch['within1']:.2f} n={ch['n']}"
        rows.append(["(random step)", "", *blank, cell, cell, cell])
    return header, rows


def format_table(metrics: Mapping) -> str:
    """One fixed-width text table: methods x (best-of-N, AUROC, Spearman, attribution per rule), cells
    `value [95% CI] n=...`; best-of-N n counts groups, attribution cells are exact/within-1 accuracy."""
    out = [text_table(*_rows(metrics))]
    skipped = metrics.get("skipped_methods") or []
    if skipped:
        out.append(f"skipped (no finite scores): {', '.join(skipped)}")
    return "\n".join(out)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Fixed-width columns, a dashed rule under the header."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def format_markdown(metrics: Mapping, title: str = "progadv evaluate") -> str:
    """metrics.md: the summary table plus attribution detail, calibration, failure kinds and how reductions
    were chosen."""
    header, rows = _rows(metrics)
    md = [f"# {title}", ""]
    md.append(
        f"{metrics.get('n_trajectories')} trajectories, {metrics.get('n_labelled')} labelled, "
        f"{metrics.get('n_success')} successes. Intervals: {metrics.get('interval') or 'none (n_boot=0)'}; "
        f"seed {metrics.get('seed')}."
    )
    md += ["", "## Summary", "", _md_table(header, rows), ""]
    md.append("Best-of-N n counts groups; attribution cells are exact / within-1-step accuracy over labelled failures.")
    red = metrics.get("reduction") or {}
    md += ["", "## Reductions", "", ", ".join(f"{k}: {v}" for k, v in red.items()) or "not stated"]
    sel = metrics.get("reduction_selection")
    if sel:
        md += ["", f"Reduction choice ({sel.get('how')}): chosen **{sel.get('chosen')}**; "
               f"held-out {sel.get('metric')} = {_fmt(sel.get('out_of_fold', sel.get('held_out')))} "
               f"(n={sel.get('n')}); the in-sample figures below are optimistic for the chosen one."]  # fmt: skip
        if sel.get("per_fold"):
            md += ["", _md_table(["fold", "chosen", "held-out", "n held out"],
                                 [[str(f["fold"]), str(f["chosen"]), _fmt(f["held_out"]), str(f["n_held_out"])]
                                  for f in sel["per_fold"]])]  # fmt: skip
        if sel.get("in_sample"):
            md += ["", _md_table(["candidate", "in-sample (optimistic)"],
                                 [[k, _fmt(v)] for k, v in sel["in_sample"].items()])]  # fmt: skip
    meths = metrics.get("methods", {})
    if meths:
        md += ["", "## Failure attribution", ""]
        rows_fa = []
        for m, e in meths.items():
            for r, a in e["failure_attribution"].items():
                thr = a.get("threshold")
                note = "" if r != "threshold" else (f"cv {_thr(a.get('thresholds'))}" if thr == "cv" else f"{thr}")
                rows_fa.append([m, r, note, _fmt(a["exact"]), _fmt(a["within1"]), _fmt(a["mae"]), str(a["n"])])
        ch = metrics.get("attribution_chance") or {}
        if ch.get("n"):
            rows_fa.append(["(random step)", "", "", _fmt(ch["exact"]), _fmt(ch["within1"]), _fmt(ch["mae"]),
                            str(ch["n"])])  # fmt: skip
        md.append(_md_table(["method", "rule", "threshold", "exact", "within ±1", "MAE (steps)", "n"], rows_fa))
        md += ["", "## Calibration (P(success), held-out half)", ""]
        rows_c = []
        for m, e in meths.items():
            c = e["calibration"]
            if "brier" in c:
                rows_c.append([m, c["kind"], _fmt(c["brier"], digits=3), _fmt(c["brier_base_rate"], digits=3),
                               _fmt(c["ece"], digits=3), str(c["n_fit"]), str(c["n_eval"])])  # fmt: skip
            else:
                rows_c.append([m, c["kind"], "-", "-", "-", "-", c.get("skipped", "not evaluated")])
        md.append(_md_table(["method", "kind", "Brier", "Brier (base rate)", "ECE", "n fit", "n eval"], rows_c))
        kinds_rows = []
        for m, e in meths.items():
            for kd, sp in (e.get("success_prediction_by_failure_kind") or {}).items():
                kinds_rows.append([m, f"successes + {kd} failures", _fmt(sp["auroc"], sp["auroc_ci"]),
                                   _fmt(sp["spearman"], sp["spearman_ci"]), str(sp["n"]), str(sp["n_pos"])])  # fmt: skip
        if kinds_rows:
            md += ["", "## Success prediction by failure kind", "",
                   "Progress advantage grades decisions, not luck: read the decision rows for what it can see.", "",
                   _md_table(["method", "subset", "AUROC", "Spearman", "n", "n successes"], kinds_rows)]  # fmt: skip
    if metrics.get("skipped_methods"):
        md += ["", f"Skipped (no finite scores): {', '.join(metrics['skipped_methods'])}."]
    return "\n".join(md) + "\n"


def _thr(ts) -> str:
    return "[" + ", ".join(f"{t:.3g}" for t in ts) + "]" if ts else ""


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)
