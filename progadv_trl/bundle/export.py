"""Writing a bundle: `export_bundle` (from models in memory) and `export_from_paths` (from checkpoint folders).

The layout is drawn in the package docstring (bundle/__init__.py); its names are in layout.py.

What the reference is and how it is stored is decided in one place: `resolve_for_export` (the library's
reference resolver, reference.py, plus the checks that keep export explicit), then `choose_layout` and
`_record_identity` for a reference recorded by identity; everything after it only carries that decision out.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ..config import ATTRIBUTION_RULES, ScoringConfig
from ..reference import (
    ADAPTER_DISABLED,
    NAMED_ADAPTER,
    SEPARATE,
    TRL_REF_ADAPTER,
    Reference,
    active_adapter,
    is_peft_model,
    resolve,
)
from .card import model_card
from .files import _check_target, _fsync_path, _fsync_tree, _hash_dir, _new_tmp_dir, _publish, _refuse_pickle_written, _write_json
from .identity import _check_identity_matches, _identity_record
from .layout import MANIFEST_NAME, POLICY_DIR, README_NAME, REFERENCE_DIR, TOKENIZER_DIR, BundleError
from .manifest import _manifest_head, _manifest_tail, to_manifest_json, tokenizer_fingerprint
from .weights import _check_vocab_fits, _model_info, _save_adapter, _save_full, _unwrap, peft_state_dict

LAYOUTS = ("lora", "two_adapters", "merged_policy", "full")


# ----------------------------------------------------------------------------------------------------------------
# The reference decision: what the reference is, and how it is stored. Nothing else in export decides it.


def resolve_for_export(policy, reference, reference_identity: dict | None, reference_adapter: str | None) -> Reference:
    """The reference to store, through the library's one resolver (`reference.resolve`), after the checks that
    make export explicit: a PEFT policy that holds TRL's "ref" adapter must say which reference it means."""
    if isinstance(reference, Reference):
        if reference_adapter is not None or reference_identity is not None:
            raise BundleError("give a Reference, or reference_adapter= / reference_identity=, not both")
        return reference
    peft = is_peft_model(policy)
    if reference_adapter is not None and not peft:
        raise BundleError("reference_adapter= needs a PeftModel policy")
    if not peft:
        if reference is None and reference_identity is None:
            raise BundleError("a full-weight policy needs its reference: pass reference= (a model) or reference_identity=")
        return resolve(policy, reference, identity=reference_identity)
    active, adapters = active_adapter(policy), list(policy.peft_config)
    if reference_adapter is not None:
        if reference_adapter not in adapters:
            raise BundleError(f"reference_adapter {reference_adapter!r} is not one of the policy's adapters {adapters}")
        if reference is not None or reference_identity is not None:
            raise BundleError("give reference_adapter= or reference=/reference_identity=, not both")
    elif (reference is None or reference is policy) and TRL_REF_ADAPTER in adapters and active != TRL_REF_ADAPTER:
        raise BundleError(
            f"the policy has a 'ref' adapter besides {active!r} (TRL adds one when training an existing "
            "adapter with beta > 0): the reference is that adapter, not the bare base model. Pass "
            "reference_adapter='ref'"
        )
    return resolve(policy, None if reference is policy else reference, adapter=reference_adapter, identity=reference_identity)


def choose_layout(policy, reference: Reference) -> str:
    """How a policy and its resolved reference are stored, one of LAYOUTS:

    - "lora": a PeftModel policy whose reference is its base model with the adapter disabled: the adapter is stored
      in policy/, the unmerged base once in reference/ (or recorded by identity);
    - "two_adapters": a PeftModel whose reference is another of its adapters (TRL's "ref"): both stored merged,
      as full weights;
    - "merged_policy": a PeftModel policy with a separate reference model: the policy stored merged;
    - "full": plain models, the reference stored in reference/ or recorded by identity.
    """
    if not is_peft_model(policy):
        if reference.kind != SEPARATE:
            raise BundleError(f"a full-weight policy cannot have {reference.describe()} as its reference")
        return "full"
    return {ADAPTER_DISABLED: "lora", NAMED_ADAPTER: "two_adapters", SEPARATE: "merged_policy"}[reference.kind]


def _record_identity(layout: str, policy, reference, reference_identity: dict | None) -> dict | None:
    """The manifest's record of a reference recorded by identity (None: the reference is stored), after checking
    that the files it names hold the weights of the reference chosen by `choose_layout`."""
    if reference_identity is None:
        return None
    identity_rec, _ = _identity_record(reference_identity)
    if layout == "lora":
        _check_identity_matches(peft_state_dict(policy, None), reference_identity, identity_rec)
    elif reference is not None:
        _check_identity_matches(reference.state_dict(), reference_identity, identity_rec)
    return identity_rec


# ----------------------------------------------------------------------------------------------------------------
# Export


def export_bundle(
    out_dir: str | os.PathLike,
    policy,
    reference=None,
    tokenizer=None,
    *,
    scoring_config: ScoringConfig | None = None,
    max_length: int | None = None,
    training: dict | None = None,
    heldout_metrics: dict | None = None,
    calibration: dict | None = None,
    heldout_fingerprint: str | None = None,
    reduction_choice: dict | str | None = None,
    reference_identity: dict | None = None,
    reference_adapter: str | None = None,
    attribution: dict | None = None,
    provenance: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a critic bundle atomically and return its path.

    Args:
        out_dir: the bundle directory to create (must be new, empty, or - with `overwrite` - an existing bundle).
        policy: a causal LM, or a `peft.PeftModel`. A PeftModel with no `reference` is stored as its adapter plus
            its base model (LoRA deltas not merged) as the reference, once.
        reference: the reference model; None for a PeftModel policy or with `reference_identity`. A PeftModel policy
            with a separate reference is stored with the adapter merged into full weights.
        tokenizer: the tokenizer both models read.
        scoring_config: the scoring defaults users get (default: ScoringConfig with training's beta), its
            `variant` (with clip and support_threshold) recorded as the manifest's `scoring.variant`.
        max_length: the truncation length users get by default.
        training: {"beta", "temperature", "trainer_class", "global_step", "seed", ...} of the run.
        heldout_metrics: metrics at export time (with n and intervals), any JSON-able dict.
        calibration: `evaluation.Calibrator.to_dict()`, for `ProgressCritic.predict_success`; it may add "method"
            (the METHODS or variant name whose score it calibrates; default: the bundle's variant).
        heldout_fingerprint: e.g. `fingerprint_trajectories(heldout)`.
        reduction_choice: how the token/step reductions were chosen, e.g. {"how": "cross-validation", ...}.
        reference_identity: {"repo_id", "revision", "path"?}: record the reference by identity (no weights stored);
            the files are hashed from `path` or the local Hugging Face cache.
        reference_adapter: for a PeftModel whose reference is another adapter (TRL's "ref" adapter when training an
            existing adapter with beta > 0): both the active adapter and this one are stored merged, as full weights.
        attribution: default failure-attribution rule, {"rule": one of config.ATTRIBUTION_RULES,
            "threshold": float} (e.g. the rule and CV-chosen threshold from held-out evaluation).
        provenance: extra provenance fields (merged with those taken from `training`).
        overwrite: replace an existing bundle at out_dir.
    """
    out = Path(out_dir).absolute()
    _check_target(out, overwrite)
    if tokenizer is None:
        raise BundleError("export_bundle needs the tokenizer both models read (tokenizer=)")
    policy, reference = _unwrap(policy), _unwrap(reference)
    training = dict(training or {})
    if scoring_config is None:
        scoring_config = ScoringConfig(beta=float(training.get("beta", 1.0)))
    if not isinstance(scoring_config, ScoringConfig):
        raise BundleError(f"scoring_config must be a ScoringConfig, got {type(scoring_config).__name__}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise BundleError(f"max_length must be an integer >= 2 or None, got {max_length!r}")

    # Decide what gets stored before writing anything.
    ref = resolve_for_export(policy, reference, reference_identity, reference_adapter)
    layout = choose_layout(policy, ref)
    reference, reference_adapter, reference_identity = _unwrap(ref.model), ref.adapter, ref.identity

    if calibration is not None and not (isinstance(calibration, dict) and "kind" in calibration and "params" in calibration):
        raise BundleError("calibration must be evaluation.Calibrator.to_dict() (a dict with 'kind' and 'params')")
    if attribution is not None and attribution.get("rule", "min_cumsum") not in ATTRIBUTION_RULES:
        raise BundleError(f"attribution rule must be one of {ATTRIBUTION_RULES}, got {attribution.get('rule')!r}")
    # Everything JSON-side is checked before any weight is written, so bad metadata fails fast.
    tail = to_manifest_json(
        _manifest_tail(
            scoring_config,
            max_length,
            training,
            heldout_metrics,
            calibration,
            heldout_fingerprint,
            reduction_choice,
            attribution,
            provenance,
        )
    )
    identity_rec = _record_identity(layout, policy, reference, reference_identity)

    _check_vocab_fits(policy.get_base_model() if layout != "full" else policy, tokenizer, "policy")
    if reference is not None and reference is not policy:
        _check_vocab_fits(reference, tokenizer, "reference")

    tmp = _new_tmp_dir(out)
    try:
        manifest = _write_contents(
            tmp,
            policy,
            reference,
            tokenizer,
            layout=layout,
            identity_rec=identity_rec,
            reference_adapter=reference_adapter,
        )
        manifest = to_manifest_json({**manifest, **tail})
        (tmp / README_NAME).write_text(model_card(manifest), encoding="utf-8")
        _fsync_tree(tmp)
        _write_manifest(tmp / MANIFEST_NAME, manifest)  # last: its presence means "complete"
        _fsync_path(tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_manifest(path: Path, manifest: dict) -> None:
    _write_json(path, manifest)


def _save_tokenizer(tokenizer, out: Path) -> None:
    tokenizer.save_pretrained(out)
    _refuse_pickle_written(out)


def _write_contents(tmp: Path, policy, reference, tokenizer, *, layout, identity_rec, reference_adapter) -> dict:
    pol_dir, ref_dir, tok_dir = tmp / POLICY_DIR, tmp / REFERENCE_DIR, tmp / TOKENIZER_DIR
    pol: dict[str, Any]
    ref: dict[str, Any]
    if layout in ("lora",):
        base = policy.get_base_model()
        active = active_adapter(policy)
        _save_adapter(policy, pol_dir, active)
        cfg = policy.peft_config[active]
        pol = {
            "kind": "lora",
            "dir": POLICY_DIR,
            **_model_info(base),
            "adapter": {
                "name": active,
                "peft_type": str(getattr(cfg.peft_type, "value", cfg.peft_type)),
                "base_model_name_or_path": getattr(cfg, "base_model_name_or_path", None),
                "r": getattr(cfg, "r", None),
                "lora_alpha": getattr(cfg, "lora_alpha", None),
                "target_modules": sorted(cfg.target_modules) if isinstance(cfg.target_modules, (set, list)) else cfg.target_modules,
            },
        }
        pol["source"] = getattr(cfg, "base_model_name_or_path", None) or pol["source"]
        if identity_rec is None:
            _save_full(base, ref_dir, peft_state_dict(policy, None))
            ref = {"kind": "full", "dir": REFERENCE_DIR, "is_policy_base": True, **_model_info(base)}
        else:
            ref = {**identity_rec, "is_policy_base": True}
    elif layout == "two_adapters":
        base = policy.get_base_model()
        active = active_adapter(policy)
        _save_full(base, pol_dir, peft_state_dict(policy, active))
        pol = {"kind": "full", "dir": POLICY_DIR, **_model_info(base), "merged_from_adapter": active}
        _save_full(base, ref_dir, peft_state_dict(policy, reference_adapter))
        ref = {"kind": "full", "dir": REFERENCE_DIR, "is_policy_base": False, **_model_info(base), "merged_from_adapter": reference_adapter}
    else:
        if layout == "merged_policy":
            base = policy.get_base_model()
            active = active_adapter(policy)
            _save_full(base, pol_dir, peft_state_dict(policy, active))
            pol = {"kind": "full", "dir": POLICY_DIR, **_model_info(base), "merged_from_adapter": active}
        else:
            _save_full(policy, pol_dir)
            pol = {"kind": "full", "dir": POLICY_DIR, **_model_info(policy)}
        if identity_rec is None:
            _save_full(reference, ref_dir)
            ref = {"kind": "full", "dir": REFERENCE_DIR, "is_policy_base": False, **_model_info(reference)}
        else:
            ref = {**identity_rec, "is_policy_base": False}
    _save_tokenizer(tokenizer, tok_dir)

    pol["files"] = _hash_dir(pol_dir)
    if ref["kind"] == "full":
        ref["files"] = _hash_dir(ref_dir)
    tok = {"dir": TOKENIZER_DIR, **tokenizer_fingerprint(tokenizer), "files": _hash_dir(tok_dir)}
    return _manifest_head(pol, ref, tok)


def export_from_paths(
    policy_path: str | os.PathLike,
    reference_path: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    scoring_config: ScoringConfig | None = None,
    max_length: int | None = None,
    reference_identity: dict | None = None,
    dtype=None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    **kwargs,
) -> Path:
    """`progadv export`: a bundle from any checkpoint pair, no training (an instruct model and its base, say).

    `policy_path` may be a LoRA adapter directory (peft's adapter_config.json); its reference defaults to the
    adapter's recorded base model. With `reference_identity` the reference is recorded by hub id, revision and
    hashes instead of stored (its files are read from `reference_identity["path"]`, `reference_path` or the cache).
    Pickle checkpoints are read with transformers' safe loader and written as safetensors.
    """
    from ..reference import load_pair

    for p in (policy_path, reference_path):
        if p is not None and not Path(p).exists():
            raise BundleError(f"{p} does not exist: pass a local checkpoint directory")
    if reference_identity is not None and reference_path is not None and "path" not in reference_identity:
        reference_identity = {**reference_identity, "path": reference_path}
    from ..rendering import TokenizerMismatchError

    try:
        policy, reference, tokenizer = load_pair(
            policy_path, reference_path, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except TokenizerMismatchError:
        raise
    except (OSError, ValueError) as e:  # not a checkpoint, no reference recorded, remote code refused, ...
        raise BundleError(f"cannot load the checkpoint pair (policy {policy_path}, reference {reference_path}): {e}") from None
    prov = {"exported_from": {"policy": str(policy_path), "reference": None if reference_path is None else str(reference_path)}}
    prov.update(kwargs.pop("provenance", None) or {})
    return export_bundle(
        out_dir,
        policy,
        reference,
        tokenizer,
        scoring_config=scoring_config,
        max_length=max_length,
        reference_identity=reference_identity,
        provenance=prov,
        overwrite=overwrite,
        **kwargs,
    )


