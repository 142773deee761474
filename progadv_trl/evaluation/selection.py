"""Best-of-N: keep the highest-scoring rollout of a group. The one selection rule of the library.

`pick_best` is used by `best_of_n` (metrics.json's `selected`), by `ProgressCritic.best_of_n` and, through
`best_of_n`, by the training callback's figures, so the same scores, group and seed give the same pick everywhere.
The rule: a NaN score (e.g. a fully truncated trajectory) ranks below every number; ties for the top score are
broken uniformly at random by a generator seeded with (seed, group name), so the pick for a group does not depend
on which other groups are present or in what order they come.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .labels import available_methods, check_method, is_success, method_available
from .stats import bootstrap_ci, mean_stat, ratio_stat

if TYPE_CHECKING:
    from ..scoring import TrajectoryScore

# best_of_n's reference points, the same for every method: metrics.json keeps them once, under
# best_of_n_reference (with the group counts), not in each method's entry.
REFERENCE_KEYS = ("group_size", "random_pick", "random_pick_ci", "pass_at_n", "pass_at_n_ci", "mean_at_n",
                  "mean_at_n_ci")  # fmt: skip


def top_indices(scores) -> np.ndarray:
    """Indices of the top score, NaN ranking below every number (all of them when every score is NaN)."""
    s = np.asarray(scores, dtype=np.float64)
    s = np.where(np.isnan(s), -np.inf, s)
    return np.flatnonzero(s == s.max())


def tie_rng(group: str, seed: int = 0) -> np.random.Generator:
    """The tie-break generator of one group: seeded by (seed, crc32 of the group name), independent of the others."""
    return np.random.default_rng([int(seed), zlib.crc32(str(group).encode("utf-8"))])


def pick_best(scores, group: str = "", seed: int = 0) -> int:
    """Index of the kept rollout among one group's `scores` (higher is better; see the module docstring)."""
    top = top_indices(scores)
    if top.size == 0:
        raise ValueError("pick_best needs at least one score")
    return int(top[0]) if top.size == 1 else int(tie_rng(group, seed).choice(top))


def select_best(
    scores: Sequence[TrajectoryScore], method: str = "progress_advantage", seed: int = 0
) -> dict[str, TrajectoryScore]:
    """{group: the kept trajectory} over every trajectory given, labelled or not. Trajectories without a `group`
    form one group, ""; a group of one keeps its only member. `ProgressCritic.best_of_n` returns this."""
    check_method(method, scores)
    by: dict[str, list[TrajectoryScore]] = {}
    for ts in scores:
        by.setdefault("" if ts.group is None else str(ts.group), []).append(ts)
    return {g: members[pick_best([t.method_score(method) for t in members], g, seed)] for g, members in by.items()}


def labelled_groups(
    scores: Sequence[TrajectoryScore], threshold: float | None = None
) -> dict[str, list[TrajectoryScore]]:
    """Labelled trajectories by `group`, sorted by group name; groups with fewer than two labelled members leave
    nothing to select and are dropped."""
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
    """Keep the highest-scoring rollout of every group (`pick_best`); report how often the kept one succeeded.

    Only labelled trajectories in groups of at least two count. `success` uses the seeded tie-break, and
    `success_tie_expected` is the same figure averaged exactly over the tie-break. A NaN score ranks below every
    number, so all methods select from the same groups. Reference points over the same groups: `random_pick`
    (expected success of a uniformly random rollout = mean of the group success rates), `pass_at_n` (oracle: the
    group has a success), `mean_at_n` (success rate pooled over all rollouts; equals `random_pick` when groups
    have equal sizes). `gain_over_random` = mean over groups of (kept success - group success rate), with a
    paired interval. Intervals resample groups. `selected` maps group -> kept trajectory id.
    """
    groups = labelled_groups(scores, success_threshold)
    kept, kept_exp, rates, any_succ, n_succ, sizes, selected = [], [], [], [], [], [], {}
    for g, members in groups.items():
        y = np.array([float(is_success(t, success_threshold)) for t in members])
        s = np.array([t.method_score(method) for t in members], dtype=np.float64)
        top = top_indices(s)
        pick = pick_best(s, g, seed)
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
        success_ci=bootstrap_ci((kept,), mean_stat, paired=False, **ci),
        success_tie_expected=float(kept_exp.mean()),
        gain_over_random=float((kept - rates).mean()),
        gain_over_random_ci=bootstrap_ci((kept - rates,), mean_stat, paired=False, **ci),
        random_pick=float(rates.mean()),
        random_pick_ci=bootstrap_ci((rates,), mean_stat, paired=False, **ci),
        pass_at_n=float(any_succ.mean()),
        pass_at_n_ci=bootstrap_ci((any_succ,), mean_stat, paired=False, **ci),
        mean_at_n=float(n_succ.sum() / sizes.sum()),
        mean_at_n_ci=bootstrap_ci((n_succ, sizes), ratio_stat, paired=True, **ci),
        group_size={"min": int(sizes.min()), "max": int(sizes.max()), "mean": float(sizes.mean())},
        selected=selected,
    )
    return out


def best_of_n_table(
    scores: Sequence[TrajectoryScore],
    methods: Sequence[str] | None = None,
    seed: int = 0,
    *,
    n_boot: int = 1000,
    success_threshold: float | None = None,
) -> dict:
    """{"methods": {method: best_of_n(...)}, "reference": {random_pick, pass_at_n, mean_at_n, ...}}.

    Methods with no finite score anywhere are listed under "skipped". Default methods: `available_methods`.
    """
    methods = available_methods(scores) if methods is None else methods
    res, skipped = {}, []
    for m in methods:
        if not method_available(scores, m):
            skipped.append(m)
            continue
        res[m] = best_of_n(scores, m, seed, n_boot=n_boot, success_threshold=success_threshold)
    ref = {k: next(iter(res.values()))[k] for k in ("n_groups", "n_trajectories", *REFERENCE_KEYS)} if res else None
    return {"methods": res, "reference": ref, "skipped": skipped}
