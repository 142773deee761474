"""P(success) from a raw score: `Calibrator` (Platt or isotonic), and its held-out quality (Brier, log loss, ECE)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .labels import labelled_arrays

if TYPE_CHECKING:
    from ..scoring import TrajectoryScore


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


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """ECE over `bins` equal-width bins of P(success): the bin-size-weighted mean |mean p - success rate|."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    err = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            err += m.mean() * abs(p[m].mean() - y[m].mean())
    return float(err)


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
    s, y, _ = labelled_arrays(scores, method, success_threshold)
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
                ece=expected_calibration_error(p, y[ev]),
            )
    out["calibrator"] = Calibrator(kind).fit(s, y).to_dict()
    return out
