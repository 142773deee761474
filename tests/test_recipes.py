"""The recipes run as a user runs them (subprocesses, YAML configs), smoke-sized on tiny local models.

toy_sft -> toy_grpo builds a reference and a policy; grpo_lora_qwen then runs its LoRA GRPO on that local reference
instead of Qwen (the command in its docstring), and score_public_pair.sh scores the (policy, reference) pair as if it
were a public instruct/base pair.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from progadv_trl.demo.pipeline import DemoConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
BIN = Path(sys.executable).parent


def _run(args, cwd, env=None, timeout=300):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHON": sys.executable,
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **(env or {})}  # fmt: skip
    p = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{args} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def test_every_yaml_opens_with_its_command():
    for y in sorted(RECIPES.glob("*.yaml")):
        first = y.read_text().splitlines()[0]
        assert first.startswith("# ") and f"recipes/{y.name}" in first, f"{y.name}: first line is {first!r}"
        cmd = first[2:].split()
        assert (ROOT / cmd[1]).is_file(), f"{y.name}: {cmd[1]} does not exist"
        yaml.safe_load(y.read_text())  # and it parses


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    fast = {k: v for k, v in dataclasses.asdict(DemoConfig.fast(out_dir=str(d / "run"))).items()}
    cfg = d / "fast.yaml"
    cfg.write_text("# python recipes/toy_sft.py --config fast.yaml\n" + yaml.safe_dump(fast))
    _run([sys.executable, str(RECIPES / "toy_sft.py"), "--config", str(cfg)], cwd=d)
    p = _run([sys.executable, str(RECIPES / "toy_grpo.py"), "--config", str(cfg)], cwd=d)
    return d, Path(fast["out_dir"]), p.stdout


def test_toy_sft_then_grpo(toy):
    _, run, stdout = toy
    for sub in ("base", "reference", "policy"):
        assert (run / sub / "config.json").is_file(), sub
    summary = json.loads((run / "summary_grpo.json").read_text())
    assert {"reference_success", "policy_success", "success", "timings"} <= set(summary)
    recs = [json.loads(line) for line in (run / "rollouts_policy.jsonl").read_text().splitlines()]
    assert recs and all("success" in r and "group" in r for r in recs)


def test_grpo_lora_qwen_on_a_local_tiny_model(toy):
    d, run, _ = toy
    out = d / "lora"
    _run([sys.executable, str(RECIPES / "grpo_lora_qwen.py"), "--config", str(RECIPES / "grpo_lora_qwen.yaml"),
          "--model_name_or_path", str(run / "reference"), "--max_steps", "2", "--use_cpu", "true", "--bf16", "false",
          "--dtype", "float32", "--gradient_checkpointing", "false", "--n_eval_tasks", "4", "--n_test_tasks", "2",
          "--n_per_task", "2", "--per_device_train_batch_size", "8", "--num_generations", "4",
          "--max_turn_tokens", "24", "--output_dir", str(out)], cwd=ROOT)  # fmt: skip
    assert (out / "adapter_config.json").is_file()  # a LoRA adapter: the pair is (adapter, its base)
    res = json.loads((out / "summary_world.json").read_text())
    assert {"reference_greedy", "policy_greedy", "policy_test", "reference_test"} <= set(res)
    # The adapter directory alone is a pair for progadv
    _run([str(BIN / "progadv"), "evaluate", "--policy", str(out), str(out / "rollouts_reference.jsonl"),
          "-o", str(out / "eval"), "--n-boot", "20"], cwd=ROOT)  # fmt: skip
    assert (out / "eval" / "metrics.json").is_file()


def test_score_public_pair_on_local_models(toy):
    d, run, _ = toy
    cfg = yaml.safe_load((RECIPES / "score_public_pair.yaml").read_text())
    cfg.update(n_tasks=3, n_per_task=2, max_turn_tokens=24, output=str(d / "pair" / "trajectories.jsonl"))
    small = d / "pair.yaml"
    small.write_text(yaml.safe_dump(cfg))
    _run(["bash", str(RECIPES / "score_public_pair.sh"), str(small)], cwd=ROOT,
         env={"POLICY": str(run / "policy"), "REFERENCE": str(run / "reference"), "OUT_DIR": str(d / "pair")})  # fmt: skip
    for f in ("trajectories.jsonl", "scores.jsonl", "bundle/manifest.json", "eval/metrics.json"):
        assert (d / "pair" / f).is_file(), f


def test_score_real_logs_on_local_models(tiny_dir, tmp_path):
    out = tmp_path / "real"
    _run([sys.executable, str(RECIPES / "score_real_logs.py"), "--config", str(RECIPES / "score_real_logs.yaml"),
          "--policy", str(tiny_dir["policy"]), "--reference", str(tiny_dir["reference"]), "--out_dir", str(out),
          "--dtype", "float32", "--device", "cpu", "--max_length", "1024", "--n_boot", "0"], cwd=ROOT)  # fmt: skip
    recs = [json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(recs) == len(scores) == 4  # the four Who&When cases the YAML points at
    assert [len(s["steps"]) for s in scores] == [sum(m["role"] == "assistant" for m in r["messages"]) for r in recs]
    ww = json.loads((out / "eval" / "metrics.json").read_text())["whowhen_attribution"]
    assert ww["n"] == 4 and ww["methods"]["progress_advantage"]["min_cumsum"]["agent_accuracy"] is not None


def test_onpolicy_sweep_two_fast_cells(tmp_path):
    """The sweep recipe as a user runs it: two (beta, steps) cells of one fast seed each, then its table; the second
    invocation resumes every finished cell instead of training again."""
    out = tmp_path / "sweep"
    args = [sys.executable, str(RECIPES / "onpolicy_sweep.py"), "--config", str(RECIPES / "onpolicy_sweep.yaml"),
            "--betas", "0.05", "0.3", "--steps", "2", "--seeds", "0", "--out_dir", str(out), "--fast", "true"]  # fmt: skip
    _run(args, cwd=tmp_path, timeout=900)
    rows = json.loads((out / "sweep.json").read_text())
    assert [(r["beta"], r["steps"]) for r in rows] == [(0.05, 2), (0.3, 2)]
    for r in rows:  # each cell really ran with its own beta and steps
        cfg = json.loads((out / f"beta_{r['beta']}_steps_2" / "seed_0" / "summary.json").read_text())["config"]
        assert (cfg["beta"], cfg["grpo_steps"]) == (r["beta"], 2) and "on-policy/auroc" in r
    assert "| 0.3 | 2 |" in (out / "sweep.md").read_text()
    p = _run(args, cwd=tmp_path, timeout=300)
    assert p.stderr.count("exists with this configuration: not run again") == 2


def test_steer_agent_on_the_toy_pair(toy):
    """The critic-guided agent: a bundle of the toy pair steers the toy reference; its records carry every candidate
    with its scores and the chosen index, and `progadv evaluate` reads them."""
    d, run, _ = toy
    bundle, out = d / "steer_bundle", d / "steer" / "episodes.jsonl"
    _run([str(BIN / "progadv"), "export", "--policy", str(run / "policy"), "--reference", str(run / "reference"),
          str(bundle)], cwd=ROOT)  # fmt: skip
    p = _run([sys.executable, str(RECIPES / "steer_agent.py"), "--config", str(RECIPES / "steer_agent.yaml"),
              "--bundle", str(bundle), "--sampler", str(run / "reference"), "--output", str(out), "--n_tasks", "3",
              "--k", "3", "--device", "cpu"], cwd=ROOT)  # fmt: skip
    assert json.loads(p.stdout.strip().splitlines()[-1])["episodes"] == 3
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    for r in recs:
        steps = r["metadata"]["steering"]
        assert len(steps) == sum(m["role"] == "assistant" for m in r["messages"])
        for st in steps:
            assert len(st["candidates"]) == len(st["scores"]) == 3
            pa = [s["progress_advantage"] for s in st["scores"]]
            assert pa[st["chosen"]] == max(pa)  # progress advantage chose it
    _run([str(BIN / "progadv"), "evaluate", "--bundle", str(bundle), str(out), "-o", str(d / "steer" / "eval"),
          "--n-boot", "20"], cwd=ROOT)  # fmt: skip
    assert (d / "steer" / "eval" / "metrics.json").is_file()
