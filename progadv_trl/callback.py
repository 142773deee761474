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
  the trainer already has (`reference.from_trainer`: `trainer.ref_model`, the PEFT model with its adapter
  disabled, or TRL's "ref" adapter; with beta == 0 and full fine-tuning, a frozen copy loaded once from the initial
  checkpoint). With labels: AUROC, best-of-N and failure-attribution accuracy per method (progadv_trl.evaluation).

Metric names as logged: `progadv/train/...` in training log entries; the evaluation-side figures carry the
Trainer's `eval_` prefix, `eval_progadv/eval/...` and `eval_progadv/heldout/...`, so that TensorBoard, wandb and
the other trackers file them with the trainer's own evaluation figures (`eval/progadv/heldout/...`) rather than
under `train/` (transformers files every key that does not start with `eval_` under `train/`).

Per-step tables go to `output_dir/progadv/{eval,heldout[,train]}/step_XXXXXX.parquet` and, when "wandb" or
"trackio" is in `report_to`, to those as tables. At the end of training (and on every save with
`export="save"`) the critic bundle is written (bundle.export_bundle).

The class only wires trainer events; what it owns lives in progadv_trl/training/ (figures, the held-out set,
outputs) and TRL's private methods are touched in progadv_trl/trl_hooks.py alone.

Never breaks training: any error in the callback's own work is counted (`progadv/errors`), warned about and
skipped, unless `strict=True`. The callback's history is stored in `trainer_state.json` of each checkpoint and
restored on resume.

Distributed contract: every rank constructs the callback and takes part in every forward pass and gather (ZeRO-3
and FSDP shard the weights, so a rank that skips a forward pass hangs the others); the held-out set is sharded
across ranks (padded so every rank runs the same number of forward passes, with no shared-prefix plan, whose pass
count depends on the shard) and gathered; captured rollouts are gathered at logging steps (`on_step_end` /
`on_epoch_end` when the trainer is about to log, `on_prediction_step` in evaluation: events every rank runs). Only
the main process computes figures, logs and writes files. The bundle export (`on_train_end`, `on_save` with
export="save") is collective too: with sharded weights every rank joins the gather of the full policy (LoRA
adapter included) and of a separate reference (training/sharded.py), the main process writes, and every rank then
learns every rank's outcome, so a failure anywhere is reported on every rank (raised everywhere with strict=True).
Tested with two CPU processes under `torchrun --nproc_per_node 2` (gloo), with DDP and with FSDP2-sharded models;
docs/supported.md has the matrix.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from transformers import TrainerCallback

from . import trl_hooks
from .config import ATTRIBUTION_RULES, ScoringConfig
from .reference import Reference, from_trainer
from .scoring import TrajectoryScore
from .training.figures import batch_scores, label_figures, step_figures, token_figures, turn_ids  # noqa: F401
from .training.heldout import HeldoutSet, load_heldout
from .training.outputs import BUNDLE_DIR, TABLE_DIR, Outputs  # noqa: F401

STATE_KEY = "progadv_trl"  # key in TrainerState.stateful_callbacks (saved in every checkpoint's trainer_state.json)
EXPORT_CHOICES = (None, "end", "save")
TRAIN_PREFIX = "progadv/train/"
EVAL_PREFIX = "eval_progadv/eval/"  # "eval_": trackers file it with the trainer's own evaluation figures
ERRORS_KEY = "progadv/errors"


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
        reference: the held-out reference, a model or a path. Default: what the trainer has (`reference.from_trainer`).
        reference_pass: with beta == 0 there are no reference log-probs to reuse; True runs one extra no-grad
            reference forward per generation batch (cost logged as `progadv/train/ref_pass_seconds`), False skips
            the `progadv/train/` and `eval_progadv/eval/` figures with one warning.
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
        self.eval_steps, self.strict = eval_steps, strict
        self.reference_arg, self.reference_pass = reference, reference_pass
        self.heldout_max_length = heldout_max_length
        self.max_logged_steps = max_logged_steps
        self.train_tables = train_tables
        self.export, self.export_dir = export, export_dir
        self.success_threshold = success_threshold
        self.figure_kwargs = dict(success_threshold=success_threshold, attribution_rule=attribution_rule, seed=seed)
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
        self._reference: Reference | None = None
        self.last_train_batches: list[trl_hooks.RolloutBatch] = []  # the last logging window's captures (this rank)
        self.last_eval: list[TrajectoryScore] = []  # the last evaluation's rollout scores (main process)

        self.outputs = Outputs(trainer, on_error=self._error, write_tables=write_tables)
        self.heldout: HeldoutSet | None = None
        if heldout is not None:
            self.heldout = HeldoutSet(
                load_heldout(heldout, strict=strict), trainer, make_scorer=self._make_scorer, config=self.config,
                gather=self._gather, on_error=self._error, max_length=heldout_max_length,
                batch_size=heldout_batch_size, strict=strict, max_logged_steps=max_logged_steps,
                figure_kwargs=self.figure_kwargs,
            )  # fmt: skip

        self.capture = trainer_beta != 0.0 or reference_pass
        if not self.capture:
            warnings.warn(
                f"{type(trainer).__name__} has beta == 0: it computes no reference log-probs, so the progadv/train/ "
                "and eval_progadv/eval/ figures are skipped. Pass reference_pass=True to run one extra no-grad "
                "reference forward per generation batch instead (held-out scoring is unaffected).",
                stacklevel=2,
            )
        pass_reference = None
        if reference_pass and trainer_beta == 0.0:
            pass_reference = self.reference()
            if pass_reference.kind == "separate":
                trl_hooks.prepare_frozen_reference(trainer, pass_reference.model)
        self.hooks = trl_hooks.TrainerHooks(
            trainer,
            self._on_batch,
            on_error=lambda e: self._error("capture", e),
            log_extras=self._log_extras,
            reference_pass=reference_pass,
            reference=pass_reference,
        ).install()

    # -- small helpers -------------------------------------------------------------------------------------------
    @property
    def accelerator(self):
        return self.trainer.accelerator

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    @property
    def last_heldout(self) -> list[TrajectoryScore]:
        """The last held-out scores (main process)."""
        return self.heldout.last_scores if self.heldout is not None else []

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

    def reference(self) -> Reference:
        """The reference the trainer's KL term uses (resolved once; see `reference.from_trainer`)."""
        if self._reference is None:
            self._reference = from_trainer(self.trainer, self.reference_arg)
        return self._reference

    def _make_scorer(self):
        from .engine import ProgressScorer

        # Each rank must run the same number of forward passes (ZeRO-3 / FSDP): one batch per chunk, whatever
        # its length, so the chunk count (equal on every rank) is the forward count.
        # No shared-prefix plan either: its number of passes depends on which trajectories a rank holds.
        return ProgressScorer(
            trl_hooks.unwrap(self.trainer),
            trl_hooks.tokenizer(self.trainer),
            self.reference(),
            config=self.config,
            max_length=self.heldout_max_length,
            batch_tokens=2**62,
            share_prefix=False,
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

    def _gather_scored(self, batches, where: str) -> list[dict] | None:
        """Score this rank's captures and gather them (collective: every rank joins, even after a local error).
        The main process gets every rank's payload, or None when any rank failed; other ranks get None."""
        try:
            scores, sums, seconds = self._score_local(batches)
            payload = {"scores": scores, "sums": sums, "seconds": seconds, "ok": True}
        except Exception as e:  # noqa: BLE001
            self._error(where, e)
            payload = {"ok": False}
        gathered = self._gather([payload])
        if not self.is_main or not all(p["ok"] for p in gathered):
            return None
        return gathered

    def _flush_train(self, state) -> dict:
        """Gather this window's training captures (collective) and compute the figures (main process)."""
        batches, self._train_buf = self._train_buf, []
        self.last_train_batches = batches
        gathered = self._gather_scored(batches, "training-rollout figures")
        scores = [s for p in gathered or () for s in p["scores"]]
        if not scores:
            return {}
        figs = token_figures(TRAIN_PREFIX, [p["sums"] for p in gathered], self.kind)
        figs.update(step_figures(scores, TRAIN_PREFIX, self.max_logged_steps))
        if self.reference_pass and trl_hooks.beta(self.trainer) == 0.0:
            figs[f"{TRAIN_PREFIX}ref_pass_seconds"] = float(sum(p["seconds"] for p in gathered))
        if self.train_tables:
            self.outputs.table("train", scores, state.global_step)
        return figs

    def _flush_eval_batch(self):
        """After each evaluation batch (every rank): gather its captures to the main process."""
        batches, self._eval_buf = self._eval_buf, []
        gathered = self._gather_scored(batches, "evaluation-rollout figures")
        if gathered is not None:
            for p in gathered:
                self._eval_scores.extend(p["scores"])
            self._eval_sums.append([p["sums"] for p in gathered])

    def _eval_figures(self) -> dict:
        scores, self._eval_scores = self._eval_scores, []
        sums, self._eval_sums = self._eval_sums, []
        if not self.is_main or not scores:
            return {}
        by_rank = [[s for window in sums for s in window[r]] for r in range(len(sums[0]))] if sums else []
        figs = token_figures(EVAL_PREFIX, by_rank, self.kind)
        figs.update(step_figures(scores, EVAL_PREFIX, self.max_logged_steps))
        figs.update(label_figures(scores, EVAL_PREFIX, **self.figure_kwargs))
        step = self.trainer.state.global_step
        self.last_eval = scores
        self.history.append({"kind": "eval", "step": step, "figures": figs})
        self.outputs.table("eval", scores, step)
        return figs

    def _log_extras(self, mode: str) -> dict:
        """Called by the wrapped `trainer.log` (no collectives here: every figure was gathered beforehand)."""
        if mode == "eval":
            figs = self._eval_figures()
        else:
            figs, self._pending = self._pending, {}
        if figs and self.is_main:
            figs[ERRORS_KEY] = self.errors
            self._sync_state()
        return figs if self.is_main else {}

    # -- held-out ------------------------------------------------------------------------------------------------
    def score_heldout(self) -> dict:
        """Score the held-out set now (every rank must call it); figures on the main process, {} elsewhere."""
        if self.heldout is None:
            return {}
        figs = self.heldout.score()
        if figs:
            step = self.trainer.state.global_step
            self.history.append({"kind": "heldout", "step": step, "figures": figs})
            self.outputs.table("heldout", self.heldout.last_scores, step)
        return figs

    def _heldout_now(self, step: int) -> dict:
        figs = self.score_heldout()
        self._heldout_done_step = step
        return figs

    # -- export --------------------------------------------------------------------------------------------------
    def export_bundle(self, out_dir, *, policy=None, reference=None) -> Path:
        """Write the critic bundle (policy, reference, tokenizer, scoring config, held-out figures) to `out_dir`.
        `policy` / `reference`: full-weight copies to write instead of the live models (sharded runs, `_export`)."""
        last = next((h["figures"] for h in reversed(self.history) if h["kind"] == "heldout"), None)
        return self.outputs.export_bundle(
            out_dir, reference or self.reference(), config=self.config, max_length=self.heldout_max_length,
            heldout=self.heldout, heldout_figures=last, success_threshold=self.success_threshold, policy=policy,
        )  # fmt: skip

    def _export(self, out_dir):
        """Every rank: gather the full weights when they are sharded (FSDP / ZeRO-3), the main process writes the
        bundle, then every rank learns every rank's outcome, so a failure is reported everywhere (and raised
        everywhere with strict=True) and no rank waits in a gather another rank never joins."""
        from .training import sharded

        err = None
        try:  # local preparation, no collective: which models to gather
            plan = self._export_plan()
        except Exception as e:  # noqa: BLE001
            plan, err = None, e
        errors = self._rank_errors(err)
        if not errors:
            try:
                models = {name: sharded.full_model(m, is_main=self.is_main) for name, m in plan.items()}  # collective
                if self.is_main:
                    ref = self.reference()
                    if "reference" in models:
                        from .reference import Reference

                        ref = Reference(ref.kind, model=models["reference"], adapter=ref.adapter, identity=ref.identity)
                    self.export_bundle(out_dir, policy=models.get("policy"), reference=ref)
            except Exception as e:  # noqa: BLE001
                err = e
            errors = self._rank_errors(err)
        if errors:  # the same report on every rank, naming the ranks that failed
            e = RuntimeError("; ".join(f"rank {r}: {m}" for r, m in errors))
            e.__cause__ = err  # this rank's own exception, when it is one of them
            self._error("bundle export", e)

    def _export_plan(self) -> dict:
        """{"policy": model[, "reference": model]}: the models whose full weights the bundle needs, as the
        collective gather wants them (FSDP1: the wrapped root). Empty when nothing is sharded (live models used)."""
        from .training import sharded

        models = sharded.trainer_models(self.trainer, self.reference())
        return {name: m for name, m in models.items() if sharded.kind(m) is not None}

    def _rank_errors(self, err: BaseException | None) -> list[tuple[int, str]]:
        """(rank, message) of every rank that failed (collective when several processes run)."""
        msg = None if err is None else f"{type(err).__name__}: {err}"
        return [(r, m) for r, m in enumerate(self._gather([msg])) if m is not None]

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
                figs[ERRORS_KEY] = self.errors
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
            figs[ERRORS_KEY] = self.errors
            self.trainer.log(figs)
        self._sync_state(state)
        if self.export in ("end", "save"):
            self._export(Path(self.export_dir) if self.export_dir else Path(args.output_dir) / BUNDLE_DIR)
