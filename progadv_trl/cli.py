"""`progadv`: score, evaluate, export, inspect and demo.

Bad input never ends in a traceback: user errors print one message (naming the record and field where there is
one) and exit with status 2; output files are written atomically, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from . import __version__


def _user_errors() -> tuple[type[BaseException], ...]:
    from .trajectories import ChatTemplateError, TokenizerMismatchError, TrajectoryError

    errs: list[type[BaseException]] = [TrajectoryError, ChatTemplateError, TokenizerMismatchError, FileNotFoundError]
    try:
        from .bundle import BundleError

        errs.append(BundleError)
    except ImportError:
        pass
    return tuple(errs)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        if args.policy or args.reference:
            raise SystemExit("progadv: error: give --bundle or --policy/--reference, not both")
        from .critic import ProgressCritic

        critic = ProgressCritic.from_pretrained(args.bundle, trust_remote_code=args.trust_remote_code, device=args.device)
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
