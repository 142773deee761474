"""What a score is for: best-of-N selection, success prediction (+ calibration) and failure attribution, with
intervals and reference points, written as metrics.json / metrics.md / plots.

Inputs are `TrajectoryScore`s (see `scoring.py`); every method's score is "higher = more likely to succeed".
One module per concern:

    labels       what counts as a success; the labelled arrays every metric reads
    stats        AUROC, vectorised statistics, bootstrap intervals (scipy), folds
    selection    the one best-of-N rule (`pick_best`), used by metrics.json, ProgressCritic and the callback
    prediction   success prediction (AUROC, Spearman)
    calibration  P(success): Calibrator, calibration_report, ECE
    attribution  which step broke a failed run, and how often that is right
    reductions   reduction_grid, candidate_reductions, choose_reduction (cross-validated)
    pipeline     evaluate (the metrics.json dict) and run_evaluation (scorer -> report)
    tables       text and markdown tables; plots: matplotlib figures; report: write_report

Importing this package does not import torch.
"""

from ..config import ATTRIBUTION_RULES, SELECTION_METRICS
from .attribution import attribute_failure, attribution_chance, failure_attribution
from .calibration import Calibrator, calibration_report, expected_calibration_error
from .labels import (
    available_methods,
    check_method,
    failure_kind,
    is_success,
    labelled_arrays,
    method_available,
    split_faults,
    success_value,
)
from .pipeline import EvaluationError, evaluate, run_evaluation
from .plots import new_figure, plot_best_of_n, plot_roc, plot_traces
from .prediction import success_prediction
from .reductions import (
    candidate_reductions,
    choose_reduction,
    choose_variant,
    reduction_grid,
    selection_metric,
    variant_candidates,
)
from .report import METRICS_JSON, METRICS_MD, REPORT_FILES, report_paths, write_report
from .selection import best_of_n, best_of_n_table, labelled_groups, pick_best, select_best, top_indices
from .stats import (
    CONFIDENCE,
    assign_folds,
    auroc,
    auroc_stat,
    bootstrap_ci,
    fold_ids,
    mean_stat,
    ratio_stat,
    spearman_stat,
)
from .tables import format_cell, format_markdown, format_table, markdown_table, summary_rows, text_table

__all__ = [
    "EvaluationError",
    "split_faults",
    "ATTRIBUTION_RULES", "CONFIDENCE", "METRICS_JSON", "METRICS_MD", "REPORT_FILES", "SELECTION_METRICS",
    "available_methods", "check_method", "choose_variant", "variant_candidates",
    "Calibrator", "assign_folds", "attribute_failure", "attribution_chance", "auroc", "auroc_stat", "best_of_n",
    "best_of_n_table", "bootstrap_ci", "calibration_report", "candidate_reductions", "choose_reduction", "evaluate",
    "expected_calibration_error", "failure_attribution", "failure_kind", "fold_ids", "format_cell",
    "format_markdown", "format_table", "is_success", "labelled_arrays", "labelled_groups", "markdown_table",
    "mean_stat", "method_available", "new_figure", "pick_best", "plot_best_of_n", "plot_roc", "plot_traces",
    "ratio_stat", "reduction_grid", "report_paths", "run_evaluation", "select_best", "selection_metric",
    "spearman_stat", "success_prediction", "success_value", "summary_rows", "text_table", "top_indices",
    "write_report",
]  # fmt: skip
