"""The trained reward models on a finished demo run: train the ORM and the PRM (demo/reward_models.py) from the run's
reference and policy at the default DemoConfig, score its saved test rollouts with its bundle and both reward models,
and write what each cost and the out-of-fold figures. The run's own files are only read.

    python benchmarks/reward_models.py RUN_DIR OUT_DIR SEED [--json FILE]

One seed is an anecdote: the study (`progadv study`, which trains them on every seed) is the comparison.
"""

from progadv_trl.cpu import openmp_wait_policy

openmp_wait_policy()  # as the CLI does, before torch loads: spinning OpenMP threads inflate CPU seconds on a busy machine

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

METHODS = ("progress_advantage", "orm", "prm", "policy_logprob", "reference_logprob")


def main() -> None:
    from progadv_trl.critic import ProgressCritic
    from progadv_trl.demo.main import evaluate_set, headline, headline_rows
    from progadv_trl.demo.pipeline import DemoConfig, load_models
    from progadv_trl.demo.reward_models import train_reward_models
    from progadv_trl.evaluation import text_table
    from progadv_trl.utils import write_json

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run")
    p.add_argument("out")
    p.add_argument("seed", type=int)
    p.add_argument("--json", help="a compact copy of the figures (costs, out-of-fold figures per method)")
    a = p.parse_args()
    run, out = Path(a.run), Path(a.out)
    cfg = DemoConfig(out_dir=str(run), seed=a.seed, reward_models=True)
    tok, models = load_models(cfg)
    rms, block = train_reward_models(cfg, models, tok, out_dir=str(out))
    res = {"command": f"python benchmarks/reward_models.py {a.run} {a.out} {a.seed}", "reward_models": block, "sets": {}}
    for name in ("reference", "policy"):
        c0, w0 = time.process_time(), time.perf_counter()
        h = headline(evaluate_set(ProgressCritic.from_pretrained(run / "bundle"), str(run / f"rollouts_{name}.jsonl"),
                                  out / "report" / name, cfg, rms))  # fmt: skip
        print(f"\n{name} rollouts\n" + text_table(*headline_rows(h)), flush=True)
        res["sets"][name] = {
            "evaluation_cpu_s": round(time.process_time() - c0, 1), "evaluation_wall_s": round(time.perf_counter() - w0, 1),
            "methods": {m: {k: h["methods"][m].get(k) for k in ("fair_auroc", "fair_auroc_rule", "fair_best_of_n",
                                                               "fair_attribution", "fair_attribution_rule")}
                        for m in METHODS if m in h["methods"]},
            "comparison": h["comparison"],
        }  # fmt: skip
    write_json(out / "reward_models.json", res, default=str)
    if a.json:
        write_json(a.json, res, default=str)


if __name__ == "__main__":
    main()
