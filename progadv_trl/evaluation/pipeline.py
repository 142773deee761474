"""The evaluation pipeline: `evaluate` builds the metrics.json dict from scores; `run_evaluation` runs a whole
evaluation from a scorer (score -> optional reduction choice -> evaluate -> report). `progadv evaluate` and the
demo both call `run_evaluation`.

Honesty rules kept throughout:

- Every figure carries the n it was computed on, and intervals are 95 % bootstrap intervals from
  `scipy.stats.bootstrap` (BCa; the percentile interval of the same resamples where BCa is undefined).
- Nothing is tuned on the data it is scored on: token/step reductions are chosen by `choose_reduction` (k-fold
  cross-validation or a labelled validation split) and the attribution threshold by k-fold CV; calibration is
  fitted on one split and judged on the other.
- Reference points sit beside every method: the expected success of a random pick, oracle pass@N, mean@N, and
  the chance accuracy of naming a random step as the mistake.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..config import ATTRIBUTION_RULES
from ..utils import json_safe
from .attribution import attribution_chance, failure_attribution
from .calibration import calibration_report
from .fair import fair_comparison
from .labels import (
    available_methods,
    failure_kind,
    implausible_share,
    is_success,
    out_of_support_share,
    split_faults,
    success_value,
)
from .prediction import success_prediction
from .reductions import choose_reduction as _choose_reduction
from .reductions import choose_variant as _choose_variant
from .reductions import reduction_grid
from .report import write_report
from .selection import REFERENCE_KEYS, best_of_n_table
from .stats import CONFIDENCE

if TYPE_CHECKING:
    from ..scoring import TrajectoryScore


class EvaluationError(ValueError):
    """Nothing left to evaluate; the message says why."""


def evaluate(
    scores: Sequence[TrajectoryScore],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    methods: Sequence[str] | None = None,
    calibration_split: float | None = 0.5,
    calibration: str = "platt",
    success_threshold: float | None = None,
    attribution_threshold: float | str = "cv",
    k: int = 5,
    reduction: Mapping | None = None,
    reduction_selection: Mapping | None = None,
    variant_selection: Mapping | None = None,
) -> dict:
    """Every application metric for every available method: the content of `metrics.json` (JSON-safe, no NaN).

    `fair` (`fair.fair_comparison`): every method with its best rule chosen by k-fold CV, and progress advantage
    minus the best baseline with a paired-bootstrap interval, per application (and `fair_by_failure_kind`: AUROC
    over successes plus one kind of failure).

    Per method: `best_of_n` (with `selected`: group -> kept trajectory id), `success_prediction`, `calibration`
    (held-out quality when `calibration_split` is not None, plus a calibrator fitted on all labels),
    `failure_attribution` for each rule (the threshold rule's threshold chosen by k-fold CV unless
    `attribution_threshold` is a number), and, when trajectories carry `metadata["failure_kind"]` in
    {"decision", "luck"}, `success_prediction_by_failure_kind` (successes plus only that kind of failure). Top
    level: the best-of-N reference points, attribution chance, the counts, and `reduction` (how the scores were
    reduced and how that was chosen: pass it; the default says "as scored"). `reduction_selection` (a
    `choose_reduction` result) is stored without its per-trajectory `fold_of`, and so is `variant_selection` (a
    `choose_variant` result). `methods` (default `available_methods`: METHODS and every variant on the scores);
    `out_of_support` is the share of steps flagged out of the reference's support (None without the support
    statistics, `ScoringConfig.support`); `implausible` the share of steps that fail the policy's plausibility
    constraint at the scores' alpha (`labels.implausible_share`).
    """
    scores, faulted = split_faults(list(scores))  # a numeric fault is no score: out of every metric, counted
    for ts in scores:
        success_value(ts)  # raise early, naming the record, on a malformed label
    methods = available_methods(scores) if methods is None else tuple(methods)
    labelled = [ts for ts in scores if is_success(ts, success_threshold) is not None]
    kinds = {failure_kind(ts) for ts in labelled if is_success(ts, success_threshold) is False}
    kinds = sorted(kd for kd in kinds if kd in ("decision", "luck"))
    bon = best_of_n_table(scores, methods, seed, n_boot=n_boot, success_threshold=success_threshold)
    res = {
        "n_trajectories": len(scores),
        "n_numeric_faults": len(faulted),
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
        "out_of_support": out_of_support_share(scores),
        "implausible": implausible_share(scores),
    }
    if reduction_selection is not None:
        res["reduction_selection"] = {k_: v for k_, v in reduction_selection.items() if k_ != "fold_of"}
    if variant_selection is not None:
        res["variant_selection"] = {k_: v for k_, v in variant_selection.items() if k_ != "fold_of"}
    for m, b in bon["methods"].items():
        b = {k_: v for k_, v in b.items() if k_ not in REFERENCE_KEYS}  # `selected` stays: it is per method
        entry = {
            "best_of_n": b,
            "success_prediction": success_prediction(scores, m, n_boot, seed, success_threshold=success_threshold),
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
                        or (is_success(ts, success_threshold) is False and failure_kind(ts) == kd)
                    ],
                    m,
                    n_boot,
                    seed,
                    success_threshold=success_threshold,
                )
                for kd in kinds
            }
        res["methods"][m] = entry
    # Every method with its best rule (chosen by CV), and progress advantage against the best baseline (paired).
    fair = dict(k=k, seed=seed, n_boot=n_boot, success_threshold=success_threshold)
    res["fair"] = fair_comparison(scores, methods=methods, **fair)
    if kinds:
        res["fair_by_failure_kind"] = {
            kd: fair_comparison(
                [ts for ts in scores if is_success(ts, success_threshold)
                 or (is_success(ts, success_threshold) is False and failure_kind(ts) == kd)],
                methods=methods, applications=("auroc",), **fair,
            )
            for kd in kinds
        }  # fmt: skip
    from ..formats.whowhen import whowhen_attribution

    ww = whowhen_attribution(scores)  # Who&When cases (converted logs): step- and agent-level accuracy
    if ww["n"]:
        res["whowhen_attribution"] = ww
    return json_safe(res)


def run_evaluation(
    scorer,
    trajectories,
    out_dir: str | os.PathLike,
    *,
    choose_reduction: str | None = None,
    choose_variant: str | None = None,
    k: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
    calibration: str = "platt",
    reduction_info: Mapping | None = None,
    title: str = "progadv evaluate",
    progress: bool = False,
    skipped: list | None = None,
    on_scored=None,
    merge_alphas: Sequence[float] = (),
    merge: str | Sequence[str] = "linear",
    merge_density: float | None = None,
) -> dict:
    """Score `trajectories`, evaluate every method and write the report under `out_dir`; return the metrics.

    skipped: a list to collect the trajectories the chat template cannot render (left out, named); without it the
    first such trajectory raises. on_scored: called with the scores before evaluation (the CLI names faults there).
    A trajectory with a numeric fault (`TrajectoryScore.error`) has no score under any reduction: it is left out of
    every metric, and `metrics["excluded"]` lists it with the skipped records. Raises `EvaluationError` when no
    trajectory is left.

    Several processes (WORLD_SIZE > 1, e.g. torchrun): every rank must call this; the trajectories are sharded
    across them (`distributed`), and the main process alone evaluates, writes and returns the metrics; the other
    ranks return {}.

    scorer: a `ProgressScorer` (or a `ProgressCritic`: its scorer is used); the trajectories are scored under its
    config. choose_reduction: None, or a metric in SELECTION_METRICS: then every token x step reduction is scored
    from one set of forward passes (`score_many` over `reduction_grid`), one is chosen by k-fold CV on that metric
    and the choice is stored under `reduction_selection` - the evaluated scores stay those of the scorer's own
    config. choose_variant: None, or a metric in SELECTION_METRICS: score with the support statistics (turned on
    for this run when the scorer's config lacks them) and choose a member of the progress-advantage family by the
    same k-fold protocol (`choose_variant`), stored under `variant_selection`. k: folds for that choice and for
    the attribution threshold. reduction_info: what `metrics["reduction"]`
    says about how the scorer's reductions were chosen. merge_alphas: also score against the merged reference
    pi_alpha (`merging.py`; `merge`: a name or several, `merge_density` for ties/dare) for each alpha, with the weights loaded once; each alpha becomes
    the variant `config.merged_variant_name(merge, alpha)`, evaluated (and choosable) like the others. Writes
    metrics.md, the plots and, last, metrics.json.
    """
    from .. import distributed  # several processes (torchrun): each scores a shard, the main process evaluates

    scorer = getattr(scorer, "scorer", scorer)
    if choose_variant and not scorer.config.wants_support:
        import copy
        import dataclasses

        scorer = copy.copy(scorer)  # shares the models; only this run's config gains the support statistics
        scorer.config = dataclasses.replace(scorer.config, support=True)
    selection = variant_choice = None
    merged = _merged_scores(scorer, trajectories, merge_alphas, merge, merge_density, seed, progress) if merge_alphas else {}
    if choose_reduction:
        c = scorer.config
        many = distributed.score_many(scorer, trajectories, reduction_grid(c), progress=progress, skipped=skipped)
        if many is None:  # not the main process
            return {}
        scores = many[f"{c.token_reduction}/{c.step_reduction}"]
        ok = {k_: split_faults(v)[0] for k_, v in many.items()}
        if ok[f"{c.token_reduction}/{c.step_reduction}"]:
            selection = _choose_reduction(ok, metric=choose_reduction, k=k, seed=seed)
    else:
        scores = distributed.score(scorer, trajectories, progress=progress, skipped=skipped)
        if scores is None:  # not the main process
            return {}
    for name, alpha_scores in merged.items():
        for ts, m in zip(scores, alpha_scores, strict=True):
            if ts.id != m.id:  # the same inputs, skipped alike: one list each, in order
                raise RuntimeError(f"merged scoring misaligned: {ts.id!r} against {m.id!r}")
            ts.variants[name], ts.step_variants[name] = m.score, m.advantages.tolist()
    if on_scored is not None:
        on_scored(scores)
    scores, faulted = split_faults(scores)
    if not scores:
        raise EvaluationError("no trajectory could be scored (every one has a numeric fault)")
    if choose_variant:
        variant_choice = _choose_variant(scores, metric=choose_variant, k=k, seed=seed)
    metrics = evaluate(
        scores, n_boot=n_boot, seed=seed, calibration=calibration, k=k, reduction=reduction_info,
        reduction_selection=selection, variant_selection=variant_choice,
    )  # fmt: skip
    metrics["excluded"] = {"skipped": [str(e) for e in skipped or ()], "numeric_faults": {s.id: s.error for s in faulted}}
    write_report(metrics, scores, out_dir, title=title)
    return metrics


def _merged_scores(scorer, trajectories, alphas, merge, density, seed, progress) -> dict:
    """{variant name: scores against pi_alpha} for each merge (a name or several) and alpha ({} on the other ranks
    of a multi-process run). One working copy of the weights per merge, rewritten per alpha
    (`MergedReference.set_alpha`); baselines and support statistics off (they are the plain run's)."""
    import copy
    import dataclasses

    from .. import distributed
    from ..config import merged_variant_name
    from ..merging import merged_reference

    out = {}
    for how in [merge] if isinstance(merge, str) else list(merge):
        sc = copy.copy(scorer)  # shares the models
        sc.config, sc.compute_baselines = dataclasses.replace(scorer.config, support=False), False
        sc.reference = merged_reference(scorer.policy, scorer.reference, alpha=alphas[0], merge=how,
                                        density=None if how == "linear" else density, seed=seed)  # fmt: skip
        try:
            for a in alphas:
                sc.reference.set_alpha(a)
                res = distributed.score(sc, trajectories, progress=progress, skipped=[])
                if res is not None:
                    out[merged_variant_name(how, a)] = res
        finally:
            sc.reference.release()
    return out
