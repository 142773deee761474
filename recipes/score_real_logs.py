"""Score real agent logs (τ²-bench results, Who&When cases) with a public instruct/base pair. GPU recommended.

    python recipes/score_real_logs.py --config recipes/score_real_logs.yaml
    # your own τ²-bench run, a bigger pair:
    python recipes/score_real_logs.py --config recipes/score_real_logs.yaml --input results.json \\
        --policy Qwen/Qwen2.5-14B-Instruct --reference Qwen/Qwen2.5-14B --out_dir progadv_tau2

Three `progadv` commands, in order: `convert` (OUT_DIR/trajectories.jsonl, the logs as the scorer reads them),
`score` (OUT_DIR/scores.jsonl, per-step progress advantage and the baselines) and, when the logs carry labels (every
Who&When case, every τ²-bench simulation with a reward), `evaluate` (OUT_DIR/eval/: success prediction, best-of-N over
a task's trials, failure attribution; for Who&When also step- and agent-level accuracy beside the random-step and
first-step baselines). `evaluate` runs the models again; `--evaluate false` skips it.

The instruct model is the "policy" and its base the "reference"; the pair was never trained against each other with a
KL term and the logs usually come from another model, so the scores are a heuristic (docs/formats.md).
"""

import os

from progadv_trl.utils import openmp_wait_policy  # noqa: E402 - torch-free

openmp_wait_policy()  # before torch starts: idle OpenMP threads spin only on an idle machine
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

from trl import TrlParser  # noqa: E402

from progadv_trl.cli import main as progadv  # noqa: E402
from progadv_trl.formats import detect_format  # noqa: E402


@dataclass
class RealLogArguments:
    input: str = field(
        default="tests/fixtures/who_and_when",
        metadata={"help": "a τ²-bench results .json, a Who&When case .json, or a directory of cases"},
    )
    format: str = field(default="auto", metadata={"help": "tau2 | whowhen | auto (detected from the file)"})
    policy: str = field(default="Qwen/Qwen2.5-7B-Instruct", metadata={"help": "the instruct model (hub id or path)"})
    reference: str = field(default="Qwen/Qwen2.5-7B", metadata={"help": "its base: same tokenizer and chat template"})
    out_dir: str = field(default="progadv_real_logs", metadata={"help": "trajectories.jsonl, scores.jsonl, eval/"})
    beta: float = field(default=1.0, metadata={"help": "no training beta to inherit: 1 keeps raw log-ratios"})
    max_length: int = field(default=32768, metadata={"help": "tokens per trajectory; longer ones keep start and end"})
    batch_tokens: int = field(default=32768, metadata={"help": "padded tokens per forward pass (lower: less memory)"})
    dtype: str = field(default="bfloat16", metadata={"help": "torch dtype to load the models in"})
    device: str | None = field(default=None, metadata={"help": "cuda / cpu (default: cuda when available)"})
    evaluate: bool = field(default=True, metadata={"help": "also run progadv evaluate on labelled logs"})
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples for the 95%% intervals"})


def main(a: RealLogArguments) -> int:
    import torch

    fmt = detect_format(a.input) if a.format == "auto" else a.format
    if fmt not in ("tau2", "whowhen"):
        raise SystemExit(f"{a.input}: not a τ²-bench results file or a Who&When case (detected: {fmt}); set --format")
    out = Path(a.out_dir)
    traj = str(out / "trajectories.jsonl")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pair = ["--policy", a.policy, "--reference", a.reference, "--dtype", a.dtype, "--device", device, "--beta",
            str(a.beta), "--max-length", str(a.max_length), "--batch-tokens", str(a.batch_tokens)]  # fmt: skip
    rc = progadv(["convert", "--from", fmt, a.input, traj])
    rc = rc or progadv(["score", *pair, traj, "-o", str(out / "scores.jsonl")])
    if a.evaluate:
        rc = rc or progadv(["evaluate", *pair, traj, "-o", str(out / "eval"), "--n-boot", str(a.n_boot)])
    return rc


if __name__ == "__main__":
    (args,) = TrlParser(RealLogArguments).parse_args_and_config()
    raise SystemExit(main(args))
