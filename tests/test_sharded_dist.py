"""Two CPU processes (torchrun, gloo) training with FSDP2-sharded models (tests/dist_sharded.py shards them itself:
accelerate ignores its FSDP plugin on a CPU). The end-of-training bundle is gathered from every rank and scores like
`progadv export` of the run's own checkpoint; the held-out passes run in lockstep; an export failure on one rank is
reported on every rank and nobody hangs. Full fine-tuning (a separate, sharded reference) and LoRA (the reference
is the base with the adapter disabled)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["full", "lora"])
def run(request, tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"sharded_{request.param}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "dist_sharded.py"), str(tiny_dir["reference"]), str(out), request.param]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        lines = proc.stderr.splitlines()
        key = [ln for ln in lines if any(w in ln for w in ("Error", "error:", "Traceback", "what()"))]
        pytest.fail("torchrun failed:\n" + "\n".join(key[:40]) + "\n...\n" + "\n".join(lines[-40:]))
    return request.param, out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_the_models_were_sharded_and_training_ran_clean(run):
    _, _, (r0, r1) = run
    assert r0["world"] == r1["world"] == 2
    assert r0["sharded"] == r1["sharded"] == "fsdp2"
    assert r0["errors_after_training"] == r1["errors_after_training"] == 0


def test_heldout_lockstep_under_sharding(run):
    _, _, (r0, r1) = run
    # 5 trajectories (not a multiple of 2), 2 per pass: rank 0 holds 3, rank 1 holds 2 + 1 padding -> 2 passes per
    # model on both ranks, before training and at the end (LoRA: one model, adapter on then off)
    assert r0["heldout_forwards"] == r1["heldout_forwards"] == [4, 4]
    assert r0["last_heldout_ids"] == ["t0", "t1", "t2", "t3", "t4"] and r1["last_heldout_ids"] == []
    held = [e for e in r0["log_history"] if "eval_progadv/heldout/global_step" in e]
    assert [e["eval_progadv/heldout/global_step"] for e in held] == [0, 2]
    assert held[-1]["eval_progadv/heldout/step_advantage_mean"] != 0.0  # the policy moved: the gather was real


def test_bundle_scores_like_progadv_export_of_the_checkpoint(run, tiny_dir, tmp_path):
    import torch

    from progadv_trl.bundle import export_from_paths, verify_bundle
    from progadv_trl.critic import ProgressCritic
    from dist_callback import heldout_records

    kind, out, _ = run
    bundle = out / "bundle"
    assert verify_bundle(bundle, require_reference=False).ok
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["policy"]["kind"] == ("lora" if kind == "lora" else "full")
    # what a user would do without the callback: `progadv export --beta 0.04` of the saved checkpoint against the
    # initial model (beta: the callback's bundle scores with the trainer's)
    from progadv_trl.config import ScoringConfig

    beta = manifest["scoring"]["config"]["beta"]
    assert beta == 0.04
    ref = None if kind == "lora" else tiny_dir["reference"]
    exported = export_from_paths(out / "checkpoint", ref, tmp_path / "exported", scoring_config=ScoringConfig(beta=beta))
    trajs = heldout_records(6)
    a = ProgressCritic.from_pretrained(bundle).score(trajs)
    b = ProgressCritic.from_pretrained(exported).score(trajs)
    assert [s.id for s in a] == [s.id for s in b]
    for sa, sb in zip(a, b):
        assert sa.score == pytest.approx(sb.score, abs=1e-5)
        assert [st.advantage for st in sa.steps] == pytest.approx([st.advantage for st in sb.steps], abs=1e-5)
    assert any(abs(s.score) > 1e-3 for s in a)  # trained away from the reference: not trivially equal
    # and the stored reference is the initial model, whole
    from transformers import AutoModelForCausalLM

    init = AutoModelForCausalLM.from_pretrained(tiny_dir["reference"]).state_dict()
    stored = AutoModelForCausalLM.from_pretrained(bundle / "reference").state_dict()
    assert set(init) == set(stored) and all(torch.equal(init[k], stored[k]) for k in init)


def test_an_export_failure_is_reported_on_every_rank(run):
    _, out, (r0, r1) = run
    for case, culprit in (("rank1_plan", 1), ("main_write", 0)):
        for r in (r0, r1):
            rep = r["reports"][case]
            assert rep["errors"] == 1, (case, r["rank"], rep)
            assert len(rep["messages"]) == 1 and f"rank {culprit}" in rep["messages"][0], (case, r["rank"], rep)
    assert not (out / "fail_rank1_plan").exists()  # nothing half-written
