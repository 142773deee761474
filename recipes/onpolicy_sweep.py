"""The on-policy sweep: GRPO's beta x RL steps, each cell a `progadv study` (the demo per seed), one table.

    python recipes/onpolicy_sweep.py --config recipes/onpolicy_sweep.yaml
    python recipes/onpolicy_sweep.py --config recipes/onpolicy_sweep.yaml --betas 0.02 0.3 --steps 80 --seeds 0 1

Progress advantage is exact only for the KL-optimal policy; the demo's RL policy is far from it. Planning's tabular
study with the exact optimum found on-policy AUROC 0.10-0.12 at beta <= 0.05 and 0.82 at beta = 0.3 (0.97 off-policy),
and under-trained mixtures of the optimum and the reference predictive. This recipe measures that question on the
demo: per cell (beta, steps) and across seeds, progress advantage's out-of-fold figures on the policy's own rollouts
(all, successes + decision failures, successes + luck failures; best-of-N; mistake step) and its difference from the
best baseline with the seeds' verdicts, beside the off-policy AUROC and the RL gain. Cells are studies in
OUT_DIR/beta_B_steps_S/ (resumable); the table is OUT_DIR/sweep.md and sweep.json.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from trl import TrlParser

from progadv_trl.cli import main as progadv
from progadv_trl.demo.study import APPLICATIONS
from progadv_trl.utils import write_json


@dataclass
class SweepArguments:
    betas: list[float] = field(default_factory=lambda: [0.02, 0.1, 0.3], metadata={"help": "GRPO KL coefficients"})
    steps: list[int] = field(default_factory=lambda: [60, 120, 240], metadata={"help": "GRPO optimizer steps"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "seeds per cell"})
    out_dir: str = field(default="runs/onpolicy_sweep", metadata={"help": "one study per cell under it"})
    noisy: bool = field(default=False, metadata={"help": "the free-form world"})
    fast: bool = field(default=False, metadata={"help": "the plumbing only (DemoConfig.fast; for tests)"})
    variants: bool = field(default=False, metadata={"help": "also every progress-advantage variant and merged "
                                                            "reference per seed (about a minute more each)"})


def cell_row(study: dict, beta: float, steps: int) -> dict:
    """One row of the sweep from a cell's study.json."""
    row = {"beta": beta, "steps": steps, "seeds": study["seeds"],
           "gain_points": study["success"]["mean_gain_points"], "min_gain_points": study["success"]["min_gain_points"]}
    for regime, apps in (("on-policy", APPLICATIONS), ("off-policy", ("auroc",))):
        pa = (study["table"].get(regime) or {}).get("progress_advantage") or {}
        for app in apps:
            c, v = pa.get(f"fair_{app}"), (study.get("verdicts") or {}).get(regime, {}).get(app)
            row[f"{regime}/{app}"] = None if c is None else {"mean": c["mean"], "std": c["std"]}
            row[f"{regime}/{app}/vs_best"] = None if v is None else {
                "mean": v["mean"], "beats": v["beats"], "ties": v["ties"], "loses": v["loses"]}
    return row


def sweep_markdown(rows: list[dict], command: str) -> str:
    cols = [("on-policy", a) for a in APPLICATIONS] + [("off-policy", "auroc")]
    md = ["# On-policy sweep: GRPO beta x steps", "", f"`{command}`", "",
          "Progress advantage's out-of-fold figure (mean ± std across seeds), then its difference from the best "
          "baseline (mean; beats/ties/loses over seeds).", "",
          "| beta | steps | gain (points, min) | " + " | ".join(f"{r} {a}" for r, a in cols) + " |",
          "|---" * (3 + len(cols)) + "|"]
    for r in rows:
        cells = []
        for reg, app in cols:
            c, v = r.get(f"{reg}/{app}"), r.get(f"{reg}/{app}/vs_best")
            cells.append("–" if c is None else f"{c['mean']:.2f} ± {c['std']:.2f}" + (
                "" if v is None else f"; {v['mean']:+.2f} ({v['beats']}/{v['ties']}/{v['loses']})"))
        md.append(f"| {r['beta']} | {r['steps']} | {r['gain_points']} ({r['min_gain_points']}) | " + " | ".join(cells) + " |")
    return "\n".join(md) + "\n"


def main(a: SweepArguments) -> int:
    out = Path(a.out_dir)
    rows = []
    for beta in a.betas:
        for steps in a.steps:
            cell = out / f"beta_{beta}_steps_{steps}"
            cell.mkdir(parents=True, exist_ok=True)
            (cell / "config.yaml").write_text(yaml.safe_dump({"beta": beta, "grpo_steps": steps}))
            args = ["study", "--seeds", *map(str, a.seeds), "--out", str(cell), "--config", str(cell / "config.yaml"),
                    "--no-progress"] + (["--noisy"] if a.noisy else []) + (["--fast"] if a.fast else []) + (
                    [] if a.variants else ["--no-variants"])  # fmt: skip
            rc = progadv(args)
            if rc:
                return rc
            rows.append(cell_row(json.loads((cell / "study.json").read_text()), beta, steps))
    command = "python recipes/onpolicy_sweep.py " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(a).items() if v not in (False, None))
    write_json(out / "sweep.json", rows)
    (out / "sweep.md").write_text(sweep_markdown(rows, command))
    print(sweep_markdown(rows, command))
    return 0


if __name__ == "__main__":
    (args,) = TrlParser(SweepArguments).parse_args_and_config()
    raise SystemExit(main(args))
