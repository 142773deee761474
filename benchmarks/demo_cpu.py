"""The demo's heavy passes under each attention kernel, and its decoding on one or two threads, interleaved in one
process: CPU-second ratios (sdpa / eager; one thread / two).

    python benchmarks/demo_cpu.py runs/demo --json benchmarks/results/demo_cpu.json

RUN_DIR is a finished `progadv demo` run (its reference and policy checkpoints and tokenizer). Each pass is timed
`--reps` times per kernel, the kernels alternating so that a slow spell of a shared machine falls on both; the figure
is the median CPU seconds (process_time: all threads) of each, and their ratio. Passes, with the demo's shapes:
- sft_step: forward + backward of one SFT batch (32 demonstrations, right-padded), the reference's weights;
- pretrain_step: forward + backward of one pretraining batch (64 snippets);
- prefill: one no-grad forward over 192 left-padded episode prefixes with a KV cache (what each turn of `play` starts
  with);
- play_32 / play_200: whole episodes played by the policy (`rollout.play`), 32 (a GRPO step's rollouts) and 200 (the
  greedy evaluation of the eval split).
Then "decode_threads": play_32 and play_200 (SDPA) with every decoding step on one intra-op thread
(`rollout.ONE_THREAD_ROWS` above the batch) against two (below it): what sets ONE_THREAD_ROWS.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch


def _batch(xs, pad):
    """Right-padded (ids, attention mask): a training batch."""
    L = max(map(len, xs))
    ids = torch.full((len(xs), L), pad)
    att = torch.zeros_like(ids)
    for i, x in enumerate(xs):
        ids[i, : len(x)] = torch.tensor(x)
        att[i, : len(x)] = 1
    return ids, att


def main(argv=None) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from progadv_trl.demo.pipeline import DemoConfig, demonstrations, pretraining_snippet, sft_dataset
    from progadv_trl.demo.rollout import _left_pad, play
    from progadv_trl.demo.world import Episode, episode_seed
    from progadv_trl.cpu import keep_freed_memory, openmp_wait_policy
    from progadv_trl.utils import write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    openmp_wait_policy()
    keep_freed_memory()  # as the CLI does
    cfg = DemoConfig()
    torch.set_num_threads(cfg.num_threads)
    run = Path(args.run_dir)
    tok = AutoTokenizer.from_pretrained(run / "reference")
    pad = tok.pad_token_id
    kernels = ("eager", "sdpa")
    models = {(k, n): AutoModelForCausalLM.from_pretrained(run / n, attn_implementation=k)
              for k in kernels for n in ("reference", "policy")}  # fmt: skip

    sft = [r["input_ids"] for r in sft_dataset(tok, demonstrations(cfg)[:32])]
    rng = random.Random(0)
    snippets = [pretraining_snippet(rng, tok, cfg.pretrain_read, cfg.world) for _ in range(64)]
    prefixes = [x[: 60 + (7 * i) % 100] for i, x in enumerate(sft * 6)]
    tasks = cfg.tasks("eval")

    def train_step(kernel, xs):
        m = models[kernel, "reference"].train()
        ids, att = _batch(xs, pad)
        m(input_ids=ids, attention_mask=att, labels=ids.masked_fill(att == 0, -100)).loss.backward()
        m.zero_grad(set_to_none=True)

    @torch.no_grad()
    def prefill(kernel):
        m = models[kernel, "policy"].eval()
        ids, att, pos = _left_pad(prefixes, pad)  # the sampler's own batch
        m(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True)

    def episodes(kernel, n):
        eps = [Episode(tasks[i % len(tasks)], episode_seed(0, "bench", i), cfg.world) for i in range(n)]
        play(models[kernel, "policy"], tok, eps, generator=torch.Generator().manual_seed(0),
             max_new_tokens=cfg.max_new_tokens)  # fmt: skip

    passes = {
        "sft_step": lambda k: train_step(k, sft),
        "pretrain_step": lambda k: train_step(k, snippets),
        "prefill": prefill,
        "play_32": lambda k: episodes(k, 32),
        "play_200": lambda k: episodes(k, 200),
    }
    out: dict = {"command": "python benchmarks/demo_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "torch": torch.__version__, "threads": torch.get_num_threads(), "reps": args.reps, "passes": {}}
    for name, fn in passes.items():
        for k in kernels:  # warm-up
            fn(k)
        cpu = {k: [] for k in kernels}
        wall = {k: [] for k in kernels}
        for _ in range(args.reps):
            for k in kernels:
                t, c = time.perf_counter(), time.process_time()
                fn(k)
                wall[k].append(time.perf_counter() - t)
                cpu[k].append(time.process_time() - c)
        med = {k: statistics.median(v) for k, v in cpu.items()}
        medw = {k: statistics.median(v) for k, v in wall.items()}
        out["passes"][name] = {
            "cpu_s": {k: round(v, 4) for k, v in med.items()}, "wall_s": {k: round(v, 4) for k, v in medw.items()},
            "cpu_ratio_sdpa_over_eager": round(med["sdpa"] / med["eager"], 3),
            "wall_ratio_sdpa_over_eager": round(medw["sdpa"] / medw["eager"], 3),
        }  # fmt: skip
        print(name, out["passes"][name], flush=True)
    from progadv_trl.demo import rollout

    keep = rollout.ONE_THREAD_ROWS
    out["decode_threads"] = {}
    try:
        for n in (32, 200):
            cpu, wall = {1: [], 2: []}, {1: [], 2: []}
            for _ in range(args.reps + 1):  # the first round warms up
                for th in (1, 2):
                    rollout.ONE_THREAD_ROWS = 10**6 if th == 1 else 0
                    t, c = time.perf_counter(), time.process_time()
                    episodes("sdpa", n)
                    wall[th].append(time.perf_counter() - t)
                    cpu[th].append(time.process_time() - c)
            med = {th: statistics.median(v[1:]) for th, v in cpu.items()}
            medw = {th: statistics.median(v[1:]) for th, v in wall.items()}
            out["decode_threads"][f"play_{n}"] = {
                "cpu_s": {f"{k}_thread": round(v, 4) for k, v in med.items()},
                "wall_s": {f"{k}_thread": round(v, 4) for k, v in medw.items()},
                "cpu_ratio_one_over_two": round(med[1] / med[2], 3), "wall_ratio_one_over_two": round(medw[1] / medw[2], 3),
            }  # fmt: skip
            print("decode_threads", n, out["decode_threads"][f"play_{n}"], flush=True)
    finally:
        rollout.ONE_THREAD_ROWS = keep
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
