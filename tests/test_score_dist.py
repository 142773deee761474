"""`progadv score` and `progadv evaluate` across two CPU processes (torchrun, gloo): the trajectories are sharded,
gathered in input order, and the main process alone writes; the output is byte-identical to one process's.

Both sides run one thread per process (torchrun's default, OMP_NUM_THREADS=1), so the comparison is about sharding,
not about thread counts. The single-process side runs in this process (no second torch import)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_trajectory
from progadv_trl import distributed
from progadv_trl.cli import main

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p)}  # fmt: skip


def _torchrun(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        lines = proc.stderr.splitlines()
        key = [ln for ln in lines if any(w in ln for w in ("Error", "error:", "Traceback", "what()"))]
        pytest.fail("torchrun failed:\n" + "\n".join(key[:40]) + "\n...\n" + "\n".join(lines[-40:]))
    return proc


def _single(argv: list[str]) -> int:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    # 12 trajectories of 420-980 tokens; --batch-tokens 2048 packs them 2-4 to a padded batch: 5 batches to deal
    recs = []
    for i in range(12):
        ok = i % 3 != 0
        recs.append(make_trajectory(i, n_turns=1 + (i * 5) % 9, success=ok, failure_step=None if ok else 0, group=f"g{i // 4}"))
    path = tmp_path_factory.mktemp("dist_src") / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _models(tiny_dir) -> list[str]:
    return ["--policy", str(tiny_dir["policy"]), "--reference", str(tiny_dir["reference"]), "--batch-tokens", "2048"]


def test_score_two_processes_is_byte_identical(tiny_dir, src, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert _single(["score", *_models(tiny_dir), str(src), "-o", str(one / "s.jsonl")]) == 0
    proc = _torchrun(["-m", "progadv_trl.cli", "score", *_models(tiny_dir), str(src), "-o", str(two / "s.jsonl")])
    assert (two / "s.jsonl").read_bytes() == (one / "s.jsonl").read_bytes()
    assert sorted(p.name for p in two.iterdir()) == ["s.jsonl"]  # one file, no temporary left by another rank
    assert proc.stderr.count("progadv: scored 12 trajectories") == 1  # only the main process reports


def test_evaluate_two_processes_gives_the_same_metrics(tiny_dir, src, tmp_path, capsys):
    opts = ["--n-boot", "20", "--folds", "2", "--choose-reduction", "auroc"]  # score_many's path too
    one, two = tmp_path / "one", tmp_path / "two"
    assert _single(["evaluate", *_models(tiny_dir), str(src), "-o", str(one), *opts]) == 0
    table = capsys.readouterr().out
    proc = _torchrun(["-m", "progadv_trl.cli", "evaluate", *_models(tiny_dir), str(src), "-o", str(two), *opts])
    assert (two / "metrics.json").read_bytes() == (one / "metrics.json").read_bytes()
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert proc.stdout == table  # printed once, by the main process
    assert proc.stderr.count("progadv: wrote") == 1


def test_a_failure_on_one_rank_reaches_the_main_process_and_hangs_no_one(tmp_path):
    _torchrun([str(HERE / "dist_shard.py"), str(tmp_path)], timeout=120)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    # costs [5, 1, 4, 2, 3, 3, 1] dealt heaviest first to the least-loaded rank: loads 10 and 9; results in order
    assert r0["ok"] == [[0, 0], [1, 0], [2, 1], [3, 1], [4, 1], [5, 0], [6, 0]] and r1["ok"] is None
    assert r0["failing_error"] == r1["failing_error"] == "unit 2 is bad"  # rank 1's error, raised on main too
    assert r0["after"] == [10, 20, 30]  # and the ranks are still in step


def test_shard_balances_and_covers():
    costs = [9, 1, 1, 1, 5, 4, 3, 3, 2, 2]
    parts = distributed.shard(costs, 3)
    assert sorted(i for p in parts for i in p) == list(range(10))
    assert all(p == sorted(p) for p in parts)
    loads = [sum(costs[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(costs[i] for p in parts for i in p)
    assert distributed.shard(costs, 3) == parts  # deterministic: every rank computes the same split
    assert distributed.shard([], 2) == [[], []]


def test_single_process_paths_are_the_plain_ones(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.active() and distributed.is_main()
    assert distributed.map_sharded(lambda u: u + 1, [1, 2, 3], [1, 1, 1]) == [2, 3, 4]
    assert distributed.device("cuda") == "cuda"
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.device("cuda") == "cuda:3" and distributed.device("cuda:1") == "cuda:1"
    assert distributed.device(None) is None and distributed.device("cpu") == "cpu"
