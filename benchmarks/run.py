"""Benchmarks, reported as ratios measured within one run (never asserted on time in tests; CI never fails on a time).

    python benchmarks/run.py --json runs/bench.json                   # CPU: the "realistic" and "tiny" shapes
    bash benchmarks/gpu.sh                                            # GPU: a Qwen2.5-1.5B-shaped model, bf16 + SDPA

Shapes and trajectories: `benchmarks/workload.py` ("realistic": a random Qwen2-style decoder whose output layer has
Qwen2.5-1.5B's share of a token's forward FLOPs, 15 %, vocabulary 32768, one group of 8 agent rollouts sharing a
1.2k-token prompt with tool schemas, 1.3-2.0k tokens each; "tiny": the earlier shape and corpus).

Keys, per shape (JSON: {"shapes": {shape: {key: value}}, ...}):
- scoring_speedup_vs_naive: naive time / engine time (baselines off). Naive is the paper's public code's way: one
  trajectory at a time, two separately loaded models, each model's full [seq, vocab] logits and a full-vocabulary
  log-softmax at every position. Asserted to agree with the engine's step advantages to 1e-4 (float32).
- speedup_bound_vs_naive: the naive scorer's forward FLOPs / the floor's, from the shapes and token counts.
- speedup_fraction_of_bound: the first / the second.
- distinct_token_bound: tokens / distinct tokens (a group's shared prompt counted once): the speed-up a scorer that
  only skips repeated decoder work can reach. fraction_of_distinct_bound (and *_cputime): the speed-up / this. The
  "decoder" shape (a small, decoder-bound model; 16 groups of 8 rollouts sharing a 316-token prompt) is where the
  engine's per-call and per-batch overheads would show.
- floor_efficiency: floor time / engine time (baselines off). The floor is the unavoidable work, timed as bare
  passes: both decoders over the distinct tokens (a group's shared prompt once, its KV cache reused for each
  continuation, batch 1, no padding) plus the output layer and its log-sum-exp at action positions only. The floor
  computes the same log-probs (checked against the engine to 1e-4), so it is a scorer, not a lower-bound guess.
- engine_flops_over_floor: the engine's FLOPs over its own work units (padded batches; shared-prefix groups: the
  prefix once, each continuation batch padded to its longest suffix) / the floor's: 1 / this is the floor efficiency
  the FLOPs allow. speedup_predicted_from_flops: the naive scorer's FLOPs / the engine's.
- baseline_extra_cost_ratio: engine time with the full-vocabulary baselines (self-certainty, DeepConf) / without.
- prefix_sharing_speedup: engine time with share_prefix=False / True (null when the engine has no share_prefix).
- logits_peak_memory_ratio: elements of the largest logits tensor the engine builds (seen by a hook on the output
  layer) / a plain batched forward's [B, T, V] over the same batches.
- lora_peak_memory_ratio: peak memory of scoring with a LoRA policy (reference = adapter disabled) / scoring with
  one full-weight model alone (policy = reference), each in a fresh subprocess: on a CPU the process's peak RSS
  (getrusage ru_maxrss) minus its RSS before the model is built (tracemalloc does not see torch's allocator);
  on a GPU torch.cuda.max_memory_allocated minus the allocation before.
- capture_overhead_pct: 100 x (median GRPO step time with the callback capturing training rollouts / without - 1),
  same seed, runs interleaved, the first step of each run left out (logging every step: the callback flushes every
  step). capture_noise_pct: the same figure between two runs WITHOUT the callback (the noise floor).
  capture_flush_pct: the callback's flush at each logging step, timed alone, as a share of the step.
  heldout_eval_s: one held-out evaluation of the callback (its own `eval_progadv/heldout/seconds`).
- *_cputime: the same ratios from this process's CPU seconds (all threads) instead of wall seconds.
- step_session_speedup, step_session_bound, step_session_fraction_of_bound, append_s_per_1k_tokens,
  kv_copy_share_of_score: the critic in the agent loop (realistic shape only), see `benchmarks/session_bench.py`.
- as_generated_fraction_of_bound, as_generated_sharing_speedup: scoring as generated (a template that rewrites
  earlier turns) against its distinct-token bound (realistic shape only), see `benchmarks/as_generated_bench.py`.
- two_process_speedup: scoring time in one process (all cores as threads) / under torchrun with 2 processes (the
  cores split between them), timed inside the processes from after loading to the gathered result.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
# Before torch starts its thread pool: OpenMP threads that spin while waiting made passes of small matrices up to
# 10x slower on a shared 2-core machine (the demo sets the same).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import workload as W  # noqa: E402
from as_generated_bench import bench_as_generated  # noqa: E402
from session_bench import bench_session  # noqa: E402

TARGETS = {
    "scoring_speedup_vs_naive": ">= 0.9 x bound (CPU); >= 10 (GPU)",
    "speedup_fraction_of_bound": ">= 0.9",
    "floor_efficiency": ">= 0.9",
    "prefix_sharing_speedup": ">= 2 (realistic)",
    "step_session_fraction_of_bound": ">= 0.7 (CPU)",
    "as_generated_fraction_of_bound": ">= 0.7 (CPU)",
    "capture_overhead_pct": "<= 1",
    "lora_peak_memory_ratio": "<= 1.05",
    "fraction_of_distinct_bound": ">= 0.9 (decoder)",
}
ROWS = [
    "n_trajectories", "n_tokens", "n_distinct_tokens", "n_action_tokens", "scoring_speedup_vs_naive",
    "scoring_speedup_vs_naive_cputime", "speedup_bound_vs_naive", "speedup_fraction_of_bound",
    "distinct_token_bound", "fraction_of_distinct_bound", "fraction_of_distinct_bound_cputime",
    "speedup_predicted_from_flops", "floor_efficiency", "floor_efficiency_cputime", "engine_flops_over_floor",
    "baseline_extra_cost_ratio", "baseline_extra_cost_ratio_cputime", "prefix_sharing_speedup",
    "prefix_sharing_speedup_cputime", "logits_peak_memory_ratio", "lora_peak_memory_ratio", "capture_overhead_pct",
    "capture_overhead_pct_cputime", "capture_noise_pct", "capture_flush_pct", "heldout_eval_s",
    "two_process_speedup", "step_session_speedup", "step_session_bound", "step_session_fraction_of_bound",
    "append_s_per_1k_tokens", "kv_copy_share_of_score", "as_generated_fraction_of_bound", "as_generated_sharing_speedup", "engine_tokens_per_s", "engine_s", "naive_s", "floor_s", "floor_prefix_batch1_s", "floor_engine_batches_s", "output_share",
]  # fmt: skip


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


CPU_TIMES: dict[str, list[float]] = {}  # label -> this process's CPU seconds (all threads) per timed call


def _timed(fn, device, label: str | None = None):
    """(wall seconds, result); with a label, the process's CPU seconds go to CPU_TIMES[label] (the `*_cputime`
    ratios). On a shared machine a process that waits for a core loses wall time, not CPU time: where the two
    ratios disagree, the CPU one is the steadier; where they agree, the host itself ran slower or faster."""
    _sync(device)
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    dt, dc = time.perf_counter() - t, time.process_time() - c
    if label:
        CPU_TIMES.setdefault(label, []).append(dc)
        print(f"  {label}: {dt:.2f} s wall, {dc:.2f} s CPU", file=sys.stderr, flush=True)
    return dt, out


def _supports_share_prefix() -> bool:
    from progadv_trl.engine import ProgressScorer

    return "share_prefix" in inspect.signature(ProgressScorer.__init__).parameters


def _scorer(pol, tok, ref, *, baselines: bool, share: bool | None = None, batch_tokens: int | None = None):
    from progadv_trl.engine import ProgressScorer
    from progadv_trl.scoring import ScoringConfig

    kw = {"share_prefix": share} if share is not None and _supports_share_prefix() else {}
    return ProgressScorer(pol, tok, ref, config=ScoringConfig(beta=1.0), compute_baselines=baselines,
                          batch_tokens=batch_tokens, **kw)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# The shapes


def setup(shape: str, root: Path, args) -> dict:
    """Tokenizer, models and trajectories of one shape (nothing downloaded)."""
    from progadv_trl.demo.tiny import build_tokenizer

    dtype = getattr(torch, args.dtype)
    if shape == "tiny":
        tok = build_tokenizer(root / "tok_tiny")
        trajs = W.tiny_trajectories(args.tiny_n)
    elif shape == "decoder":
        tok = W.agent_tokenizer(root / "tok_agent")
        trajs = W.agent_trajectories(tok, groups=W.DECODER_GROUPS, rollouts=8, **W.DECODER_SET)
    else:
        tok = W.agent_tokenizer(root / "tok_agent")
        trajs = W.agent_trajectories(tok, groups=args.groups, rollouts=8)
    pol, ref = W.build_pair(shape, tok, dtype=dtype, device=args.device)
    return {"shape": shape, "tok": tok, "tok_dir": root / ("tok_tiny" if shape == "tiny" else "tok_agent"),
            "pol": pol, "ref": ref, "trajs": trajs, "cfg": W.SHAPES[shape], "root": root}  # fmt: skip


def _groups(trajs, rendered) -> list[tuple[list[int], int]]:
    """[(indices, shared prefix length)] by the trajectories' `group` (ungrouped: alone, nothing shared). The
    shared prefix is the group's longest common token prefix, short of every member's last token."""
    by: dict = {}
    for i, t in enumerate(trajs):
        by.setdefault(t.group if t.group is not None else ("alone", i), []).append(i)
    out = []
    for idx in by.values():
        P = 0
        if len(idx) > 1:
            seqs = [rendered[i].input_ids for i in idx]
            P = min(len(s) for s in seqs) - 1
            for s in seqs[1:]:
                n = 0
                for a, b in zip(seqs[0][:P], s[:P]):
                    if a != b:
                        break
                    n += 1
                P = n
        out.append((idx, P))
    return out


def _action_positions(r) -> list[int]:
    return [p for s, e in r.spans for p in range(max(s, 1), e)]


# ----------------------------------------------------------------------------------------------------------------
# The naive scorer and the floor


def naive_steps(pol, ref, tok, trajs, device) -> list[list[float]]:
    """The paper's public code's way: one trajectory at a time; each model's full [T, V] logits, a float32
    log-softmax over the whole vocabulary at every position; per step the sum of the log-ratios."""
    from progadv_trl.rendering import render
    from progadv_trl.trajectories import as_trajectories

    out = []
    with torch.no_grad():
        for t in as_trajectories(trajs):
            r = render(t, tok)
            x = torch.tensor([r.input_ids], device=device)
            lp = torch.log_softmax(pol(input_ids=x).logits[0].float(), -1)
            lr = torch.log_softmax(ref(input_ids=x).logits[0].float(), -1)
            tgt = x[0, 1:, None]
            d = (lp[:-1].gather(-1, tgt) - lr[:-1].gather(-1, tgt))[:, 0].double().cpu()
            out.append([float(d[max(s, 1) - 1 : e - 1].sum()) for s, e in r.spans])
    return out


def floor_steps(models, rendered, groups, device, chunk: int = 1024) -> list[list[float]]:
    """The unavoidable work, as bare passes: per model and group, the shared prefix once (its KV cache kept), each
    continuation at batch 1 on top of it (no padding), the output layer and log-sum-exp at action positions only.
    Returns per trajectory and step the sum of log-ratios (so it can be checked against the engine)."""
    logp = []
    with torch.no_grad():
        for m in models:
            dec, head = m.get_decoder(), m.get_output_embeddings()
            per: dict[int, torch.Tensor] = {}
            for idx, P in groups:
                cache, hp = None, None
                if P > 0:
                    x = torch.tensor([rendered[idx[0]].input_ids[:P]], device=device)
                    o = dec(input_ids=x, use_cache=True)
                    cache, hp = o.past_key_values, o.last_hidden_state[0]
                for i in idx:
                    ids = rendered[i].input_ids
                    x = torch.tensor([ids[P:]], device=device)
                    pos = torch.arange(P, len(ids), device=device)[None]
                    o = dec(input_ids=x, position_ids=pos, past_key_values=cache, use_cache=cache is not None)
                    h = o.last_hidden_state[0] if hp is None else torch.cat([hp, o.last_hidden_state[0]])
                    if cache is not None:  # back to the prefix (transformers 5: crop(-n) drops the last n)
                        cache.crop(-(cache.get_seq_length() - P))
                    tgt_pos = torch.tensor(_action_positions(rendered[i]), device=device)
                    hs, tgt = h[tgt_pos - 1], torch.tensor(ids, device=device)[tgt_pos]  # h covers 0..T-1
                    parts = []
                    for c in range(0, hs.shape[0], chunk):
                        logits = head(hs[c : c + chunk]).float()
                        parts.append(logits.gather(-1, tgt[c : c + chunk, None])[:, 0] - torch.logsumexp(logits, -1))
                    per[i] = torch.cat(parts) if parts else torch.zeros(0, device=device)
            logp.append(per)
    return _step_sums(logp, rendered)


def floor_batched_steps(models, rendered, batches, device, chunk: int = 1024) -> list[list[float]]:
    """The same work on the engine's own padded batches (no prefix shared: more work than the floor, in fewer,
    larger operations): bare decoder passes, then the output layer at action positions. The floor's time is the
    faster of this and `floor_steps` (on small shapes per-operation overheads make batch 1 the slower)."""
    logp = []
    with torch.no_grad():
        for m in models:
            dec, head = m.get_decoder(), m.get_output_embeddings()
            per: dict[int, torch.Tensor] = {}
            for b in batches:
                T = max(len(rendered[i].input_ids) for i in b)
                ids = torch.zeros((len(b), T), dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, i in enumerate(b):
                    ids[row, : len(rendered[i].input_ids)] = torch.tensor(rendered[i].input_ids)
                    mask[row, : len(rendered[i].input_ids)] = 1
                ids, mask = ids.to(device), mask.to(device)
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                h = dec(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
                rows = [(row, p) for row, i in enumerate(b) for p in _action_positions(rendered[i])]
                r_idx = torch.tensor([r for r, _ in rows], device=device)
                p_idx = torch.tensor([p for _, p in rows], device=device)
                hs, tgt = h[r_idx, p_idx - 1], ids[r_idx, p_idx]
                parts = []
                for c in range(0, hs.shape[0], chunk):
                    logits = head(hs[c : c + chunk]).float()
                    parts.append(logits.gather(-1, tgt[c : c + chunk, None])[:, 0] - torch.logsumexp(logits, -1))
                lp = torch.cat(parts)
                k = 0
                for i in b:
                    n = len(_action_positions(rendered[i]))
                    per[i] = lp[k : k + n]
                    k += n
            logp.append(per)
    return _step_sums(logp, rendered)


def _step_sums(logp, rendered) -> list[list[float]]:
    out = []
    for i, r in enumerate(rendered):
        d = (logp[0][i] - logp[1][i]).double().cpu()
        steps, k = [], 0
        for s, e in r.spans:
            n = e - max(s, 1)
            steps.append(float(d[k : k + n].sum()))
            k += n
        out.append(steps)
    return out


def _max_diff(a: list[list[float]], scores) -> float:
    worst = 0.0
    for steps, s in zip(a, scores):
        assert len(steps) == len(s.steps), "step counts differ"
        for x, st in zip(steps, s.steps):
            worst = max(worst, abs(x - st.advantage))
    return worst


# ----------------------------------------------------------------------------------------------------------------
# Scoring: speed-ups, floor, baselines, prefix sharing, logits


def _check_float32(ctx, trajs, rendered, groups, dev) -> dict:
    pol, ref = (copy.deepcopy(m).float() for m in (ctx["pol"], ctx["ref"]))
    scores = _scorer(pol, ctx["tok"], ref, baselines=False).score(trajs)
    out = {"naive": _max_diff(naive_steps(pol, ref, ctx["tok"], trajs, dev), scores),
           "floor": _max_diff(floor_steps((pol, ref), rendered, groups, dev), scores)}  # fmt: skip
    del pol, ref
    return out


def flops_of(ctx, rendered, groups, units) -> dict:
    """FLOPs of both models: the naive scorer, the floor, and the engine over its own work `units` (padded batches,
    and shared-prefix groups: the prefix once, each continuation batch padded to its longest suffix)."""
    cfg = ctx["cfg"]
    f = lambda tokens, pairs, rows: 2 * W.forward_flops(cfg, tokens, pairs, rows)  # noqa: E731 - both models
    naive = sum(f(len(r.input_ids), W.causal_pairs(0, len(r.input_ids)), len(r.input_ids)) for r in rendered)
    n_action = sum(len(_action_positions(r)) for r in rendered)
    floor = f(0, 0, n_action)
    distinct = 0
    for idx, P in groups:
        floor += f(P, W.causal_pairs(0, P), 0)
        distinct += P
        for i in idx:
            T = len(rendered[i].input_ids)
            floor += f(T - P, W.causal_pairs(P, T), 0)
            distinct += T - P
    engine = f(0, 0, n_action)
    for u in units:
        if hasattr(u, "batches"):  # a shared-prefix group
            P = u.prefix_len
            engine += f(P, W.causal_pairs(0, P), 0)
            for b in u.batches:
                T = max(len(rendered[i].input_ids) for i in b)
                engine += f(len(b) * (T - P), len(b) * W.causal_pairs(P, T), 0)
        else:
            T = max(len(rendered[i].input_ids) for i in u)
            engine += f(len(u) * T, len(u) * W.causal_pairs(0, T), 0)
    return {"naive": naive, "floor": floor, "engine": engine, "distinct": distinct, "n_action": n_action}


def bench_scoring(ctx, args) -> dict:
    from progadv_trl.engine import _plain_model

    pol, ref, tok, trajs, dev = ctx["pol"], ctx["ref"], ctx["tok"], ctx["trajs"], args.device
    share = _supports_share_prefix()
    bt = args.batch_tokens
    off = _scorer(pol, tok, ref, baselines=False, batch_tokens=bt)
    on = _scorer(pol, tok, ref, baselines=True, batch_tokens=bt)
    noshare = _scorer(pol, tok, ref, baselines=False, share=False, batch_tokens=bt) if share else None
    tj, rendered = off.render(trajs)
    groups = _groups(tj, rendered)
    batches = off._batches(rendered)
    from progadv_trl import distributed

    fl = flops_of(ctx, rendered, groups, distributed.units(off, rendered))

    # Logits buffers: a hook on each output layer records the largest [rows, V] the engine builds.
    seen = {"max": 0}

    def hook(_m, _i, out):
        seen["max"] = max(seen["max"], out.numel())


    times: dict[str, list[float]] = {k: [] for k in ("naive", "engine", "baselines", "noshare", "floor", "floor_batched")}
    # Warm-up (first calls set up kernels): every path once on the shortest trajectory, untimed.
    short = [trajs[min(range(len(rendered)), key=lambda i: len(rendered[i].input_ids))]]
    naive_steps(pol, ref, tok, short, dev)
    for sc in (off, on, noshare):
        if sc is not None:
            sc.score(short)
    rounds = args.repeat if ctx["shape"] == "tiny" else args.repeat_large
    for rnd in range(rounds):  # interleaved rounds; the best of each
        t, naive_out = _timed(lambda: naive_steps(pol, ref, tok, trajs, dev), dev, "naive")
        times["naive"].append(t)
        if rnd == 0:
            hooks = [_plain_model(m).get_output_embeddings().register_forward_hook(hook) for m in (pol, ref)]
        t, scores = _timed(lambda: off.score(trajs), dev, "engine")
        times["engine"].append(t)
        if rnd == 0:
            engine_logits = seen["max"]
            for h in hooks:
                h.remove()
            diff_naive = _max_diff(naive_out, scores)
        times["baselines"].append(_timed(lambda: on.score(trajs), dev, "engine+baselines")[0])
        if noshare is not None:
            times["noshare"].append(_timed(lambda: noshare.score(trajs), dev, "engine share_prefix=False")[0])
        t, floor_out = _timed(lambda: floor_steps((pol, ref), rendered, groups, dev), dev, "floor (prefix once, batch 1)")
        times["floor"].append(t)
        if rnd == 0:
            diff_floor = _max_diff(floor_out, scores)
        # Nothing shared: the same work in the engine's batches may be faster. --engine-batches-floor: time it anyway
        # (bare passes over the engine's padded batches: how much of the engine's time its passes themselves take).
        if args.engine_batches_floor or not any(P for _, P in groups):
            t, floor_b_out = _timed(lambda: floor_batched_steps((pol, ref), rendered, batches, dev), dev, "floor (engine batches)")
            times["floor_batched"].append(t)
            if rnd == 0:
                diff_floor = max(diff_floor, _max_diff(floor_b_out, scores))
    if args.dtype == "float32":
        check = {"naive": diff_naive, "floor": diff_floor}
    else:  # half precision differs by batching in the last bits: check float32 copies on a few trajectories
        check = _check_float32(ctx, trajs[:2], rendered[:2], _groups(tj[:2], rendered[:2]), dev)
    for name, d in check.items():
        assert d <= 1e-4, f"{name} and engine step advantages differ by {d:.2e} (> 1e-4, float32)"
    best = {k: min(v) if v else float("nan") for k, v in times.items()}
    labels = {"naive": "naive", "engine": "engine", "baselines": "engine+baselines",
              "noshare": "engine share_prefix=False", "floor": "floor (prefix once, batch 1)",
              "floor_batched": "floor (engine batches)"}  # fmt: skip
    cpu = {k: min(CPU_TIMES.pop(v)) if CPU_TIMES.get(v) else float("nan") for k, v in labels.items()}
    floor_cpu = cpu["floor"]
    if times["floor_batched"] and not any(P for _, P in groups):
        floor_cpu = min(floor_cpu, cpu["floor_batched"])
    floor_t = best["floor"]
    if times["floor_batched"] and not any(P for _, P in groups):
        floor_t = min(floor_t, best["floor_batched"])  # (with shared prefixes it does more than the floor's work)
    V = _plain_model(pol).get_output_embeddings().weight.shape[0]
    plain = max(len(b) * max(len(rendered[i].input_ids) for i in b) for b in batches) * V
    n_tokens = sum(len(r.input_ids) for r in rendered)
    naive_t = best["naive"]
    speedup, bound = naive_t / best["engine"], fl["naive"] / fl["floor"]
    mean_ctx = sum(p for r in rendered for p in _action_positions(r)) / max(1, fl["n_action"])
    return {
        "n_trajectories": len(rendered), "n_tokens": n_tokens, "n_distinct_tokens": fl["distinct"],
        "n_action_tokens": fl["n_action"], "n_batches": len(batches),
        "scoring_speedup_vs_naive": speedup, "speedup_bound_vs_naive": bound, "speedup_fraction_of_bound": speedup / bound,
        "distinct_token_bound": n_tokens / fl["distinct"], "fraction_of_distinct_bound": speedup * fl["distinct"] / n_tokens,
        "fraction_of_distinct_bound_cputime": cpu["naive"] / cpu["engine"] * fl["distinct"] / n_tokens,
        "floor_efficiency": floor_t / best["engine"], "engine_flops_over_floor": fl["engine"] / fl["floor"],
        "speedup_predicted_from_flops": fl["naive"] / fl["engine"],
        "scoring_speedup_vs_naive_cputime": cpu["naive"] / cpu["engine"], "floor_efficiency_cputime": floor_cpu / cpu["engine"],
        "baseline_extra_cost_ratio": best["baselines"] / best["engine"],
        "baseline_extra_cost_ratio_cputime": cpu["baselines"] / cpu["engine"],
        "prefix_sharing_speedup_cputime": cpu["noshare"] / cpu["engine"] if share else None,
        "prefix_sharing_speedup": best["noshare"] / best["engine"] if share else None,
        "logits_peak_memory_ratio": engine_logits / plain, "logits_engine_rows": engine_logits // V,
        "logits_plain_rows": plain // V,
        "naive_max_abs_diff": diff_naive, "floor_max_abs_diff": diff_floor, "float32_check_max_abs_diff": max(check.values()),
        "engine_tokens_per_s": n_tokens / best["engine"], "engine_s": best["engine"], "engine_baselines_s": best["baselines"],
        "engine_noshare_s": best["noshare"] if share else None, "naive_s": naive_t, "floor_s": floor_t,
        "floor_prefix_batch1_s": best["floor"], "floor_engine_batches_s": best["floor_batched"],
        "output_share": W.output_share(ctx["cfg"]), "output_share_at_mean_context": W.output_share(ctx["cfg"], int(mean_ctx)),
        "mean_action_context": mean_ctx, "timing_rounds": rounds, "batch_tokens": bt, "flops_naive": fl["naive"], "flops_floor": fl["floor"],
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Subprocess workers (memory, two processes)


def _save_models(ctx) -> tuple[Path, Path]:
    root = ctx["root"] / f"models_{ctx['shape']}"
    if not (root / "policy" / "config.json").exists():
        for name, m in (("policy", ctx["pol"]), ("reference", ctx["ref"])):
            m.save_pretrained(root / name)
            ctx["tok"].save_pretrained(root / name)
    return root / "policy", root / "reference"


def _write_trajs(path: Path, trajs) -> Path:
    path.write_text("".join(json.dumps(t) + "\n" for t in trajs))
    return path


def _run_worker(spec: dict, launcher: list[str], env: dict, timeout: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        sp, out = Path(d) / "spec.json", Path(d) / "out.json"
        sp.write_text(json.dumps(spec))
        cmd = [*launcher, str(Path(__file__).resolve()), "--worker", str(sp), "--worker-out", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"worker {spec['kind']} failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def _env(**over) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p)
    env.update({k: str(v) for k, v in over.items()})
    return env


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(spec: dict) -> dict:
    """Runs in a fresh process: `memory` (peak memory of one scoring configuration) or `dist` (scoring time)."""
    import resource

    from transformers import AutoTokenizer

    from progadv_trl import distributed
    from progadv_trl.engine import ProgressScorer

    dev, kind = spec["device"], spec["kind"]
    trajs = [json.loads(line) for line in Path(spec["trajectories"]).read_text().splitlines()]
    if kind == "memory":
        tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
        # Every import both configurations need, before the baseline: the figure is the model and the scoring.
        import peft  # noqa: F401
        from transformers import Qwen2ForCausalLM  # noqa: F401

        cuda = dev.startswith("cuda")
        if cuda:
            torch.cuda.init()
            before = torch.cuda.memory_allocated()
        before_rss = _rss_bytes()
        model = W.build_model(spec["shape"], tok).to(device=dev, dtype=getattr(torch, spec["dtype"]))
        if spec["config"] == "lora":
            from peft import LoraConfig, get_peft_model

            lcfg = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False,
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # fmt: skip
            model = get_peft_model(model, lcfg).eval()
            scorer = ProgressScorer(model, tok, batch_tokens=spec["batch_tokens"])  # reference: adapter disabled
        else:
            scorer = ProgressScorer(model, tok, model, batch_tokens=spec["batch_tokens"])  # one model, both roles
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        scorer.score(trajs)
        if cuda:
            peak = torch.cuda.max_memory_allocated() - before
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before_rss
        return {"peak_bytes": peak, "param_bytes": params}
    # kind == "dist": scoring time from after loading to the gathered result
    distributed.init(spec["device"])
    scorer = ProgressScorer.from_pretrained(
        spec["policy"], spec["reference"], device=distributed.device(dev), dtype=spec["dtype"],
        compute_baselines=False, batch_tokens=spec["batch_tokens"],
    )  # fmt: skip
    _, rendered = scorer.render(trajs)
    shortest = min(range(len(rendered)), key=lambda i: len(rendered[i].input_ids))
    scorer.token_stats([rendered[shortest]])  # warm-up, local
    if distributed.active():
        torch.distributed.barrier()
    t, stats = _timed(lambda: distributed.token_stats(scorer, rendered), distributed.device(dev) or "cpu")
    distributed.finish()
    return {"seconds": t, "world": distributed.world_size(), "n_batches": len(scorer._batches(rendered)),
            "threads": torch.get_num_threads(), "main": stats is not None}  # fmt: skip


def bench_memory(ctx, args) -> dict:
    trajs = ctx["trajs"][: args.memory_n]
    path = _write_trajs(ctx["root"] / f"mem_{ctx['shape']}.jsonl", trajs)
    ctx["tok"].save_pretrained(ctx["tok_dir"])
    res = {}
    for config in ("full", "lora"):
        spec = {"kind": "memory", "config": config, "shape": ctx["shape"], "tokenizer": str(ctx["tok_dir"]),
                "trajectories": str(path), "device": args.device, "dtype": args.dtype, "batch_tokens": 16384}  # fmt: skip
        res[config] = _run_worker(spec, [sys.executable], _env(), timeout=900)
    return {
        "lora_peak_memory_ratio": res["lora"]["peak_bytes"] / res["full"]["peak_bytes"],
        "full_peak_mb": res["full"]["peak_bytes"] / 2**20, "lora_peak_mb": res["lora"]["peak_bytes"] / 2**20,
        "full_param_mb": res["full"]["param_bytes"] / 2**20, "lora_param_mb": res["lora"]["param_bytes"] / 2**20,
        "memory_n_trajectories": len(trajs),
    }  # fmt: skip


def bench_two_process(ctx, args) -> dict:
    pol_dir, ref_dir = _save_models(ctx)
    n = args.dist_n if args.dist_n is not None else (0 if ctx["shape"] == "tiny" else 4)
    trajs = ctx["trajs"][:n] if n else ctx["trajs"]
    path = _write_trajs(ctx["root"] / f"dist_{ctx['shape']}.jsonl", trajs)
    spec = {"kind": "dist", "policy": str(pol_dir), "reference": str(ref_dir), "trajectories": str(path),
            "device": args.device, "dtype": args.dtype, "batch_tokens": args.dist_batch_tokens[ctx["shape"]]}  # fmt: skip
    cores = os.cpu_count() or 2
    nproc = args.nproc
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    one, many = [], []
    for _ in range(args.dist_repeat):  # interleaved
        one.append(_run_worker(spec, [sys.executable], _env(OMP_NUM_THREADS=cores), timeout=1200)["seconds"])
        many.append(_run_worker(spec, run, _env(OMP_NUM_THREADS=max(1, cores // nproc)), timeout=1200)["seconds"])
    return {"two_process_speedup": min(one) / min(many), "one_process_s": min(one), "two_process_s": min(many),
            "dist_n_trajectories": len(trajs), "dist_batch_tokens": spec["batch_tokens"], "dist_nproc": nproc}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Capture


def bench_capture(ctx, args) -> dict:
    """GRPO steps with and without the callback capturing training rollouts (no held-out set, no export), same seed,
    runs interleaved; per-step times (between consecutive step ends, the callback's flush included), first step
    of each run left out, median. Then one run with a held-out set for the cost of one held-out evaluation."""
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    from progadv_trl.callback import ProgressAdvantageCallback
    from progadv_trl.demo.tiny import grpo_args, parity_reward, prompts

    pol_dir, _ = _save_models(ctx)
    tok = AutoTokenizer.from_pretrained(pol_dir)
    cpu = not args.device.startswith("cuda")

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_train_begin(self, *a, **k):
            self.ends = [(time.perf_counter(), time.process_time())]

        def on_step_end(self, *a, **k):
            self.ends.append((time.perf_counter(), time.process_time()))

    def trainer(name, steps, **kw):
        a = grpo_args(ctx["root"] / f"cap_{ctx['shape']}_{name}", max_steps=steps, eval_strategy="no",
                      max_completion_length=16, use_cpu=cpu, bf16=args.dtype == "bfloat16")  # fmt: skip
        return GRPOTrainer(model=str(pol_dir), args=a, reward_funcs=parity_reward, train_dataset=prompts(256),
                           processing_class=tok)  # fmt: skip

    flush = []

    def one(with_cb: bool) -> list[float]:
        t = trainer(f"cb{int(with_cb)}", args.capture_steps)
        if with_cb:
            cb = ProgressAdvantageCallback(t, export=None, write_tables=False)
            orig = cb._flush_train

            def timed_flush(state, _orig=orig):  # the callback's own work at a logging step, timed alone
                t0 = time.perf_counter()
                try:
                    return _orig(state)
                finally:
                    flush.append(time.perf_counter() - t0)

            cb._flush_train = timed_flush
            t.add_callback(cb)
        timer = StepTimes()
        t.add_callback(timer)  # after the callback: its on_step_end (the flush) falls inside the step
        t.train()
        wall = [b[0] - a[0] for a, b in zip(timer.ends, timer.ends[1:])]
        cpu = [b[1] - a[1] for a, b in zip(timer.ends, timer.ends[1:])]
        return wall[1:], cpu[1:]

    steps = {True: [], False: []}
    steps_cpu = {True: [], False: []}
    runs_without = []
    with contextlib.redirect_stdout(io.StringIO()):  # the trainer prints every log line
        for _ in range(args.capture_repeat):
            for flag in (False, True):
                d, c = one(flag)
                steps[flag].extend(d)
                steps_cpu[flag].extend(c)
                if not flag:
                    runs_without.append(statistics.median(d))
    with_s, without_s = statistics.median(steps[True]), statistics.median(steps[False])
    with_c, without_c = statistics.median(steps_cpu[True]), statistics.median(steps_cpu[False])
    noise = 100 * (max(runs_without) / min(runs_without) - 1) if len(runs_without) > 1 else None

    held = ctx["trajs"][: args.heldout_n]
    t = trainer("heldout", 1)
    t.add_callback(ProgressAdvantageCallback(t, heldout=held, export=None, write_tables=False))
    with contextlib.redirect_stdout(io.StringIO()):
        t.train()
    secs = [e["eval_progadv/heldout/seconds"] for e in t.state.log_history if "eval_progadv/heldout/seconds" in e]
    return {
        "capture_overhead_pct": 100 * (with_s / without_s - 1), "grpo_step_s_with": with_s, "grpo_step_s_without": without_s,
        "capture_overhead_pct_cputime": 100 * (with_c / without_c - 1),
        "capture_steps_each": len(steps[True]), "capture_noise_pct": noise,
        "capture_flush_pct": 100 * statistics.median(flush) / without_s if flush else None,
        "heldout_eval_s": secs[-1] if secs else None,
        "heldout_n_trajectories": len(held),
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.3f}"
    return str(v)


def table(res: dict) -> str:
    shapes = list(res["shapes"])
    lines = ["| key | " + " | ".join(shapes) + " | target |", "|---|" + "---|" * len(shapes) + "---|"]
    for k in ROWS:
        if not any(k in res["shapes"][s] for s in shapes):
            continue
        lines.append(f"| `{k}` | " + " | ".join(_fmt(res["shapes"][s].get(k)) for s in shapes) + f" | {TARGETS.get(k, '')} |")
    return "\n".join(lines)


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--shapes", default="realistic,decoder,tiny",
                   help="comma-separated: realistic, decoder, tiny, qwen2.5-1.5b")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--groups", type=int, default=1, help="groups of 8 agent rollouts (realistic, qwen2.5-1.5b)")
    p.add_argument("--tiny-n", type=int, default=32, help="tiny trajectories")
    p.add_argument("--repeat", type=int, default=3, help="timed rounds of naive, engine, floor on the tiny shape (best of)")
    p.add_argument("--repeat-large", type=int, default=2, help="the same on the realistic and qwen2.5-1.5b shapes")
    p.add_argument("--memory-n", type=int, default=3, help="trajectories scored in each memory subprocess")
    p.add_argument("--dist-n", type=int, default=None,
                   help="trajectories in the two-process comparison (0: all; default: all tiny ones, 4 realistic)")
    p.add_argument("--dist-repeat", type=int, default=2, help="interleaved rounds of the two-process comparison")
    p.add_argument("--nproc", type=int, default=2, help="processes in the multi-process run")
    p.add_argument("--capture-steps", type=int, default=7)
    p.add_argument("--capture-repeat", type=int, default=2)
    p.add_argument("--heldout-n", type=int, default=4)
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="the engine's batch_tokens (default: the engine's own, 2048 on a CPU)")
    p.add_argument("--engine-batches-floor", action="store_true",
                   help="also time bare decoder passes over the engine's padded batches when prompts are shared")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: scoring, memory, dist, capture, session, "
                                                "as_generated")
    p.add_argument("--table", default=None, metavar="JSON", help="print the table of a saved run and exit")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    if args.worker:
        res = worker(json.loads(Path(args.worker).read_text()))
        from progadv_trl import distributed

        if distributed.is_main():
            Path(args.worker_out).write_text(json.dumps(res))
        return 0
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    # tiny: 32 short trajectories in 4096-token batches (5 batches); realistic: 4 rollouts of one group, one a
    # continuation batch (the group is cut: 2 a process, the prompt run on each)
    args.dist_batch_tokens = {"tiny": 4096, "realistic": 2048, "decoder": 2048, "qwen2.5-1.5b": 16384}
    skip = set(filter(None, args.skip.split(",")))
    t0 = time.perf_counter()
    res = {"command": "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "device": args.device, "dtype": args.dtype, "torch_threads": torch.get_num_threads(),
           "share_prefix_in_engine": _supports_share_prefix(), "targets": TARGETS, "shapes": {},
           "qwen2.5-1.5b_output_share": W.output_share(W.SHAPES["qwen2.5-1.5b"]),
           "qwen2.5-1.5b_output_share_at_1k_context": W.output_share(W.SHAPES["qwen2.5-1.5b"], 1000)}  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        for shape in args.shapes.split(","):
            root = Path(d) / shape
            root.mkdir()
            torch.manual_seed(0)
            ctx = setup(shape, root, args)
            out: dict = {}
            res["shapes"][shape] = out
            for part, fn in (("scoring", bench_scoring), ("memory", bench_memory), ("dist", bench_two_process),
                             ("capture", bench_capture), ("session", bench_session),
                             ("as_generated", bench_as_generated)):  # fmt: skip
                if part in ("session", "as_generated") and shape != "realistic":
                    continue  # one realistic agent episode is what these benchmarks are about
                if part in skip:
                    continue
                ts = time.perf_counter()
                out.update(fn(ctx, args))
                out[f"{part}_bench_s"] = time.perf_counter() - ts
                print(f"[{shape}] {part}: {time.perf_counter() - ts:.0f} s", file=sys.stderr, flush=True)
    res["total_s"] = time.perf_counter() - t0
    print(table(res))
    print(json.dumps(_json_safe(res), indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(_json_safe(res), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
