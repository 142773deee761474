"""A two-process GRPO run whose policy and reference are sharded with FSDP2 (`torchrun`, gloo, CPU).

    torchrun --nproc_per_node 2 tests/dist_sharded.py MODEL_DIR OUT_DIR [lora]

Run by tests/test_sharded_dist.py. accelerate ignores its FSDP plugin on a CPU (the accelerator reports MULTI_CPU and
every rank keeps the whole model), so this script shards the trainer's models itself with torch's `fully_shard`, as
accelerate's FSDP2 preparation does on GPUs (each decoder layer, then the root), and keeps accelerate from wrapping
the sharded model in DDP. What it then checks is the callback's side: the held-out passes and the export gather.

After training it saves the checkpoint the way an FSDP run does (every rank joins the full-state-dict gather, the
main process writes), so the test can export a bundle from it with `progadv export` and compare; then it makes the
export fail on one rank, then on the main process only, and records what every rank reported.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dist_callback import count_forwards, heldout_records  # noqa: E402


def shard(model):
    """FSDP2 as accelerate applies it to a decoder-only model: every decoder layer, then the root. Under PEFT the
    root is the base model: PeftModel.generate calls the base model's generate, which would skip a root hook on the
    PeftModel wrapper (TRL then fails with "mixed torch.Tensor and DTensor")."""
    from torch.distributed.fsdp import fully_shard

    plain = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in plain.model.layers:
        fully_shard(layer)
    fully_shard(plain)
    return model


def main(model_dir: str, out_dir: str, lora: bool = False):
    import torch
    from transformers import AutoTokenizer
    from trl import GRPOTrainer

    from progadv_trl.callback import ProgressAdvantageCallback
    from progadv_trl.demo.tiny import grpo_args, parity_reward, prompts
    from progadv_trl.training import sharded

    torch.set_num_threads(1)
    out = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    args = grpo_args(out_dir, per_device_train_batch_size=2, max_steps=2, eval_strategy="no")
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    trainer = GRPOTrainer(model=model_dir, args=args, reward_funcs=parity_reward, train_dataset=prompts(16),
                          processing_class=tok, peft_config=peft_config)  # fmt: skip
    shard(trainer.model)
    if trainer.ref_model is not None:
        shard(trainer.ref_model)
    trainer.model_wrapped = trainer.model
    # accelerate (MULTI_CPU) would wrap the model in DDP, which refuses DTensor parameters: FSDP2 syncs the gradients
    trainer.accelerator.prepare_model = lambda model, device_placement=None, evaluation_mode=False: model

    # 5 held-out trajectories over 2 ranks, 2 per pass: rank 0 holds 3, rank 1 holds 2 (+1 padding)
    cb = ProgressAdvantageCallback(trainer, heldout=heldout_records(5), heldout_batch_size=2,
                                   export="end", export_dir=out / "bundle")  # fmt: skip
    trainer.add_callback(cb)
    counts = []
    orig = cb.score_heldout

    def counted():
        c = count_forwards(trainer.accelerator.unwrap_model(trainer.model), *( [trainer.ref_model] if trainer.ref_model is not None else []))
        res = orig()
        c.remove()
        counts.append(c.n)
        return res

    cb.score_heldout = counted
    trainer.train()
    rank, is_main = trainer.accelerator.process_index, trainer.accelerator.is_main_process
    errors_after_training = cb.errors

    # The checkpoint, saved as an FSDP run saves it (every rank joins the gather; the main process writes)
    policy = sharded.full_model(trainer.model, is_main=is_main)
    if is_main:
        ckpt = out / "checkpoint"
        policy.save_pretrained(ckpt)  # LoRA: the adapter, whose base is MODEL_DIR
        tok.save_pretrained(ckpt)

    # A failure on one rank only (before the gather), then on the main process only (writing): reported everywhere
    reports = {}
    real_plan = cb._export_plan
    for case in ("rank1_plan", "main_write"):
        before = cb.errors
        target = out / f"fail_{case}"
        if case == "rank1_plan" and rank == 1:
            cb._export_plan = lambda: (_ for _ in ()).throw(OSError("injected failure on rank 1"))
        if case == "main_write" and is_main:
            target.write_text("a file where the bundle should go")
        trainer.accelerator.wait_for_everyone()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cb._warned.clear()
            cb._export(target)
        cb._export_plan = real_plan
        reports[case] = {"errors": cb.errors - before,
                         "messages": [str(w.message) for w in caught if "bundle export" in str(w.message)]}  # fmt: skip

    res = {
        "rank": rank,
        "world": trainer.accelerator.num_processes,
        "sharded": sharded.kind(trainer.model),
        "log_history": trainer.state.log_history,
        "heldout_forwards": counts,
        "last_heldout_ids": [s.id for s in cb.last_heldout],
        "errors_after_training": errors_after_training,
        "reports": reports,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res, default=str))
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see dist_callback.py: skip the interpreter teardown


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], lora=len(sys.argv) > 3 and sys.argv[3] == "lora")
