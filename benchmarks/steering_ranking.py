"""Why step-level selection wins or loses: how each method orders the candidates at one state, and the plausible
variant's α in the agent loop.

    python benchmarks/steering_ranking.py runs/study_v3/seed_* --tasks 48 --k 4 8 --alphas 0.1 0.5 0.9 \
        --json benchmarks/results/steering_alpha.json

For each finished demo run, each agent (the reference, the mid-training checkpoint, the policy; each steered by the
critic that grades it, as the demo does) plays the first `--tasks` eval tasks with step-level selection
(`demo.steering.steer`) and every expanded state's candidates are labelled by the world (the one correct action, or
a mistake). Per method: held-out success when it chooses every step, and the within-state AUROC over (correct,
mistake) pairs (`demo.steering.candidate_ranking`), the question the theory answers: at one state, does a higher
log-ratio mean a better action? Per α of `--alphas` the critics' `plausibility_alpha` is set to it (the bundles
hold 0.1), and the plausible variant is set against the best baseline that needs no training and against plain
progress advantage, paired over tasks (`evaluation.fair.compare_outcomes`). The α values are a sweep reported whole,
not a choice: picking the best of them on these tasks would favour the variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("progress_advantage", "progress_advantage_plausible", "policy_logprob", "reference_logprob",
           "self_certainty", "deepconf_tail")  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="demo output directories (summary.json, bundle/, bundle_mid/, models)")
    p.add_argument("--tasks", type=int, default=48)
    p.add_argument("--k", type=int, nargs="+", default=[8])
    p.add_argument("--alphas", type=float, nargs="+", default=[None],
                   help="plausibility_alpha values for the critics (default: each bundle's own)")  # fmt: skip
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    from progadv_trl.utils import openmp_wait_policy

    openmp_wait_policy()
    import numpy as np

    from progadv_trl.demo.main import _critics
    from progadv_trl.demo.pipeline import DemoConfig, load_models, model_names
    from progadv_trl.demo.steering import AGENTS, steer
    from progadv_trl.evaluation.fair import compare_outcomes

    out = {"command": "python benchmarks/steering_ranking.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "methods": list(METHODS), "k": a.k, "tasks": a.tasks, "alphas": a.alphas, "runs": {}}  # fmt: skip
    for run in a.runs:
        s = json.loads((Path(run) / "summary.json").read_text())
        cfg = DemoConfig(**{**s["config"], "out_dir": str(run)})
        agents = [n for n in AGENTS if n in model_names(cfg)]
        critics = _critics(Path(run), agents)
        bundle_alpha = {n: c.config.plausibility_alpha for n, c in critics.items()}
        tok, models = load_models(cfg, tuple(agents))
        tasks = cfg.tasks("eval")[: a.tasks]
        res = {}
        for alpha in a.alphas:
            for n, c in critics.items():
                c.scorer.config = dataclasses.replace(c.scorer.config, plausibility_alpha=alpha or bundle_alpha[n])
            for agent in agents:
                for k in a.k:
                    eps, stats = steer(critics[agent], models[agent], tok, tasks, k=k, methods=METHODS, seed=cfg.seed,
                                       world=cfg.world, max_new_tokens=cfg.max_new_tokens,
                                       temperature=cfg.temperature)  # fmt: skip
                    step = {m: [float(ep.success) for ep in v] for m, v in eps.items()}
                    c = compare_outcomes(step, n_boot=cfg.n_boot, seed=cfg.seed)
                    fam = c["family"]["progress_advantage_plausible"]
                    r = res[f"a{alpha or 'bundle'}/{agent}/k{k}"] = {
                        "alpha": alpha or bundle_alpha[agent], "agent": agent, "k": k,
                        "step": {m: float(np.mean(v)) for m, v in step.items()},
                        "best_baseline": c["best_baseline"],
                        "pl_minus_best": {x: fam[x] for x in ("difference", "difference_ci", "verdict")},
                        "pl_minus_pa": fam.get("vs_progress_advantage"),
                        "ranking": stats["candidate_ranking"]["methods"],
                        "states_with_a_choice": stats["candidate_ranking"]["states_with_a_choice"],
                    }  # fmt: skip
                    print(f"{run} alpha={r['alpha']} {agent} K={k}: PL {r['step']['progress_advantage_plausible']:.3f} "
                          f"best {c['best_baseline']} {r['step'][c['best_baseline']]:.3f} ({fam['verdict']}); ranking "
                          f"PL {r['ranking']['progress_advantage_plausible']}", file=sys.stderr, flush=True)  # fmt: skip
        out["runs"][str(run)] = {"seed": cfg.seed, "results": res}
    summary = {}
    for key in next(iter(out["runs"].values()))["results"]:
        rows = [r["results"][key] for r in out["runs"].values() if key in r["results"]]
        verdicts = [r["pl_minus_best"]["verdict"] for r in rows]
        summary[key] = {
            "step_pl": float(np.mean([r["step"]["progress_advantage_plausible"] for r in rows])),
            "step_best": float(np.mean([r["step"][r["best_baseline"]] for r in rows])),
            "step_policy_logprob": float(np.mean([r["step"]["policy_logprob"] for r in rows])),
            "pl_minus_best_b_t_l": [verdicts.count(v) for v in ("beats", "ties", "loses")],
            "ranking_pl": float(np.mean([r["ranking"]["progress_advantage_plausible"] for r in rows
                                         if r["ranking"]["progress_advantage_plausible"] is not None])),
            "ranking_policy_logprob": float(np.mean([r["ranking"]["policy_logprob"] for r in rows
                                                     if r["ranking"]["policy_logprob"] is not None])),
            "n_runs": len(rows),
        }  # fmt: skip
    out["summary"] = summary
    print(json.dumps(summary, indent=1))
    if a.json:
        from progadv_trl.utils import write_json

        write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
