"""Score records: what scoring returns per step and per trajectory (`StepScore`, `TrajectoryScore`), their strict
JSON form, and the plausibility rule they carry (`shortfalls`, `plausible_step_values`). Numpy only: evaluation reads
these without the tensor math of `scoring.py`, which re-exports every name here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .config import IMPLAUSIBLE_OFFSET


def shortfalls(gaps: np.ndarray, alpha: float) -> np.ndarray:
    """Per step, how far (nats) its worst token falls short of the plausibility bound log alpha + max log pi_theta:
    0 for a plausible step (gap <= -log alpha), NaN where the gap is."""
    return np.maximum(np.asarray(gaps, dtype=np.float64) + math.log(alpha), 0.0)


def plausibility(gap: float | None, alpha: float | None) -> dict:
    """One step's verdict at alpha: {"plausible", "shortfall"}; {} where the gap or alpha is missing or not finite.
    What a step's JSON and a session's candidate report."""
    if gap is None or alpha is None or not math.isfinite(gap):
        return {}
    short = float(shortfalls(np.array([gap]), alpha)[0])
    return {"plausible": short == 0.0, "shortfall": short}


def plausible_step_values(advantages: np.ndarray, gaps: np.ndarray, alpha: float) -> np.ndarray:
    """progress_advantage_plausible per step: a plausible step keeps its advantage; an implausible one is worth
    -(IMPLAUSIBLE_OFFSET + shortfall), below every plausible step and ordered by shortfall (smallest first). The
    semantics per application (docs/variants.md): at one state, candidates rank plausible-first, then by advantage;
    over a trajectory, the step reduction applies to these values, so `sum` ranks trajectories by their number of
    implausible steps first (then by the plausible steps' advantage less the shortfalls), `min` by their worst step,
    and attribution's min_step names the least plausible step before the lowest advantage."""
    adv = np.asarray(advantages, dtype=np.float64)
    short = shortfalls(gaps, alpha)
    return np.where(short > 0, -(IMPLAUSIBLE_OFFSET + short), adv)


# ----------------------------------------------------------------------------------------------------------------
# Result types (the `progadv score` JSON line is `TrajectoryScore.to_dict()`).


@dataclass
class StepScore:
    index: int  # 0-based assistant-turn index (what `failure_step` indexes)
    message_index: int  # index into the trajectory's messages
    advantage: float  # NaN (null in JSON) when truncation cut every token of the step
    tokens: int  # tokens scored
    truncated: bool  # some of this step's own tokens were cut by max_length
    # nats its least plausible token falls below the policy's top choice (`step_gaps`); None where not computed
    gap: float | None = None
    # What of the message the chat template renders nowhere ("reasoning", "content", "tool_calls"): not scored
    dropped: list[str] = field(default_factory=list)

    def to_dict(self, alpha: float | None = None) -> dict:
        d = {
            "index": self.index,
            "message_index": self.message_index,
            "advantage": _json_float(self.advantage),
            "tokens": self.tokens,
            "truncated": self.truncated,
        }
        if self.gap is not None:
            d["gap"] = _json_float(self.gap)
            d.update(plausibility(self.gap, alpha))
        if self.dropped:
            d["dropped"] = list(self.dropped)
        return d


@dataclass
class TrajectoryScore:
    id: str
    score: float
    steps: list[StepScore]
    baselines: dict[str, float] = field(default_factory=dict)
    # Per-step values of each baseline (for failure attribution by baselines), same order as `steps`.
    step_baselines: dict[str, list[float]] = field(default_factory=dict)
    group: str | None = None
    success: float | None = None
    failure_step: int | None = None
    truncation: dict | None = None
    token_log_ratios: list[list[float]] | None = None  # per step, on request
    metadata: dict | None = None
    # Set when the trajectory could not be scored (e.g. "non-finite logits in policy ..."): then the score, every
    # step advantage and every baseline are NaN, so no metric or logged figure can average them in.
    error: str | None = None
    # Members of the progress-advantage family other than the plain score ("progress_advantage_..."): trajectory
    # score and per-step values, like the baselines. Filled by score_from_token_stats when the support statistics
    # are there; other code may add its own (a merged reference) and evaluation picks them up by name.
    variants: dict[str, float] = field(default_factory=dict)
    step_variants: dict[str, list[float]] = field(default_factory=dict)
    # Support diagnostics (`support_report`): {"threshold", "out_of_support" (share of flagged steps), "steps": [...]}.
    support: dict | None = None
    # The alpha of the progress_advantage_plausible figures (steps' `plausible`/`shortfall`); None without gaps.
    plausibility_alpha: float | None = None

    @property
    def gaps(self) -> np.ndarray | None:
        """Per-step plausibility gaps (`step_gaps`), or None when the scorer did not have the top-1 log-probs."""
        if not self.steps or any(s.gap is None for s in self.steps):
            return None
        return np.array([s.gap for s in self.steps], dtype=np.float64)

    def implausible_share(self, alpha: float | None = None) -> float:
        """Share of this trajectory's scored steps that fail the plausibility constraint at `alpha` (default: the
        trajectory's); NaN without gaps."""
        g, alpha = self.gaps, alpha or self.plausibility_alpha
        if g is None or alpha is None or np.isnan(g).all():
            return float("nan")
        g = g[~np.isnan(g)]
        return float(np.mean(shortfalls(g, alpha) > 0))
    # "as_generated" when each step was scored in the context the model read (rendering.render_as_generated)
    rendering: str | None = None

    @property
    def out_of_support(self) -> float:
        """Share of this trajectory's steps out of the reference's support; NaN without support statistics."""
        v = (self.support or {}).get("out_of_support")
        return float("nan") if v is None else float(v)

    @property
    def advantages(self) -> np.ndarray:
        return np.array([s.advantage for s in self.steps], dtype=np.float64)

    def method_score(self, method: str) -> float:
        if method == "progress_advantage":
            return self.score
        if method in self.variants:
            return self.variants[method]
        return self.baselines.get(method, float("nan"))

    def method_steps(self, method: str) -> np.ndarray:
        if method == "progress_advantage":
            return self.advantages
        per_step = self.step_variants if method in self.step_variants else self.step_baselines
        return np.asarray(per_step.get(method, [np.nan] * len(self.steps)), dtype=np.float64)

    def to_dict(self) -> dict:
        d = {
            "id": self.id,
            "score": _json_float(self.score),
            "steps": [s.to_dict(self.plausibility_alpha) for s in self.steps],
            "baselines": {k: _json_float(v) for k, v in self.baselines.items()},
            "step_baselines": {k: [_json_float(x) for x in v] for k, v in self.step_baselines.items()},
        }
        if self.variants or self.step_variants:
            d["variants"] = {k: _json_float(v) for k, v in self.variants.items()}
            d["step_variants"] = {k: [_json_float(x) for x in v] for k, v in self.step_variants.items()}
        if self.support is not None:
            d["support"] = {
                "threshold": _json_float(self.support["threshold"]),
                "out_of_support": _json_float(self.support["out_of_support"]),
                "steps": [{k: (_json_float(v) if isinstance(v, float) else v) for k, v in st.items()}
                          for st in self.support["steps"]],
            }  # fmt: skip
        for key in ("plausibility_alpha", "group", "success", "failure_step", "truncation", "metadata", "error",
                    "rendering"):
            val = getattr(self, key)
            if val is not None:
                d[key] = val
        if self.token_log_ratios is not None:
            d["token_log_ratios"] = [[_json_float(x) for x in step] for step in self.token_log_ratios]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrajectoryScore":
        nan = float("nan")
        steps = [
            StepScore(
                index=s["index"],
                message_index=s["message_index"],
                advantage=nan if s["advantage"] is None else s["advantage"],
                tokens=s["tokens"],
                truncated=s["truncated"],
                gap=(nan if s["gap"] is None else s["gap"]) if "gap" in s else None,
                dropped=list(s.get("dropped") or []),
            )
            for s in d["steps"]
        ]
        return cls(
            id=d["id"],
            score=nan if d.get("score") is None else d["score"],
            steps=steps,
            baselines={k: (nan if v is None else v) for k, v in d.get("baselines", {}).items()},
            step_baselines={k: [nan if x is None else x for x in v] for k, v in d.get("step_baselines", {}).items()},
            group=d.get("group"),
            success=d.get("success"),
            failure_step=d.get("failure_step"),
            truncation=d.get("truncation"),
            token_log_ratios=d.get("token_log_ratios"),
            metadata=d.get("metadata"),
            error=d.get("error"),
            variants={k: (nan if v is None else v) for k, v in (d.get("variants") or {}).items()},
            step_variants={k: [nan if x is None else x for x in v] for k, v in (d.get("step_variants") or {}).items()},
            support=_support_from_json(d.get("support")),
            plausibility_alpha=d.get("plausibility_alpha"),
            rendering=d.get("rendering"),
        )


def _support_from_json(sup: dict | None) -> dict | None:
    if sup is None:
        return None
    nan = float("nan")
    num = ("ref_mean_logp", "ref_min_logp", "kl")
    return {
        "threshold": nan if sup.get("threshold") is None else sup["threshold"],
        "out_of_support": nan if sup.get("out_of_support") is None else sup["out_of_support"],
        "steps": [{k: (nan if k in num and v is None else v) for k, v in st.items()} for st in sup.get("steps", [])],
    }


def _json_float(x):
    # null for NaN and +-inf alike: json.dumps would write NaN/Infinity, which strict JSON readers reject.
    return None if x is None or not math.isfinite(x) else float(x)
