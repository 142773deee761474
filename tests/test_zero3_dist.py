"""DeepSpeed ZeRO-3 on two CPU processes: the export gather and the held-out scoring context (tests/dist_zero3.py).
Skipped unless deepspeed is installed (it is not a dependency; `pip install deepspeed` with DS_BUILD_OPS=0 runs here
on a CPU with DS_ACCELERATOR=cpu)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow
HERE = Path(__file__).parent


def test_zero3_gather_and_scoring_match_the_unsharded_model(tiny_dir, tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "dist_zero3.py"), str(tiny_dir["reference"]), str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["kind"] == r1["kind"] == "zero3" and r0["local_head_numel"] == 0  # really partitioned
    assert r0["full_equal"] is True
    assert r0["scoring_max_diff"] == r1["scoring_max_diff"] == 0.0
