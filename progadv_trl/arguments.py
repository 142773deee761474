"""The `progadv` commands' options: one dataclass per argument group, with `help` metadata, parsed by transformers'
`HfArgumentParser` in `cli.py`. Torch-free, so `progadv --help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import (
    MERGES,
    PAPER_TOKEN_REDUCTIONS,
    PLAUSIBILITY_ALPHAS,
    PLAUSIBLE,
    RENDERINGS,
    SELECTION_METRICS,
    STEP_REDUCTIONS,
    TOKEN_REDUCTIONS,
    VARIANTS,
)
from .formats import FORMATS

@dataclass
class ModelArguments:
    """The models: a critic bundle, or a policy/reference checkpoint pair."""

    bundle: str | None = field(default=None, metadata={"help": "a critic bundle directory (progadv export / the training callback)"})
    policy: str | None = field(default=None, metadata={"help": "policy checkpoint directory, or a LoRA adapter directory"})
    reference: str | None = field(
        default=None,
        metadata={"help": "reference checkpoint (LoRA policy: default the adapter's base). With --bundle: where a "
                          "reference recorded by identity lives"},
    )
    dtype: str | None = field(default=None, metadata={"help": "torch dtype to load the models in (default: the checkpoint's)"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1, ... (default: cpu). Under torchrun, "
                                                               "cuda means each rank's own GPU (cuda:LOCAL_RANK)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code shipped with the checkpoint"})


@dataclass
class ScoringArguments:
    """Overrides of the scoring config (default: the bundle's, else beta=1, sum over tokens, sum over steps)."""

    beta: float | None = field(default=None, metadata={"help": "A_t = beta * sum of token log-ratios (default 1.0)"})
    token_reduction: str | None = field(default=None, metadata={"choices": TOKEN_REDUCTIONS + PAPER_TOKEN_REDUCTIONS,
                                                                "help": "how a step's token log-ratios are reduced"})  # fmt: skip
    step_reduction: str | None = field(default=None, metadata={"choices": STEP_REDUCTIONS,
                                                               "help": "how a trajectory's steps are reduced"})  # fmt: skip
    temperature: float | None = field(default=None, metadata={"help": "divide logits by this (the theory holds at 1.0)"})
    max_length: int | None = field(default=None, metadata={"help": "truncate longer trajectories (start + most recent kept)"})
    batch_tokens: int | None = field(default=None, metadata={
        "help": "padded tokens per forward pass (default: 2048 on a CPU, 16384 on a GPU)"})
    support: bool = field(default=False, metadata={"help": "support diagnostics (per step: reference mean/min token "
                                                           "log-prob, KL(pi||ref), out-of-support flag) and the "
                                                           "progress-advantage variants; keeps one batch's policy "
                                                           "log-softmax rows (action tokens x vocabulary floats)"})  # fmt: skip
    support_threshold: float | None = field(default=None, metadata={"help": "a step is out of support when its least "
                                                                            "likely token's reference log-prob is "
                                                                            "below this (default log(1e-2), chosen on a validation split)"})  # fmt: skip
    clip: float | None = field(default=None, metadata={"help": "progress_advantage_clipped: clip token log-ratios to "
                                                               "[-clip, clip] (default 5)"})  # fmt: skip
    variant: str | None = field(default=None, metadata={"choices": ("progress_advantage", PLAUSIBLE, *VARIANTS),
                                                        "help": "the progress-advantage variant a critic uses "
                                                                "(best-of-N, success prediction, attribution); with "
                                                                "export: recorded in the bundle"})  # fmt: skip
    plausibility_alpha: float | None = field(default=None, metadata={
        "help": f"{PLAUSIBLE}: a step is plausible when each token has policy probability >= alpha x the policy's top "
                f"choice there (default 0.1; evaluate chooses among {PLAUSIBILITY_ALPHAS} by CV)"})

    rendering: str | None = field(default=None, metadata={"choices": RENDERINGS,
                                                          "help": "whole: the conversation rendered once; as_generated: "
                                                                  "each step in the context the model read (for "
                                                                  "templates that rewrite earlier turns, e.g. drop "
                                                                  "reasoning); auto (default): whole where exact, else "
                                                                  "as generated"})  # fmt: skip
    strict: bool = field(default=False, metadata={"help": "refuse a step whose tool calls, content or reasoning the "
                                                          "chat template renders nowhere (default: flag it `dropped`)"})  # fmt: skip

    def __post_init__(self):
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"argument --max-length: must be at least 2, got {self.max_length}")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise ValueError(f"argument --batch-tokens: must be at least 1, got {self.batch_tokens}")
        from .config import ScoringConfig

        ScoringConfig(**self.overrides())  # a bad --variant, --clip, ... is a usage error here, not a traceback later

    def overrides(self) -> dict:
        """The ScoringConfig fields given on the command line."""
        keys = ("beta", "token_reduction", "step_reduction", "temperature", "support_threshold", "clip", "variant",
                "plausibility_alpha", "rendering")
        over = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        for flag in ("support", "strict"):
            if getattr(self, flag):
                over[flag] = True
        if self.plausibility_alpha is not None:
            over["plausibility_alpha_source"] = "given on the command line (--plausibility-alpha)"
        return over


@dataclass
class InputArguments:
    """Where trajectories come from and what happens to bad records."""

    format: str = field(default="auto", metadata={"choices": ("auto", "progadv", *FORMATS),
                                                  "help": "input format: the project's records, τ²-bench results or "
                                                          "Who&When cases (default: detected)"})  # fmt: skip
    on_error: str = field(default="raise", metadata={"choices": ("raise", "skip"),
                                                     "help": "bad records: stop, or skip them and name them"})  # fmt: skip
    skip_invalid: bool = field(default=False, metadata={"help": "score the valid records, then count and name the "
                                                                 "skipped ones (= --on-error skip)"})  # fmt: skip

    def __post_init__(self):
        if self.skip_invalid:
            self.on_error = "skip"


@dataclass
class ScoreArguments:
    output: str = field(metadata={"aliases": ["-o"], "help": "output .jsonl (written atomically)"})
    token_ratios: bool = field(default=False, metadata={"help": "also write every token's log-ratio"})


@dataclass
class EvaluateArguments:
    output: str = field(metadata={"aliases": ["-o"], "help": "output directory: metrics.json, metrics.md, PNG plots"})
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples for the 95%% intervals (0: none)"})
    seed: int = field(default=0, metadata={"help": "seeds the bootstrap, the folds and best-of-N tie-breaks"})
    folds: int = field(default=5, metadata={"help": "k for the cross-validated choices"})
    calibration: str = field(default="platt", metadata={"choices": ("platt", "isotonic"), "help": "P(success) calibration"})
    choose_reduction: str | None = field(
        default=None,
        metadata={"choices": SELECTION_METRICS,
                  "help": "also choose the token/step reduction by k-fold CV on this metric; its held-out figure is reported"},
    )  # fmt: skip
    choose_variant: bool = field(
        default=False,
        metadata={"help": "score with the support statistics and choose a progress-advantage variant by k-fold CV "
                          "(on the --choose-reduction metric, default auroc); metrics.json's variant_selection holds "
                          "the choice and its out-of-fold figure"},
    )  # fmt: skip
    merge_alphas: list[float] = field(
        default_factory=list,
        metadata={"help": "also score against the merged reference pi_alpha = ref + alpha (policy - ref) for each "
                          "alpha (weights loaded once); each is a variant, e.g. progress_advantage_merged_linear_a0.5"},
    )  # fmt: skip
    merge: list[str] = field(default_factory=lambda: ["linear"],
                             metadata={"choices": MERGES, "help": "how pi_alpha is merged, one or several (TIES/DARE: "
                                                                  "PEFT's merge_utils on the task vector)"})  # fmt: skip
    merge_density: float | None = field(default=None, metadata={"help": "ties/dare: the share of the task vector kept"})


@dataclass
class ConvertArguments:
    source_format: str = field(metadata={"aliases": ["--from"], "choices": FORMATS, "help": "the logs' format"})
    strict: bool = field(default=False, metadata={"help": "a case or simulation that cannot be converted is an error "
                                                          "(default: skip it, name it and its reason, go on)"})  # fmt: skip


@dataclass
class ExportArguments:
    policy: str = field(metadata={"help": "policy checkpoint, or a LoRA adapter directory"})
    reference: str | None = field(default=None, metadata={"help": "reference checkpoint (LoRA: default the adapter's base)"})
    reference_id: str | None = field(default=None, metadata={"help": "record the reference by hub id + file hashes, not weights"})
    revision: str | None = field(default=None, metadata={"help": "with --reference-id: the hub revision"})
    dtype: str | None = field(default=None, metadata={"help": "torch dtype to load the models in"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code shipped with the checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing bundle (atomically)"})


@dataclass
class InspectArguments:
    reference: str | None = field(default=None, metadata={"help": "where a reference recorded by identity lives"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code shipped with the bundle"})


@dataclass
class DemoArguments:
    out: str = field(metadata={"help": "run directory (models, rollouts, bundle, report, summary.json)"})
    config: str | None = field(default=None, metadata={"help": "YAML of DemoConfig fields, read like the recipes' (see recipes/toy_*.yaml)"})
    seed: int | None = field(default=None, metadata={"help": "seeds everything (default 0)"})
    fast: bool = field(default=False, metadata={"help": "seconds instead of minutes: checks the plumbing, learns little"})
    no_progress: bool = field(default=False, metadata={"help": "no progress bars"})
    noisy: bool = field(default=False, metadata={"help": "the free-form world: names, several wordings, free-text reasons"})
    reward_models: bool = field(default=False, metadata={"help": "also train an outcome and a process reward model of the "
                                                                 "reference's size and compare (about 2 CPU minutes more; "
                                                                 "docs/reward_models.md)"})  # fmt: skip


@dataclass
class StudyArguments:
    seeds: list[int] = field(metadata={"nargs": "+", "help": "one demo run per seed, into OUT/seed_N"})
    out: str = field(metadata={"help": "study directory: seed_N/ runs, study.json, study.md"})
    config: str | None = field(default=None, metadata={"help": "YAML of DemoConfig fields, as for `progadv demo`"})
    noisy: bool = field(default=False, metadata={"help": "the free-form world (see `progadv demo --noisy`)"})
    fast: bool = field(default=False, metadata={"help": "DemoConfig.fast per seed (plumbing only)"})
    no_progress: bool = field(default=False, metadata={"help": "no progress bars"})
    reevaluate: bool = field(default=False, metadata={"help": "evaluate finished seeds again with this version's "
                                                              "evaluation (same models and rollouts)"})  # fmt: skip
    no_variants: bool = field(default=False, metadata={"help": "leave the progress-advantage variants and merged "
                                                               "references out of each seed's evaluation (faster)"})  # fmt: skip
    no_reward_models: bool = field(default=False, metadata={"help": "leave the trained reward models (ORM, PRM) out of "
                                                                    "each seed (about 2 CPU minutes a seed faster)"})  # fmt: skip


@dataclass
class ProgadvArguments:
    """`progadv grpo`: the callback's options, as `progadv_*` keys beside `trl grpo`'s in the same YAML."""

    progadv_heldout: str | None = field(default=None, metadata={"help": "held-out trajectories scored during training: a "
                                                                        ".jsonl/.json/.parquet file, or a dataset folder"})  # fmt: skip
    progadv_eval_steps: int | None = field(default=None, metadata={"help": "score the held-out set every this many "
                                                                           "steps (also before the first and at the end)"})  # fmt: skip
    progadv_export: str = field(default="end", metadata={"choices": ("end", "save", "none"),
                                                         "help": "write the critic bundle at the end, also at every "
                                                                 "checkpoint, or never"})  # fmt: skip
    progadv_export_dir: str | None = field(default=None, metadata={"help": "where the end-of-training bundle goes "
                                                                           "(default OUTPUT_DIR/progadv_bundle)"})  # fmt: skip
    progadv_success_threshold: float | None = field(default=None, metadata={"help": "a reward above this counts as a "
                                                                                    "success (default 0)"})  # fmt: skip
    progadv_reference_pass: bool = field(default=False, metadata={"help": "beta == 0: run one extra no-grad reference "
                                                                          "pass per generation batch for the train/eval figures"})  # fmt: skip
    progadv_variant: str | None = field(default=None, metadata={"choices": ("progress_advantage", PLAUSIBLE, *VARIANTS),
                                                                "help": "the progress-advantage variant the held-out "
                                                                        "figures and the bundle use"})  # fmt: skip
    progadv_heldout_max_length: int | None = field(default=None, metadata={"help": "truncate longer held-out trajectories"})
    progadv_heldout_batch_size: int = field(default=8, metadata={"help": "held-out trajectories per forward pass and rank"})

    def __post_init__(self):
        # TrlParser puts YAML values in as defaults, which argparse does not check against `choices`: check here
        if self.progadv_export not in ("end", "save", "none"):
            raise ValueError(f"progadv_export must be one of end, save, none; got {self.progadv_export!r}")
        if self.progadv_variant is not None and self.progadv_variant not in ("progress_advantage", PLAUSIBLE, *VARIANTS):
            raise ValueError(f"progadv_variant must be progress_advantage or one of {(PLAUSIBLE, *VARIANTS)}; got {self.progadv_variant!r}")
        if self.progadv_eval_steps is not None and self.progadv_eval_steps < 1:
            raise ValueError(f"progadv_eval_steps must be a positive integer; got {self.progadv_eval_steps}")
        if self.progadv_heldout_batch_size < 1:
            raise ValueError(f"progadv_heldout_batch_size must be at least 1; got {self.progadv_heldout_batch_size}")
