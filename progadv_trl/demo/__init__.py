"""The demo: a stochastic customer-service world, a tiny model taught to act in it (SFT on flawed demonstrations:
the reference), then GRPO with a KL term (the policy), and labelled rollouts of both.

    from progadv_trl.demo import DemoConfig, run_demo
    summary = run_demo(DemoConfig(out_dir="demo_out"))   # `progadv demo`: ~6 minutes on 2 CPU cores

`world` is pure Python (no torch): tasks, the policy, labels. `rollout` turns episodes into tokens with the model's
chat template and plays them with a model (also as TRL's `rollout_func`). `pipeline` trains and evaluates.
"""

from .pipeline import (
    DemoConfig,
    build_assets,
    evaluate,
    heldout_records,
    load_models,
    sample_rollouts,
    success_rate,
    summarize,
    train_policy,
    train_reference,
    write_jsonl,
)
from .main import run_demo
from .rollout import make_rollout_func, play, success_reward
from .world import SYSTEM_PROMPT, TOOL_SCHEMAS, Episode, Task, WorldConfig, make_tasks, run_episode

__all__ = [
    "DemoConfig", "build_assets", "train_reference", "train_policy", "sample_rollouts", "success_rate", "summarize",
    "evaluate", "heldout_records", "load_models", "run_demo", "write_jsonl", "make_rollout_func", "play", "success_reward",
    "SYSTEM_PROMPT", "TOOL_SCHEMAS", "Episode", "Task", "WorldConfig", "make_tasks", "run_episode",
]
