"""Pure scoring math: taken-token log-probs from hidden states (chunked), token and step reductions, baselines.

Everything here is a function of tensors or arrays; `engine.py` runs the models and the callback feeds the
tensors GRPO already computed. Both end in `score_from_token_stats`, so the math lives once.

Sign convention: every method's trajectory score is "higher = more likely to succeed".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .scores import (  # noqa: F401 - re-exported: the score records and the plausibility rule live there
    StepScore,
    TrajectoryScore,
    _json_float,
    _support_from_json,
    plausibility,
    plausible_step_values,
    shortfalls,
)
from .config import (  # noqa: F401 - re-exported: the names used to live here
    BASELINES,
    IMPLAUSIBLE_OFFSET,
    METHODS,
    PLAUSIBLE,
    PAPER_TOKEN_REDUCTIONS,
    STEP_REDUCTIONS,
    TOKEN_REDUCTIONS,
    VARIANTS,
    ScoringConfig,
)


# ----------------------------------------------------------------------------------------------------------------
# Log-probs of taken tokens from hidden states, without a [batch, seq, vocab] float32 tensor.


@torch.no_grad()
def token_logprob_stats(
    hidden: torch.Tensor,
    lm_head,
    targets: torch.Tensor,
    temperature: float = 1.0,
    topk: int = 0,
    chunk_size: int = 1024,
    with_vocab_stats: bool = False,
    keep_logprobs: bool = False,
    other_logprobs: torch.Tensor | None = None,
    with_top1: bool = False,
) -> dict[str, torch.Tensor]:
    """Log-prob of each target token (and optional whole-vocabulary statistics) from final hidden states.

    hidden: [N, H] hidden states at the positions that predict `targets` ([N]). The output layer runs on at most
    `chunk_size` rows at a time and the softmax is taken in float32, so peak memory is chunk_size x vocab floats.
    Returns float32 tensors of shape [N]: "logp"; with `with_vocab_stats` also "mean_logp" (mean over the
    vocabulary of log p, for self-certainty) and "topk_logp" (mean of the top-k log-probs, for DeepConf); with
    `with_top1` also "top1_logp" (max over the vocabulary of log p: the plausibility constraint's reference point,
    one max over logits the pass already holds).

    Support diagnostics need two models' distributions at the same positions, so they take two passes:
    `keep_logprobs` returns this model's whole log-softmax rows as "logprobs" ([N, V] float32: the caller holds
    N x V x 4 bytes until the second pass), and `other_logprobs` (those rows of the other model, same positions)
    makes this pass return "kl_other_self" = KL(other || this) and "kl_self_other" = KL(this || other) per row,
    computed chunk by chunk.
    """
    out = {"logp": []}
    if with_vocab_stats:
        out["mean_logp"], out["topk_logp"] = [], []
    if with_top1:
        out["top1_logp"] = []
    if keep_logprobs:
        out["logprobs"] = []
    if other_logprobs is not None:
        out["kl_other_self"], out["kl_self_other"] = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        logits = lm_head(hidden[start : start + chunk_size]).float()
        if temperature != 1.0:
            logits = logits / temperature
        lse = torch.logsumexp(logits, dim=-1)
        tgt = targets[start : start + chunk_size]
        out["logp"].append(logits.gather(-1, tgt[:, None]).squeeze(-1) - lse)
        if with_top1:
            out["top1_logp"].append(logits.max(-1).values - lse)
        if with_vocab_stats:
            out["mean_logp"].append(logits.mean(-1) - lse)
            k = min(max(topk, 1), logits.shape[-1])
            out["topk_logp"].append(logits.topk(k, dim=-1).values.mean(-1) - lse)
        if keep_logprobs or other_logprobs is not None:
            lp = logits - lse[:, None]
            if keep_logprobs:
                out["logprobs"].append(lp)
            if other_logprobs is not None:
                o = other_logprobs[start : start + chunk_size].to(lp.device)
                out["kl_other_self"].append(_kl_rows(o, lp))
                out["kl_self_other"].append(_kl_rows(lp, o))
    return {k: (torch.cat(v) if v else torch.zeros(0)) for k, v in out.items()}


def _kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probs; a token p gives no mass adds nothing (0 log 0 = 0, even against -inf)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


# ----------------------------------------------------------------------------------------------------------------
# Per-trajectory token statistics -> step advantages -> trajectory scores and baselines (numpy, float64).


@dataclass
class TokenStats:
    """Per action token of one trajectory, in order. Arrays are float64 except `step` (int: assistant-turn index)."""

    step: np.ndarray
    policy_logp: np.ndarray
    reference_logp: np.ndarray
    policy_mean_logp: np.ndarray | None = None  # mean over the vocabulary of log p (self-certainty)
    policy_topk_logp: np.ndarray | None = None  # mean of the top-k log p (DeepConf)
    vocab_size: int | None = None
    # Support diagnostics (ScoringConfig.support): full-vocabulary KLs of the two next-token distributions.
    kl_policy_ref: np.ndarray | None = None  # KL(pi_theta || pi_ref) at the state before each action token
    kl_ref_policy: np.ndarray | None = None  # KL(pi_ref || pi_theta) there
    # max over the vocabulary of log pi_theta at each action token's position (the plausibility constraint)
    policy_top1_logp: np.ndarray | None = None

    @property
    def log_ratio(self) -> np.ndarray:
        return self.policy_logp - self.reference_logp


def aggregate(x: np.ndarray, how: str) -> float:
    """sum | mean | min | max | last of a 1-D array; NaN when empty."""
    if x.size == 0:
        return float("nan")
    if how == "sum":
        return float(x.sum())
    if how == "mean":
        return float(x.mean())
    if how == "min":
        return float(x.min())
    if how == "max":
        return float(x.max())
    if how == "last":
        return float(x[-1])
    raise ValueError(f"unknown reduction {how!r}")


def _per_step(values: np.ndarray, step: np.ndarray, n_steps: int, how: str) -> np.ndarray:
    return np.array([aggregate(values[step == i], how) for i in range(n_steps)], dtype=np.float64)


def step_advantages(stats: TokenStats, n_steps: int, beta: float = 1.0, token_reduction: str = "sum") -> np.ndarray:
    """Advantage of every step; NaN for a step with no scored tokens (cut by truncation)."""
    if token_reduction.startswith("paper_"):
        how = token_reduction[len("paper_") :]
        return beta * (
            _per_step(stats.policy_logp, stats.step, n_steps, how)
            - _per_step(stats.reference_logp, stats.step, n_steps, how)
        )
    return beta * _per_step(stats.log_ratio, stats.step, n_steps, token_reduction)


def reduce_steps(values: np.ndarray, how: str = "sum") -> float:
    """One trajectory score from per-step values (NaN steps, i.e. cut by truncation, are left out)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan")
    if how == "bottom10":
        k = max(1, math.ceil(0.1 * v.size))
        return float(np.sort(v)[:k].mean())
    if how == "min_cumsum":
        return float(np.cumsum(v).min())
    return aggregate(v, how)


def _sliding_means(x: np.ndarray, window: int) -> np.ndarray:
    if x.size <= window:
        return np.array([x.mean()])
    c = np.concatenate([[0.0], np.cumsum(x)])
    return (c[window:] - c[:-window]) / window


def baseline_scores(stats: TokenStats, n_steps: int, config: ScoringConfig) -> dict[str, dict]:
    """Baselines from the same forward passes: {method: {"score": float, "steps": per-step values}}.

    policy_logprob / reference_logprob: mean log-prob of the action tokens (length-normalised).
    self_certainty (Kang et al. 2025): KL(U || p) = -log V - mean_v log p_v, averaged over action tokens.
    DeepConf (Fu et al. 2025): token confidence c = -mean of the top-k log-probs; larger means more peaked, i.e.
    more confident. deepconf_tail = mean c over the last N tokens; deepconf_bottom10 = mean of the lowest 10 % of
    sliding-window group confidences.
    """
    out = {
        "policy_logprob": (stats.policy_logp, "mean"),
        "reference_logprob": (stats.reference_logp, "mean"),
    }
    res = {}
    for name, (vals, how) in out.items():
        res[name] = {"score": aggregate(vals, how), "steps": _per_step(vals, stats.step, n_steps, how)}
    if stats.policy_mean_logp is not None and stats.vocab_size:
        sc = -math.log(stats.vocab_size) - stats.policy_mean_logp
        res["self_certainty"] = {"score": aggregate(sc, "mean"), "steps": _per_step(sc, stats.step, n_steps, "mean")}
    if stats.policy_topk_logp is not None:
        conf = -stats.policy_topk_logp
        steps = _per_step(conf, stats.step, n_steps, "mean")
        if conf.size:
            tail = float(conf[-config.deepconf_tail_tokens :].mean())
            groups = _sliding_means(conf, config.deepconf_window)
            k = max(1, math.ceil(0.1 * groups.size))
            bottom = float(np.sort(groups)[:k].mean())
        else:
            tail = bottom = float("nan")
        res["deepconf_tail"] = {"score": tail, "steps": steps}
        res["deepconf_bottom10"] = {"score": bottom, "steps": steps}
    return res


def variant_token_values(stats: TokenStats, config: ScoringConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{variant: (per-token values, mask of the tokens kept)} for the VARIANTS; {} without support statistics.

    centred_policy subtracts KL(pi_theta||pi_ref)(s), the policy's expected log-ratio in the state: on the policy's
    own rollouts it measures the action taken against what the policy would do there. centred_reference adds
    KL(pi_ref||pi_theta)(s), minus the reference's expected log-ratio: the same centring for the reference's
    rollouts. clipped bounds each token's log-ratio to [-clip, clip]; in_support leaves out tokens whose reference
    log-prob is below support_threshold (where the log-ratio is dominated by the reference's tail).
    """
    if stats.kl_policy_ref is None or stats.kl_ref_policy is None:
        return {}
    lr = stats.log_ratio
    every = np.ones(lr.shape, dtype=bool)
    return {
        "progress_advantage_centred_policy": (lr - stats.kl_policy_ref, every),
        "progress_advantage_centred_reference": (lr + stats.kl_ref_policy, every),
        "progress_advantage_clipped": (np.clip(lr, -config.clip, config.clip), every),
        "progress_advantage_in_support": (lr, stats.reference_logp >= config.support_threshold),
    }


def variant_scores(stats: TokenStats, n_steps: int, config: ScoringConfig) -> dict[str, dict]:
    """{variant: {"score", "steps"}}: each variant's token values through the token reduction, beta and the step
    reduction of progress_advantage. A paper_* token reduction reduces the variant's per-token values with its plain
    counterpart (the variants are per-token quantities; there is no per-model split of them). A step with no token
    kept (in_support) is NaN and left out of the step reduction, as a step cut by truncation is."""
    how = config.token_reduction.removeprefix("paper_")
    out = {}
    for name, (vals, keep) in variant_token_values(stats, config).items():
        steps = config.beta * _per_step(vals[keep], stats.step[keep], n_steps, how)
        out[name] = {"score": reduce_steps(steps, config.step_reduction), "steps": steps}
    return out


def step_gaps(stats: TokenStats, n_steps: int) -> np.ndarray | None:
    """Per step, how far (nats) its least plausible token falls below the policy's own top choice at that position:
    max over the step's tokens of max_v log pi_theta(v) - log pi_theta(x), >= 0 (0: every token was the argmax). NaN
    for a step with no tokens; None without the top-1 log-probs (TRL's training tensors do not carry them)."""
    if stats.policy_top1_logp is None:
        return None
    gap = np.maximum(stats.policy_top1_logp - stats.policy_logp, 0.0)  # float rounding can make the argmax -1e-7
    return _per_step(gap, stats.step, n_steps, "max")


def support_report(stats: TokenStats, n_steps: int, threshold: float) -> dict | None:
    """Per step: the reference's mean and minimum token log-prob, the mean per-token KL(pi_theta||pi_ref), and
    whether the step is out of the reference's support (min below `threshold`; None for a step with no tokens);
    `out_of_support`: the share of flagged steps among the steps with tokens. None without support statistics."""
    if stats.kl_policy_ref is None:
        return None
    mean = _per_step(stats.reference_logp, stats.step, n_steps, "mean")
    low = _per_step(stats.reference_logp, stats.step, n_steps, "min")
    kl = _per_step(stats.kl_policy_ref, stats.step, n_steps, "mean")
    flags = [None if math.isnan(m) else bool(m < threshold) for m in low]
    scored = [f for f in flags if f is not None]
    return {
        "threshold": threshold,
        "out_of_support": float(np.mean(scored)) if scored else float("nan"),
        "steps": [
            {"ref_mean_logp": float(a), "ref_min_logp": float(b), "kl": float(c), "out_of_support": f}
            for a, b, c, f in zip(mean, low, kl, flags)
        ],
    }


def numeric_fault(stats: TokenStats) -> str | None:
    """Why a trajectory's token statistics cannot be scored, or None. With finite logits every log-prob is finite
    (log-softmax of finite numbers), so a NaN or inf log-prob means NaN or inf logits: a broken checkpoint (a NaN
    weight), an overflow in half precision."""
    parts = []
    for who, lp in (("policy", stats.policy_logp), ("reference", stats.reference_logp)):
        bad = ~np.isfinite(lp)
        if bad.any():
            steps = sorted({int(x) for x in stats.step[bad]})
            shown = ", ".join(map(str, steps[:10])) + (", ..." if len(steps) > 10 else "")
            parts.append(f"in {who} ({int(bad.sum())} of {lp.size} action tokens; steps {shown})")
    return "non-finite logits " + " and ".join(parts) if parts else None


def score_from_token_stats(
    stats: TokenStats,
    n_steps: int,
    config: ScoringConfig,
    *,
    id: str = "",
    message_indices: list[int] | None = None,
    truncated_steps: set[int] | frozenset = frozenset(),
    with_token_ratios: bool = False,
) -> TrajectoryScore:
    """The one place token statistics become a `TrajectoryScore` (the engine and the callback both call it)."""
    adv = step_advantages(stats, n_steps, config.beta, config.token_reduction)
    counts = np.bincount(stats.step, minlength=n_steps) if stats.step.size else np.zeros(n_steps, dtype=int)
    msg = message_indices if message_indices is not None else list(range(n_steps))
    steps = [
        StepScore(index=i, message_index=msg[i], advantage=float(adv[i]), tokens=int(counts[i]), truncated=i in truncated_steps)
        for i in range(n_steps)
    ]
    gaps = step_gaps(stats, n_steps)
    if gaps is not None:
        for st, g in zip(steps, gaps):
            st.gap = float(g)
    base = baseline_scores(stats, n_steps, config)
    var = variant_scores(stats, n_steps, config)
    if gaps is not None:
        pv = plausible_step_values(adv, gaps, config.plausibility_alpha)
        var[PLAUSIBLE] = {"score": reduce_steps(pv, config.step_reduction), "steps": pv}
    ratios = None
    if with_token_ratios:
        lr = stats.log_ratio
        ratios = [lr[stats.step == i].tolist() for i in range(n_steps)]
    res = TrajectoryScore(
        id=id,
        score=reduce_steps(adv, config.step_reduction),
        steps=steps,
        baselines={k: v["score"] for k, v in base.items()},
        step_baselines={k: v["steps"].tolist() for k, v in base.items()},
        token_log_ratios=ratios,
        variants={k: v["score"] for k, v in var.items()},
        step_variants={k: v["steps"].tolist() for k, v in var.items()},
        support=support_report(stats, n_steps, config.support_threshold),
        plausibility_alpha=config.plausibility_alpha if gaps is not None else None,
    )
    fault = numeric_fault(stats)
    if fault:
        # Every figure of this trajectory goes: a baseline from a sound policy next to a missing progress score
        # would compare methods on different trajectories. Token counts stay, to show what was attempted.
        nan = float("nan")
        res.error, res.score = fault, nan
        for st in res.steps:
            st.advantage = nan
            st.gap = None if st.gap is None else nan
        res.baselines = {k: nan for k in res.baselines}
        res.step_baselines = {k: [nan] * len(v) for k, v in res.step_baselines.items()}
        res.variants = {k: nan for k in res.variants}
        res.step_variants = {k: [nan] * len(v) for k, v in res.step_variants.items()}
    return res
