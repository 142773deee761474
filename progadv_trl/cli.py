"""`progadv`: score, evaluate, export, inspect and demo.

Bad input never ends in a traceback: user errors print one message (naming the record and field where there is
one) and exit with status 2; output files are written atomically, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .utils import atomic_write_text


def _user_errors() -> tuple[type[BaseException], ...]:
    from .trajectories import ChatTemplateError, TokenizerMismatchError, TrajectoryError

    errs: list[type[BaseException]] = [TrajectoryError, ChatTemplateError, TokenizerMismatchError, FileNotFoundError]
    try:
        from .bundle import BundleError

        errs.append(BundleError)
    except ImportError:
        pass
    return tuple(errs)


# ----------------------------------------------------------------------------------------------------------------
# Shared arguments


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models (a bundle, or a policy/reference pair)")
    g.add_argument("--bundle", help="a critic bundle directory (progadv export / the training callback)")
    g.add_argument("--policy", help="policy checkpoint directory, or a LoRA adapter directory")
    g.add_argument("--reference", help="reference checkpoint (for a LoRA policy: defaults to the adapter's base)")
    g.add_argument("--dtype", default=None, help="torch dtype to load the models in (default: the checkpoint's)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code shipped with the checkpoint")


def _add_scoring_args(p: argparse.ArgumentParser) -> None:
    from .scoring import PAPER_TOKEN_REDUCTIONS, STEP_REDUCTIONS, TOKEN_REDUCTIONS

    g = p.add_argument_group("scoring (defaults: the bundle's, else beta=1, sum over tokens, sum over steps)")
    g.add_argument("--beta", type=float, default=None, help="A_t = beta * sum of token log-ratios (default 1.0)")
    g.add_argument("--token-reduction", choices=TOKEN_REDUCTIONS + PAPER_TOKEN_REDUCTIONS, default=None)
    g.add_argument("--step-reduction", choices=STEP_REDUCTIONS, default=None)
    g.add_argument("--temperature", type=float, default=None, help="divide logits by this (the theory holds at 1.0)")
    g.add_argument("--max-length", type=int, default=None, help="truncate longer trajectories (start + most recent kept)")
    g.add_argument("--batch-tokens", type=int, default=16384, help="padded tokens per forward pass")
    g.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="bad records: stop, or skip and report")


def _scoring_overrides(args) -> dict:
    return {
        k: v
        for k, v in {
            "beta": args.beta,
            "token_reduction": args.token_reduction,
            "step_reduction": args.step_reduction,
            "temperature": args.temperature,
        }.items()
        if v is not None
    }


def _load_inputs(args):
    from .trajectories import load_trajectories

    res = load_trajectories(args.trajectories, on_error=args.on_error)
    if res.errors:
        print(f"progadv: {res.summary()}", file=sys.stderr)
    if not res.trajectories:
        raise SystemExit("progadv: error: no valid trajectories to score")
    return res.trajectories


def _scorer(args):
    """A ProgressScorer from --bundle or --policy/--reference, with the command line's overrides applied."""
    import dataclasses

    from .engine import ProgressScorer
    from .scoring import ScoringConfig

    over = _scoring_overrides(args)
    if args.bundle:
        if args.policy:
            raise SystemExit("progadv: error: give --bundle or --policy, not both")
        from .critic import ProgressCritic

        # --reference with --bundle: where to find a reference the bundle records by identity (hub id + hashes)
        critic = ProgressCritic.from_pretrained(
            args.bundle, trust_remote_code=args.trust_remote_code, device=args.device, reference_path=args.reference
        )
        scorer = critic.scorer
        scorer.config = dataclasses.replace(scorer.config, **over)
        if args.max_length is not None:
            scorer.max_length = args.max_length
        scorer.batch_tokens = args.batch_tokens
        return scorer, critic
    if not args.policy:
        raise SystemExit("progadv: error: give --bundle, or --policy (and --reference unless the policy is a LoRA adapter)")
    scorer = ProgressScorer.from_pretrained(
        args.policy,
        args.reference,
        config=ScoringConfig(**over),
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        max_length=args.max_length,
        batch_tokens=args.batch_tokens,
    )
    return scorer, None


# ----------------------------------------------------------------------------------------------------------------
# Commands


def cmd_score(args) -> int:
    trajs = _load_inputs(args)
    scorer, _ = _scorer(args)
    scores = scorer.score(trajs, with_token_ratios=args.token_ratios, progress=len(trajs) > 1)
    lines = [json.dumps(s.to_dict()) for s in scores]
    atomic_write_text(args.output, "\n".join(lines) + "\n")
    print(f"progadv: scored {len(scores)} trajectories ({sum(len(s.steps) for s in scores)} steps) -> {args.output}", file=sys.stderr)
    return 0


def _reduction_info(scorer, critic) -> dict:
    c = scorer.config
    how = "default from the theory (beta * sum over tokens, sum over steps), not tuned"
    if critic is not None:
        choice = critic.manifest.get("scoring", {}).get("reduction_choice")
        how = (choice.get("how") if isinstance(choice, dict) else choice) or "the bundle's scoring rule"
    return {"beta": c.beta, "token_reduction": c.token_reduction, "step_reduction": c.step_reduction, "chosen_by": how}


def cmd_evaluate(args) -> int:
    from .applications import choose_reduction, evaluate, format_table
    from .engine import reduction_grid
    from .report import write_report

    trajs = _load_inputs(args)
    scorer, critic = _scorer(args)
    selection = None
    if args.choose_reduction:
        # One set of forward passes; every token x step reduction; k-fold CV so no choice is scored on its own data.
        grid = reduction_grid(scorer.config)
        default = f"{scorer.config.token_reduction}/{scorer.config.step_reduction}"
        many = scorer.score_many(trajs, grid, progress=len(trajs) > 1)
        scores = many[default]
        selection = choose_reduction(many, metric=args.choose_reduction, k=args.folds, seed=args.seed)
    else:
        scores = scorer.score(trajs, progress=len(trajs) > 1)
    metrics = evaluate(
        scores, n_boot=args.n_boot, seed=args.seed, calibration=args.calibration,
        reduction=_reduction_info(scorer, critic), reduction_selection=selection, k=args.folds,
    )
    print(format_table(metrics))
    paths = write_report(metrics, scores, args.output)
    print(f"progadv: wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from .bundle import export_from_paths
    from .scoring import ScoringConfig

    identity = {"repo_id": args.reference_id, "revision": args.revision} if args.reference_id else None
    out = export_from_paths(
        args.policy, args.reference, args.output,
        scoring_config=ScoringConfig(**_scoring_overrides(args)), max_length=args.max_length,
        reference_identity=identity, dtype=args.dtype, trust_remote_code=args.trust_remote_code, overwrite=args.overwrite,
    )
    print(f"progadv: bundle written to {out} (check it: progadv inspect {out})", file=sys.stderr)
    return 0


def cmd_inspect(args) -> int:
    from .bundle import format_report, verify_bundle

    report = verify_bundle(args.bundle, reference_path=args.reference, require_reference=False, trust_remote_code=args.trust_remote_code)
    print(format_report(report))
    return 0 if report.ok else 2


def cmd_demo(args) -> int:
    import os
    from pathlib import Path

    # Before torch starts its thread pool: idle OpenMP threads that spin slowed this tiny model up to 10x on a busy
    # 2-core machine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import warnings

    # transformers 5 renamed gradient checkpointing; TRL 1.16 still calls the old names every step. Not ours to fix.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
    from .demo.main import run_demo
    from .demo.pipeline import DemoConfig

    over = {}
    if args.config:
        import yaml

        try:
            over = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise SystemExit(f"progadv: error: cannot read --config {args.config}: {e}")
        if not isinstance(over, dict):
            raise SystemExit(f"progadv: error: --config {args.config} must be a mapping of DemoConfig fields")
    over.update(out_dir=args.out, progress=not args.no_progress)
    if args.seed is not None:
        over["seed"] = args.seed
    if args.noisy:
        over["free_form"] = True
    cfg = DemoConfig.fast(**over) if args.fast else DemoConfig.from_dict(over)
    run_demo(cfg)
    return 0


def cmd_study(args) -> int:
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts (see cmd_demo)
    from .demo.study import main as study_main

    return study_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="progadv",
        description="Progress advantage for LLM agents: A_t = beta * sum over a step's tokens of log pi - log pi_ref.",
    )
    p.add_argument("--version", action="version", version=f"progadv_trl {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", help="per-step progress advantage of every trajectory -> JSONL")
    _add_model_args(s)
    _add_scoring_args(s)
    s.add_argument("trajectories", help="trajectories: .jsonl, .json or .parquet")
    s.add_argument("-o", "--output", required=True, help="output .jsonl (written atomically)")
    s.add_argument("--token-ratios", action="store_true", help="also write every token's log-ratio")
    s.set_defaults(func=cmd_score)

    e = sub.add_parser("evaluate", help="best-of-N, success prediction, failure attribution vs baselines -> DIR")
    _add_model_args(e)
    _add_scoring_args(e)
    e.add_argument("trajectories", help="labelled trajectories (success, group, failure_step)")
    e.add_argument("-o", "--output", required=True, help="output directory: metrics.json, metrics.md, PNG plots")
    e.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% intervals (0: none)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--folds", type=int, default=5, help="k for the cross-validated choices")
    e.add_argument("--calibration", choices=("platt", "isotonic"), default="platt", help="P(success) calibration")
    e.add_argument(
        "--choose-reduction", choices=("auroc", "spearman", "best_of_n"), default=None,
        help="also choose the token/step reduction by k-fold CV on this metric and report its held-out figure",
    )
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("export", help="build a critic bundle from a checkpoint pair (no training needed)")
    x.add_argument("--policy", required=True, help="policy checkpoint, or a LoRA adapter directory")
    x.add_argument("--reference", default=None, help="reference checkpoint (LoRA: defaults to the adapter's base)")
    x.add_argument("--reference-id", default=None, help="record the reference by hub id + file hashes, not weights")
    x.add_argument("--revision", default=None, help="with --reference-id: the hub revision")
    x.add_argument("--dtype", default=None)
    x.add_argument("--trust-remote-code", action="store_true")
    x.add_argument("--overwrite", action="store_true", help="replace an existing bundle (atomically)")
    _add_scoring_args(x)
    x.add_argument("output", help="bundle directory to create")
    x.set_defaults(func=cmd_export)

    i = sub.add_parser("inspect", help="print a bundle's manifest and verify every file")
    i.add_argument("bundle")
    i.add_argument("--reference", default=None, help="where a reference recorded by identity lives")
    i.add_argument("--trust-remote-code", action="store_true")
    i.set_defaults(func=cmd_inspect)

    d = sub.add_parser("demo", help="the whole loop on a CPU: tiny agent, GRPO + callback, bundle, evaluation (~10 min)")
    d.add_argument("--out", required=True, help="run directory (models, rollouts, bundle, report, summary.json)")
    d.add_argument("--config", default=None, help="YAML of DemoConfig fields (see recipes/toy_*.yaml)")
    d.add_argument("--seed", type=int, default=None, help="seeds everything (default 0)")
    d.add_argument("--fast", action="store_true", help="seconds instead of minutes: checks the plumbing, learns little")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.add_argument("--noisy", action="store_true", help="the free-form world: names, several wordings, free-text reasons")
    d.set_defaults(func=cmd_demo)

    st = sub.add_parser("study", help="the demo over several seeds (resumable), one table across seeds -> DIR/study.{json,md}")
    st.add_argument("--seeds", type=int, nargs="+", required=True, help="one demo run per seed, into DIR/seed_N")
    st.add_argument("--out", required=True, help="study directory; a seed whose summary.json matches is not rerun")
    st.add_argument("--config", default=None, help="YAML of DemoConfig fields, the same for every seed")
    st.add_argument("--noisy", action="store_true", help="the free-form world (as demo --noisy)")
    st.add_argument("--fast", action="store_true", help="DemoConfig.fast per seed: checks the plumbing, learns little")
    st.add_argument("--no-progress", action="store_true", help="no progress bars")
    st.set_defaults(func=cmd_study)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except _user_errors() as e:
        print(f"progadv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("progadv: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
