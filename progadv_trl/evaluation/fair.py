"""A fair comparison: every method gets its best rule, chosen on folds it is not reported on, and progress
advantage is compared with the best baseline by a paired bootstrap.

For each method and application the candidate rules are:

- success prediction and best-of-N: the method's own trajectory score (`native`) and every step reduction of its
  per-step values (`config.STEP_REDUCTIONS`: sum, mean, min, max, last, bottom10, min_cumsum). A log-prob baseline
  thus may rank by its worst step rather than its mean, as progress advantage may;
- failure attribution: `min_step`, `min_cumsum` and `threshold` (its threshold chosen inside the training folds).
  A log-prob is <= 0 at every step, so `min_cumsum` always names its last step; `min_step` is its natural rule.

k-fold cross-validation (stratified by success for AUROC; whole groups for best-of-N; failed cases for
attribution): on each fold the rule with the best figure on the other k-1 folds is applied to it, so every
reported figure is out-of-fold. The per-item out-of-fold outcomes (a trajectory's score, a group's kept success, a
case's hit) are pooled; for AUROC each fold's chosen scores are turned into within-fold rank fractions first, so
scores of different rules are comparable across folds. `rule` is the choice on all the data (what to use on new
data); `per_fold` lists the choices.

The progress-advantage family (progress_advantage and every variant on the scores, `config.in_family`) is never a
baseline: each member is compared, with its own CV-chosen rule, against the same best baseline (`family`).

Baselines beyond the standard ones (`config.extra_baselines`: whatever other baselines the scores carry, e.g.
trained reward models) are also compared with progress advantage head to head (`versus`): the same paired
bootstrap of progress advantage minus that baseline, so a verdict against each stands even when it is not the best.

The paired bootstrap resamples the same items for progress advantage and for the baseline with the best
out-of-fold figure (choosing that baseline on the same data favours the baseline, never progress advantage), and
gives the 95 % percentile interval of the difference. The verdict is "beats" or "loses" only when the interval
excludes zero, else "ties".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy import stats as sps

from ..config import BASELINES, PLAUSIBILITY_ALPHAS, PLAUSIBLE, STEP_REDUCTIONS, extra_baselines, in_family
from .attribution import _best_threshold, _valid_label, attribute_failure
from .labels import available_methods, is_success, method_available
from .selection import labelled_groups, pick_best
from .stats import CONFIDENCE, auroc, auroc_stat, fold_ids

if TYPE_CHECKING:
    from ..scoring import TrajectoryScore

APPLICATIONS = ("auroc", "best_of_n", "attribution")
SCORE_RULES = ("native", *STEP_REDUCTIONS)
ATTRIBUTION_CANDIDATES = ("min_step", "min_cumsum", "threshold")


def step_value_sets(ts: TrajectoryScore, method: str) -> dict[str, np.ndarray]:
    """{rule suffix: per-step values} of `method`: {"": its steps}, except progress_advantage_plausible, whose alpha
    is part of its rule: one set per alpha of PLAUSIBILITY_ALPHAS ("@a0.1", ...), from the steps' gaps."""
    if method == PLAUSIBLE and ts.gaps is not None:
        from ..scoring import plausible_step_values

        return {f"@a{a:g}": plausible_step_values(ts.advantages, ts.gaps, a) for a in PLAUSIBILITY_ALPHAS}
    return {"": ts.method_steps(method)}


def rule_values(ts: TrajectoryScore, method: str) -> dict[str, float]:
    """The trajectory score of `method` under every candidate rule (NaN where undefined): `native`, then every step
    reduction of every set of `step_value_sets` ("min", or "min@a0.1" for the plausible variant)."""
    from ..scoring import reduce_steps

    out = {"native": ts.method_score(method)}
    for suffix, steps in step_value_sets(ts, method).items():
        ok = steps[~np.isnan(steps)]
        for r in STEP_REDUCTIONS:
            out[r + suffix] = reduce_steps(ok, r) if ok.size else float("nan")
    return out


def _rule_arrays(items: Sequence[TrajectoryScore], method: str) -> dict[str, np.ndarray]:
    """{rule: its value per item}; a rule some item lacks is NaN there (it then ranks last)."""
    per = [rule_values(ts, method) for ts in items]
    names = dict.fromkeys(k for r in per for k in r)
    return {k: np.array([r.get(k, np.nan) for r in per], dtype=np.float64) for k in names}


def _argbest(values: dict[str, float]) -> str | None:
    """Highest finite value; ties go to the first candidate, so the choice is deterministic."""
    best, bv = None, -math.inf
    for name, v in values.items():
        if v is not None and math.isfinite(v) and v > bv:
            best, bv = name, v
    return best


def _stratified_folds(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    folds = np.empty(y.size, dtype=int)
    for cls in (True, False):
        idx = np.flatnonzero(y == cls)
        folds[idx] = fold_ids(idx.size, k, seed + int(cls))
    return folds


def _rank_fraction(x: np.ndarray) -> np.ndarray:
    """Scores -> average ranks scaled to (0, 1], NaN ranking lowest (a score that cannot be computed ranks last)."""
    x = np.where(np.isnan(x), -np.inf, x)
    return sps.rankdata(x) / x.size


# ----------------------------------------------------------------------------------------------------------------
# One application, one method: the out-of-fold outcomes


def _oof_auroc(vals: dict[str, np.ndarray], y: np.ndarray, folds: np.ndarray) -> tuple[np.ndarray, list]:
    """Out-of-fold rank fractions of the rule chosen on the other folds; per-fold choices."""
    out, chosen = np.full(y.size, np.nan), []
    for j in np.unique(folds):
        tr, te = folds != j, folds == j
        pick = _argbest({r: auroc(_rank_fraction(v[tr]), y[tr]) for r, v in vals.items()}) or "native"
        chosen.append(pick)
        out[te] = _rank_fraction(vals[pick][te])
    return out, chosen


def _kept(vals: np.ndarray, y: np.ndarray, groups: list[tuple[str, np.ndarray]], seed: int) -> np.ndarray:
    """Per group: success of the rollout kept by `vals` (the library's one tie rule)."""
    return np.array([y[idx][pick_best(vals[idx], g, seed)] for g, idx in groups], dtype=np.float64)


def _oof_best_of_n(vals, y, groups, folds, seed) -> tuple[np.ndarray, list]:
    out, chosen = np.full(len(groups), np.nan), []
    for j in np.unique(folds):
        tr = [g for g, f in zip(groups, folds) if f != j]
        te = np.flatnonzero(folds == j)
        pick = _argbest({r: float(_kept(v, y, tr, seed).mean()) for r, v in vals.items()}) or "native"
        chosen.append(pick)
        out[te] = _kept(vals[pick], y, [groups[i] for i in te], seed)
    return out, chosen


def _predict(rule: str, v: np.ndarray, thr: float) -> int:
    return attribute_failure(v, rule, thr)


def _fit_rule(cases, rule: str) -> tuple[float, float]:
    """(exact accuracy, threshold) of `rule` on cases, its threshold chosen on them for the threshold rule."""
    thr = _best_threshold(cases) if rule == "threshold" else 0.0
    hits = [_predict(rule, v, thr) == f for v, f in cases]
    return float(np.mean(hits)), thr


def _oof_attribution(case_sets: dict[str, list], folds) -> tuple[np.ndarray, list]:
    """`case_sets`: {rule suffix: [(per-step values, failure step)]} (`step_value_sets`); candidates are every
    attribution rule on every set."""
    n = len(next(iter(case_sets.values())))
    out, chosen = np.full(n, np.nan), []
    for j in np.unique(folds):
        fits = {}
        for suffix, cases in case_sets.items():
            tr = [c for c, f in zip(cases, folds) if f != j]
            fits.update({(r, suffix): _fit_rule(tr, r) for r in ATTRIBUTION_CANDIDATES})
        pick = _argbest({k: acc for k, (acc, _) in fits.items()})
        (rule, suffix), thr = pick, fits[pick][1]
        chosen.append((rule if rule != "threshold" else f"threshold<{thr:.3g}") + suffix)
        cases = case_sets[suffix]
        for i in np.flatnonzero(folds == j):
            out[i] = float(_predict(rule, cases[i][0], thr) == cases[i][1])
    return out, chosen


def _attribution_cases(failed: Sequence[TrajectoryScore], method: str) -> dict[str, list]:
    sets = [step_value_sets(ts, method) for ts in failed]
    return {sfx: [(st[sfx], int(ts.failure_step)) for st, ts in zip(sets, failed)] for sfx in sets[0]}


# ----------------------------------------------------------------------------------------------------------------
# Paired bootstrap


def _paired_interval(stat, n: int, n_boot: int, seed: int, strata: np.ndarray | None = None) -> list[float] | None:
    """95 % percentile interval of stat(idx) over `n_boot` resamples of the n items (within strata if given)."""
    if n_boot <= 0 or n < 2:
        return None
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        if strata is None:
            idx = rng.integers(0, n, n)
        else:
            idx = np.concatenate([rng.choice(np.flatnonzero(strata == s), (strata == s).sum()) for s in np.unique(strata)])
        v = stat(idx)
        if math.isfinite(v):
            vals.append(v)
    if not vals:
        return None
    a = (1 - CONFIDENCE) / 2
    return [float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))]


def verdict(ci) -> str:
    if ci is None:
        return "undetermined"
    return "beats" if ci[0] > 0 else "loses" if ci[1] < 0 else "ties"


# ----------------------------------------------------------------------------------------------------------------
# Everything


def fair_comparison(
    scores: Sequence[TrajectoryScore],
    *,
    methods: Sequence[str] | None = None,
    k: int = 5,
    seed: int = 0,
    n_boot: int = 1000,
    success_threshold: float | None = None,
    applications: Sequence[str] = APPLICATIONS,
    versus: Sequence[str] | None = None,
) -> dict:
    """{application: {"methods": {method: {"value", "rule", "per_fold", "n"}}, "best_baseline", "difference",
    "difference_ci", "verdict", "family", "versus"}} for AUROC, best-of-N and failure attribution (see the module
    docstring). `family`: {member: {"difference", "difference_ci", "verdict"}}, each progress-advantage family member
    minus the best baseline; the top-level difference is progress_advantage's. `versus`: {baseline: the same for
    progress_advantage minus that baseline} for each baseline named (default: `config.extra_baselines` of the
    methods, e.g. trained reward models). Default methods: `available_methods`."""
    scores = list(scores)
    methods = [m for m in (available_methods(scores) if methods is None else methods) if method_available(scores, m)]
    versus = extra_baselines(methods) if versus is None else tuple(versus)
    out: dict = {"k": k, "n_boot": n_boot, "protocol": "per-method rule chosen by k-fold CV; paired bootstrap vs the "
                 "baseline with the best out-of-fold figure"}  # fmt: skip
    labelled = [ts for ts in scores if is_success(ts, success_threshold) is not None]

    # success prediction
    y = np.array([bool(is_success(ts, success_threshold)) for ts in labelled])
    if "auroc" in applications and y.size and min(y.sum(), (~y).sum()) >= 2:
        kk = int(min(k, y.sum(), (~y).sum()))
        folds = _stratified_folds(y, kk, seed)
        oof = {}
        res = {}
        for m in methods:
            vals = _rule_arrays(labelled, m)
            oof[m], per_fold = _oof_auroc(vals, y, folds)
            allv = {r: auroc(_rank_fraction(v), y) for r, v in vals.items()}
            res[m] = {"value": auroc(oof[m], y), "rule": _argbest(allv), "per_fold": per_fold, "n": int(y.size)}

        def diff(a, b):
            def stat(idx):
                yy = y[idx]
                return float(auroc_stat(oof[a][idx][yy], oof[a][idx][~yy]) - auroc_stat(oof[b][idx][yy], oof[b][idx][~yy]))

            return stat

        out["auroc"] = _compare(res, oof, diff, y.size, n_boot, seed, strata=y.astype(int), versus=versus)

    # best-of-N
    groups_map = labelled_groups(scores, success_threshold)
    if "best_of_n" in applications and len(groups_map) >= 2:
        flat = [ts for members in groups_map.values() for ts in members]
        yb = np.array([float(bool(is_success(ts, success_threshold))) for ts in flat])
        groups, start = [], 0
        for g, members in groups_map.items():
            groups.append((g, np.arange(start, start + len(members))))
            start += len(members)
        kk = min(k, len(groups))
        folds = fold_ids(len(groups), kk, seed)
        oof, res = {}, {}
        for m in methods:
            vals = _rule_arrays(flat, m)
            oof[m], per_fold = _oof_best_of_n(vals, yb, groups, folds, seed)
            allv = {r: float(_kept(v, yb, groups, seed).mean()) for r, v in vals.items()}
            res[m] = {"value": float(oof[m].mean()), "rule": _argbest(allv), "per_fold": per_fold, "n": len(groups)}

        def diff(a, b):
            return lambda idx: float(oof[a][idx].mean() - oof[b][idx].mean())

        out["best_of_n"] = _compare(res, oof, diff, len(groups), n_boot, seed, versus=versus)

    # failure attribution: the same failed cases for every method (a labelled step inside the trajectory)
    failed = [ts for ts in labelled if is_success(ts, success_threshold) is False
              and _valid_label(ts.failure_step, len(ts.steps))]  # fmt: skip
    failed = [ts for ts in failed if all(not np.isnan(ts.method_steps(m)).all() for m in methods)]
    if "attribution" in applications and len(failed) >= 4:
        kk = min(k, len(failed))
        folds = fold_ids(len(failed), kk, seed)
        oof, res = {}, {}
        for m in methods:
            case_sets = _attribution_cases(failed, m)
            oof[m], per_fold = _oof_attribution(case_sets, folds)
            allv = {r + sfx: _fit_rule(cases, r)[0] for sfx, cases in case_sets.items() for r in ATTRIBUTION_CANDIDATES}
            res[m] = {"value": float(oof[m].mean()), "rule": _argbest(allv), "per_fold": per_fold, "n": len(failed)}

        def diff(a, b):
            return lambda idx: float(oof[a][idx].mean() - oof[b][idx].mean())

        out["attribution"] = _compare(res, oof, diff, len(failed), n_boot, seed, versus=versus)
    return out


def compare_outcomes(outcomes: dict[str, Sequence[float]], *, n_boot: int = 1000, seed: int = 0,
                     versus: Sequence[str] = ()) -> dict:
    """The same verdicts for methods that need no rule: `outcomes[method]` is a per-item figure (e.g. each task's
    success when an agent chose its steps by that method), paired across methods (the same items in the same order).
    Progress advantage and each family member are compared with the baseline of the highest mean, by a paired
    bootstrap of the mean difference; choosing that baseline on the same items favours it. Returns `_compare`'s
    entry: {"methods": {m: {"value", "n"}}, "best_baseline", "difference", "difference_ci", "verdict", "family"}, and
    "versus" ({baseline: progress_advantage minus it}) for each baseline named in `versus`."""
    arrays = {m: np.asarray(v, dtype=np.float64) for m, v in outcomes.items()}
    n = {a.size for a in arrays.values()}
    if len(n) > 1:
        raise ValueError(f"compare_outcomes: methods have different numbers of items {sorted(n)}; they must be paired")
    n = n.pop() if n else 0
    res = {m: {"value": float(a.mean()) if a.size else float("nan"), "n": int(a.size)} for m, a in arrays.items()}

    def diff(a, b):
        return lambda idx: float(arrays[a][idx].mean() - arrays[b][idx].mean())

    return _compare(res, arrays, diff, n, n_boot, seed, versus=versus)


def _compare(res: dict, oof: dict, diff, n: int, n_boot: int, seed: int, strata=None, versus=()) -> dict:
    entry = {"methods": res}
    family = [m for m in res if in_family(m)]
    best = _argbest({m: r["value"] for m, r in res.items() if not in_family(m)})
    if best is None or not family:
        return entry
    per = {}
    for m in family:  # the same best baseline for every member: one comparison each, same items, same resamples
        ci = _paired_interval(diff(m, best), n, n_boot, seed, strata)
        per[m] = {"difference": res[m]["value"] - res[best]["value"], "difference_ci": ci, "verdict": verdict(ci)}
        if m != "progress_advantage" and "progress_advantage" in res:  # does the variant improve on the plain one?
            ci = _paired_interval(diff(m, "progress_advantage"), n, n_boot, seed, strata)
            per[m]["vs_progress_advantage"] = {"difference": res[m]["value"] - res["progress_advantage"]["value"],
                                               "difference_ci": ci, "verdict": verdict(ci)}  # fmt: skip
    heads = [b for b in versus if b in res and not in_family(b) and "progress_advantage" in res]
    for m in family:  # every member head to head with the named baselines too (the plausible variant against an ORM)
        if m != "progress_advantage" and heads:
            per[m]["versus"] = {}
            for b in heads:
                ci = _paired_interval(diff(m, b), n, n_boot, seed, strata)
                per[m]["versus"][b] = {"difference": res[m]["value"] - res[b]["value"], "difference_ci": ci,
                                       "verdict": verdict(ci)}  # fmt: skip
    # With trained baselines present (reward models) the best baseline may be one of them; every member is also set
    # against the best of the baselines that need no training (config.BASELINES), paired the same way.
    untrained = _argbest({m: r["value"] for m, r in res.items() if m in BASELINES})
    if untrained is not None and untrained != best:
        for m in family:
            ci = _paired_interval(diff(m, untrained), n, n_boot, seed, strata)
            per[m]["vs_best_untrained"] = {"baseline": untrained, "difference": res[m]["value"] - res[untrained]["value"],
                                           "difference_ci": ci, "verdict": verdict(ci)}  # fmt: skip
    entry["best_baseline"] = best
    if untrained is not None:
        entry["best_untrained_baseline"] = untrained
    if "progress_advantage" in per:
        entry.update(per["progress_advantage"])
    entry["family"] = per
    if heads:  # head to head with named baselines (trained reward models): the same items and resamples
        entry["versus"] = {}
        for b in heads:
            ci = _paired_interval(diff("progress_advantage", b), n, n_boot, seed, strata)
            entry["versus"][b] = {"difference": res["progress_advantage"]["value"] - res[b]["value"],
                                  "difference_ci": ci, "verdict": verdict(ci)}  # fmt: skip
    return entry
