"""`progadv grpo --config grpo.yaml`: TRL's `trl grpo` with the progress-advantage callback on.

    progadv grpo --config recipes/grpo_progadv.yaml                                   # one process
    torchrun --nproc_per_node 2 -m progadv_trl.cli grpo --config recipes/grpo_progadv.yaml
    accelerate launch --config_file recipes/accelerate/two_processes.yaml -m progadv_trl.cli grpo --config ...

The YAML holds the keys of `trl grpo` (TRL's `GRPOScriptArguments`, `GRPOConfig`, `ModelConfig`,
`DatasetMixtureConfig`), parsed by TRL's own `TrlParser` (unknown keys are refused, command-line flags override the
file), plus the callback's options as `progadv_*` keys (`ProgadvArguments`). The same YAML without the `progadv_*`
keys runs under `trl grpo` unchanged. What happens then mirrors TRL 1.16's `trl/scripts/grpo.py` step by step
(reward functions by name or dotted import path, a dataset by name or local path, or a `datasets:` mixture; the
GRPOTrainer; train; save), with the callback added before training.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from .arguments import ProgadvArguments


def make_parser():
    from trl import DatasetMixtureConfig, GRPOConfig, ModelConfig, TrlParser
    from trl.scripts.grpo import GRPOScriptArguments

    return TrlParser((GRPOScriptArguments, GRPOConfig, ModelConfig, DatasetMixtureConfig, ProgadvArguments),
                     prog="progadv grpo")  # fmt: skip


def parse(argv: list[str]):
    """(script_args, training_args, model_args, dataset_args, progadv_args); a bad key or value is a usage error."""
    parser = make_parser()
    try:
        return parser.parse_args_and_config(args=argv)
    except (ValueError, OSError) as e:  # unknown keys, a value a dataclass refuses, a missing config file
        parser.error(str(e))


def reward_functions(script_args) -> list:
    """TRL's named rewards, or any dotted import path (`my_lib.rewards.custom_reward`), as `trl grpo` loads them."""
    from trl.rewards import accuracy_reward, get_soft_overlong_punishment, reasoning_accuracy_reward, think_format_reward

    named = {
        "accuracy_reward": accuracy_reward,
        "reasoning_accuracy_reward": reasoning_accuracy_reward,
        "think_format_reward": think_format_reward,
        "get_soft_overlong_punishment": get_soft_overlong_punishment(max_completion_len=1280, soft_punish_cache=256),
    }
    funcs: list = []
    if script_args.reward_model_name_or_path:
        funcs.append(script_args.reward_model_name_or_path)
    for name in script_args.reward_funcs or []:
        if name in named:
            funcs.append(named[name])
        elif "." in name:
            module, attr = name.rsplit(".", 1)
            sys.path.insert(0, os.getcwd())  # as trl grpo does: a rewards module beside the YAML works
            try:
                funcs.append(getattr(importlib.import_module(module), attr))
            except (ImportError, AttributeError) as e:
                raise SystemExit(f"progadv grpo: error: reward_funcs: cannot import {name!r}: {e}")
        else:
            raise SystemExit(f"progadv grpo: error: reward_funcs: {name!r} is not one of {sorted(named)} nor a dotted "
                             "import path")  # fmt: skip
    if not funcs:
        raise SystemExit("progadv grpo: error: give reward_funcs (or reward_model_name_or_path)")
    return funcs


def load_train_dataset(script_args, dataset_args):
    from datasets import load_dataset

    from trl import get_dataset

    if dataset_args.datasets:
        return get_dataset(dataset_args)
    if script_args.dataset_name:  # a hub name, or a local folder of data files (train.jsonl, test.jsonl, ...)
        return load_dataset(script_args.dataset_name, name=script_args.dataset_config,
                            streaming=script_args.dataset_streaming)  # fmt: skip
    raise SystemExit("progadv grpo: error: give dataset_name (a hub name or a local path) or datasets")


def load_heldout_source(spec: str):
    """A trajectory file (.jsonl/.json/.parquet) is passed as is; a folder is a dataset (`save_to_disk` output, or
    data files that `datasets.load_dataset` reads), its train split."""
    p = Path(spec)
    if not p.exists():
        raise SystemExit(f"progadv grpo: error: progadv_heldout: {spec} does not exist")
    if p.is_file():
        return str(p)
    import datasets

    if (p / "dataset_info.json").is_file() or (p / "state.json").is_file():
        return datasets.load_from_disk(str(p))
    return datasets.load_dataset(str(p), split="train")


def build(script_args, training_args, model_args, dataset_args, progadv_args):
    """The GRPOTrainer `trl grpo` would build, with `ProgressAdvantageCallback` added."""
    from trl import GRPOTrainer, get_peft_config, get_quantization_config

    from .callback import ProgressAdvantageCallback
    from .config import ScoringConfig

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs
    dataset = load_train_dataset(script_args, dataset_args)
    trainer = GRPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=reward_functions(script_args),
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    p = progadv_args
    beta = float(training_args.beta)
    scoring = ScoringConfig(beta=beta if beta > 0 else 1.0, temperature=float(training_args.temperature),
                            **({"variant": p.progadv_variant} if p.progadv_variant else {}))  # fmt: skip
    callback = ProgressAdvantageCallback(
        trainer,
        heldout=load_heldout_source(p.progadv_heldout) if p.progadv_heldout else None,
        eval_steps=p.progadv_eval_steps,
        scoring_config=scoring,
        reference_pass=p.progadv_reference_pass,
        heldout_max_length=p.progadv_heldout_max_length,
        heldout_batch_size=p.progadv_heldout_batch_size,
        success_threshold=p.progadv_success_threshold,
        export=None if p.progadv_export == "none" else p.progadv_export,
        export_dir=p.progadv_export_dir,
    )
    trainer.add_callback(callback)
    return trainer, callback


def main(argv: list[str] | None = None) -> int:
    import transformers
    from packaging.version import Version

    args = parse(list(sys.argv[1:] if argv is None else argv))
    training_args = args[1]
    trainer, callback = build(*args)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # output_dir/trainer_state.json: log_history with the callback's figures (main process)
    if trainer.accelerator.is_main_process:
        bundle = callback.export_dir or Path(training_args.output_dir) / "progadv_bundle"
        where = f"; critic bundle: {bundle} (progadv inspect {bundle})" if callback.export else ""
        print(f"progadv grpo: model saved to {training_args.output_dir}{where}", file=sys.stderr)
    # Every rank waits here for the main process's writing above: a rank that tears its gloo group down while a peer
    # is still busy aborts ("terminate called without an active exception", exit 1 after a finished run).
    trainer.accelerator.wait_for_everyone()
    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()  # finish the trackers, destroy the process group (as trl grpo does)
    return 0
