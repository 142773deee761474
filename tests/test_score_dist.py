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


def _records() -> list[dict]:
    """16 trajectories of 420-980 tokens: 3 groups of 4 rollouts that share their prompt (the engine scores each over
    its shared prefix, `prefix.py`) and 4 alone (padded batches); --batch-tokens 2048 makes units of both kinds."""
    recs = []
    for i in range(16):
        ok = i % 3 != 0
        g = i // 4 if i < 12 else None
        rec = make_trajectory(i, n_turns=1 + (i * 5) % 9, success=ok, failure_step=None if ok else 0, group=f"g{i // 4}")
        if g is not None:
            rec["messages"][1]["content"] = f"Weather in city {g}?"  # the group's shared prompt
        recs.append(rec)
    return recs


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    recs = _records()
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
    assert proc.stderr.count("progadv: scored 16 trajectories") == 1  # only the main process reports


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


def test_each_unit_run_alone_gives_the_plan_s_numbers(tiny_models, tiny_tokenizer):
    """What the ranks do, in one process: every work unit of the plan (shared-prefix groups and padded batches) run
    alone reproduces the single call's statistics bit for bit."""
    import numpy as np

    from progadv_trl.engine import ProgressScorer

    pol, ref = tiny_models
    scorer = ProgressScorer(pol, tiny_tokenizer, ref, batch_tokens=2048)
    _, rendered = scorer.render(_records())
    units = distributed.units(scorer, rendered)
    assert any(hasattr(u, "batches") for u in units) and any(isinstance(u, list) for u in units)
    whole = scorer.token_stats(rendered)
    pieces = dict(pair for u in units for pair in scorer.run_unit(rendered, u))
    assert sorted(pieces) == list(range(len(rendered)))
    for i, st in enumerate(whole):
        for k in ("policy_logp", "reference_logp", "policy_mean_logp", "policy_topk_logp", "step"):
            assert np.array_equal(getattr(st, k), getattr(pieces[i], k)), (i, k)
    # Dealt to 2, 4, 8 ranks (groups heavier than a rank's share cut into their continuation batches, a rank's
    # pieces of one group run over the prefix once): every trajectory once, the same bits.
    for n in (2, 4, 8):
        work = distributed.pieces(units, rendered, n)
        assert n < 8 or len(work) > len(units)  # at 8 ranks some group is cut
        got = {}
        for part in distributed.shard([distributed._cost(p, rendered) for _, p in work], n):
            for unit in distributed.merge_pieces([work[i] for i in part]):
                for i, st in scorer.run_unit(rendered, unit):
                    assert i not in got
                    got[i] = st
        assert sorted(got) == list(range(len(rendered)))
        for i, st in enumerate(whole):
            assert np.array_equal(st.policy_logp, got[i].policy_logp) and np.array_equal(st.reference_logp, got[i].reference_logp)
