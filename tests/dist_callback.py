"""Helpers for the callback tests, and the two-process run (`torchrun --nproc_per_node 2 tests/dist_callback.py`).

Run by tests/test_callback_dist.py with torchrun on gloo (CPU). `accelerate launch --cpu --num_processes 2` started
only one process on our test machine, so torchrun is the launcher we test with.

    torchrun --nproc_per_node 2 tests/dist_callback.py MODEL_DIR OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# GRPO's own timing figures differ run to run; everything else must be identical with and without the callback.
TIMING_KEYS = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second", "eval_runtime",
               "eval_samples_per_second", "eval_steps_per_second")  # fmt: skip


from progadv_trl.demo.tiny import grpo_args, parity_reward, prompts  # noqa: E402,F401 - shared with benchmarks/run.py


def heldout_records(n: int):
    from conftest import make_trajectory

    return [
        make_trajectory(i, n_turns=1 + i % 3, success=bool(i % 2), failure_step=None if i % 2 else 0, group=f"g{i // 2}")
        for i in range(n)
    ]


class count_forwards:
    """Count forward passes through the models' decoders (the engine calls the decoder directly, TRL the model)."""

    def __init__(self, *models):
        self.n, self._handles = 0, []
        for m in models:
            base = m.get_base_model() if hasattr(m, "get_base_model") else m
            self._handles.append(base.get_decoder().register_forward_pre_hook(self._hook))

    def _hook(self, *_):
        self.n += 1

    def remove(self):
        for h in self._handles:
            h.remove()


def is_ours(key: str) -> bool:
    """A key the callback logs: progadv/train/..., progadv/errors, eval_progadv/{eval,heldout}/..."""
    return key.startswith(("progadv/", "eval_progadv/"))


def grpo_figures(log_history) -> list[dict]:
    """The trainer's own figures, entry by entry (progadv keys, timings and our extra entries left out)."""
    out = []
    for e in log_history:
        own = {k: v for k, v in e.items() if not is_ours(k) and k not in TIMING_KEYS}
        if set(own) - {"step", "epoch"}:
            out.append(own)
    return out


def main(model_dir: str, out_dir: str):
    import torch
    from transformers import AutoTokenizer
    from trl import GRPOTrainer

    from progadv_trl.callback import ProgressAdvantageCallback

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    args = grpo_args(
        out_dir,
        per_device_train_batch_size=2,  # 2 ranks x 2 = one prompt group of 4 split across the ranks
        per_device_eval_batch_size=2,
        max_steps=2,
        eval_steps=2,
    )
    trainer = GRPOTrainer(
        model=model_dir, args=args, reward_funcs=parity_reward, train_dataset=prompts(16),
        eval_dataset=prompts(2, offset=100), processing_class=tok,
    )  # fmt: skip
    cb = ProgressAdvantageCallback(trainer, heldout=heldout_records(5), heldout_batch_size=2, export=None)
    trainer.add_callback(cb)
    counts = {}
    orig = cb.score_heldout

    def counted():
        c = count_forwards(trainer.accelerator.unwrap_model(trainer.model), trainer.ref_model)
        res = orig()
        c.remove()
        counts.setdefault("heldout_forwards", []).append(c.n)
        return res

    cb.score_heldout = counted
    trainer.train()
    rank = trainer.accelerator.process_index
    res = {
        "rank": rank,
        "world": trainer.accelerator.num_processes,
        "log_history": trainer.state.log_history,
        "heldout_forwards": counts.get("heldout_forwards"),
        "last_heldout_ids": [s.id for s in cb.last_heldout],
        "errors": cb.errors,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res, default=str))
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # Under pytest, about one run in eight had a rank abort during interpreter teardown ("terminate called without
    # an active exception"), after all the work above was done and written; skip the teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
