"""`progadv`: score, evaluate, convert, export, inspect, demo.

Every command's options are dataclasses with `help` metadata, parsed by transformers' `HfArgumentParser` (the
parser under TRL's `TrlParser`), so each option reads the same on the command line, in `--help` and in Python.
Nothing here imports torch until a command runs: `progadv --help` stays fast.

Bad input never ends in a traceback: user errors print one message (naming the record and field where there is
one) and exit with status 2; output files are written atomically, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from transformers.hf_argparser import HfArgumentParser

from . import __version__
from .arguments import (  # noqa: F401 - the argument groups (DemoArguments, ... are imported from here too)
    ConvertArguments,
    DemoArguments,
    EvaluateArguments,
    ExportArguments,
    InputArguments,
    InspectArguments,
    ModelArguments,
    ScoreArguments,
    ScoringArguments,
    StudyArguments,
)
from .cpu import keep_freed_memory, openmp_wait_policy
from .utils import write_jsonl

# ----------------------------------------------------------------------------------------------------------------
# Shared steps


def _user_errors() -> tuple[type[BaseException], ...]:
    from .bundle import BundleError
    from .evaluation import EvaluationError
    from .trajectories import TrajectoryError
    from .rendering import ChatTemplateError, TokenizerMismatchError

    return (TrajectoryError, ChatTemplateError, TokenizerMismatchError, BundleError, EvaluationError, FileNotFoundError)


def _load_inputs(path: str, inputs: InputArguments):
    """(valid trajectories, RecordErrors of the skipped ones); with --skip-invalid, a file with none valid is an
    error that names them all."""
    from .formats import as_trajectory_source
    from .trajectories import TrajectoryError, load_trajectories

    source, not_converted = as_trajectory_source(path, inputs.format, on_error=inputs.on_error)
    res = load_trajectories(source, on_error=inputs.on_error)
    if not res.trajectories:
        raise TrajectoryError(not_converted + res.errors)
    return res.trajectories, not_converted + res.errors


def _report_skipped_and_faults(skipped, scores) -> None:
    """After scoring: count and name the skipped records and the numeric faults (stderr)."""
    from .evaluation import split_faults
    from .trajectories import skipped_report

    if skipped:
        print(f"progadv: {skipped_report(skipped)}", file=sys.stderr)
    cut = [s for s in scores if s.truncation]
    if cut:
        by = sorted({s.truncation.get("limit", "max_length") for s in cut})
        print(f"progadv: {len(cut)} trajector{'y' if len(cut) == 1 else 'ies'} truncated (by {' and '.join(by)}; "
              "start and most recent context kept, cut steps flagged `truncated`, wholly cut ones `advantage: null`)",
              file=sys.stderr)  # fmt: skip
    faulted = split_faults(scores)[1]
    if faulted:
        n = len(faulted)
        print(f"progadv: {n} trajector{'y has' if n == 1 else 'ies have'} no score (numeric fault), left out of every metric:", file=sys.stderr)
        for s in faulted[:100]:
            print(f"  id {s.id!r}: {s.error}", file=sys.stderr)


def _scorer(model: ModelArguments, scoring: ScoringArguments):
    """(ProgressScorer, ProgressCritic or None) from --bundle or --policy/--reference, with the overrides applied."""
    from . import distributed
    from .engine import ProgressScorer
    from .scoring import ScoringConfig

    device = distributed.device(model.device)  # `cuda` under torchrun: this rank's GPU
    over = scoring.overrides()
    if model.bundle:
        if model.policy:
            raise SystemExit("progadv: error: give --bundle or --policy, not both")
        from .critic import ProgressCritic

        critic = ProgressCritic.from_pretrained(
            model.bundle, trust_remote_code=model.trust_remote_code, device=device, dtype=model.dtype,
            reference_path=model.reference,
        )  # fmt: skip
        scorer = critic.scorer
        scorer.config = dataclasses.replace(scorer.config, **over)
        if scoring.max_length is not None:
            scorer.max_length = scoring.max_length
        scorer.batch_tokens = scoring.batch_tokens
        return scorer, critic
    if not model.policy:
        raise SystemExit("progadv: error: give --bundle, or --policy (and --reference unless the policy is a LoRA adapter)")
    scorer = ProgressScorer.from_pretrained(
        model.policy, model.reference, config=ScoringConfig(**over), dtype=model.dtype, device=device,
        trust_remote_code=model.trust_remote_code, max_length=scoring.max_length, batch_tokens=scoring.batch_tokens,
    )  # fmt: skip
    return scorer, None


def _reduction_info(scorer, critic) -> dict:
    c = scorer.config
    how = "default from the theory (beta * sum over tokens, sum over steps), not tuned"
    if critic is not None:
        choice = critic.manifest.get("scoring", {}).get("reduction_choice")
        how = (choice.get("how") if isinstance(choice, dict) else choice) or "the bundle's scoring rule"
    return {"beta": c.beta, "token_reduction": c.token_reduction, "step_reduction": c.step_reduction, "chosen_by": how,
            "variant": c.variant}


# ----------------------------------------------------------------------------------------------------------------
# Commands: one function each, taking the parsed dataclasses


def cmd_score(trajectories: str, model: ModelArguments, scoring: ScoringArguments, inputs: InputArguments,
              args: ScoreArguments) -> int:  # fmt: skip
    from . import distributed

    distributed.init(model.device)  # several processes (torchrun): shard, gather, the main process writes
    trajs, skipped = _load_inputs(trajectories, inputs)
    scorer, _ = _scorer(model, scoring)
    skip = skipped if inputs.on_error == "skip" else None  # records the chat template cannot render join them
    scores = distributed.score(
        scorer, trajs, with_token_ratios=args.token_ratios, progress=len(trajs) > 1, skipped=skip
    )  # fmt: skip
    if scores is None:  # not the main process: it writes and reports
        return 0
    write_jsonl(args.output, (s.to_dict() for s in scores))  # strict JSON: a NaN in metadata is written null
    print(f"progadv: scored {len(scores)} trajectories ({sum(len(s.steps) for s in scores)} steps) -> {args.output}", file=sys.stderr)
    from .evaluation.labels import implausible_share, out_of_support_share

    imp = implausible_share(scores)
    if imp is not None and imp["share"] is not None:
        print(f"progadv: {imp['share']:.1%} of {imp['n_steps']} steps implausible to the policy itself (a token below "
              f"{imp['alpha']:g} x its top choice); per step: `plausible`, `shortfall`", file=sys.stderr)
    oos = out_of_support_share(scores)
    if oos is not None and oos["share"] is not None:
        print(f"progadv: {oos['share']:.1%} of {oos['n_steps']} steps out of the reference's support (a token with "
              f"reference log-prob < {oos['threshold']:.3g}); per trajectory: the `support` field", file=sys.stderr)
    _report_skipped_and_faults(skipped, scores)
    return 0


def cmd_evaluate(trajectories: str, model: ModelArguments, scoring: ScoringArguments, inputs: InputArguments,
                 args: EvaluateArguments) -> int:  # fmt: skip
    from . import distributed
    from .evaluation import format_table, report_paths, run_evaluation

    distributed.init(model.device)  # several processes (torchrun): shard, gather, the main process evaluates
    trajs, skipped = _load_inputs(trajectories, inputs)
    scorer, critic = _scorer(model, scoring)
    # --choose-reduction: one set of forward passes, every token x step reduction, k-fold CV so no choice is scored
    # on its own data; the evaluated scores stay the scorer's own reductions.
    metrics = run_evaluation(
        scorer, trajs, args.output, choose_reduction=args.choose_reduction, k=args.folds, n_boot=args.n_boot,
        choose_variant=(args.choose_reduction or "auroc") if args.choose_variant else None,
        seed=args.seed, calibration=args.calibration, reduction_info=_reduction_info(scorer, critic),
        progress=len(trajs) > 1, skipped=skipped if inputs.on_error == "skip" else None,
        on_scored=lambda scores: _report_skipped_and_faults(skipped, scores),
        merge_alphas=args.merge_alphas, merge=args.merge, merge_density=args.merge_density,
    )  # fmt: skip
    if not distributed.is_main():  # the main process evaluates, writes and prints
        return 0
    print(format_table(metrics))
    print(f"progadv: wrote {', '.join(str(p) for p in report_paths(args.output).values())}", file=sys.stderr)
    return 0


def cmd_convert(source: str, output: str, args: ConvertArguments) -> int:
    from .formats import convert_report

    conv = convert_report(args.source_format, source, on_error="raise" if args.strict else "skip")
    write_jsonl(output, conv.records)
    print(f"progadv: {conv.summary()} -> {output}", file=sys.stderr)
    return 0


def cmd_export(output: str, args: ExportArguments, scoring: ScoringArguments) -> int:
    from .bundle import export_from_paths
    from .scoring import ScoringConfig

    identity = {"repo_id": args.reference_id, "revision": args.revision} if args.reference_id else None
    out = export_from_paths(
        args.policy, args.reference, output,
        scoring_config=ScoringConfig(**scoring.overrides()), max_length=scoring.max_length,
        reference_identity=identity, dtype=args.dtype, trust_remote_code=args.trust_remote_code, overwrite=args.overwrite,
    )  # fmt: skip
    print(f"progadv: bundle written to {out} (check it: progadv inspect {out})", file=sys.stderr)
    return 0


def cmd_inspect(bundle: str, args: InspectArguments) -> int:
    from .bundle import format_report, verify_bundle

    report = verify_bundle(bundle, reference_path=args.reference, require_reference=False, trust_remote_code=args.trust_remote_code)
    print(format_report(report))
    return 0 if report.ok else 2


def cmd_demo(args: DemoArguments) -> int:
    openmp_wait_policy()
    keep_freed_memory()  # the same numbers, far fewer page faults (cpu.py)
    import warnings

    # transformers 5 renamed gradient checkpointing; TRL 1.16 still calls the old names every step. Not ours to fix.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
    from .demo.main import demo_config, run_demo

    run_demo(demo_config(args))
    return 0


def cmd_study(args: StudyArguments) -> int:
    openmp_wait_policy()  # once, before torch starts: what runs as the first seed starts decides for all
    keep_freed_memory()
    from .demo.study import main as study_main

    return study_main(args)


# name: (help, positional arguments as (name, help), dataclasses, function)
COMMANDS = {
    "score": ("per-step progress advantage of every trajectory -> JSONL",
              [("trajectories", "trajectories: .jsonl, .json, .parquet, or τ²-bench / Who&When logs")],
              (ModelArguments, ScoringArguments, InputArguments, ScoreArguments), cmd_score),
    "evaluate": ("best-of-N, success prediction, failure attribution vs baselines -> DIR",
                 [("trajectories", "labelled trajectories (success, group, failure_step)")],
                 (ModelArguments, ScoringArguments, InputArguments, EvaluateArguments), cmd_evaluate),
    "convert": ("τ²-bench results or Who&When cases -> trajectories JSONL",
                [("input", "a τ²-bench results file or a Who&When case, or a folder of them (searched recursively)"),
                 ("output", "output .jsonl (written atomically)")], (ConvertArguments,), cmd_convert),
    "export": ("build a critic bundle from a checkpoint pair (no training needed)",
               [("output", "bundle directory to create")], (ExportArguments, ScoringArguments), cmd_export),
    "inspect": ("print a bundle's manifest and verify every file", [("bundle", "the bundle directory")],
                (InspectArguments,), cmd_inspect),
    "demo": ("the whole loop on a CPU: tiny agent, GRPO + callback, bundle, evaluation (~5 min)", [], (DemoArguments,),
             cmd_demo),
    "study": ("the demo over several seeds (resumable), one table across seeds -> OUT/study.{json,md}", [],
              (StudyArguments,), cmd_study),
}  # fmt: skip


def _flags_take_no_value(parser: argparse.ArgumentParser) -> None:
    """HfArgumentParser gives a bool field an optional value (`--overwrite [true|false]`), so `--overwrite OUT`
    would read the positional OUT as that value. A flag that defaults to False takes no value here."""
    for action in list(parser._actions):
        if action.nargs == "?" and action.const is True and action.default is False:
            parser._remove_action(action)
            for opt in action.option_strings:
                parser._option_string_actions.pop(opt, None)
            for group in parser._action_groups:
                if action in group._group_actions:
                    group._group_actions.remove(action)
            parser.add_argument(*action.option_strings, dest=action.dest, action="store_true", help=action.help)


class _DefaultOnce(argparse.ArgumentDefaultsHelpFormatter):
    """HfArgumentParser's formatter appends "(default: X)" to every option, so an option whose help already says its
    default read "(default 1.0) (default: None)". This one adds it only where the help is silent and there is one."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h.lower() or action.default in (None, False, argparse.SUPPRESS) or action.option_strings == []:
            return h
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="progadv",
        description="Progress advantage for LLM agents: A_t = beta * sum over a step's tokens of log pi - log pi_ref.",
    )
    p.add_argument("--version", action="version", version=f"progadv_trl {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=HfArgumentParser)
    for name, (help_, positionals, types, _) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_, dataclass_types=types, formatter_class=_DefaultOnce)
        _flags_take_no_value(sp)
        for pos, pos_help in positionals:
            sp.add_argument(pos, help=pos_help)
    # `progadv grpo` is parsed by TRL's TrlParser (progadv_trl/grpo.py; `main` hands it over before this parser runs,
    # so `progadv --help` does not import TRL); listed here for --help.
    sub.add_parser("grpo", help="GRPO training from a `trl grpo` YAML with the callback on (progadv_* keys); "
                   "see progadv grpo --help", dataclass_types=[])  # fmt: skip
    return p


def parse(argv: list[str] | None = None) -> tuple[str, list]:
    """(command, [positional values..., dataclass instances...]) in the order the command function takes them."""
    ns = vars(build_parser().parse_args(argv))
    command = ns.pop("command")
    _, positionals, types, _ = COMMANDS[command]
    values: list = [ns.pop(pos) for pos, _ in positionals]
    for t in types:
        try:
            values.append(t(**{f.name: ns[f.name] for f in dataclasses.fields(t) if f.name in ns}))
        except ValueError as e:  # a value the dataclass refuses: argparse's usage error (status 2), not a traceback
            build_parser().error(str(e))
    return command, values


def _plain_notices() -> None:
    """The library's own notices (how trajectories were rendered, what a template drops, cut trajectories) print as
    the command's lines, "progadv: ...", not as a UserWarning with a source line; other packages' warnings as usual."""
    import warnings
    from pathlib import Path

    default, ours = warnings.formatwarning, str(Path(__file__).parent)

    def fmt(message, category, filename, lineno, line=None):
        if issubclass(category, UserWarning) and str(filename).startswith(ours):
            return f"progadv: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = fmt


def main(argv: list[str] | None = None) -> int:
    import warnings

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["grpo"]:  # TRL's parser and training loop (progadv_trl/grpo.py)
        from .grpo import main as grpo_main

        return grpo_main(argv[1:])
    command, values = parse(argv)
    # The library warns about numeric faults; the commands name each one themselves, after scoring.
    warnings.filterwarnings("ignore", message=".*numeric fault", category=UserWarning)
    _plain_notices()
    from . import distributed

    quiet = not distributed.is_main()  # several processes: the main process reports every rank's error once
    ok = False
    try:
        rc = COMMANDS[command][3](*values) or 0
        ok = True
        return rc
    except _user_errors() as e:
        if not quiet:
            print(f"progadv: error: {e}", file=sys.stderr)
        return 2
    except distributed.RankError as e:
        print(f"progadv: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if not quiet:
            print("progadv: interrupted; no output was left half-written", file=sys.stderr)
        return 130
    finally:
        distributed.finish(barrier=ok)


if __name__ == "__main__":
    sys.exit(main())
