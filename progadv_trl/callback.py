"""ProgressAdvantageCallback: progress advantage of agent steps, logged while GRPOTrainer / RLOOTrainer trains.

    trainer = GRPOTrainer(model=..., args=GRPOConfig(beta=0.04, ...), ...)
    trainer.add_callback(ProgressAdvantageCallback(trainer, heldout=heldout_dataset, eval_steps=50))
    trainer.train()

Three sources, three metric prefixes (every figure reaches `trainer.state.log_history` and every `report_to`
backend, in the same log entry as the trainer's own figures):

- `progadv/train/`: the training rollouts. GRPO already computes the reference log-probs of every completion (beta
  > 0) and the policy log-probs in its loss; both are captured (trl_hooks.py), so no forward pass is added. Per
  logging window: mean token log-ratio, GRPO's k3 `kl` recomputed from the captured tensors (it matches the
  trainer's `kl`), mean / quantiles / fraction positive of the per-turn advantage, and the mean by turn index for
  multi-turn rollouts (turns = runs of model-written tokens, i.e. `tool_mask == 1`).
- `progadv/eval/`: the trainer's own evaluation rollouts (`eval_dataset` + an eval strategy), captured the same
  way; the rewards are the success labels (`success_threshold`): per-step figures, AUROC pooled and within prompt
  groups, best-of-N over each prompt's `num_generations` rollouts, against the baselines that come from the same
  passes (policy_logprob, reference_logprob).
- `progadv/heldout/`: a fixed set of trajectories in the core format, scored with `engine.ProgressScorer` before
  the first step (the baseline), every `eval_steps` steps and at the end, with the policy against the reference
  the trainer already has (`trainer.ref_model`, the PEFT model with its adapter disabled, or TRL's "ref" adapter;
  with beta == 0 and full fine-tuning, a frozen copy loaded once from the initial checkpoint). With labels: AUROC,
  best-of-N and failure-attribution accuracy per method (progadv_trl.evaluation).

Per-step tables go to `output_dir/progadv/{eval,heldout[,train]}/step_XXXXXX.parquet` and, when "wandb" or
"trackio" is in `report_to`, to those as tables. At the end of training (and on every save with
`export="save"`) the critic bundle is written (bundle.export_bundle).

Never breaks training: any error in the callback's own work is counted (`progadv/errors`), warned about and
skipped, unless `strict=True`. The callback's history is stored in `trainer_state.json` of each checkpoint and
restored on resume.

Distributed contract: every rank constructs the callback and takes part in every forward pass and gather (ZeRO-3
and FSDP shard the weights, so a rank that skips a forward pass hangs the others); the held-out set is sharded
across ranks (padded so every rank runs the same number of forward passes) and gathered; captured rollouts are
gathered at logging steps (`on_step_end` / `on_epoch_end` when the trainer is about to log, `on_prediction_step`
in evaluation: events every rank runs). Only the main process computes figures, logs and writes files. Tested
with two CPU processes under `torchrun --nproc_per_node 2` (gloo); `accelerate launch --cpu --num_processes 2`
started only one process on our test machine.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from . import trl_hooks
from .config import ATTRIBUTION_RULES, METHODS
from .scoring import ScoringConfig, TokenStats, TrajectoryScore, score_from_token_stats

STATE_KEY = "progadv_trl"  # key in TrainerState.stateful_callbacks (saved in every checkpoint's trainer_state.json)
EXPORT_CHOICES = (None, "end", "save")
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
TABLE_DIR = "progadv"
BUNDLE_DIR = "progadv_bundle"


# ----------------------------------------------------------------------------------------------------------------
# Captured tensors -> per-rollout scores (through scoring.score_from_token_stats: the math lives there)


def turn_ids(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] 0/1 mask of model-written tokens -> turn index of each such token (contiguous runs), -1 elsewhere."""
    m = mask.bool()
    prev = torch.nn.functional.pad(m[:, :-1], (1, 0), value=False)
    ids = (m & ~prev).long().cumsum(dim=1) - 1
    return torch.where(m, ids, torch.full_like(ids, -1))


def batch_scores(batch: trl_hooks.RolloutBatch, config: ScoringConfig) -> tuple[list[TrajectoryScore], dict]:
    """One TrajectoryScore per rollout of a captured batch, plus token sums: (scores, {"lr_sum", "n", "k3_sum"}).

    Rollouts with no model-written token (e.g. masked truncated completions) are left out. A rollout's `group` is
    its prompt (generation batch, row // num_generations); `success` is its reward.
    """
    pol, ref, mask = batch.policy_logps.double(), batch.ref_logps.double(), batch.mask
    ids = turn_ids(mask)
    m = mask.bool()
    diff = ref - pol
    k3 = torch.exp(diff) - diff - 1  # GRPO's per-token kl estimator, to recompute its `kl` figure
    sums = {"lr_sum": float((pol - ref)[m].sum()), "n": int(m.sum()), "k3_sum": float(k3[m].sum())}
    out = []
    for b in range(mask.size(0)):
        sel = ids[b] >= 0
        if not bool(sel.any()):
            continue
        step = ids[b][sel].numpy()
        stats = TokenStats(step=step, policy_logp=pol[b][sel].numpy(), reference_logp=ref[b][sel].numpy())
        row = int(batch.rows[b]) if batch.rows is not None else b
        ts = score_from_token_stats(stats, int(step.max()) + 1, config, id=f"{batch.mode}-g{batch.generation}-r{row}")
        ts.group = f"{batch.mode}-g{batch.generation}-p{row // max(batch.num_generations, 1)}"
        if batch.rewards is not None and not math.isnan(float(batch.rewards[b])):
            ts.success = float(batch.rewards[b])
        ts.metadata = {"global_step": batch.global_step, "multi_turn": batch.multi_turn}
        out.append(ts)
    return out, sums


# ----------------------------------------------------------------------------------------------------------------
# Figures


def _finite(x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    return a[np.isfinite(a)]


def step_figures(scores: list[TrajectoryScore], prefix: str, max_steps: int, by: str = "turn") -> dict:
    """Mean / quantiles / fraction positive of the step advantages, trajectory score mean, mean by step index."""
    out = {f"{prefix}rollouts": len(scores)}
    if not scores:
        return out
    adv = _finite(np.concatenate([s.advantages for s in scores]) if scores else [])
    traj = _finite([s.score for s in scores])
    out[f"{prefix}steps_per_rollout"] = float(np.mean([len(s.steps) for s in scores]))
    if adv.size:
        out[f"{prefix}step_advantage_mean"] = float(adv.mean())
        out[f"{prefix}step_advantage_positive_frac"] = float((adv > 0).mean())
        for q, v in zip(QUANTILES, np.quantile(adv, QUANTILES)):
            out[f"{prefix}step_advantage_q{int(round(q * 100)):02d}"] = float(v)
    if traj.size:
        out[f"{prefix}score_mean"] = float(traj.mean())
    if any(len(s.steps) > 1 for s in scores) or by == "step":
        for i in range(max_steps):
            v = _finite([s.steps[i].advantage for s in scores if len(s.steps) > i])
            if v.size:
                out[f"{prefix}step_advantage_by_{by}/{i}"] = float(v.mean())
    return out


def _available(scores, method) -> bool:
    return any(math.isfinite(s.method_score(method)) for s in scores)


def label_figures(scores: list[TrajectoryScore], prefix: str, *, success_threshold, attribution_rule, seed) -> dict:
    """AUROC, best-of-N and failure attribution per method (progadv_trl.evaluation, no bootstrap: cheap)."""
    from . import evaluation as ev

    out = {}
    labelled = [s for s in scores if ev.is_success(s, success_threshold) is not None]
    if not labelled:
        return out
    out[f"{prefix}success_rate"] = float(np.mean([ev.is_success(s, success_threshold) for s in labelled]))
    methods = [m for m in METHODS if _available(labelled, m)]
    for m in methods:
        sp = ev.success_prediction(labelled, m, n_boot=0, seed=seed, success_threshold=success_threshold)
        if sp["auroc"] is not None:
            out[f"{prefix}auroc/{m}"] = sp["auroc"]
    grouped = [s for s in labelled if s.group is not None]
    if grouped:
        ref_done = False
        for m in methods:
            bon = ev.best_of_n(grouped, m, seed, n_boot=0, success_threshold=success_threshold)
            if bon["success"] is None:
                continue
            out[f"{prefix}best_of_n/{m}"] = bon["success"]
            if not ref_done:
                out[f"{prefix}best_of_n/random_pick"] = bon["random_pick"]
                out[f"{prefix}best_of_n/pass_at_n"] = bon["pass_at_n"]
                out[f"{prefix}best_of_n/groups"] = bon["n_groups"]
                ref_done = True
        # AUROC within each prompt group (both outcomes present), averaged: the ranking best-of-N relies on,
        # free of differences in prompt difficulty.
        by: dict[str, list] = {}
        for s in grouped:
            by.setdefault(str(s.group), []).append(s)
        for m in methods:
            vals = []
            for members in by.values():
                y = np.array([bool(ev.is_success(s, success_threshold)) for s in members])
                x = np.array([s.method_score(m) for s in members], dtype=np.float64)
                ok = np.isfinite(x)
                if ok.sum() >= 2 and y[ok].any() and not y[ok].all():
                    vals.append(ev.auroc(x[ok], y[ok]))
            if vals:
                out[f"{prefix}group_auroc/{m}"] = float(np.mean(vals))
    if any(s.failure_step is not None for s in labelled):
        for m in methods:
            fa = ev.failure_attribution(labelled, m, attribution_rule, success_threshold=success_threshold)
            if fa.get("exact") is not None:
                out[f"{prefix}attribution_exact/{m}"] = fa["exact"]
                out[f"{prefix}attribution_within1/{m}"] = fa["within1"]
        ch = ev.attribution_chance(labelled, success_threshold=success_threshold)
        if ch["exact"] is not None:
            out[f"{prefix}attribution_exact/chance"] = ch["exact"]
    return out


def steps_table(scores: list[TrajectoryScore], global_step: int):
    """One row per agent step: the per-step table written as parquet and sent to wandb/trackio."""
    import pandas as pd

    rows = []
    for s in scores:
        for st in s.steps:
            rows.append(
                {
                    "global_step": global_step,
                    "id": s.id,
                    "group": s.group,
                    "success": None if s.success is None else float(s.success),
                    "failure_step": s.failure_step,
                    "step": st.index,
                    "message_index": st.message_index,
                    "advantage": st.advantage,
                    "tokens": st.tokens,
                    "truncated": st.truncated,
                    "score": s.score,
                }
            )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------------


class ProgressAdvantageCallback(TrainerCallback):
    """Log progress advantage figures for training rollouts, evaluation rollouts and a fixed held-out set.

    Args:
        trainer: the `trl.GRPOTrainer` or `trl.RLOOTrainer` this callback is added to (callbacks get no trainer).
        heldout: trajectories in the core format (a .jsonl/.json/.parquet path, a list of dicts, a
            `datasets.Dataset`, or `Trajectory` objects). Bad records are skipped with a warning naming them
            (raised with `strict=True`). None: no held-out scoring.
        eval_steps: score the held-out set every this many optimizer steps (besides before the first step and at
            the end). None: only before and at the end.
        scoring_config: `ScoringConfig`. Default: beta = the trainer's beta (1.0 when it is 0), temperature = the
            trainer's (`args.temperature`: the log-probs GRPO computes, and its KL anchors, are temperature-scaled).
            Its temperature applies to held-out scoring; captured training/eval log-probs are the trainer's own.
        reference: the held-out reference, a model or a path. Default: what the trainer has (see module docstring).
        reference_pass: with beta == 0 there are no reference log-probs to reuse; True runs one extra no-grad
            reference forward per generation batch (cost logged as `progadv/train/ref_pass_seconds`), False skips
            the `progadv/train/` and `progadv/eval/` figures with one warning.
        heldout_max_length: truncate longer held-out trajectories (engine semantics). None: no truncation.
        heldout_batch_size: held-out trajectories per forward pass and rank.
        success_threshold: a numeric label (a reward) counts as a success when > this (evaluation's default 0).
        attribution_rule: failure-attribution rule (`config.ATTRIBUTION_RULES`).
        max_logged_steps: figures by turn / step index are logged for the first this many indices.
        write_tables: write per-step parquet tables (and send them to wandb/trackio when in `report_to`).
        train_tables: also write a table per logging step for the training rollouts (off: they are many).
        export: None, "end" (write the critic bundle at the end of training) or "save" (also at every checkpoint).
        export_dir: where the end-of-training bundle goes (default `output_dir/progadv_bundle`).
        strict: raise instead of counting errors in `progadv/errors`.
        seed: for tie-breaking in best-of-N.
    """

    def __init__(
        self,
        trainer,
        heldout=None,
        eval_steps: int | None = None,
        *,
        scoring_config: ScoringConfig | None = None,
        reference=None,
        reference_pass: bool = False,
        heldout_max_length: int | None = None,
        heldout_batch_size: int = 8,
        success_threshold: float | None = None,
        attribution_rule: str = "min_cumsum",
        max_logged_steps: int = 8,
        write_tables: bool = True,
        train_tables: bool = False,
        export: str | None = "end",
        export_dir: str | os.PathLike | None = None,
        strict: bool = False,
        seed: int = 0,
    ):
        if export not in EXPORT_CHOICES:
            raise ValueError(f"export must be one of {EXPORT_CHOICES}, got {export!r}")
        if eval_steps is not None and (not isinstance(eval_steps, int) or eval_steps < 1):
            raise ValueError(f"eval_steps must be a positive integer or None, got {eval_steps!r}")
        if heldout_batch_size < 1:
            raise ValueError(f"heldout_batch_size must be >= 1, got {heldout_batch_size}")
        if attribution_rule not in ATTRIBUTION_RULES:
            raise ValueError(f"attribution_rule must be one of {ATTRIBUTION_RULES}, got {attribution_rule!r}")
        trl_hooks.check_trl_version()
        self.trainer = trainer
        self.kind = trl_hooks.trainer_kind(trainer)
        self.eval_steps, self.strict, self.seed = eval_steps, strict, seed
        self.reference_arg, self.reference_pass = reference, reference_pass
        self.heldout_max_length, self.heldout_batch_size = heldout_max_length, heldout_batch_size
        self.success_threshold, self.attribution_rule = success_threshold, attribution_rule
        self.max_logged_steps = max_logged_steps
        self.write_tables, self.train_tables = write_tables, train_tables
        self.export, self.export_dir = export, export_dir
        trainer_beta = trl_hooks.beta(trainer)
        self.config = scoring_config or ScoringConfig(
            beta=trainer_beta if trainer_beta > 0 else 1.0, temperature=trl_hooks.temperature(trainer)
        )

        # History (restored on resume), figures waiting for the next log call, counters
        self.history: list[dict] = []  # [{"kind": "heldout"|"eval", "step": int, "figures": {...}}]
        self.errors = 0
        self._pending: dict[str, float] = {}  # train-mode figures for the next trainer.log
        self._train_buf: list[trl_hooks.RolloutBatch] = []
        self._eval_buf: list[trl_hooks.RolloutBatch] = []
        self._eval_scores: list[TrajectoryScore] = []
        self._eval_sums: list[list[list[dict]]] = []  # per eval batch, per rank, per captured batch
        self._heldout_done_step: int | None = None
        self._warned: set[str] = set()
        self.last_train_batches: list[trl_hooks.RolloutBatch] = []  # the last logging window's captures (this rank)
        self.last_heldout: list[TrajectoryScore] = []  # the last held-out scores (main process)
        self.last_eval: list[TrajectoryScore] = []  # the last evaluation's rollout scores (main process)
        self._scorer = None
        self._rendered = None
        self._frozen_reference = None

        self.heldout = None
        if heldout is not None:
            self.heldout = self._load_heldout(heldout)

        self.capture = trainer_beta != 0.0 or reference_pass
        if not self.capture:
            warnings.warn(
                f"{type(trainer).__name__} has beta == 0: it computes no reference log-probs, so the progadv/train/ "
                "and progadv/eval/ figures are skipped. Pass reference_pass=True to run one extra no-grad reference "
                "forward per generation batch instead (held-out scoring is unaffected).",
                stacklevel=2,
            )
        ref_model = None
        if reference_pass and trainer_beta == 0.0 and trl_hooks.peft_reference_context(trainer) is None:
            ref_model = self._reference_model()
            trl_hooks.prepare_frozen_reference(trainer, ref_model)
        self.hooks = trl_hooks.TrainerHooks(
            trainer,
            self._on_batch,
            on_error=lambda e: self._error("capture", e),
            log_extras=self._log_extras,
            reference_pass=reference_pass,
            reference_model=ref_model,
        ).install()

    # -- small helpers -------------------------------------------------------------------------------------------
    @property
    def accelerator(self):
        return self.trainer.accelerator

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    def _warn_once(self, key: str, msg: str):
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, stacklevel=3)

    def _error(self, where: str, e: BaseException):
        """Count, warn once per place, and go on; `strict=True` re-raises."""
        self.errors += 1
        if self.strict:
            raise e
        self._warn_once(f"error:{where}", f"ProgressAdvantageCallback: {where} failed and was skipped ({type(e).__name__}: {e}); "
                        "further failures are counted in progadv/errors")

    def _gather(self, obj: list) -> list:
        from accelerate.utils import gather_object

        if self.accelerator.num_processes == 1:
            return list(obj)
        return gather_object(obj)

    def _load_heldout(self, heldout):
        from .trajectories import load_trajectories

        res = load_trajectories(heldout, on_error="raise" if self.strict else "skip")
        if res.errors:
            shown = "; ".join(str(e) for e in res.errors[:5])
            more = f" (and {len(res.errors) - 5} more)" if len(res.errors) > 5 else ""
            warnings.warn(f"held-out set: {len(res.errors)} bad record(s) skipped: {shown}{more}", stacklevel=3)
        if not res.trajectories:
            raise ValueError("held-out set: no valid trajectory to score")
        return res.trajectories

    # -- references ----------------------------------------------------------------------------------------------
    def _reference_model(self):
        """A frozen reference model: `reference=` (model or path), else loaded once from the initial checkpoint."""
        if self._frozen_reference is not None:
            return self._frozen_reference
        ref = self.reference_arg
        policy = trl_hooks.unwrap(self.trainer)
        if ref is None or isinstance(ref, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM

            path = ref if ref is not None else getattr(policy.config, "_name_or_path", None)
            if not path or not Path(str(path)).exists() and ref is None:
                raise ValueError(
                    "held-out scoring needs a reference: the trainer has none (beta == 0, full fine-tuning) and the "
                    f"model's initial checkpoint {path!r} is not a local directory; pass reference= (a model or a path)"
                )
            ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=next(policy.parameters()).dtype)
        ref = ref.to(next(policy.parameters()).device).eval()
        ref.requires_grad_(False)
        self._frozen_reference = ref
        return ref

    def _separate_reference(self):
        """The reference the trainer's KL term uses, as a separate model: `reference=`, else its ref_model, else
        (beta == 0, full fine-tuning) a frozen copy of the initial checkpoint. None for a PEFT policy whose
        reference is its own adapter state (adapters disabled, or TRL's "ref" adapter)."""
        if self.reference_arg is not None:
            return self._reference_model()
        ref = trl_hooks.trainer_reference(self.trainer)
        if ref is None and not trl_hooks.is_peft(trl_hooks.unwrap(self.trainer)):
            ref = self._reference_model()
        return ref

    def _make_scorer(self):
        from .engine import ProgressScorer

        t = self.trainer
        policy = trl_hooks.unwrap(t)
        reference = self._separate_reference()
        ctx = trl_hooks.peft_reference_context(t) if reference is None else None
        # Each rank must run the same number of forward passes (ZeRO-3 / FSDP): one batch per chunk, whatever
        # its length, so the chunk count (equal on every rank) is the forward count.
        return ProgressScorer(
            policy,
            trl_hooks.tokenizer(t),
            reference,
            config=self.config,
            max_length=self.heldout_max_length,
            reference_context=ctx,
            batch_tokens=2**62,
        )

    # -- capture -------------------------------------------------------------------------------------------------
    def _on_batch(self, batch: trl_hooks.RolloutBatch):
        buf = self._train_buf if batch.mode == "train" else self._eval_buf
        buf.append(batch)
        if len(buf) > 10_000:  # the callback was never added to the trainer, or logging is off: do not grow forever
            del buf[: len(buf) - 10_000]
            self._warn_once("buffer", "ProgressAdvantageCallback: captured rollouts are piling up (was the callback added "
                            "with trainer.add_callback, and is logging on?); keeping the latest 10000 batches")

    def _score_local(self, batches) -> tuple[list[TrajectoryScore], list[dict], float]:
        scores, sums, seconds = [], [], 0.0
        for b in batches:
            s, tok = batch_scores(b, self.config)
            scores.extend(s)
            sums.append(tok)
            seconds += b.ref_pass_seconds
        return scores, sums, seconds

    def _token_figures(self, prefix: str, sums_by_rank: list[list[dict]]) -> dict:
        out = {}
        flat = [s for rank in sums_by_rank for s in rank]
        n = sum(s["n"] for s in flat)
        if n:
            out[f"{prefix}token_log_ratio_mean"] = sum(s["lr_sum"] for s in flat) / n
            out[f"{prefix}tokens"] = n
        # The trainer's own `kl`, recomputed: per (micro-)batch a masked mean over all ranks, then the mean over the
        # window's batches. GRPO uses the k3 estimator; RLOO the first-order one (the log-ratio itself).
        lengths = {len(r) for r in sums_by_rank}
        key = "k3_sum" if self.kind == "grpo" else "lr_sum"
        if len(lengths) == 1 and next(iter(lengths)):
            per = []
            for j in range(next(iter(lengths))):
                k = sum(r[j][key] for r in sums_by_rank)
                c = sum(r[j]["n"] for r in sums_by_rank)
                per.append(k / max(c, 1))
            out[f"{prefix}kl"] = float(np.mean(per))
        return out

    def _flush_train(self, state) -> dict:
        """Gather this window's training captures (collective) and compute the figures (main process)."""
        batches, self._train_buf = self._train_buf, []
        self.last_train_batches = batches
        try:
            scores, sums, seconds = self._score_local(batches)
            payload = {"scores": scores, "sums": sums, "seconds": seconds, "ok": True}
        except Exception as e:  # noqa: BLE001
            self._error("training-rollout figures", e)
            payload = {"ok": False}
        gathered = self._gather([payload])
        if not self.is_main or not all(p["ok"] for p in gathered):
            return {}
        scores = [s for p in gathered for s in p["scores"]]
        if not scores:
            return {}
        prefix = "progadv/train/"
        figs = self._token_figures(prefix, [p["sums"] for p in gathered])
        figs.update(step_figures(scores, prefix, self.max_logged_steps))
        if self.reference_pass and trl_hooks.beta(self.trainer) == 0.0:
            figs[f"{prefix}ref_pass_seconds"] = float(sum(p["seconds"] for p in gathered))
        if self.train_tables and self.write_tables:
            self._table("train", scores, state.global_step)
        return figs

    def _flush_eval_batch(self):
        """After each evaluation batch (every rank): gather its captures to the main process."""
        batches, self._eval_buf = self._eval_buf, []
        try:
            scores, sums, _ = self._score_local(batches)
            payload = {"scores": scores, "sums": sums, "ok": True}
        except Exception as e:  # noqa: BLE001
            self._error("evaluation-rollout figures", e)
            payload = {"ok": False}
        gathered = self._gather([payload])
        if self.is_main and all(p["ok"] for p in gathered):
            for p in gathered:
                self._eval_scores.extend(p["scores"])
            self._eval_sums.append([p["sums"] for p in gathered])

    def _eval_figures(self) -> dict:
        scores, self._eval_scores = self._eval_scores, []
        sums, self._eval_sums = self._eval_sums, []
        if not self.is_main or not scores:
            return {}
        prefix = "progadv/eval/"
        by_rank = [[s for window in sums for s in window[r]] for r in range(len(sums[0]))] if sums else []
        figs = self._token_figures(prefix, by_rank)
        figs.update(step_figures(scores, prefix, self.max_logged_steps))
        figs.update(
            label_figures(scores, prefix, success_threshold=self.success_threshold,
                          attribution_rule=self.attribution_rule, seed=self.seed)  # fmt: skip
        )
        step = self.trainer.state.global_step
        self.last_eval = scores
        self.history.append({"kind": "eval", "step": step, "figures": figs})
        if self.write_tables:
            self._table("eval", scores, step)
        return figs

    def _log_extras(self, mode: str) -> dict:
        """Called by the wrapped `trainer.log` (no collectives here: every figure was gathered beforehand)."""
        if mode == "eval":
            figs = self._eval_figures()
        else:
            figs, self._pending = self._pending, {}
        if figs and self.is_main:
            figs["progadv/errors"] = self.errors
            self._sync_state()
        return figs if self.is_main else {}

    # -- held-out ------------------------------------------------------------------------------------------------
    def score_heldout(self) -> dict:
        """Score the held-out set now (every rank must call it); figures on the main process, {} elsewhere."""
        if self.heldout is None:
            return {}
        t0 = time.perf_counter()
        acc = self.accelerator
        world, rank = acc.num_processes, acc.process_index
        try:
            self._render_heldout()  # the same on every rank: a trajectory the template cannot render is dropped everywhere
        except Exception as e:  # noqa: BLE001
            self._error("held-out rendering", e)
            return {}
        n = len(self.heldout)
        per_rank = math.ceil(n / world)
        n_chunks = math.ceil(per_rank / self.heldout_batch_size)
        mine = list(range(rank, n, world))
        # Pad with repeats of a real item so every rank runs n_chunks full forward passes (dropped after gather)
        pad = per_rank - len(mine)
        idx = mine + [mine[-1] if mine else 0] * pad
        real = [True] * len(mine) + [False] * pad
        payload = {"ok": True, "scores": []}
        try:
            from .engine import finish_score

            if self._scorer is None:
                self._scorer = self._make_scorer()
            rendered = self._render_heldout()
            device = next(trl_hooks.unwrap(self.trainer).parameters()).device
            with trl_hooks.rng_guard(device):
                for c in range(n_chunks):
                    part = idx[c * self.heldout_batch_size : (c + 1) * self.heldout_batch_size]
                    keep = real[c * self.heldout_batch_size : (c + 1) * self.heldout_batch_size]
                    stats = self._scorer.token_stats([rendered[i] for i in part])
                    for i, st, k in zip(part, stats, keep):
                        if k:
                            payload["scores"].append((i, finish_score(self.heldout[i], rendered[i], st, self.config)))
        except Exception as e:  # noqa: BLE001 - a rank that failed still joins the gather below
            self._error("held-out scoring", e)
            payload = {"ok": False}
        gathered = self._gather([payload])
        if not self.is_main or not all(p["ok"] for p in gathered):
            return {}
        scores = [s for _, s in sorted((pair for p in gathered for pair in p["scores"]), key=lambda x: x[0])]
        step = self.trainer.state.global_step
        prefix = "progadv/heldout/"
        try:
            figs = step_figures(scores, prefix, self.max_logged_steps, by="step")
            figs.update(
                label_figures(scores, prefix, success_threshold=self.success_threshold,
                              attribution_rule=self.attribution_rule, seed=self.seed)  # fmt: skip
            )
        except Exception as e:  # noqa: BLE001
            self._error("held-out figures", e)
            return {}
        figs[f"{prefix}global_step"] = step
        figs[f"{prefix}seconds"] = time.perf_counter() - t0
        self.last_heldout = scores
        self.history.append({"kind": "heldout", "step": step, "figures": figs})
        if self.write_tables:
            self._table("heldout", scores, step)
        return figs

    def _render_heldout(self):
        """Render the held-out set once (chat template + action spans); trajectories that cannot be rendered are
        dropped with one warning naming them."""
        if self._rendered is not None:
            return self._rendered
        from .trajectories import render

        tok = trl_hooks.tokenizer(self.trainer)
        keep, rendered, bad = [], [], []
        for traj in self.heldout:
            try:
                rendered.append(render(traj, tok, self.heldout_max_length))
                keep.append(traj)
            except ValueError as e:  # ChatTemplateError: names the trajectory
                if self.strict:
                    raise
                bad.append(str(e))
        if bad:
            warnings.warn(f"held-out set: {len(bad)} trajectory(ies) skipped: " + "; ".join(bad[:3]), stacklevel=2)
        if not keep:
            raise ValueError("held-out set: no trajectory could be rendered with the trainer's chat template")
        self.heldout, self._rendered = keep, rendered
        return rendered

    def _heldout_now(self, step: int) -> dict:
        figs = self.score_heldout()
        self._heldout_done_step = step
        return figs

    # -- tables and export ---------------------------------------------------------------------------------------
    def _table(self, kind: str, scores, step: int):
        try:
            df = steps_table(scores, step)
            folder = Path(self.trainer.args.output_dir) / TABLE_DIR / kind
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"step_{step:06d}.parquet"
            k = 1
            while path.exists():  # e.g. a second evaluation at the same step
                path = folder / f"step_{step:06d}_{k}.parquet"
                k += 1
            df.to_parquet(path)
            self._send_table(f"progadv/{kind}_steps", df)
        except Exception as e:  # noqa: BLE001
            self._error(f"{kind} table", e)

    def _send_table(self, name: str, df):
        report_to = self.trainer.args.report_to or []
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                wandb = None
            if wandb is not None and getattr(wandb, "run", None) is not None:
                wandb.log({name: wandb.Table(dataframe=df)})
        if "trackio" in report_to:
            try:
                import trackio
            except ImportError:
                trackio = None
            if trackio is not None:
                trackio.log({name: trackio.Table(dataframe=df)})

    def export_bundle(self, out_dir) -> Path:
        """Write the critic bundle (policy, reference, tokenizer, scoring config, held-out figures) to `out_dir`."""
        try:
            from .bundle import export_bundle, fingerprint_trajectories
        except ImportError as e:
            raise RuntimeError(
                "progadv_trl.bundle.export_bundle is unavailable, so the critic bundle cannot be written "
                f"({e}); pass export=None to the callback to skip it"
            ) from e
        t = self.trainer
        policy = trl_hooks.unwrap(t)
        reference = self._separate_reference()
        # A PEFT policy with no separate reference: the bundle stores the adapter; its reference is the base or "ref"
        ref_adapter = "ref" if reference is None and "ref" in policy.peft_config else None
        last = next((h["figures"] for h in reversed(self.history) if h["kind"] == "heldout"), None)
        return export_bundle(
            out_dir,
            policy,
            reference,
            trl_hooks.tokenizer(t),
            scoring_config=self.config,
            max_length=self.heldout_max_length,
            training={
                "beta": trl_hooks.beta(t),
                "temperature": trl_hooks.temperature(t),
                "trainer_class": type(t).__name__,
                "global_step": int(t.state.global_step),
                "seed": int(t.args.seed),
            },
            heldout_metrics=last,
            heldout_fingerprint=fingerprint_trajectories(self.heldout) if self.heldout else None,
            calibration=self._calibration(),
            reference_adapter=ref_adapter,
            overwrite=True,
        )

    def _calibration(self) -> dict | None:
        """Platt calibration of P(success) on the last held-out scores, for ProgressCritic.predict_success. None
        without labels of both kinds. It is only as good as the held-out set is like the rollouts scored later
        (on- or off-policy): the manifest says what it was fitted on."""
        from .evaluation import Calibrator, is_success

        pairs = [(s.score, is_success(s, self.success_threshold)) for s in self.last_heldout]
        pairs = [(x, y) for x, y in pairs if y is not None and math.isfinite(x)]
        ys = [y for _, y in pairs]
        if not ys or all(ys) or not any(ys):
            return None
        cal = Calibrator("platt").fit([x for x, _ in pairs], ys).to_dict()
        c = self.config
        cal.update(
            method="progress_advantage",
            scoring={"beta": c.beta, "token_reduction": c.token_reduction, "step_reduction": c.step_reduction},
            fitted_on=f"the callback's held-out set at step {self.trainer.state.global_step} (n={len(pairs)})",
        )
        return cal

    def _export(self, out_dir):
        if not self.is_main:  # TODO(distributed): ZeRO-3 / FSDP would need the full weights gathered first
            return
        try:
            self.export_bundle(out_dir)
        except Exception as e:  # noqa: BLE001
            self._error("bundle export", e)

    # -- resume --------------------------------------------------------------------------------------------------
    def _sync_state(self, state=None):
        """Keep the callback's history in TrainerState, so every checkpoint's trainer_state.json carries it."""
        state = state or self.trainer.state
        if state.stateful_callbacks is None:
            state.stateful_callbacks = {}
        state.stateful_callbacks[STATE_KEY] = {
            "history": self.history,
            "errors": self.errors,
            "pending": self._pending,
            "heldout_done_step": self._heldout_done_step,
        }

    def _restore(self, state) -> bool:
        saved = (state.stateful_callbacks or {}).get(STATE_KEY)
        if not saved or not state.global_step:
            return False
        self.history = list(saved.get("history", []))
        self.errors = int(saved.get("errors", 0))
        self._pending = dict(saved.get("pending", {}))
        self._heldout_done_step = saved.get("heldout_done_step")
        return True

    # -- trainer events ------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        resumed = self._restore(state)
        if self.heldout is not None and not resumed:
            figs = self._heldout_now(state.global_step)
            if figs and self.is_main:
                # Nothing has been generated yet, so logging now flushes no GRPO metric window: a step-0 entry.
                figs["progadv/errors"] = self.errors
                self.trainer.log(figs)
        self._sync_state(state)

    def _maybe_flush(self, state, control):
        if control.should_log and self.capture:
            figs = self._flush_train(state)
            if figs:
                self._pending.update(figs)

    def on_step_end(self, args, state, control, **kwargs):
        final = state.global_step >= state.max_steps or control.should_training_stop
        if self.heldout is not None and self._heldout_done_step != state.global_step:
            if final or (self.eval_steps and state.global_step % self.eval_steps == 0):
                figs = self._heldout_now(state.global_step)
                if figs:  # newest held-out figures win if two wait for the same log call
                    self._pending.update(figs)
        self._maybe_flush(state, control)
        self._sync_state(state)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._maybe_flush(state, control)

    def on_prediction_step(self, args, state, control, **kwargs):
        if self.capture:
            self._flush_eval_batch()

    def on_evaluate(self, args, state, control, **kwargs):
        self._sync_state(state)

    def on_save(self, args, state, control, **kwargs):
        if self.export == "save":
            self._export(Path(args.output_dir) / f"checkpoint-{state.global_step}" / BUNDLE_DIR)

    def on_train_end(self, args, state, control, **kwargs):
        figs = {}
        if self.capture and self._train_buf:
            figs.update(self._flush_train(state))  # rollouts after the last logging step
        # (every rank decides the same way: the buffers hold one entry per micro-batch on every rank)
        if self.heldout is not None and self._heldout_done_step != state.global_step:
            figs.update(self._heldout_now(state.global_step))
        figs.update(self._pending)
        self._pending = {}
        if figs and self.is_main:
            # GRPO flushed its metric window in the final training summary just before: logging now is safe.
            figs["progadv/errors"] = self.errors
            self.trainer.log(figs)
        self._sync_state(state)
        if self.export in ("end", "save"):
            self._export(Path(self.export_dir) if self.export_dir else Path(args.output_dir) / BUNDLE_DIR)
