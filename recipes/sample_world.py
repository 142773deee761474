"""Labelled rollouts of any ChatML chat model (Qwen2/2.5 family) in the demo's customer-service world -> JSONL.

    python recipes/sample_world.py --config recipes/score_public_pair.yaml

Each record is in progadv's trajectory format with `success`, `group` (the task), and, for a failure whose cause was a
decision, `failure_step` (metadata.failure_kind says "decision" or "luck"). Feed them to `progadv score/evaluate`.
"""

import os

from progadv_trl.utils import openmp_wait_policy  # noqa: E402 - torch-free

openmp_wait_policy()  # before torch starts: idle OpenMP threads spin only on an idle machine
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import TrlParser  # noqa: E402

from progadv_trl.demo import TOOL_SCHEMAS, make_tasks, sample_rollouts, summarize, write_jsonl  # noqa: E402


@dataclass
class SampleArguments:
    model: str = field(default="Qwen/Qwen2.5-0.5B-Instruct", metadata={"help": "the model that acts (hub id or path)"})
    output: str = field(default="progadv_public_pair/trajectories.jsonl", metadata={"help": "JSONL to write"})
    n_tasks: int = field(default=32, metadata={"help": "customers (groups)"})
    n_per_task: int = field(default=8, metadata={"help": "episodes per customer (best-of-N needs several)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (0: greedy)"})
    world_seed: int = field(default=0, metadata={"help": "seeds tasks and dice; skip past training customers"})
    skip_tasks: int = field(default=0, metadata={"help": "start this far into the task stream (held-out splits)"})
    max_turn_tokens: int = field(default=96, metadata={"help": "tokens per assistant turn before it is cut off"})
    tool_schema: bool = field(default=True, metadata={"help": "render the tools' JSON schemas in the prompt"})
    dtype: str = field(default="auto", metadata={"help": "torch dtype to load the model in"})
    device: str | None = field(default=None, metadata={"help": "cuda / cpu (default: cuda when available)"})
    # Read by recipes/score_public_pair.sh, not here:
    policy: str | None = field(default=None, metadata={"help": "score_public_pair.sh: the policy of the pair"})
    reference: str | None = field(default=None, metadata={"help": "score_public_pair.sh: the reference of the pair"})
    out_dir: str | None = field(default=None, metadata={"help": "score_public_pair.sh: where bundle and eval go"})


def main(a: SampleArguments) -> dict:
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(a.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=a.dtype).to(device).eval()
    tasks = make_tasks(a.n_tasks, a.world_seed, skip=a.skip_tasks)
    greedy = a.temperature == 0
    recs = sample_rollouts(model, tok, tasks, a.n_per_task, a.temperature or 1.0, seed=a.world_seed, greedy=greedy,
                           max_new_tokens=a.max_turn_tokens, tools=TOOL_SCHEMAS if a.tool_schema else None,
                           tag="world")
    out = Path(a.output)
    write_jsonl(out, recs)
    s = summarize(recs)
    print(json.dumps({"output": str(out), **s}))
    return s


if __name__ == "__main__":
    (args,) = TrlParser(SampleArguments).parse_args_and_config()
    main(args)
