"""Reference for the demo: SFT of a tiny local model on flawed demonstrations of the customer-service world.

    python recipes/toy_sft.py --config recipes/toy_sft.yaml [--out_dir DIR --seed 1 ...]

Builds the tokenizer and a randomly initialised tiny Qwen2 model (no hub), trains it on demonstrations that are often
wrong, two mistakes systematically so (see progadv_trl/demo/world.py: DemoMix), and reports its success rate on
held-out tasks. Next: recipes/toy_grpo.py with the same out_dir.
"""

import os

from progadv_trl.utils import openmp_wait_policy  # noqa: E402 - torch-free

openmp_wait_policy()  # before torch starts: idle OpenMP threads spin only on an idle machine
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import time  # noqa: E402

from trl import TrlParser  # noqa: E402

from progadv_trl.demo import DemoConfig, build_assets, load_models, sample_rollouts, summarize, train_reference  # noqa: E402


def main(cfg: DemoConfig) -> dict:
    t0 = time.time()
    build_assets(cfg.out_dir, cfg.seed, cfg)
    train_reference(cfg)
    sft_s = time.time() - t0
    tok, models = load_models(cfg, ("reference",))
    ev = cfg.tasks("eval")
    kw = dict(seed=cfg.seed, world=cfg.world, max_new_tokens=cfg.max_new_tokens)
    out = {
        "sft_s": round(sft_s, 1),
        "reference_greedy": summarize(sample_rollouts(models["reference"], tok, ev, 1, greedy=True, tag="g", **kw)),
        "reference_sampled": summarize(sample_rollouts(models["reference"], tok, ev, 2, cfg.temperature, tag="s", **kw)),
    }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    (cfg,) = TrlParser(DemoConfig).parse_args_and_config()
    main(cfg)
