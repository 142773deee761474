"""GRPO with LoRA on a real instruct model in the demo's customer-service world (GPU recommended).

    python recipes/grpo_lora_qwen.py --config recipes/grpo_lora_qwen.yaml
    # smoke test on CPU with a local tiny model (what the test suite and CI do):
    python recipes/grpo_lora_qwen.py --config recipes/grpo_lora_qwen.yaml --model_name_or_path progadv_demo/reference \\
        --max_steps 2 --use_cpu true --bf16 false --dtype float32 --gradient_checkpointing false \\
        --n_eval_tasks 4 --n_test_tasks 2 --output_dir /tmp/lora_smoke

The model plays whole multi-turn episodes through `rollout_func` (progadv_trl/demo/rollout.py): tool calls in the
chat template's own format (Qwen2.5: <tool_call>{"name": ..., "arguments": ...}</tool_call>), tool results and
customer replies inserted by the world with env_mask 0. With `peft_config` the reference is the same weights with the
adapter disabled, so after training the adapter directory alone is a policy/reference pair for progadv:

    progadv evaluate --policy OUTPUT_DIR OUTPUT_DIR/rollouts_reference.jsonl -o OUTPUT_DIR/eval
"""

import os

from progadv_trl.utils import openmp_wait_policy  # noqa: E402 - torch-free

openmp_wait_policy()  # before torch starts: idle OpenMP threads spin only on an idle machine
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import json  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, ModelConfig, TrlParser, get_peft_config  # noqa: E402

from progadv_trl.demo import TOOL_SCHEMAS, make_rollout_func, make_tasks, sample_rollouts, success_reward, summarize  # noqa: E402
from progadv_trl.demo.pipeline import grpo_dataset, write_jsonl  # noqa: E402
from progadv_trl.utils import write_json  # noqa: E402


@dataclass
class WorldArguments:
    world_seed: int = field(default=0, metadata={"help": "seeds the tasks and the world's dice"})
    n_train_tasks: int = field(default=512, metadata={"help": "GRPO prompts (one customer each)"})
    n_eval_tasks: int = field(default=100, metadata={"help": "held-out tasks for success before/after (greedy)"})
    n_test_tasks: int = field(default=32, metadata={"help": "held-out tasks for the labelled test rollouts"})
    n_per_task: int = field(default=8, metadata={"help": "test rollouts per task, per model"})
    max_turn_tokens: int = field(default=96, metadata={"help": "tokens per assistant turn before it is cut off"})
    tool_schema: bool = field(
        default=True,
        metadata={"help": "render the tools' JSON schemas in the prompt (instruct models expect them; the tiny demo "
                          "model was trained without)"},
    )


def success(model, tok, tasks, args, tools, greedy=True, n=1, tag="eval"):
    recs = sample_rollouts(model, tok, tasks, n, 1.0, seed=args.world_seed, greedy=greedy, tag=tag,
                           max_new_tokens=args.max_turn_tokens, tools=tools)
    return recs, summarize(recs)


def main(args: WorldArguments, training_args: GRPOConfig, model_args: ModelConfig) -> dict:
    if training_args.beta <= 0:
        raise SystemExit("beta must be > 0: progress advantage reads the KL-regularised policy against its reference")
    tok = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tools = TOOL_SCHEMAS if args.tool_schema else None
    # Disjoint splits of one stream: eval, test, then training customers.
    ev = make_tasks(args.n_eval_tasks, args.world_seed)
    test = make_tasks(args.n_test_tasks, args.world_seed, skip=args.n_eval_tasks)
    train = make_tasks(args.n_train_tasks, args.world_seed, skip=args.n_eval_tasks + args.n_test_tasks)
    training_args.model_init_kwargs = {**(training_args.model_init_kwargs or {}), "dtype": model_args.dtype or "auto"}
    trainer = GRPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=success_reward,
        args=training_args,
        train_dataset=grpo_dataset(train),
        processing_class=tok,
        rollout_func=make_rollout_func(train, seed=args.world_seed, max_new_tokens=args.max_turn_tokens, tools=tools),
        peft_config=get_peft_config(model_args),
    )
    model = trainer.accelerator.unwrap_model(trainer.model)
    out = Path(training_args.output_dir)
    _, before = success(model, tok, ev, args, tools)
    trainer.train()
    trainer.save_model(str(out))
    tok.save_pretrained(out)
    result = {"reference_greedy": before}
    _, result["policy_greedy"] = success(model, tok, ev, args, tools)
    # Fresh labelled test rollouts of both models (the reference = this model with the adapter off).
    recs, result["policy_test"] = success(model, tok, test, args, tools, greedy=False, n=args.n_per_task, tag="test-policy")
    write_jsonl(out / "rollouts_policy.jsonl", recs)
    if hasattr(model, "disable_adapter"):  # LoRA: the reference is the same weights, adapter off
        with model.disable_adapter():
            recs, result["reference_test"] = success(model, tok, test, args, tools, greedy=False, n=args.n_per_task,
                                                     tag="test-reference")
    else:  # full fine-tuning: the reference is the starting checkpoint
        ref = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=model.dtype).to(model.device)
        recs, result["reference_test"] = success(ref, tok, test, args, tools, greedy=False, n=args.n_per_task,
                                                 tag="test-reference")
    write_jsonl(out / "rollouts_reference.jsonl", recs)
    write_json(out / "summary_world.json", result)
    trainer.accelerator.print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    parser = TrlParser((WorldArguments, GRPOConfig, ModelConfig))
    main(*parser.parse_args_and_config())
