"""Two CPU processes (torchrun, gloo): every rank takes part in the held-out forward passes, the held-out set is
sharded and gathered, the evaluation prompt group split across ranks is put back together, and only the main
process logs and writes. (`accelerate launch --cpu --num_processes 2` started only one process on our test
machine; torchrun is the launcher tested.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def ranks(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "dist_callback.py"), str(tiny_dir["reference"]), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=480)
    if proc.returncode != 0:  # the ranks' own errors come before torchrun's summary: show them first
        lines = proc.stderr.splitlines()
        key = [ln for ln in lines if any(w in ln for w in ("Error", "error:", "terminate", "Traceback", "what()"))]
        pytest.fail("torchrun failed:\n" + "\n".join(key[:40]) + "\n...\n" + "\n".join(lines[-40:]))
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_ranks_ran(ranks):
    _, (r0, r1) = ranks
    assert (r0["rank"], r1["rank"]) == (0, 1) and r0["world"] == r1["world"] == 2
    assert r0["errors"] == r1["errors"] == 0


def test_every_rank_runs_the_same_heldout_forward_passes(ranks):
    _, (r0, r1) = ranks
    # 5 trajectories over 2 ranks, 2 per pass: rank 0 holds 3, rank 1 holds 2 (+1 padding) -> 2 passes x 2 models
    assert r0["heldout_forwards"] == r1["heldout_forwards"] == [4, 4]


def test_heldout_is_sharded_and_gathered(ranks):
    out, (r0, r1) = ranks
    assert r0["last_heldout_ids"] == ["t0", "t1", "t2", "t3", "t4"]  # all of them, once, in order
    assert r1["last_heldout_ids"] == []
    held = [e for e in r0["log_history"] if "eval_progadv/heldout/global_step" in e]
    assert [e["eval_progadv/heldout/global_step"] for e in held] == [0, 2]
    assert all(e["eval_progadv/heldout/rollouts"] == 5 for e in held)
    assert held[0]["eval_progadv/heldout/step_advantage_mean"] == 0.0


def test_only_main_logs_and_writes(ranks):
    out, (r0, r1) = ranks
    assert any(k.startswith(("progadv/", "eval_progadv/")) for e in r0["log_history"] for k in e)
    assert not any(k.startswith(("progadv/", "eval_progadv/")) for e in r1["log_history"] for k in e)
    import pandas as pd

    tables = sorted(p.relative_to(out).as_posix() for p in (out / "progadv").rglob("*.parquet"))
    assert tables == ["progadv/eval/step_000002.parquet", "progadv/heldout/step_000000.parquet",
                      "progadv/heldout/step_000002.parquet"]  # fmt: skip
    assert pd.read_parquet(out / tables[-1])["id"].nunique() == 5


def test_gathered_figures_match_the_trainer(ranks):
    _, (r0, _) = ranks
    log = r0["log_history"]
    kls = [(e["kl"], e["progadv/train/kl"]) for e in log if "kl" in e]
    assert len(kls) == 2 and kls[-1][0] > 0
    for grpo, ours in kls:
        assert ours == pytest.approx(grpo, rel=1e-5, abs=1e-7)
    train = [e for e in log if "loss" in e]
    assert all(e["progadv/train/rollouts"] == 4 for e in train)  # 2 per rank, gathered
    ev = [e for e in log if "eval_kl" in e]
    assert len(ev) == 1 and ev[0]["eval_progadv/eval/kl"] == pytest.approx(ev[0]["eval_kl"], rel=1e-5)
    # 2 eval prompts x 4 rollouts, each prompt's group split 2 + 2 across the ranks and put back together
    assert ev[0]["eval_progadv/eval/rollouts"] == 8 and ev[0]["eval_progadv/eval/best_of_n/groups"] == 2
