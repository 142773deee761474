"""Names and the scoring config: torch-free, so `progadv --help` and `import progadv_trl` stay light.

Every other module takes method, reduction and rule names from here; `scoring.py` does the math behind them.
"""

from __future__ import annotations

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
# Failure attribution: which step of a failed run is named as the mistake (evaluation/attribution.py).
ATTRIBUTION_RULES = ("min_cumsum", "min_step", "threshold")
# What a cross-validated choice (of a reduction, a rule) optimises (evaluation/reductions.py).
SELECTION_METRICS = ("auroc", "spearman", "best_of_n")


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

    def __post_init__(self):
        if self.token_reduction not in TOKEN_REDUCTIONS + PAPER_TOKEN_REDUCTIONS:
            raise ValueError(f"token_reduction must be one of {TOKEN_REDUCTIONS + PAPER_TOKEN_REDUCTIONS}, got {self.token_reduction!r}")
        if self.step_reduction not in STEP_REDUCTIONS:
            raise ValueError(f"step_reduction must be one of {STEP_REDUCTIONS}, got {self.step_reduction!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def to_dict(self) -> dict:
        return asdict(self)
