"""Write an evaluation to disk: metrics.md, three PNG plots and, last, metrics.json.

metrics.json is written last and atomically (`utils.atomic_write_text`: a temporary file, then `os.replace`), so
its presence means the directory is complete.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..utils import atomic_write_text, write_json
from .plots import plot_best_of_n, plot_roc, plot_traces
from .tables import format_markdown

if TYPE_CHECKING:
    from ..scoring import TrajectoryScore

METRICS_JSON = "metrics.json"
METRICS_MD = "metrics.md"
ROC_PNG = "roc.png"
BEST_OF_N_PNG = "best_of_n.png"
TRACES_PNG = "traces.png"
REPORT_FILES = (METRICS_MD, ROC_PNG, BEST_OF_N_PNG, TRACES_PNG, METRICS_JSON)  # in the order they are written


def report_paths(out_dir: str | os.PathLike) -> dict[str, Path]:
    """{file name: path} of every file `write_report` writes under `out_dir`."""
    return {name: Path(out_dir) / name for name in REPORT_FILES}


def write_report(
    metrics: Mapping,
    scores: Sequence[TrajectoryScore],
    out_dir: str | os.PathLike,
    title: str = "progadv evaluate",
) -> dict[str, Path]:
    """Write metrics.md, roc.png, best_of_n.png, traces.png and finally metrics.json under `out_dir`.

    Returns {name: path}. `metrics` is `evaluate(...)`'s result; `scores` the same trajectories.
    """
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    thr = metrics.get("success_threshold")
    paths = report_paths(out_dir)
    # A previous run's metrics.json would vouch for a directory this run is about to change: remove it first.
    paths[METRICS_JSON].unlink(missing_ok=True)
    atomic_write_text(paths[METRICS_MD], format_markdown(metrics, title=title))
    plot_roc(metrics, scores, paths[ROC_PNG], threshold=thr)
    plot_best_of_n(metrics, paths[BEST_OF_N_PNG])
    plot_traces(scores, paths[TRACES_PNG], threshold=thr)
    write_json(paths[METRICS_JSON], metrics)  # strict: NaN/inf -> null
    return paths
