"""Names and the scoring config: torch-free, so `progadv --help` and `import progadv_trl` stay light.

Every other module takes method, reduction and rule names from here; `scoring.py` does the math behind them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

# Token reductions turn a step's per-token log-ratios into its advantage. "sum" is the exact A_t (times beta).
TOKEN_REDUCTIONS = ("sum", "mean", "min", "max", "last")
# The paper's public code reduces each model's log-probs first and subtracts after: agg(log pi) - agg(log ref).
# Offered under names that say so; they are not the A_t of the theory.
PAPER_TOKEN_REDUCTIONS = ("paper_mean", "paper_min", "paper_max", "paper_last")
# Step reductions turn a trajectory's step advantages into one score.
STEP_REDUCTIONS = ("sum", "mean", "min", "max", "last", "bottom10", "min_cumsum")
# Every method's trajectory score is "higher = more likely to succeed".
METHODS = (
    "progress_advantage",
    "policy_logprob",
    "reference_logprob",
    "self_certainty",
    "deepconf_tail",
    "deepconf_bottom10",
)
BASELINES = METHODS[1:]
# Variants of progress advantage (scoring.variant_scores), computed when the support statistics are (ScoringConfig
# .support). Each goes through the same token reduction, beta and step reduction as progress_advantage. Other
# members of the family may be added at run time by filling `TrajectoryScore.variants[name]` with a name that
# starts with "progress_advantage_" (e.g. a merged reference): evaluation enumerates what the scores carry.
VARIANTS = (
    "progress_advantage_centred_policy",  # log-ratio - KL(pi_theta || pi_ref)(s): on-policy centring
    "progress_advantage_centred_reference",  # log-ratio + KL(pi_ref || pi_theta)(s): the reference's rollouts
    "progress_advantage_clipped",  # log-ratio clipped to [-clip, clip]
    "progress_advantage_in_support",  # tokens with reference log-prob < support_threshold left out
)
FAMILY_PREFIX = "progress_advantage_"
# The plausibility-gated member (scoring.plausible_step_values): a step counts only where the policy itself finds
# every one of its tokens plausible, log pi_theta(x) >= log alpha + max_v log pi_theta(v) (contrastive decoding's
# adaptive plausibility constraint, Li et al. 2023, brought to agent steps). GRPO moves probability only where the
# policy samples; where it rarely goes, the log-ratio is a side effect of normalisation, not Q* - V*. Needs only the
# policy's top-1 log-prob per action token (from the policy pass's own softmax), not the support statistics.
PLAUSIBLE = "progress_advantage_plausible"
# The alpha grid a cross-validated choice ranges over (evaluation.fair: alpha is part of the method's rule, chosen on
# the folds it is not reported on, like the step reduction); DEFAULT_ALPHA is contrastive decoding's 0.1.
# It reaches 0.9 (a token within 0.11 nats of the top one): on the five-seed study a grid that stopped at 0.3 chose
# its top for AUROC in 15 of 15 seed-regimes, so its best rule may have lain past the edge.
PLAUSIBILITY_ALPHAS = (0.01, 0.03, 0.1, 0.3, 0.5, 0.7, 0.9)
DEFAULT_ALPHA = 0.1
# An implausible step's value is -(IMPLAUSIBLE_OFFSET + shortfall): below every plausible step's advantage (|A_t| is
# beta times a few hundred nats at most), ordered among themselves by shortfall. A sum over steps thus ranks
# trajectories by their number of implausible steps first. Finite, so every reduction and JSON writer takes it.
IMPLAUSIBLE_OFFSET = 1e6
# Weight-space merges for the merged reference pi_alpha = pi_ref + alpha * (pi_theta - pi_ref) (merging.py). Each
# alpha scored becomes the variant `merged_variant_name(merge, alpha)`.
MERGES = ("linear", "ties", "dare_linear", "dare_ties")


def merged_variant_name(merge: str, alpha: float) -> str:
    """The variant name of progress advantage against pi_alpha, e.g. progress_advantage_merged_linear_a0.5."""
    return f"{FAMILY_PREFIX}merged_{merge}_a{float(alpha):g}"
# How a conversation becomes token rows (rendering.py): whole, each step as generated, or whichever is exact.
RENDERINGS = ("auto", "whole", "as_generated")
# Failure attribution: which step of a failed run is named as the mistake (evaluation/attribution.py).
ATTRIBUTION_RULES = ("min_cumsum", "min_step", "threshold")
# What a cross-validated choice (of a reduction, a rule) optimises (evaluation/reductions.py).
SELECTION_METRICS = ("auroc", "spearman", "best_of_n")


def in_family(method: str) -> bool:
    """progress_advantage or one of its variants (named "progress_advantage_..."), as opposed to a baseline."""
    return method == "progress_advantage" or method.startswith(FAMILY_PREFIX)


def method_names(variant_names=(), baseline_names=()) -> tuple[str, ...]:
    """METHODS, then the given variant names in a stable order: the known VARIANTS first (in their order), then any
    other (run-time) names sorted; then any other baselines given (sorted), e.g. a trained reward model whose scores
    were put in `TrajectoryScore.baselines`. What evaluation enumerates."""
    given = {v for v in variant_names if in_family(v) and v != "progress_advantage"}
    known = (PLAUSIBLE, *VARIANTS)
    extra = {b for b in baseline_names if not in_family(b) and b not in METHODS}
    return METHODS + tuple(v for v in known if v in given) + tuple(sorted(given - set(known))) + tuple(sorted(extra))


def extra_baselines(methods) -> tuple[str, ...]:
    """The baselines among `methods` that are not one of METHODS (run-time ones, such as trained reward models):
    the fair comparison sets progress advantage against each of them head to head."""
    return tuple(m for m in methods if not in_family(m) and m not in METHODS)


# Default out-of-support threshold on a token's reference log-prob: log(1e-2), a token the reference gives less than
# 1 in 100. Chosen on a validation split of the demo study (seeds 0-1, the in-support variant's AUROC over successes +
# decision failures, both regimes, among log 0.1 ... log 1e-6) and reported on seeds 2-4:
# `python benchmarks/support_threshold.py runs/study` (benchmarks/results/support_threshold.json).
SUPPORT_THRESHOLD = math.log(1e-2)


@dataclass
class ScoringConfig:
    """How token log-ratios become step advantages and trajectory scores."""

    beta: float = field(default=1.0, metadata={"help": "A_t = beta * sum of token log-ratios; the KL coefficient of training."})
    token_reduction: str = field(default="sum", metadata={"help": f"One of {TOKEN_REDUCTIONS + PAPER_TOKEN_REDUCTIONS}."})
    step_reduction: str = field(default="sum", metadata={"help": f"One of {STEP_REDUCTIONS}."})
    temperature: float = field(
        default=1.0, metadata={"help": "Logits are divided by this before the softmax. The theory holds at 1.0."}
    )
    topk: int = field(default=20, metadata={"help": "DeepConf token confidence: minus the mean log-prob of the top k."})
    deepconf_window: int = field(default=32, metadata={"help": "DeepConf group confidence: sliding window in tokens."})
    deepconf_tail_tokens: int = field(default=64, metadata={"help": "DeepConf tail confidence: the last N action tokens."})
    support: bool = field(
        default=False,
        metadata={"help": "Support diagnostics and the variants: full-vocabulary KL(pi||ref) and KL(ref||pi) at every "
                          "action token. Costs one reference pass's worth of output-layer work more and keeps the "
                          "policy's log-softmax rows (action tokens x vocabulary float32) of one batch in memory."},
    )  # fmt: skip
    support_threshold: float = field(
        default=SUPPORT_THRESHOLD,
        metadata={"help": "A step is out of the reference's support when its least likely token has reference "
                          "log-prob below this (also what progress_advantage_in_support leaves out). Default log(1e-2) "
                          "= -4.61, chosen on a validation split of the demo study (config.SUPPORT_THRESHOLD)."},
    )  # fmt: skip
    clip: float = field(
        default=5.0,
        metadata={"help": "progress_advantage_clipped: token log-ratios clipped to [-clip, clip]. 5 nats (a token "
                          "~150x likelier under one model) is a round default, not tuned."},
    )  # fmt: skip
    variant: str = field(
        default="progress_advantage",
        metadata={"help": f"The member of the progress-advantage family a critic uses by default (best-of-N, success "
                          f"prediction, attribution, the session's choose): progress_advantage, {PLAUSIBLE} or one of "
                          f"{VARIANTS}."},
    )  # fmt: skip
    plausibility_alpha: float = field(
        default=DEFAULT_ALPHA,
        metadata={"help": f"{PLAUSIBLE}: a step is plausible when each of its tokens has policy probability >= alpha "
                          f"times the policy's top choice at that position. Contrastive decoding's 0.1; `progadv "
                          f"evaluate` chooses among {PLAUSIBILITY_ALPHAS} by CV."},
    )  # fmt: skip
    plausibility_alpha_source: str = field(
        default="default (contrastive decoding's 0.1, not tuned)",
        metadata={"help": "How plausibility_alpha was chosen (recorded in a bundle's manifest)."},
    )  # fmt: skip

    rendering: str = field(
        default="auto",
        metadata={"help": f"One of {RENDERINGS}. whole: the conversation rendered once (exact for prefix-preserving "
                          "templates). as_generated: each step in the context the model read (the conversation up to it "
                          "with the generation prompt, then the turn as the template writes it, reasoning included); "
                          "shared context runs once. auto: whole where the template is prefix-preserving for the "
                          "conversation, else as generated (said once per run)."},
    )  # fmt: skip
    strict: bool = field(
        default=False,
        metadata={"help": "Refuse a step whose tool calls, content or reasoning the chat template renders nowhere "
                          "(default: score it and flag it `dropped`)."},
    )  # fmt: skip

    def __post_init__(self):
        if self.rendering not in RENDERINGS:
            raise ValueError(f"rendering must be one of {RENDERINGS}, got {self.rendering!r}")
        if self.token_reduction not in TOKEN_REDUCTIONS + PAPER_TOKEN_REDUCTIONS:
            raise ValueError(f"token_reduction must be one of {TOKEN_REDUCTIONS + PAPER_TOKEN_REDUCTIONS}, got {self.token_reduction!r}")
        if self.step_reduction not in STEP_REDUCTIONS:
            raise ValueError(f"step_reduction must be one of {STEP_REDUCTIONS}, got {self.step_reduction!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not self.clip > 0:
            raise ValueError(f"clip must be > 0, got {self.clip}")
        if not 0 < self.plausibility_alpha <= 1:
            raise ValueError(f"plausibility_alpha must be in (0, 1], got {self.plausibility_alpha}")
        if not in_family(self.variant):
            raise ValueError(f"variant must be progress_advantage or a name starting with {FAMILY_PREFIX!r} (e.g. one "
                             f"of {VARIANTS}), got {self.variant!r}")  # fmt: skip

    @property
    def wants_support(self) -> bool:
        """Whether scoring computes the support statistics: asked for, or needed by the configured variant."""
        return bool(self.support) or self.variant in VARIANTS

    def variant_params(self) -> dict:
        """The variant's name and the parameters it depends on (what a bundle manifest records)."""
        return {"name": self.variant, "params": {"clip": self.clip, "support_threshold": self.support_threshold,
                                                 "plausibility_alpha": self.plausibility_alpha,
                                                 "plausibility_alpha_source": self.plausibility_alpha_source,
                                                 "beta": self.beta, "token_reduction": self.token_reduction,
                                                 "step_reduction": self.step_reduction}}  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self)
