"""Choose the out-of-support threshold on a validation split of the study, report it on the other seeds.

    python benchmarks/support_threshold.py runs/study --validation 0 1 --json benchmarks/results/support_threshold.json

A step is "out of support" when its least likely token has reference log-prob below the threshold;
`progress_advantage_in_support` leaves such tokens out. Per finished study seed (its saved bundle and test rollouts,
both sets), one set of forward passes with the support statistics scores every candidate threshold
(`ProgressScorer.score_many`). The threshold is the one whose `in_support` variant has the best mean AUROC over
successes + decision failures on the validation seeds (both regimes); its figures on the other seeds are reported
beside plain progress advantage's, with the share of steps it flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

CANDIDATES = (math.log(0.1), math.log(0.03), math.log(1e-2), math.log(1e-3), math.log(1e-4), math.log(1e-5), math.log(1e-6))
SETS = {"policy": "on-policy", "reference": "off-policy"}


def _auroc_decision(scores, method: str) -> float | None:
    from progadv_trl.evaluation.stats import auroc

    import numpy as np

    keep = [t for t in scores if t.success or (t.metadata or {}).get("failure_kind") == "decision"]
    x = np.array([t.method_score(method) for t in keep], dtype=np.float64)
    y = np.array([bool(t.success) for t in keep])
    ok = ~np.isnan(x)
    return None if y[ok].all() or not y[ok].any() else float(auroc(x[ok], y[ok]))


def seed_figures(seed_dir: Path) -> dict:
    from progadv_trl.critic import ProgressCritic
    from progadv_trl.trajectories import load_trajectories

    summary = json.loads((seed_dir / "summary.json").read_text())
    critic = ProgressCritic.from_pretrained(seed_dir / "bundle")
    scorer = critic.scorer
    scorer.config = dataclasses.replace(scorer.config, support=True)
    out = {}
    for name, regime in SETS.items():
        path = Path(summary["test_rollouts"][name]["path"])
        if not path.is_absolute() and not path.exists():
            path = seed_dir / path.name
        trajs = load_trajectories(str(path)).trajectories
        configs = {f"{t:.4f}": dataclasses.replace(scorer.config, support_threshold=t) for t in CANDIDATES}
        many = scorer.score_many(trajs, configs)
        first = next(iter(many.values()))
        out[regime] = {"progress_advantage": _auroc_decision(first, "progress_advantage"), "thresholds": {}}
        for key, scores in many.items():
            steps = [s for t in scores if t.support for s in t.support["steps"]]
            out[regime]["thresholds"][key] = {
                "in_support_auroc_decision": _auroc_decision(scores, "progress_advantage_in_support"),
                "flagged_share": sum(bool(s.get("out_of_support")) for s in steps) / max(len(steps), 1),
            }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study", help="a `progadv study` directory (seed_N/ with bundle/ and rollouts)")
    p.add_argument("--validation", type=int, nargs="+", default=[0, 1], help="seeds the threshold is chosen on")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    root = Path(a.study)
    seeds = sorted(int(d.name.split("_")[1]) for d in root.glob("seed_*") if (d / "summary.json").exists())
    per_seed = {s: seed_figures(root / f"seed_{s}") for s in seeds}
    keys = list(next(iter(per_seed.values()))["on-policy"]["thresholds"])

    def mean(vals):
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    val = {k: mean([per_seed[s][r]["thresholds"][k]["in_support_auroc_decision"] for s in a.validation for r in SETS.values()])
           for k in keys}  # fmt: skip
    chosen = max(val, key=lambda k: -1 if val[k] is None else val[k])
    test = [s for s in seeds if s not in a.validation]
    report = {
        "command": "python benchmarks/support_threshold.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "candidates": keys, "validation_seeds": a.validation, "test_seeds": test,
        "validation_mean_auroc": val, "chosen": float(chosen),
        "test": {r: {"in_support": mean([per_seed[s][r]["thresholds"][chosen]["in_support_auroc_decision"] for s in test]),
                     "progress_advantage": mean([per_seed[s][r]["progress_advantage"] for s in test]),
                     "flagged_share": mean([per_seed[s][r]["thresholds"][chosen]["flagged_share"] for s in test])}
                 for r in SETS.values()},
        "per_seed": per_seed,
    }  # fmt: skip
    print(json.dumps({k: report[k] for k in ("validation_mean_auroc", "chosen", "test")}, indent=2))
    if a.json:
        from progadv_trl.utils import write_json

        write_json(a.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
