"""Why step-level selection wins or loses: how each method orders the candidates at one state.

    python benchmarks/steering_ranking.py runs/study_steering/seed_* --tasks 50 --k 8 --json benchmarks/results/steering_ranking.json

For each finished demo run (its bundle, reference and policy), each agent plays the first `--tasks` eval tasks with
step-level selection (`demo.steering.steer`, a few methods) and every expanded state's candidates are labelled by the
world (the one correct action, or a mistake). The figure per method is the within-state AUROC over (correct, mistake)
pairs (`demo.steering.candidate_ranking`), the question the theory answers: at one state, does a higher log-ratio
mean a better action? Also: the share of states with a choice, and what the top-ranked wrong candidates were.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METHODS = ("progress_advantage", "progress_advantage_centred_policy", "policy_logprob", "reference_logprob")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="demo output directories (summary.json, bundle/, reference/, policy/)")
    p.add_argument("--tasks", type=int, default=50)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    from progadv_trl.utils import openmp_wait_policy

    openmp_wait_policy()
    from progadv_trl.critic import ProgressCritic
    from progadv_trl.demo.pipeline import DemoConfig, load_models
    from progadv_trl.demo.steering import AGENTS, steer

    out = {"command": "python benchmarks/steering_ranking.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "methods": list(METHODS), "k": a.k, "tasks": a.tasks, "runs": {}}  # fmt: skip
    for run in a.runs:
        s = json.loads((Path(run) / "summary.json").read_text())
        cfg = DemoConfig(**{**s["config"], "out_dir": str(run)})
        critic = ProgressCritic.from_pretrained(Path(run) / "bundle")
        tok, models = load_models(cfg)
        tasks = cfg.tasks("eval")[: a.tasks]
        res = {}
        for agent in AGENTS:
            _, stats = steer(critic, models[agent], tok, tasks, k=a.k, methods=METHODS, seed=cfg.seed, world=cfg.world,
                             max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)  # fmt: skip
            res[agent] = stats["candidate_ranking"]
            print(f"{run} {agent}: {json.dumps(res[agent])}", file=sys.stderr, flush=True)
        out["runs"][str(run)] = {"seed": cfg.seed, "reference_success": s["reference_success"],
                                 "policy_success": s["policy_success"], "ranking": res}  # fmt: skip
    summary = {}
    for agent in AGENTS:
        for m in METHODS:
            vals = [r["ranking"][agent]["methods"][m] for r in out["runs"].values() if r["ranking"][agent]["methods"].get(m) is not None]
            summary[f"{agent}/{m}"] = {"mean": sum(vals) / len(vals) if vals else None, "per_run": vals}
    out["summary"] = summary
    print(json.dumps(summary, indent=1))
    if a.json:
        from progadv_trl.utils import write_json

        write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
