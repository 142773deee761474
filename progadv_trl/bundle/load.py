"""Loading a verified bundle: `load_bundle` -> (policy, tokenizer, reference (a `reference.Reference`), manifest)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from ..reference import ADAPTER_DISABLED, SEPARATE, Reference
from .layout import DEFAULT_DIRS, MANIFEST_NAME, BundleError
from .verify import verify_bundle
from .weights import _check_vocab_fits


def load_bundle(
    path: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    reference_path: str | os.PathLike | None = None,
    device: str | None = None,
    dtype=None,
):
    """Verify a bundle, then load it: (policy, tokenizer, reference, manifest); `reference` is a
    `reference.Reference` that `ProgressScorer` takes as is.

    A LoRA bundle gives a `peft.PeftModel` policy whose reference is that model with its adapter disabled (the base,
    held once); a full bundle gives two models. Raises `BundleError` listing every problem found.
    """
    report = verify_bundle(path, trust_remote_code=trust_remote_code, reference_path=reference_path)
    report.raise_for_errors()
    for w in report.warnings:
        warnings.warn(w, stacklevel=2)
    root, manifest = Path(path), report.manifest
    if manifest is None or report.reference_dir is None:  # verify_bundle reports an error whenever either is missing
        raise BundleError(
            f"{root} passed verification without a readable manifest or a reference folder, so it cannot be loaded. "
            "Run `progadv inspect` on it and re-export the bundle"
        )
    kw: dict[str, Any] = dict(trust_remote_code=trust_remote_code, use_safetensors=True)
    if dtype is not None:
        from ..reference import resolve_dtype

        kw["dtype"] = resolve_dtype(dtype)
    pol = manifest["policy"]
    policy, reference = _load_policy_and_reference(pol, root / (pol.get("dir") or DEFAULT_DIRS["policy"]), report.reference_dir, kw)
    tokenizer = report.tokenizer
    if tokenizer is None:  # pragma: no cover - verify_bundle loads it
        from transformers import AutoTokenizer

        tok_dir = root / (manifest["tokenizer"].get("dir") or DEFAULT_DIRS["tokenizer"])
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=trust_remote_code)
    _check_vocab_fits(policy.get_base_model() if pol["kind"] == "lora" else policy, tokenizer, "policy")
    if reference.model is not None:
        _check_vocab_fits(reference.model, tokenizer, "reference")
    if device is not None:
        policy.to(device)
        if reference.model is not None:
            reference.model.to(device)
    policy.eval()
    if reference.model is not None:
        reference.model.eval()
    return policy, tokenizer, reference, manifest


# ----------------------------------------------------------------------------------------------------------------
# The reference decision at load: which model is the reference. Nothing else in load decides it.


def _load_policy_and_reference(pol: dict, pol_dir: Path, reference_dir: Path, kw: dict):
    """(policy, Reference) from the manifest's policy section and the verified reference folder.

    - policy kind "lora": the reference folder holds the adapter's base; the policy is the PeftModel on it and the
      reference is that model with its adapter disabled;
    - policy kind "full": policy and reference are two models, the reference read from the reference folder (the
      bundle's reference/, or the folder of a reference recorded by identity).
    """
    from transformers import AutoModelForCausalLM

    if pol["kind"] == "lora":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(reference_dir, **kw)
        return PeftModel.from_pretrained(base, pol_dir, is_trainable=False), Reference(ADAPTER_DISABLED)
    if pol["kind"] == "full":
        policy = AutoModelForCausalLM.from_pretrained(pol_dir, **kw)
        return policy, Reference(SEPARATE, model=AutoModelForCausalLM.from_pretrained(reference_dir, **kw))
    raise BundleError(f"unknown policy kind {pol['kind']!r} in {MANIFEST_NAME}; upgrade progadv_trl or re-export")
