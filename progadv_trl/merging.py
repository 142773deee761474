"""The merged reference: pi_alpha = pi_ref + alpha * (pi_theta - pi_ref) in weight space, scored in place of pi_ref.

The score is then beta * sum over a step's tokens of log pi_theta - log pi_alpha: alpha = 0 is the plain progress
advantage, alpha = 1 gives 0 everywhere, and values between temper the log-ratio where the policy moved furthest
from its reference (the paper's public code offers the same knob). Merges of the task vector tau = pi_theta - pi_ref:

    linear       pi_ref + alpha * tau                                   (torch.lerp: exact at alpha = 0 and 1)
    ties         pi_ref + alpha * ties([tau], density)                 (PEFT's `merge_utils.ties`)
    dare_linear  pi_ref + alpha * dare_linear([tau], density)          (random drop, rescaled by 1 / density)
    dare_ties    pi_ref + alpha * dare_ties([tau], density)

With one task vector, TIES's sign election and disjoint mean keep every surviving entry, so "ties" is its trim
step (keep the `density` largest |tau| of each tensor) and "dare_ties" equals "dare_linear"; the names are PEFT's.
The masks are drawn once per tensor from `seed` and are the same for every alpha, so a sweep moves along one
direction. The math is PEFT's (`peft.utils.merge_utils`); this module only decides which tensors it runs on.

Where the weights come from, by the reference's kind (`reference.py`):

    separate          (a full-weight pair) the reference model's parameters point at working tensors, rewritten in
                      place for each alpha, only inside `active()`; the original tensors are never written, so the
                      reference is restored bitwise. Memory: one more copy of the reference's weights.
    adapter_disabled  (a LoRA policy on its base) linear: the adapter scaled by alpha with PEFT's
                      `rescale_adapter_scale`, no copy at all. ties/dare: the adapter's delta weight (PEFT's
                      `get_delta_weight`) is pruned and added to working copies of the adapted layers' base weights,
                      swapped in with the adapter disabled; memory: one copy of the adapted layers. PEFT's
                      `add_weighted_adapter(combination_type="ties"|"dare_*")` is not used: it prunes the A and B
                      factors separately (prune(B) @ prune(A) is not prune(B @ A)), and its "*_svd" variants prune
                      B @ A but truncate the result back to rank r, which discards part of what survived pruning.
                      Neither is the task-vector merge a full-weight pair gets.
    named_adapter     (TRL's "ref" adapter) not supported: pi_alpha would need both adapters active at once.

The engine runs the policy outside `Reference.active` and the reference inside it, so the policy pass always sees
the unscaled adapter / the untouched policy. A sweep (`alpha_sweep`) runs the policy's pass once and the reference's
pass once per alpha (`ProgressScorer.reference_logp`); with support statistics (which need both models' rows) both
passes run per alpha.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .reference import ADAPTER_DISABLED, SEPARATE, Reference, active_adapter, is_peft_model, resolve
from .config import MERGES

_PRUNED = ("ties", "dare_linear", "dare_ties")


def check_merge(merge: str, density: float | None) -> None:
    """A clear ValueError for an unknown merge or a missing / out-of-range density (ties and DARE need one)."""
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    if merge in _PRUNED:
        if density is None:
            raise ValueError(f"merge {merge!r} needs density: the fraction of the task vector's entries kept, in (0, 1]")
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], got {density}")


def merged_direction(tau: torch.Tensor, merge: str, density: float | None) -> torch.Tensor:
    """The merged task vector of one tensor (weight 1): what PEFT's merge of the single task `tau` gives.

    DARE draws its mask from torch's global generator (PEFT takes no generator); callers seed it (`_seeded`)."""
    if merge == "linear" or density == 1:  # density 1 keeps every entry (PEFT would warn and return tau)
        return tau
    from peft.utils import merge_utils

    one = torch.ones(1, dtype=tau.dtype, device=tau.device)
    fn = {"ties": merge_utils.ties, "dare_linear": merge_utils.dare_linear, "dare_ties": merge_utils.dare_ties}[merge]
    return fn([tau], one, density)


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's generators for DARE's masks without disturbing the caller's random state."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 weights are merged in float32 and rounded once; float64 stays float64.
    return torch.promote_types(dtype, torch.float32)


@dataclass(eq=False)
class MergedReference(Reference):
    """pi_alpha as a `Reference`: `model_for(policy)` under `active(policy)` computes it. Build it with
    `merged_reference`; move it along the sweep with `set_alpha`; drop its working tensors with `release`."""

    alpha: float = 0.0
    merge: str = "linear"
    density: float | None = None
    seed: int = 0
    base: Reference | None = field(default=None, repr=False)  # the pi_ref this merges toward the policy from
    _policy: Any = field(default=None, repr=False)
    # (parameter, original tensor, target tensor, working tensor): separate -> target is the policy's parameter;
    # adapter_disabled ties/dare -> target is None and the adapter's delta is read from `_layers`.
    _slots: list = field(default_factory=list, repr=False)
    _layers: list = field(default_factory=list, repr=False)  # adapter_disabled: the LoraLayers of the adapter
    _adapter: str | None = field(default=None, repr=False)  # adapter_disabled: the adapter pi_alpha scales

    def __post_init__(self):
        super().__post_init__()
        check_merge(self.merge, self.density)

    # -- building ---------------------------------------------------------------------------------------------
    def _bind(self, policy) -> None:
        self._policy = policy
        if self.kind == SEPARATE:
            self._bind_separate(policy)
        elif self.kind == ADAPTER_DISABLED:
            self._bind_lora(policy)
        else:
            raise ValueError(
                f"a merged reference needs a separate reference model or a LoRA policy on its base; got "
                f"{self.base.describe()}: pi_alpha would need both adapters active at once; merge that adapter into "
                "the base first (then the base, adapter disabled, is pi_ref)"
            )

    def _bind_separate(self, policy) -> None:
        ref = self.model
        if ref is None:
            raise ValueError("the reference is recorded by identity only; load its weights before merging")
        if is_peft_model(policy):
            raise ValueError(
                "a PEFT policy with a separate reference model: their weights do not line up by name; merge the "
                "adapter (merge_and_unload) first, or use its base as the reference (adapter disabled)"
            )
        theirs = dict(policy.named_parameters())
        for name, p in ref.named_parameters():
            q = theirs.pop(name, None)
            if q is None or q.shape != p.shape:
                got = "missing" if q is None else f"shape {tuple(q.shape)}"
                raise ValueError(f"policy and reference differ at {name!r}: reference {tuple(p.shape)}, policy {got}")
            self._slots.append((p, p.data, q.data, torch.empty_like(p.data)))
        if theirs:
            raise ValueError(f"the policy has parameters the reference lacks: {sorted(theirs)[:5]}")

    def _bind_lora(self, policy) -> None:
        from peft import PeftType
        from peft.tuners.lora import LoraLayer

        adapter = self._adapter = active_adapter(policy)
        cfg = policy.peft_config[adapter]
        if cfg.peft_type != PeftType.LORA:
            raise ValueError(f"a merged reference on an adapter needs LoRA; adapter {adapter!r} is {cfg.peft_type}")
        # What scaling cannot reach: DoRA normalises W + s*BA (not linear in s); modules_to_save / trainable tokens
        # are full copies that the adapter-disabled reference does not use but a scaled adapter still would.
        if getattr(cfg, "use_dora", False):
            raise ValueError("DoRA adapters are not linear in their scale; merge the adapter and use a separate reference")
        if getattr(cfg, "modules_to_save", None) or getattr(cfg, "trainable_token_indices", None):
            raise ValueError(
                "the adapter trains full modules (modules_to_save / trainable_token_indices), which scaling cannot "
                "interpolate; merge it (merge_and_unload) and use a separate reference"
            )
        self._layers = [m for m in policy.modules() if isinstance(m, LoraLayer) and adapter in m.scaling]
        if not self._layers:
            raise ValueError(f"adapter {adapter!r} has no LoRA layers")
        if any(getattr(m, "merged", False) for m in self._layers):
            raise ValueError("the adapter is merged into the base weights; unmerge it (policy.unmerge_adapter()) first")
        if self.merge == "linear":
            return
        for layer in self._layers:
            w = layer.get_base_layer().weight
            if not w.dtype.is_floating_point:
                raise ValueError(f"{self.merge} on a LoRA policy rewrites base weights; {type(w).__name__} ({w.dtype}) is quantised")
            self._slots.append((w, w.data, None, torch.empty_like(w.data)))

    # -- moving along the sweep -----------------------------------------------------------------------------------
    @torch.no_grad()
    def set_alpha(self, alpha: float) -> "MergedReference":
        """Rewrite the working tensors for this alpha, in place (no new allocation); the originals stay as they were."""
        alpha = float(alpha)
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got {alpha}")
        self.alpha = alpha
        if not self._slots:
            return self  # LoRA linear: the scale is applied in `active`
        with _seeded(self.seed) if self.merge.startswith("dare") else contextlib.nullcontext():
            for i, (_, orig, target, work) in enumerate(self._slots):
                cdt = _compute_dtype(orig.dtype)
                if self.merge == "linear":  # lerp: exactly orig at alpha 0, exactly target at alpha 1
                    work.copy_(torch.lerp(orig.to(cdt), target.to(orig.device, cdt), alpha))
                    continue
                if target is not None:
                    tau = target.to(orig.device, cdt) - orig.to(cdt)
                else:  # the LoRA layer's s * B @ A, in its base weight's layout
                    tau = self._layers[i].get_delta_weight(self._adapter).to(orig.device, cdt)
                    if tau.shape != orig.shape:
                        raise ValueError(f"LoRA delta {tuple(tau.shape)} does not match its base weight {tuple(orig.shape)}")
                work.copy_(orig.to(cdt) + alpha * merged_direction(tau, self.merge, self.density))
        return self

    def release(self) -> None:
        """Drop the working tensors (the reference itself was never changed)."""
        self._slots, self._layers, self._policy = [], [], None

    # -- the Reference protocol -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def active(self, policy):
        """Within this context, `model_for(policy)` computes pi_alpha; on exit everything is as it was."""
        if policy is not self._policy:
            raise ValueError("this merged reference was built for another policy (or released); build it with merged_reference")
        if self.kind == ADAPTER_DISABLED and self.merge == "linear":
            from peft.helpers import rescale_adapter_scale

            with rescale_adapter_scale(policy, self.alpha):
                yield
            return
        with policy.disable_adapter() if self.kind == ADAPTER_DISABLED else contextlib.nullcontext():
            done = []
            try:
                for p, _, _, work in self._slots:
                    p.data = work  # a pointer swap: the original tensor is never written
                    done.append(p)
                yield
            finally:
                for p, (_, orig, _, _) in zip(done, self._slots):
                    p.data = orig

    def describe(self) -> str:
        how = self.merge if self.merge == "linear" else f"{self.merge}, density {self.density}, seed {self.seed}"
        base = self.base.describe() if self.base is not None else self.kind
        return f"pi_ref + {self.alpha:g} * (pi_theta - pi_ref) ({how}), pi_ref being {base}"


def merged_reference(
    policy,
    reference=None,
    *,
    alpha: float,
    merge: str = "linear",
    density: float | None = None,
    seed: int = 0,
) -> MergedReference:
    """pi_alpha for `policy` against `reference` (anything `reference.resolve` takes: a model, a `Reference`, None
    for a LoRA policy on its base). Pass it as `ProgressScorer(policy, tokenizer, reference=...)`."""
    base = resolve(policy, reference)
    if isinstance(base, MergedReference):
        raise ValueError("the reference is already merged; pass its `base`")
    merged = MergedReference(
        base.kind, model=base.model, adapter=base.adapter, identity=base.identity,
        merge=merge, density=density, seed=seed, base=base,
    )  # fmt: skip
    merged._bind(policy)
    return merged.set_alpha(alpha)


def alpha_sweep(
    scorer_or_pair,
    trajectories,
    alphas,
    merge: str = "linear",
    *,
    density: float | None = None,
    seed: int = 0,
    **score_kwargs,
) -> dict[float, list]:
    """{alpha: ProgressScorer.score(trajectories) with pi_alpha as the reference}, the weights loaded once.

    `scorer_or_pair`: a `ProgressScorer`, or (policy_path, reference_path) for `ProgressScorer.from_pretrained`
    (reference_path None for a LoRA adapter directory). The scorer's own reference is back in place afterwards,
    and a separate reference model's weights are bitwise what they were. The trajectories are rendered once and the
    policy's pass runs once (its statistics do not depend on the reference); each alpha costs one reference pass
    (two passes when the scorer computes support statistics). The same numbers as `score` per alpha. `score_kwargs`:
    with_token_ratios, skipped (filled once), progress. `density` (the fraction of each tensor's task-vector entries
    kept) and `seed` (DARE's mask) matter only to ties and DARE.
    """
    import dataclasses

    # here, so engine.py may one day build a merged reference without a cycle
    from .engine import ProgressScorer, _warn_faults, finish_score

    bad = set(score_kwargs) - {"with_token_ratios", "skipped", "progress"}
    if bad:
        raise TypeError(f"alpha_sweep: unexpected keyword arguments {sorted(bad)}")
    check_merge(merge, density)
    alphas = [float(a) for a in alphas]
    if not alphas:
        raise ValueError("alphas is empty")
    if isinstance(scorer_or_pair, ProgressScorer):
        scorer = scorer_or_pair
    else:
        policy_path, reference_path = scorer_or_pair
        scorer = ProgressScorer.from_pretrained(policy_path, reference_path)
    progress = score_kwargs.get("progress", False)
    trajs, rendered = scorer.render(trajectories, score_kwargs.get("skipped"))
    base = scorer.reference
    merged = merged_reference(scorer.policy, base, alpha=alphas[0], merge=merge, density=density, seed=seed)
    out: dict[float, list] = {}
    stats = None
    try:
        for a in alphas:
            scorer.reference = merged.set_alpha(a)
            if stats is None or scorer.config.wants_support:
                stats = scorer.token_stats(rendered, progress=progress)
            else:  # the policy's statistics kept, the reference's replaced
                ref = scorer.reference_logp(rendered, progress=progress)
                stats = [dataclasses.replace(st, reference_logp=r) for st, r in zip(stats, ref, strict=True)]
            out[a] = [finish_score(t, r, st, scorer.config, with_token_ratios=score_kwargs.get("with_token_ratios", False))
                      for t, r, st in zip(trajs, rendered, stats)]  # fmt: skip
            _warn_faults(out[a])
    finally:
        scorer.reference = base
        merged.release()
    return out
