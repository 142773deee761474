"""The one module that touches TRL internals: capture the log-probs GRPOTrainer / RLOOTrainer already compute.

`ProgressAdvantageCallback` (callback.py) needs, for every rollout the trainer scores, the policy's and the
reference's log-prob of each generated token and the mask of the tokens the model wrote. TRL computes all of it
but exposes none of it, so this module wraps private methods of ONE trainer instance (instance attributes, never
the class: two trainers in one process do not see each other's hooks):

GRPOTrainer
    `_calculate_rewards`               -> the rewards of the batch (all processes), read back per local row.
    `_generate_and_score_completions`  -> `ref_per_token_logps`, `completion_mask`, `tool_mask` (multi-turn),
                                          `old_per_token_logps` when TRL computed it. Three private keys are added
                                          to the returned batch (`progadv_rows`, `progadv_rewards`, and with
                                          beta == 0 and the opt-in reference pass `progadv_ref_per_token_logps`);
                                          they ride through TRL's shuffle/split to the loss and the loss ignores them.
    `_compute_loss` + `_get_per_token_logps_and_entropies`
                                       -> the policy log-probs of the loss's first forward pass, when TRL did not
                                          compute `old_per_token_logps` at generation.
RLOOTrainer
    `_generate_and_score_completions` + `_get_per_token_logps_and_entropies`
                                       -> RLOO always runs the policy (first call) and, with beta > 0, the
                                          reference (second call) at generation time; both are captured there.
Trainer (public, documented as an override point)
    `log`                              -> figures computed beforehand are added to the dict being logged, so they
                                          reach `state.log_history` and every `report_to` backend in the same entry
                                          as the trainer's own, without flushing GRPO's metric window.

Which policy log-probs: the policy *at rollout time* (TRL's `old_per_token_logps` semantics). When TRL computed
`old_per_token_logps` (num_iterations > 1, misaligned accumulation, vLLM importance sampling) that tensor is used;
otherwise the loss's first pass over each micro-batch of a fresh generation batch is used (the first of the
`num_iterations` passes, before any optimizer step: identical to `old_per_token_logps`, and exactly the tensor
GRPO's `kl` is computed from). No forward pass is added for any of this. Log-probs are TRL's: temperature-scaled
by `args.temperature`, computed on the training model (train mode).

Generation with vLLM (`use_vllm=True`, colocate or server; TRL 1.16's `_generate_single_turn`): vLLM returns
completions with its own per-token log-probs, which TRL keeps as `sampling_per_token_logps`. Those are the
sampler's (another engine's numerics, possibly quantized or stale weights), not pi_theta's, and are never read
here. With `vllm_importance_sampling_correction=True` (TRL's default) TRL recomputes `old_per_token_logps` with the
training model at generation and takes the importance ratio against the sampler's; that tensor is captured, as
above. With the correction off the loss's first pass is captured, as without vLLM. The reference log-probs come
from the training-side reference either way. Tested on TRL's own vLLM branch with the engine replaced by a stand-in
(tests/test_vllm_path.py); vLLM itself is not run in our tests.

Supported: TRL 1.16.x (tested with 1.16.0). Other versions raise `UnsupportedTRLError`; set
PROGADV_TRL_SKIP_VERSION_CHECK=1 to try anyway (the private methods may have changed meaning).
Text-only: multimodal forward kwargs are not passed to the opt-in reference pass.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

SUPPORTED_TRL_VERSIONS = ("1.16",)  # major.minor prefixes whose private methods this module was written against
SKIP_VERSION_CHECK_ENV = "PROGADV_TRL_SKIP_VERSION_CHECK"
ROWS_KEY, REWARDS_KEY, REF_KEY = "progadv_rows", "progadv_rewards", "progadv_ref_per_token_logps"

_GRPO_METHODS = ("_generate_and_score_completions", "_compute_loss", "_get_per_token_logps_and_entropies", "_calculate_rewards")
_RLOO_METHODS = ("_generate_and_score_completions", "_get_per_token_logps_and_entropies", "_calculate_rewards")


class UnsupportedTRLError(RuntimeError):
    pass


def _major_minor(version: str) -> str:
    parts = version.split(".")
    return ".".join(parts[:2])


def check_trl_version(version: str | None = None) -> str:
    """Raise `UnsupportedTRLError` unless TRL's major.minor is one this module was written against."""
    if version is None:
        import trl

        version = getattr(trl, "__version__", "unknown")
    if _major_minor(version) in SUPPORTED_TRL_VERSIONS:
        return version
    if os.environ.get(SKIP_VERSION_CHECK_ENV, "") not in ("", "0"):
        warnings.warn(
            f"progadv_trl: TRL {version} is not a supported version ({', '.join(v + '.x' for v in SUPPORTED_TRL_VERSIONS)}); "
            f"{SKIP_VERSION_CHECK_ENV} is set, so the callback runs anyway: check its figures.",
            stacklevel=3,
        )
        return version
    raise UnsupportedTRLError(
        f"ProgressAdvantageCallback reads tensors from private methods of TRL's GRPOTrainer/RLOOTrainer and supports "
        f"TRL {', '.join(v + '.x' for v in SUPPORTED_TRL_VERSIONS)}; found TRL {version}. Install a supported "
        f"version (pip install 'trl>=1.16,<1.17'), or set {SKIP_VERSION_CHECK_ENV}=1 to try anyway."
    )


def trainer_kind(trainer) -> str:
    """'grpo' or 'rloo'; a clear error for any other trainer or a TRL whose private methods moved."""
    from trl import GRPOTrainer, RLOOTrainer

    if isinstance(trainer, GRPOTrainer):
        kind, needed = "grpo", _GRPO_METHODS
    elif isinstance(trainer, RLOOTrainer):
        kind, needed = "rloo", _RLOO_METHODS
    else:
        raise TypeError(
            f"ProgressAdvantageCallback works with trl.GRPOTrainer and trl.RLOOTrainer (and their subclasses), got "
            f"{type(trainer).__name__}"
        )
    missing = [m for m in needed if not callable(getattr(trainer, m, None))]
    if missing:
        raise UnsupportedTRLError(
            f"{type(trainer).__name__} has no {', '.join(missing)}: this TRL version is not supported by "
            f"progadv_trl.trl_hooks (written for TRL {', '.join(SUPPORTED_TRL_VERSIONS)}.x)"
        )
    return kind


# ----------------------------------------------------------------------------------------------------------------
# Small accessors the callback needs (kept here because they read TRL attributes or use TRL utilities)


def unwrap(trainer, model=None):
    model = trainer.model if model is None else model
    return trainer.accelerator.unwrap_model(model)


def beta(trainer) -> float:
    return float(trainer.beta)


def temperature(trainer) -> float:
    return float(getattr(trainer, "temperature", getattr(trainer.args, "temperature", 1.0)))


def num_generations(trainer, mode: str) -> int:
    if mode == "eval":
        return int(getattr(trainer, "num_generations_eval", None) or trainer.num_generations)
    return int(trainer.num_generations)


def tokenizer(trainer):
    pc = trainer.processing_class
    return getattr(pc, "tokenizer", pc)


def trainer_reference(trainer):
    """The separate reference model the trainer loaded (beta > 0, full fine-tuning), unwrapped; else None."""
    ref = getattr(trainer, "ref_model", None)
    return None if ref is None else unwrap(trainer, ref)


def prepare_frozen_reference(trainer, model) -> None:
    """Give a separately loaded reference the fused log-prob head TRL's own passes call (`fused_lm_head=True`)."""
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, temperature=temperature(trainer), cast_lm_head_to_fp32=getattr(trainer.args, "cast_lm_head_to_fp32", False))


@contextlib.contextmanager
def rng_guard(device: torch.device | None = None):
    """Forward passes the trainer would not have run must not move its random streams (sampling, dropout)."""
    devices = []
    if device is not None and device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        yield


# ----------------------------------------------------------------------------------------------------------------
# What one capture holds


@dataclass
class RolloutBatch:
    """Per-token log-probs of one (micro-)batch of rollouts on this process, on CPU.

    policy_logps / ref_logps / mask: [B, T] over the completion tokens; `mask` = the tokens the loss and GRPO's kl
    count (completion_mask * tool_mask): the model's own tokens. rewards: [B] weighted total reward per rollout
    (NaN when every reward function returned None). rows: [B] index of each rollout in its generation batch over
    all processes; rollouts of one prompt share `rows // num_generations`. generation: a per-trainer counter of
    generation batches (same on every process), so (generation, rows // num_generations) names a prompt group.
    """

    mode: str
    policy_logps: torch.Tensor
    ref_logps: torch.Tensor
    mask: torch.Tensor
    multi_turn: bool
    rewards: torch.Tensor | None
    rows: torch.Tensor | None
    generation: int
    num_generations: int
    global_step: int = 0
    ref_pass_seconds: float = 0.0


# ----------------------------------------------------------------------------------------------------------------
# The hooks


class TrainerHooks:
    """Instance-level wrappers on one GRPOTrainer / RLOOTrainer that hand each captured `RolloutBatch` to `on_batch`.

    reference_pass: with beta == 0 TRL computes no reference log-probs; when True, one extra no-grad reference
        forward per generation batch is run here (its wall time is reported in `RolloutBatch.ref_pass_seconds`)
        with `reference` (a `reference.Reference`: a frozen model, or the PEFT model's adapters switched). When
        False and beta == 0, nothing is captured.
    on_error: called with the exception when the capture code fails; it decides whether to re-raise. TRL's own
        exceptions always propagate untouched.
    log_extras: callable(mode) -> dict of figures added to every `trainer.log` call in that mode.
    """

    def __init__(
        self,
        trainer,
        on_batch: Callable[[RolloutBatch], None],
        *,
        on_error: Callable[[BaseException], None],
        log_extras: Callable[[str], dict] | None = None,
        reference_pass: bool = False,
        reference=None,
    ):
        check_trl_version()
        self.trainer = trainer
        self.kind = trainer_kind(trainer)
        self.on_batch, self.on_error, self.log_extras = on_batch, on_error, log_extras
        self.reference_pass = reference_pass
        self.reference = reference
        self._originals: dict[str, Callable] = {}
        self._generation = 0
        self._pending = {"train": 0, "eval": 0}  # loss passes still to capture, per mode
        self._rewards_per_func = None
        self._in_loss = False
        self._loss_logps = None
        self._gen_calls: list[torch.Tensor] | None = None
        self._ref_seconds = 0.0
        self._unreported_seconds = 0.0  # reference-pass time not yet attached to a captured batch

    # -- install / uninstall -----------------------------------------------------------------------------------
    def install(self) -> "TrainerHooks":
        t = self.trainer
        if self._originals:
            return self
        wrappers = {
            "_calculate_rewards": self._wrap_calculate_rewards,
            "_generate_and_score_completions": self._wrap_generate,
            "_get_per_token_logps_and_entropies": self._wrap_logps,
            "log": self._wrap_log,
        }
        if self.kind == "grpo":
            wrappers["_compute_loss"] = self._wrap_compute_loss
        for name, make in wrappers.items():
            orig = getattr(t, name)  # the bound method (or a wrapper someone else installed on the instance)
            self._originals[name] = orig
            setattr(t, name, make(orig))
        return self

    def uninstall(self) -> None:
        for name, orig in self._originals.items():
            # Restore exactly what was there: delete our instance attribute, or put back another wrapper
            if getattr(orig, "__self__", None) is self.trainer and getattr(orig, "__func__", None) is getattr(type(self.trainer), name, None):
                self.trainer.__dict__.pop(name, None)
            else:
                setattr(self.trainer, name, orig)
        self._originals.clear()

    @property
    def installed(self) -> bool:
        return bool(self._originals)

    # -- helpers -------------------------------------------------------------------------------------------------
    def _mode(self) -> str:
        return "train" if self.trainer.model.training else "eval"

    def _safe(self, fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - capture must never break training; on_error decides
            self.on_error(e)
            return None

    def _local_rewards(self, n_local: int, device) -> torch.Tensor | None:
        """Weighted total reward of this process's rows, computed as TRL does (nansum; NaN when all are None)."""
        rpf = self._rewards_per_func
        self._rewards_per_func = None
        if rpf is None:
            return None
        t = self.trainer
        rpf = rpf.detach().float()
        w = t.reward_weights.to(rpf.device).float()
        rewards = (rpf * w.unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rpf).all(dim=1)] = float("nan")
        start = t.accelerator.process_index * n_local
        local = rewards[start : start + n_local]
        if local.numel() != n_local:  # rewards not gathered the way we expect: better no labels than wrong ones
            return None
        return local.to(device)

    def _rows(self, n_local: int, device) -> torch.Tensor:
        start = self.trainer.accelerator.process_index * n_local
        return torch.arange(start, start + n_local, device=device)

    def _reference_logps(self, out: dict, mode: str) -> torch.Tensor:
        """The opt-in reference pass (beta == 0), computed with TRL's own log-prob function so that it matches the
        policy log-probs it is subtracted from (same temperature, same padding and positions)."""
        t = self.trainer
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
        att = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        keep = out["completion_ids"].size(1)
        bs = t.args.per_device_train_batch_size if mode == "train" else t.args.per_device_eval_batch_size
        fn = self._originals["_get_per_token_logps_and_entropies"]
        t0 = time.perf_counter()
        with torch.no_grad(), rng_guard(ids.device):
            if self.reference is None:
                raise RuntimeError("reference pass requested but no reference was given")
            if self.reference.kind == "separate":
                logps, _, _ = fn(self.reference.model, ids, att, keep, batch_size=bs)
            else:
                from trl.models.utils import disable_gradient_checkpointing

                with self.reference.active(unwrap(t)), disable_gradient_checkpointing(t.model, t.args.gradient_checkpointing_kwargs):
                    logps, _, _ = fn(t.model, ids, att, keep, batch_size=bs)
        self._ref_seconds += time.perf_counter() - t0
        return logps.detach()

    def _emit(self, mode, policy, ref, mask, multi_turn, rewards, rows, seconds=0.0):
        n_gen = num_generations(self.trainer, mode)
        batch = RolloutBatch(
            mode=mode,
            policy_logps=policy.detach().float().cpu(),
            ref_logps=ref.detach().float().cpu(),
            mask=mask.detach().long().cpu(),
            multi_turn=multi_turn,
            rewards=None if rewards is None else rewards.detach().float().cpu(),
            rows=None if rows is None else rows.detach().long().cpu(),
            generation=self._generation,
            num_generations=n_gen,
            global_step=int(self.trainer.state.global_step),
            ref_pass_seconds=seconds,
        )
        self.on_batch(batch)

    def _wants_reference(self) -> bool:
        return beta(self.trainer) != 0.0 or self.reference_pass

    # -- wrappers ------------------------------------------------------------------------------------------------
    def _wrap_calculate_rewards(self, orig):
        def _calculate_rewards(*args, **kwargs):
            out = orig(*args, **kwargs)
            self._rewards_per_func = out  # [N_all_processes, n_funcs]; read right after in the same generation
            return out

        return _calculate_rewards

    def _wrap_logps(self, orig):
        def _get_per_token_logps_and_entropies(*args, **kwargs):
            out = orig(*args, **kwargs)
            if self._in_loss and self._loss_logps is None:
                self._loss_logps = out[0].detach()
            elif self._gen_calls is not None:
                self._gen_calls.append(out[0].detach())
            return out

        return _get_per_token_logps_and_entropies

    def _wrap_generate(self, orig):
        def _generate_and_score_completions(inputs):
            mode = self._mode()
            self._rewards_per_func = None
            self._gen_calls = [] if self.kind == "rloo" else None
            try:
                out = orig(inputs)
            finally:
                gen_calls, self._gen_calls = self._gen_calls, None
            self._generation += 1
            self._pending[mode] = 0
            if self._wants_reference():
                self._safe(self._after_generate, out, mode, gen_calls)
            return out

        return _generate_and_score_completions

    def _after_generate(self, out: dict, mode: str, gen_calls):
        t = self.trainer
        mask = out["completion_mask"]
        tool_mask = out.get("tool_mask")
        if tool_mask is not None:
            mask = mask * tool_mask
        n_local = mask.size(0)
        rewards = self._local_rewards(n_local, mask.device)
        rows = self._rows(n_local, mask.device)
        self._ref_seconds = 0.0
        if self.kind == "rloo":
            # RLOO: first forward at generation = the policy; second = the reference (beta > 0)
            policy = gen_calls[0]
            ref = gen_calls[1] if beta(t) != 0.0 else self._reference_logps(out, mode)
            self._emit(mode, policy, ref, mask, False, rewards, rows, self._ref_seconds)
            return
        ref = out.get("ref_per_token_logps")
        if ref is None:
            ref = self._reference_logps(out, mode)
        if out.get("old_per_token_logps") is not None:
            self._emit(mode, out["old_per_token_logps"], ref, mask, tool_mask is not None, rewards, rows, self._ref_seconds)
            return
        # Policy log-probs come from the loss's first pass over each micro-batch: tag the rows so they survive
        # TRL's shuffle and split, and count how many loss passes belong to this generation's first iteration.
        out[ROWS_KEY] = rows
        if rewards is not None:
            out[REWARDS_KEY] = rewards
        if "ref_per_token_logps" not in out:
            out[REF_KEY] = ref
        self._unreported_seconds = self._ref_seconds
        self._pending[mode] = t.args.steps_per_generation if mode == "train" else 1

    def _wrap_compute_loss(self, orig):
        def _compute_loss(model, inputs):
            mode = self._mode()
            if self._pending.get(mode, 0) <= 0 or ROWS_KEY not in inputs:
                return orig(model, inputs)
            self._pending[mode] -= 1
            self._in_loss, self._loss_logps = True, None
            try:
                loss = orig(model, inputs)
            finally:
                self._in_loss = False
            logps, self._loss_logps = self._loss_logps, None
            if logps is not None:
                self._safe(self._after_loss, inputs, logps, mode)
            return loss

        return _compute_loss

    def _after_loss(self, inputs: dict, logps: torch.Tensor, mode: str):
        mask = inputs["completion_mask"]
        tool_mask = inputs.get("tool_mask")
        if tool_mask is not None:
            mask = mask * tool_mask
        ref = inputs.get("ref_per_token_logps")
        if ref is None:
            ref = inputs[REF_KEY]
        # The reference pass ran once per generation batch: its time goes with the first micro-batch captured
        seconds, self._unreported_seconds = self._unreported_seconds, 0.0
        self._emit(mode, logps, ref, mask, tool_mask is not None, inputs.get(REWARDS_KEY), inputs[ROWS_KEY], seconds)

    def _wrap_log(self, orig):
        def log(logs, *args, **kwargs):
            if self.log_extras is not None:
                extra = self._safe(self.log_extras, self._mode())
                if extra:
                    for k, v in extra.items():
                        logs.setdefault(k, v)
            return orig(logs, *args, **kwargs)

        return log
