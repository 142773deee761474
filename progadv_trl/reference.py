"""The one answer to "which model is the reference?", for scoring, export, loading and the training callback.

A policy's reference is one of:

    separate          a model of its own: a full fine-tune's initial checkpoint, TRL's `ref_model`, a base model
                      loaded next to an instruct model. `identity` may also record it by hub id + revision (a
                      bundle then stores the record instead of the weights).
    adapter_disabled  a PEFT policy with every adapter disabled: LoRA trained on a base, so the base is pi_ref and
                      no second copy of the weights is held.
    named_adapter     a PEFT policy with another of its adapters active: TRL's frozen "ref" adapter, which TRL adds
                      when it trains an existing adapter with beta > 0.

`resolve` turns what a caller has (a policy, maybe a model or an adapter name) into a `Reference`; `from_trainer`
does it for a GRPOTrainer / RLOOTrainer as TRL itself would; `load_pair` does it from checkpoint paths. The bundle
(bundle/export.py, bundle/load.py), the engine and the callback all ask here and nowhere else.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEPARATE, ADAPTER_DISABLED, NAMED_ADAPTER = "separate", "adapter_disabled", "named_adapter"
KINDS = (SEPARATE, ADAPTER_DISABLED, NAMED_ADAPTER)
TRL_REF_ADAPTER = "ref"  # the name TRL gives the frozen copy of an adapter it trains with beta > 0


def is_peft_model(model) -> bool:
    """The one PEFT check of the library."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def is_adapter_dir(path) -> bool:
    return Path(path, "adapter_config.json").is_file()


def active_adapter(peft_model) -> str:
    a = peft_model.active_adapter
    return a[0] if isinstance(a, (list, tuple)) else a


@dataclass
class Reference:
    """How to get pi_ref's log-probs next to a given policy. Build it with `resolve`, `from_trainer` or `load_pair`."""

    kind: str
    model: Any = None  # separate: the reference model (None while only recorded by identity)
    adapter: str | None = None  # named_adapter: the adapter that is pi_ref
    identity: dict | None = None  # {"repo_id", "revision", "path"?}: a separate reference known by its hub identity

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"reference kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == NAMED_ADAPTER and not self.adapter:
            raise ValueError("a named_adapter reference needs the adapter's name")

    def model_for(self, policy):
        """The module whose forward pass, under `active(policy)`, gives the reference's log-probs."""
        if self.kind == SEPARATE:
            if self.model is None:
                raise ValueError(
                    f"the reference {self.identity.get('repo_id') if self.identity else ''} is recorded by identity "
                    "only; load its weights first (bundle.load_bundle, or pass a model)"
                )
            return self.model
        return policy

    @contextlib.contextmanager
    def active(self, policy):
        """Within this context, `model_for(policy)` computes pi_ref (adapters switched as TRL's `use_adapter` does)."""
        if self.kind == SEPARATE:
            yield
        elif self.kind == ADAPTER_DISABLED:
            with policy.disable_adapter():
                yield
        else:
            previous = policy.active_adapter
            policy.set_adapter(self.adapter)
            try:
                yield
            finally:
                policy.set_adapter(previous)

    def describe(self) -> str:
        if self.kind == SEPARATE:
            src = getattr(getattr(self.model, "config", None), "_name_or_path", None) if self.model is not None else None
            who = (self.identity or {}).get("repo_id") or src
            return f"a separate model{f' ({who})' if who else ''}"
        if self.kind == ADAPTER_DISABLED:
            return "the policy with its adapter disabled (the base model)"
        return f"the policy's adapter {self.adapter!r}"


def resolve(policy, reference=None, *, adapter: str | None = None, identity: dict | None = None) -> Reference:
    """The rule, in order: a `Reference` is taken as is; a model is a separate reference; `adapter=` names the
    adapter that is pi_ref; a PEFT policy that also holds TRL's "ref" adapter uses it (as TRL's own KL term does);
    any other PEFT policy's reference is itself with adapters disabled. A full-weight policy needs a model."""
    if isinstance(reference, Reference):
        return reference
    if reference is not None and not (reference is policy and is_peft_model(policy)):
        # (a PEFT policy passed as its own reference means "adapters off", below)
        return Reference(SEPARATE, model=reference, identity=identity)
    if identity is not None and not is_peft_model(policy):
        return Reference(SEPARATE, identity=identity)
    if is_peft_model(policy):
        if adapter is not None:
            if adapter not in policy.peft_config:
                raise ValueError(f"reference adapter {adapter!r} is not one of the policy's adapters {list(policy.peft_config)}")
            return Reference(NAMED_ADAPTER, adapter=adapter)
        if TRL_REF_ADAPTER in policy.peft_config and active_adapter(policy) != TRL_REF_ADAPTER:
            return Reference(NAMED_ADAPTER, adapter=TRL_REF_ADAPTER)
        return Reference(ADAPTER_DISABLED, identity=identity)
    if adapter is not None:
        raise ValueError("a reference adapter needs a PEFT policy")
    raise ValueError(
        "no reference: pass `reference=` (a model), a PEFT policy (its adapter is disabled for the reference), or a "
        "`Reference`"
    )


# ----------------------------------------------------------------------------------------------------------------
# From a trainer


def from_trainer(trainer, override=None) -> Reference:
    """The reference the trainer's KL term uses, as TRL defines it:

    `override` (a model or a checkpoint path) wins; else the trainer's `ref_model` (beta > 0, full fine-tuning);
    else, for a PEFT model, its "ref" adapter when TRL made one, or its adapters disabled; else (beta == 0 and full
    fine-tuning: TRL loaded no reference) a frozen copy of the initial checkpoint, loaded once here from
    `model.config._name_or_path`, which must be a local directory.
    """
    from . import trl_hooks

    policy = trl_hooks.unwrap(trainer)
    if override is None:
        ref = trl_hooks.trainer_reference(trainer)
        if ref is not None:
            return Reference(SEPARATE, model=ref)
        if is_peft_model(policy):
            return resolve(policy)
    return Reference(SEPARATE, model=_frozen_copy(policy, override))


def _frozen_copy(policy, source):
    """A frozen reference on the policy's device and dtype: `source` (model or path), else the initial checkpoint."""
    if source is None or isinstance(source, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM

        path = source if source is not None else getattr(policy.config, "_name_or_path", None)
        if not path or (source is None and not Path(str(path)).exists()):
            raise ValueError(
                "held-out scoring needs a reference: the trainer has none (beta == 0, full fine-tuning) and the "
                f"model's initial checkpoint {path!r} is not a local directory; pass reference= (a model or a path)"
            )
        source = AutoModelForCausalLM.from_pretrained(str(path), dtype=next(policy.parameters()).dtype)
    ref = source.to(next(policy.parameters()).device).eval()
    ref.requires_grad_(False)
    return ref


# ----------------------------------------------------------------------------------------------------------------
# From checkpoint paths


def resolve_dtype(dtype):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return "auto"
    return getattr(torch, str(dtype))


def has_tokenizer(path) -> bool:
    p = Path(path)
    return (p / "tokenizer_config.json").is_file() or (p / "tokenizer.json").is_file()


def load_pair(policy_path, reference_path=None, *, dtype=None, device=None, trust_remote_code=False):
    """(policy, Reference, tokenizer) from checkpoint directories.

    A LoRA adapter directory as `policy_path` loads its base (or `reference_path`) once, wraps it as a PeftModel,
    and the reference is that model with the adapter disabled. A full-weight policy needs `reference_path`.
    """
    from transformers import AutoModelForCausalLM

    kw = dict(trust_remote_code=trust_remote_code)
    if dtype is not None:
        kw["dtype"] = resolve_dtype(dtype)
    policy_path = str(policy_path)
    if is_adapter_dir(policy_path):
        from peft import PeftConfig, PeftModel

        base_path = reference_path or PeftConfig.from_pretrained(policy_path).base_model_name_or_path
        if not base_path:
            raise ValueError(f"{policy_path} is a LoRA adapter with no base model recorded: pass the reference path")
        base = AutoModelForCausalLM.from_pretrained(base_path, **kw)
        policy = PeftModel.from_pretrained(base, policy_path)
        reference = Reference(ADAPTER_DISABLED)
        tokenizer = pick_tokenizer(policy_path, str(base_path), adapter=True, trust_remote_code=trust_remote_code)
    else:
        if reference_path is None:
            raise ValueError("a full-weight policy needs a reference: pass reference_path")
        policy = AutoModelForCausalLM.from_pretrained(policy_path, **kw)
        reference = Reference(SEPARATE, model=AutoModelForCausalLM.from_pretrained(str(reference_path), **kw).eval())
        tokenizer = pick_tokenizer(policy_path, str(reference_path), adapter=False, trust_remote_code=trust_remote_code)
    if device is not None:
        policy.to(device)
        if reference.model is not None:
            reference.model.to(device)
    return policy.eval(), reference, tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def pick_tokenizer(policy_path: str, other_path: str, *, adapter: bool, trust_remote_code: bool = False):
    """The one tokenizer both models read: the policy directory's when it has one, else the reference's (an
    adapter's base). When both have one they must agree on vocabulary, chat template and the ids of a probe
    conversation (`check_same_tokenizer`); the refusal says which directory's tokenizer to use.

    The probe matters for adapters: an adapter directory has no config.json, so transformers 5 loads its tokenizer
    by the class its tokenizer_config.json names (TokenizersBackend: tokenizer.json as written), while the base
    directory's config.json (model_type qwen2, say) selects Qwen2Tokenizer, which builds its own normalizer and
    pre-tokenizer. The same files can then give different ids for the same conversation.
    """
    from transformers import AutoTokenizer

    from .rendering import check_same_tokenizer

    def load(path):
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)

    if not has_tokenizer(policy_path):
        return load(other_path)
    tokenizer = load(policy_path)
    other = None
    if other_path != policy_path:
        if has_tokenizer(other_path):
            other = load(other_path)
        elif not Path(other_path).exists():  # a hub id: its tokenizer is in the cache if the model was fetched with it
            try:
                other = load(other_path)
            except (OSError, ValueError):
                warnings.warn(f"could not load {other_path}'s tokenizer to compare it with {policy_path}'s", stacklevel=3)
    if other is None:
        return tokenizer
    if adapter:
        names = (f"adapter's ({policy_path})", f"base model's ({other_path})")
        hint = (
            f"Use the base model's tokenizer: the reference is that model, and a trainer started from it loads this one. "
            f"Delete the tokenizer files in {policy_path} ({', '.join(f for f in TOKENIZER_FILES if Path(policy_path, f).is_file())}) "
            f"or copy {other_path}'s over them. (If the adapter was really trained with its own tokenizer, save that one "
            f"into a copy of {other_path} instead and pass it as the reference.)"
        )
    else:
        names = (f"policy's ({policy_path})", f"reference's ({other_path})")
        hint = (
            f"Use the policy's tokenizer ({policy_path}): it is the one the policy was trained with. If the reference "
            f"was trained with it too, copy {policy_path}'s tokenizer files into {other_path}; otherwise these two "
            "checkpoints do not belong together."
        )
    check_same_tokenizer(tokenizer, other, names, hint)
    if adapter and type(tokenizer) is not type(other):
        warnings.warn(
            f"the adapter {policy_path} carries its own tokenizer, which loads as {type(tokenizer).__name__} while its "
            f"base {other_path} loads as {type(other).__name__}. They agree on vocabulary, chat template and the ids of "
            "a probe conversation with tool calls, non-ASCII text and digits, so the adapter's is used: it is the one "
            "saved with the adapter.",
            stacklevel=3,
        )
    return tokenizer
