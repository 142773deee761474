"""Does the demo's RL learn? build_assets + SFT + GRPO + greedy held-out success, one seed, no callback/evaluation.

    python benchmarks/demo_learning.py --seed 0 --out runs/learn0 [--set grpo_steps=100 --set beta=0.1] [--noisy]
    python benchmarks/demo_learning.py --seed 0 --out runs/learn0 --reuse   # keep base + reference, redo GRPO

Prints reference -> policy greedy success on the eval split, failures by situation/reason, and wall and process CPU
seconds per stage (the demo's cost on an uncontended 2-core machine is about the CPU time / 2 when both threads are
busy; compare CPU times across runs on a shared machine, not wall times).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def decision_probe(model, tok, tasks) -> dict:
    """Mean P(first token is a tool call) right after a lookup, by situation ('timeout': after a timed-out lookup):
    whether a model tells the situations apart, not only what greedy decoding does."""
    import torch

    from progadv_trl.demo.rollout import encode, render
    from progadv_trl.demo.world import tool_call_message

    tc = tok.convert_tokens_to_ids("<tool_call>")
    res: dict[str, list[float]] = {}
    for t in tasks:
        for key, out in ((t.situation, {"insured": t.insured, "within_24h": t.within_24h}), ("timeout", {"error": "timeout"})):
            msgs = t.prompt() + [tool_call_message("get_reservation", t.res_id),
                                 {"role": "tool", "content": json.dumps({**out, "id": t.res_id})}]
            with torch.no_grad():
                logits = model(torch.tensor([encode(tok, render(tok, msgs, True))])).logits[0, -1]
            res.setdefault(key, []).append(torch.softmax(logits.float(), -1)[tc].item())
    return {k: round(sum(v) / len(v), 3) for k, v in sorted(res.items())}


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], help="DemoConfig field=value (JSON value)")
    p.add_argument("--noisy", action="store_true", help="free-form world content")
    p.add_argument("--reuse", action="store_true", help="reuse out/base and out/reference")
    p.add_argument("--sampled", action="store_true", help="also sampled success (2 per task)")
    a = p.parse_args()

    from transformers.utils import logging as hf_logging

    from progadv_trl.demo.pipeline import (DemoConfig, build_assets, load_models, sample_rollouts, train_policy,
                                           train_reference)

    hf_logging.disable_progress_bar()
    over = {k: _value(v) for k, v in (s.split("=", 1) for s in a.set)}
    if a.noisy:
        over["free_form"] = True
    cfg = DemoConfig(**{"out_dir": a.out, "seed": a.seed, **over})
    times = {}

    def stage(name, fn):
        t0, c0 = time.perf_counter(), _cpu()
        r = fn()
        times[name] = (round(time.perf_counter() - t0, 1), round(_cpu() - c0, 1))
        print(f"[learn] {name}: wall {times[name][0]} s, cpu {times[name][1]} s", flush=True)
        return r

    if not (a.reuse and cfg.path("reference").exists()):
        stage("assets", lambda: build_assets(cfg.out_dir, cfg.seed, cfg))
        stage("sft", lambda: train_reference(cfg))
    trainer, _ = stage("grpo", lambda: train_policy(cfg))
    rewards = [round(h["reward"], 2) for h in trainer.state.log_history if "reward" in h]
    tok, models = load_models(cfg)
    # the last step's policy beside the kept one (TRL keeps the latest checkpoint beside the best): what the demo
    # kept before it chose a checkpoint on the validation split
    last = cfg.path("grpo_run") / f"checkpoint-{trainer.state.global_step}"
    if cfg.val_steps and (last / "config.json").exists():
        from transformers import AutoModelForCausalLM

        models["last_step"] = AutoModelForCausalLM.from_pretrained(last).eval()
    res = {}

    def ev():
        for name, m in models.items():
            recs = sample_rollouts(m, tok, cfg.tasks("eval"), 1, greedy=True, seed=cfg.seed, world=cfg.world,
                                   max_new_tokens=cfg.max_new_tokens, tag=f"eval-greedy-{name}")
            fails = collections.Counter(
                (r["metadata"]["situation"], (r["metadata"]["failure_reason"] or r["metadata"]["outcome"])[:40])
                for r in recs if not r["success"])
            res[name] = {"greedy": sum(r["success"] for r in recs) / len(recs), "fails": fails.most_common(6),
                         "p_tool_call": decision_probe(m, tok, cfg.tasks("eval")[:60])}
            if a.sampled:
                recs = sample_rollouts(m, tok, cfg.tasks("eval"), 2, cfg.temperature, seed=cfg.seed, world=cfg.world,
                                       max_new_tokens=cfg.max_new_tokens, tag=f"eval-sampled-{name}")
                res[name]["sampled"] = sum(r["success"] for r in recs) / len(recs)

    stage("eval", ev)
    gain = 100 * (res["policy"]["greedy"] - res["reference"]["greedy"])
    out = {"seed": a.seed, "over": over, "reference": res["reference"]["greedy"], "policy": res["policy"]["greedy"],
           "gain_points": round(gain, 1), "sampled": {k: v.get("sampled") for k, v in res.items()},
           "last_step": res.get("last_step", {}).get("greedy"), "kept": trainer.state.best_model_checkpoint,
           "times_wall_cpu": times, "reward_curve": rewards,
           "p_tool_call": {k: v["p_tool_call"] for k, v in res.items()},
           "fails": {k: v["fails"] for k, v in res.items()}}
    print(json.dumps({k: v for k, v in out.items() if k != "fails"}, default=str))
    for k, v in out["fails"].items():
        print(f"[learn] {k} failures: {v}")
    Path(a.out, "learning.json").write_text(json.dumps(out, indent=1, default=str))
    print(f"[learn] seed {a.seed}: reference {out['reference']:.3f} -> policy {out['policy']:.3f} ({gain:+.1f} points)")


if __name__ == "__main__":
    main()
