"""Benchmarks, reported as ratios measured in one run (never as asserts in tests).

    python benchmarks/run.py --json runs/bench.json

Keys:
- scoring_speedup_vs_naive: naive (one trajectory at a time, full [seq, vocab] logits and a full log-softmax for both
  models) time / engine time, same trajectories and models.
- floor_efficiency: floor / engine time, where the floor is the bare decoder forward passes of both models over the
  engine's own batches (no output layer, no statistics). 1.0 means the scoring adds nothing over the forward passes.
- capture_overhead_pct: GRPO step time with the ProgressAdvantageCallback capturing training rollouts vs without,
  tiny model, same seed (100 * (with / without - 1)).
- lora_memory_ratio: parameter bytes the scorer holds with a LoRA policy (one base + adapter, reference = adapter
  disabled) / with a separate full-weight policy and reference.
- logits_memory_ratio: rows of the largest logits tensor the engine builds (chunked, action positions only) / rows
  of a plain batched forward over the same batches ([batch, seq, vocab] logits).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch



def _trajectories(n: int):
    from progadv_trl.demo.tiny import make_trajectory

    return [make_trajectory(i, n_turns=1 + i % 5) for i in range(n)]


def _naive(policy, reference, tokenizer, trajs):
    from progadv_trl.trajectories import as_trajectories
    from progadv_trl.rendering import render

    out = []
    with torch.no_grad():
        for t in as_trajectories(trajs):
            r = render(t, tokenizer)
            x = torch.tensor([r.input_ids])
            lp = torch.log_softmax(policy(x).logits[0].float(), -1)
            lr = torch.log_softmax(reference(x).logits[0].float(), -1)
            out.append([float((lp[s - 1 : e - 1].gather(-1, x[0, s:e, None]) - lr[s - 1 : e - 1].gather(-1, x[0, s:e, None])).sum()) for s, e in r.spans])
    return out


def _time(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_scoring(root: Path, n: int) -> dict:
    from progadv_trl.engine import ProgressScorer, _hidden_fn
    from progadv_trl.demo.tiny import build_model, build_tokenizer, perturbed_copy

    tok = build_tokenizer(root / "tok")
    # A vocabulary of a real model's size: the output layer and the softmax are where naive scoring pays.
    ref = build_model(tok, root / "ref", hidden_size=128, num_layers=4, intermediate_size=256).eval()
    ref.resize_token_embeddings(32000)
    pol = perturbed_copy(ref).eval()
    trajs = _trajectories(n)
    scorer = ProgressScorer(pol, tok, ref, batch_tokens=8192)
    _, rendered = scorer.render(trajs)
    n_tokens = sum(len(r.input_ids) for r in rendered)

    engine_t = _time(lambda: scorer.score(trajs))
    naive_t = _time(lambda: _naive(pol, ref, tok, trajs), repeat=1)

    def floor():
        with torch.no_grad():
            for batch in scorer._batches(rendered):
                T = max(len(rendered[i].input_ids) for i in batch)
                ids = torch.zeros((len(batch), T), dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, i in enumerate(batch):
                    ids[row, : len(rendered[i].input_ids)] = torch.tensor(rendered[i].input_ids)
                    mask[row, : len(rendered[i].input_ids)] = 1
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                for m in (pol, ref):
                    _hidden_fn(m)[0](ids, mask, pos)

    floor_t = _time(floor)
    batches = scorer._batches(rendered)
    engine_rows = max(min(scorer.chunk_size, sum(e - s for i in b for s, e in rendered[i].spans)) for b in batches)
    plain_rows = max(len(b) * max(len(rendered[i].input_ids) for i in b) for b in batches)
    return {
        "scoring_speedup_vs_naive": naive_t / engine_t,
        "floor_efficiency": floor_t / engine_t,
        "logits_memory_ratio": engine_rows / plain_rows,
        "n_trajectories": n,
        "n_tokens": n_tokens,
        "engine_tokens_per_s": n_tokens / engine_t,
        "engine_s": engine_t,
        "naive_s": naive_t,
        "floor_s": floor_t,
    }


def bench_lora_memory(root: Path) -> dict:
    from peft import LoraConfig, get_peft_model

    from progadv_trl.demo.tiny import build_model, build_tokenizer

    tok = build_tokenizer(root / "tok2")
    base = build_model(tok, hidden_size=128, num_layers=4, intermediate_size=256)
    nbytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    full_pair = 2 * nbytes(base)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    return {"lora_memory_ratio": nbytes(peft_model) / full_pair}


def bench_capture(root: Path, steps: int = 12, repeat: int = 3) -> dict:
    """GRPO steps with and without the callback capturing training rollouts (no held-out set, no export), same
    seed, runs interleaved so machine load hits both alike; the best of `repeat` runs each."""
    from transformers import AutoTokenizer
    from trl import GRPOTrainer

    from progadv_trl.callback import ProgressAdvantageCallback
    from progadv_trl.demo.tiny import build_model, build_tokenizer, grpo_args, parity_reward, prompts

    tok = build_tokenizer(root / "cap")
    build_model(tok, root / "cap")
    tok = AutoTokenizer.from_pretrained(root / "cap")

    def one(with_cb: bool) -> float:
        args = grpo_args(root / f"cap_run_{with_cb}", max_steps=steps, eval_strategy="no", max_completion_length=16)
        t = GRPOTrainer(model=str(root / "cap"), args=args, reward_funcs=parity_reward, train_dataset=prompts(256),
                        processing_class=tok)  # fmt: skip
        if with_cb:
            t.add_callback(ProgressAdvantageCallback(t, export=None, write_tables=False))
        t0 = time.perf_counter()
        t.train()
        return (time.perf_counter() - t0) / steps

    times = {True: [], False: []}
    for _ in range(repeat):
        for flag in (False, True):
            times[flag].append(one(flag))
    with_s, without_s = min(times[True]), min(times[False])
    return {"capture_overhead_pct": 100 * (with_s / without_s - 1), "grpo_step_s_with": with_s, "grpo_step_s_without": without_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--n", type=int, default=64, help="trajectories to score")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        res = {"torch_threads": torch.get_num_threads()}
        res.update(bench_scoring(root, args.n))
        res.update(bench_lora_memory(root))
        res.update(bench_capture(root))
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
