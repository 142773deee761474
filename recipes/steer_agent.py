"""A critic-guided agent: at every turn sample K candidate turns, keep the one the critic ranks highest.

    python recipes/steer_agent.py --config recipes/steer_agent.yaml

The critic is a bundle (`ProgressCritic.from_pretrained`); the sampler is any `transformers` causal LM that can
generate with a ChatML chat template (the demo's reference or policy, a Qwen2.5 instruct model, ...). The tasks are the
demo world's (the customer-service desk of `progadv demo`). Per episode the recipe keeps ONE critic session: it scores
the K candidates at the current state, then `append`s the chosen turn and the world's reply, so each turn costs the new
tokens, not the whole conversation again.

Output: one trajectory record per episode (JSONL), labelled by the world (`success`, `failure_step`), with
`metadata.steering` holding, per step, every candidate, its scores under each method and which one was chosen, so
`progadv evaluate --bundle B OUT.jsonl -o DIR` reads it as any other trajectory file. A summary line goes to stdout.
"""

import os

from progadv_trl.utils import openmp_wait_policy  # noqa: E402 - torch-free

openmp_wait_policy()  # before torch starts its threads
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from trl import TrlParser  # noqa: E402

from progadv_trl import ProgressCritic  # noqa: E402
from progadv_trl.demo import TOOL_SCHEMAS, make_tasks, write_jsonl  # noqa: E402
from progadv_trl.demo.rollout import decode_turn, end_of_turn, render  # noqa: E402
from progadv_trl.demo.world import Episode, WorldConfig, episode_seed  # noqa: E402

METHODS = ("progress_advantage", "policy_logprob", "reference_logprob", "self_certainty", "deepconf_tail")


@dataclass
class SteerArguments:
    bundle: str = field(default="runs/demo/bundle", metadata={"help": "the critic bundle (progadv demo writes one)"})
    sampler: str = field(default="runs/demo/reference",
                         metadata={"help": "the model that proposes turns (path or hub id); the bundle's reference is "
                                           "the off-policy case, its policy the on-policy one"})  # fmt: skip
    output: str = field(default="runs/steer/episodes.jsonl", metadata={"help": "JSONL of steered episodes"})
    method: str = field(default="progress_advantage", metadata={"help": f"what picks the turn: one of {METHODS} or a variant"})
    k: int = field(default=4, metadata={"help": "candidate turns sampled at every step"})
    n_tasks: int = field(default=16, metadata={"help": "customers, one episode each"})
    world_seed: int = field(default=0, metadata={"help": "seeds tasks and dice"})
    skip_tasks: int = field(default=0, metadata={"help": "start this far into the task stream (held-out tasks)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the candidates"})
    max_turn_tokens: int = field(default=24, metadata={"help": "tokens per candidate turn (24: the tiny demo; ~96 for Qwen)"})
    tool_schema: bool = field(default=False, metadata={"help": "render the tools' JSON schemas (instruct models expect them)"})
    noisy: bool = field(default=False, metadata={"help": "the demo's free-form world"})
    device: str | None = field(default=None, metadata={"help": "cuda / cpu (default: cuda when available)"})


@torch.no_grad()
def candidates(model, tok, messages, tools, a: SteerArguments, gen: torch.Generator) -> list[tuple[dict, bool]]:
    """K sampled next turns as (assistant message, ended with the end-of-turn token)."""
    eos = end_of_turn(tok)
    ids = tok(render(tok, messages, True, tools), add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))  # generate() draws from the global RNG
    out = model.generate(ids, do_sample=True, temperature=a.temperature, top_k=0, top_p=1.0, max_new_tokens=a.max_turn_tokens,
                         num_return_sequences=a.k, eos_token_id=eos, pad_token_id=tok.pad_token_id or eos)  # fmt: skip
    rows = [row[: row.index(eos) + 1] if eos in row else row for row in out[:, ids.shape[1]:].tolist()]
    return [decode_turn(tok, row, eos)[:2] for row in rows]


def steer_episode(critic, model, tok, task, a: SteerArguments, world, tools) -> dict:
    from progadv_trl.evaluation import pick_best

    ep = Episode(task, episode_seed(a.world_seed, "steer", task.id), world)
    session = critic.session(ep.messages, tools)
    gen = torch.Generator().manual_seed(episode_seed(a.world_seed, "steer-sample", task.id))
    steps = []
    while not ep.done:
        cands = candidates(model, tok, ep.messages, tools, a, gen)
        scores = session.score([m for m, _ in cands])
        pick = pick_best([s.method_score(a.method) for s in scores], f"{task.id}/{ep.n_steps}", a.world_seed)
        steps.append({"chosen": pick, "candidates": [m for m, _ in cands],
                      "scores": [{m: s.method_score(m) for m in METHODS} for s in scores]})  # fmt: skip
        n_before = len(ep.messages)
        msg, ended = cands[pick]
        ep.step(msg, unfinished=not ended)
        if not ep.done:
            session.append(ep.messages[n_before:])  # the chosen turn and what the world said back
    rec = ep.record(id=f"steer-{task.id}", method=a.method, k=a.k, sampler=a.sampler)
    rec["metadata"]["steering"] = steps
    if tools:
        rec["tools"] = tools
    return rec


def main(a: SteerArguments) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    critic = ProgressCritic.from_pretrained(a.bundle, device=device)
    tok = AutoTokenizer.from_pretrained(a.sampler)
    model = AutoModelForCausalLM.from_pretrained(a.sampler).to(device).eval()
    world = WorldConfig(free_form=a.noisy)
    tools = TOOL_SCHEMAS if a.tool_schema else None
    recs = [steer_episode(critic, model, tok, t, a, world, tools)
            for t in make_tasks(a.n_tasks, a.world_seed, skip=a.skip_tasks, config=world)]  # fmt: skip
    write_jsonl(Path(a.output), recs)
    s = {"output": a.output, "episodes": len(recs), "success": sum(r["success"] for r in recs) / max(len(recs), 1),
         "method": a.method, "k": a.k}  # fmt: skip
    print(json.dumps(s))
    return s


if __name__ == "__main__":
    (args,) = TrlParser(SteerArguments).parse_args_and_config()
    main(args)
