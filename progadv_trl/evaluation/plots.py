"""The report's figures: ROC curves, best-of-N bars, per-step traces of failed runs (matplotlib, Agg).

`new_figure` is the bare Figure every plot here (and the demo's training curves) draws on.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .labels import is_success
from ..utils import atomic_write_bytes

if TYPE_CHECKING:
    from ..scoring import TrajectoryScore


def save_png(fig, path: Path) -> None:
    """PNG bytes first, then an atomic write: an interrupted report leaves no half-written plot."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def new_figure(**kw):
    """A bare matplotlib Figure: it renders PNGs with the Agg backend and, unlike pyplot, touches no global
    state, so writing a report from a notebook or a training process leaves the user's backend alone."""
    from matplotlib.figure import Figure

    return Figure(**kw)


def plot_roc(metrics: Mapping, scores: Sequence[TrajectoryScore], path: Path, threshold=None) -> None:
    """ROC curve of every evaluated method (sklearn's roc_curve), AUROC and n in the legend."""
    from sklearn.metrics import roc_curve

    fig = new_figure(figsize=(5.5, 5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="chance")
    drawn = 0
    for m, e in metrics.get("methods", {}).items():
        pairs = [(ts.method_score(m), is_success(ts, threshold)) for ts in scores]
        pairs = [(s, y) for s, y in pairs if y is not None and math.isfinite(s)]
        y = np.array([p[1] for p in pairs], dtype=bool)
        if y.all() or not y.any():
            continue
        fpr, tpr, _ = roc_curve(y, np.array([p[0] for p in pairs]))
        sp = e["success_prediction"]
        ax.plot(fpr, tpr, lw=2 if m == "progress_advantage" else 1.2, label=f"{m} {sp['auroc']:.2f} (n={sp['n']})")
        drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "needs successes and failures", ha="center", va="center")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="Success prediction (AUROC)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_png(fig, path)


def plot_best_of_n(metrics: Mapping, path: Path) -> None:
    """Kept-rollout success per method with 95 % intervals, beside random pick, mean@N and oracle pass@N."""
    ref = metrics.get("best_of_n_reference") or {}
    bars = [(m, e["best_of_n"]["success"], e["best_of_n"]["success_ci"]) for m, e in metrics.get("methods", {}).items()]
    if ref:
        bars += [("random pick", ref["random_pick"], ref["random_pick_ci"]), ("mean@N", ref["mean_at_n"], ref["mean_at_n_ci"]),
                 ("oracle pass@N", ref["pass_at_n"], ref["pass_at_n_ci"])]  # fmt: skip
    fig = new_figure(figsize=(max(5, 0.9 * len(bars) + 1), 4))
    ax = fig.subplots()
    xs = np.arange(len(bars))
    vals = [v if v is not None else 0.0 for _, v, _ in bars]
    err = np.array([[v - c[0], c[1] - v] if (c is not None and v is not None) else [0, 0] for _, v, c in bars]).T
    colors = ["tab:blue" if i < len(bars) - (3 if ref else 0) else "tab:grey" for i in range(len(bars))]
    if bars:
        ax.bar(xs, vals, yerr=np.clip(err, 0, None), color=colors, capsize=3)
    ax.set_xticks(xs, [b[0] for b in bars], rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success of the kept rollout")
    ax.set_title(f"Best-of-N (groups: {ref.get('n_groups', 0)}, N≈{(ref.get('group_size') or {}).get('mean') or 0:.1f})")
    fig.tight_layout()
    save_png(fig, path)


def plot_traces(scores: Sequence[TrajectoryScore], path: Path, method: str = "progress_advantage", max_traces: int = 4,
                threshold=None) -> None:  # fmt: skip
    """Per-step advantage (bars) and its running sum (line) of a few failed trajectories, the labelled
    `failure_step` marked in red."""
    failed = [ts for ts in scores if is_success(ts, threshold) is False and len(ts.steps)]
    labelled = [ts for ts in failed if isinstance(ts.failure_step, int) and 0 <= ts.failure_step < len(ts.steps)]
    pick = (labelled or failed)[:max_traces]
    n = max(1, len(pick))
    fig = new_figure(figsize=(6, 2.2 * n))
    axes = fig.subplots(n, 1, squeeze=False)
    for ax, ts in zip(axes[:, 0], pick):
        v = ts.method_steps(method)
        x = np.arange(v.size)
        ax.bar(x, np.nan_to_num(v), color=["tab:red" if i == ts.failure_step else "tab:blue" for i in x], alpha=0.7)
        ax.plot(x, np.cumsum(np.nan_to_num(v)), color="black", marker="o", ms=3, lw=1, label="cumulative")
        if ts.failure_step is not None and 0 <= ts.failure_step < v.size:
            ax.axvline(ts.failure_step, color="tab:red", ls="--", lw=1, label=f"labelled mistake (step {ts.failure_step})")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(f"{ts.id}", fontsize=8)
        ax.set_ylabel(method if method != "progress_advantage" else "A_t", fontsize=8)
        ax.legend(fontsize=6, loc="best")
    if not pick:
        axes[0, 0].text(0.5, 0.5, "no failed trajectories", ha="center", va="center")
    axes[-1, 0].set_xlabel("step (assistant turn)")
    fig.tight_layout()
    save_png(fig, path)
