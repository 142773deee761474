"""The training callback under faults: an out-of-memory in the held-out pass, an export that fails half-way, and a
process killed while it publishes a bundle. Training goes on, nothing exported is half-written, and the metric
history has no duplicates. (An exception in held-out scoring and a resume from a checkpoint: tests/test_callback*.py.)"""

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from dist_callback import grpo_args, heldout_records, parity_reward, prompts
from reliability_helpers import one_torch_thread  # noqa: F401 - autouse


def _trainer(model_dir, out_dir, **kw):
    from transformers import AutoTokenizer
    from trl import GRPOTrainer

    return GRPOTrainer(
        model=str(model_dir), args=grpo_args(out_dir, eval_strategy="no", **kw), reward_funcs=parity_reward,
        train_dataset=prompts(16), processing_class=AutoTokenizer.from_pretrained(model_dir),
    )  # fmt: skip


def test_out_of_memory_in_the_heldout_pass_is_counted_and_training_goes_on(tiny_dir, tmp_path):
    from progadv_trl.callback import ProgressAdvantageCallback

    t = _trainer(tiny_dir["reference"], tmp_path, max_steps=4)
    cb = ProgressAdvantageCallback(t, heldout=heldout_records(3), eval_steps=2, export=None)
    t.add_callback(cb)
    scorer = cb.heldout.make_scorer()
    real = scorer.token_stats

    def token_stats(rendered, **kw):
        if t.state.global_step == 2:  # the pass at step 2 runs out of memory
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        return real(rendered, **kw)

    scorer.token_stats = token_stats
    cb.heldout.make_scorer = lambda: scorer
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t.train()
    assert t.state.global_step == 4  # training went on
    assert cb.errors == 1 and sum("held-out scoring failed" in str(x.message) for x in w) == 1
    held = [h["step"] for h in cb.history if h["kind"] == "heldout"]
    assert held == [0, 4]  # the failed pass is missing, nothing is repeated
    logged = [e["eval_progadv/heldout/global_step"] for e in t.state.log_history if "eval_progadv/heldout/global_step" in e]
    assert logged == [0, 4]
    assert [e["progadv/errors"] for e in t.state.log_history if "progadv/errors" in e][-1] == 1


def test_an_export_that_fails_half_way_leaves_no_bundle_and_no_litter(tiny_dir, tmp_path, monkeypatch):
    from progadv_trl.bundle import export as E
    from progadv_trl.callback import ProgressAdvantageCallback

    t = _trainer(tiny_dir["reference"], tmp_path, max_steps=2)
    cb = ProgressAdvantageCallback(t, heldout=heldout_records(2), export="end")
    t.add_callback(cb)

    def broken(tokenizer, out):  # the weights are written, the tokenizer is not: a disk that filled up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(E, "_save_tokenizer", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.train()
    assert t.state.global_step == 2 and cb.errors == 1
    assert not (tmp_path / "progadv_bundle").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".progadv_bundle")]  # no temporary folder


KILLED_EXPORT = textwrap.dedent(
    """
    import sys
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from progadv_trl.bundle import export_bundle

    pol = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    ref = AutoModelForCausalLM.from_pretrained(sys.argv[2])
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    print("ready", flush=True)
    while True:  # export over and over until killed: every kill lands somewhere inside an export
        export_bundle(sys.argv[3], pol, ref, tok, overwrite=True)
    """
)


@pytest.mark.parametrize("delay", [0.3, 0.9, 1.7])
def test_a_process_killed_while_exporting_never_leaves_a_half_written_bundle(tiny_dir, tmp_path, delay):
    from progadv_trl.bundle import verify_bundle

    out = tmp_path / "critic"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen([sys.executable, "-c", KILLED_EXPORT, str(tiny_dir["policy"]), str(tiny_dir["reference"]), str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)  # fmt: skip
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait(timeout=60)
    # The target is a whole, verified bundle (or not there yet): never a half-written one.
    if out.exists():
        report = verify_bundle(out)
        assert report.ok, report.errors
    # A killed export may leave its hidden temporary folder; it is never mistaken for a bundle.
    for tmp in (q for q in tmp_path.iterdir() if q.name.startswith(".critic.")):
        assert not verify_bundle(tmp).ok
