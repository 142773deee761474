"""Policy for the demo: GRPO (beta > 0) from the SFT reference, multi-turn through TRL's `rollout_func`.

    python recipes/toy_grpo.py --config recipes/toy_grpo.yaml     # after recipes/toy_sft.py (same out_dir)

Then measures reference vs policy success on held-out tasks (greedy and sampled) and writes fresh labelled test
rollouts of both models (out_dir/rollouts_{reference,policy}.jsonl) for `progadv score` / `progadv evaluate`:

    progadv evaluate --policy progadv_demo/policy --reference progadv_demo/reference \\
        progadv_demo/rollouts_reference.jsonl -o progadv_demo/eval_reference
"""

import os

from progadv_trl.utils import openmp_wait_policy  # noqa: E402 - torch-free

openmp_wait_policy()  # before torch starts: idle OpenMP threads spin only on an idle machine
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from trl import TrlParser  # noqa: E402

from progadv_trl.demo import DemoConfig, evaluate, train_policy  # noqa: E402
from progadv_trl.utils import write_json  # noqa: E402


def main(cfg: DemoConfig) -> dict:
    if not (cfg.path("reference") / "config.json").exists():
        sys.exit(f"no reference in {cfg.path('reference')}: run recipes/toy_sft.py with out_dir={cfg.out_dir} first")
    t0 = time.time()
    trainer, path = train_policy(cfg)
    grpo_s = time.time() - t0
    summary = evaluate(cfg)
    summary["timings"]["grpo_s"] = round(grpo_s, 1)
    summary["grpo_steps"] = trainer.state.global_step
    write_json(cfg.path("summary_grpo.json"), summary)  # strict JSON: a NaN figure is written null
    print(json.dumps({k: summary[k] for k in ("reference_success", "policy_success", "success", "timings")}, indent=2))
    return summary


if __name__ == "__main__":
    (cfg,) = TrlParser(DemoConfig).parse_args_and_config()
    main(cfg)
