"""Labels: what counts as a success, which methods were computed, and the labelled arrays every metric reads.

`success` may be a bool or a float reward; a float counts as a success when it is > `success_threshold` (0 by
default). Unlabelled trajectories (`success` None) are left out of every metric that needs a label.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..scoring import TrajectoryScore


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


def available_methods(scores: Sequence[TrajectoryScore]) -> tuple[str, ...]:
    """The methods evaluation enumerates: METHODS, then every variant some score carries (`config.method_names`:
    known variants in their order, run-time ones sorted), then every other baseline some score carries (sorted; e.g.
    a trained reward model, `demo/reward_models.py`), so a variant added by filling `ts.variants` or a baseline added
    by filling `ts.baselines` (under a name outside the progress-advantage family) is evaluated without registering
    it anywhere, as a baseline."""
    from ..config import method_names

    return method_names({v for ts in scores for v in ts.variants}, {b for ts in scores for b in ts.baselines})


def check_method(method: str, scores: Sequence[TrajectoryScore] = ()) -> None:
    """A method name is one of METHODS, a progress-advantage variant or a baseline the scores carry; anything else
    names the known ones."""
    from ..config import METHODS, in_family

    if method not in METHODS and not in_family(method) and not any(method in ts.baselines for ts in scores):
        known = available_methods(scores)
        raise ValueError(f"method must be one of {known} (or a progress_advantage_... variant), got {method!r}")


def out_of_support_share(scores: Sequence[TrajectoryScore]) -> dict | None:
    """Share of scored steps flagged out of the reference's support, over a set; None without support statistics."""
    with_support = [ts for ts in scores if ts.support]
    if not with_support:
        return None
    flags = [st["out_of_support"] for ts in with_support for st in ts.support["steps"]]
    flags = [f for f in flags if f is not None]
    thr = with_support[0].support["threshold"]
    return {"share": float(np.mean(flags)) if flags else None, "n_steps": len(flags), "threshold": thr,
            "trajectories_with_a_flagged_step": sum(any(st["out_of_support"] for st in ts.support["steps"])
                                                    for ts in with_support)}  # fmt: skip


def implausible_share(scores: Sequence[TrajectoryScore], alpha: float | None = None) -> dict | None:
    """Share of scored steps that fail the policy's plausibility constraint at `alpha` (default: each trajectory's
    own), over a set; None where no trajectory carries the plausibility gaps."""
    from ..config import DEFAULT_ALPHA
    from ..scores import shortfalls

    with_gaps = [ts for ts in scores if ts.gaps is not None]
    if not with_gaps:
        return None
    alpha = alpha or with_gaps[0].plausibility_alpha or DEFAULT_ALPHA
    g = np.concatenate([ts.gaps for ts in with_gaps])
    g = g[~np.isnan(g)]
    flags = shortfalls(g, alpha) > 0  # the one rule (scores.shortfalls), as each trajectory's own share
    return {"share": float(flags.mean()) if flags.size else None, "n_steps": int(flags.size), "alpha": alpha,
            "trajectories_with_an_implausible_step": sum(bool(ts.implausible_share(alpha) > 0) for ts in with_gaps)}


def method_available(scores: Sequence[TrajectoryScore], method: str) -> bool:
    """A method is evaluated only if some trajectory has a finite score for it (a baseline not computed is all NaN)."""
    return any(math.isfinite(ts.method_score(method)) for ts in scores)


def failure_kind(ts: TrajectoryScore):
    """`metadata["failure_kind"]` ("decision", "luck", ...) or None."""
    return ts.metadata.get("failure_kind") if isinstance(ts.metadata, Mapping) else None


def labelled_arrays(
    scores: Sequence[TrajectoryScore], method: str, threshold: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def split_faults(scores) -> tuple[list, list]:
    """(scored, faulted): trajectories with a usable score, and those whose logits were not finite (`error` set,
    see `scoring.numeric_fault`); the latter are left out of every metric and counted instead."""
    ok = [s for s in scores if getattr(s, "error", None) is None]
    return ok, [s for s in scores if getattr(s, "error", None) is not None]
