"""The manifest's schema, apart from the files: library versions, the tokenizer's fingerprint, the held-out
fingerprint, the scoring section and the rest of the manifest's tail, and reading the ScoringConfig back.

The manifest holds plain JSON only (`to_manifest_json`: NaN/inf become null, anything that is not data is refused).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import warnings
from typing import Any

from ..config import ScoringConfig
from ..utils import json_safe
from .files import _sha256_text
from .layout import ACTION_SPANS, FORMAT_VERSION, TRUNCATION, BundleError


def to_manifest_json(x: Any) -> Any:
    """`utils.json_safe(x, strict=True)`, its TypeError for a value that is not plain data raised as a BundleError."""
    try:
        return json_safe(x, strict=True)
    except TypeError as e:
        raise BundleError(str(e)) from e


def library_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    out: dict[str, str | None] = {"progadv_trl": __version__}
    for name in ("trl", "transformers", "peft", "torch", "safetensors", "tokenizers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def tokenizer_fingerprint(tokenizer) -> dict:
    """What must not change between export and load: the token ids (vocabulary), the chat template, and the ids
    the tokenizer gives a probe conversation (a bundle's tokenizer/ has no config.json, so transformers picks its
    class from tokenizer_config.json: the probe catches a class that reads the same files differently)."""
    from ..rendering import probe_fingerprint

    vocab = tokenizer.get_vocab()
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return {
        "vocab_size": len(vocab),
        "vocab_sha256": _sha256_text(json.dumps(sorted(vocab.items()), ensure_ascii=False)),
        "chat_template_sha256": _sha256_text(template) if template else None,
        "probe_ids_sha256": probe_fingerprint(tokenizer) if template else None,
        "eos_token": getattr(tokenizer, "eos_token", None),
        "pad_token": getattr(tokenizer, "pad_token", None),
    }


def fingerprint_trajectories(trajectories) -> str:
    """sha256 of a trajectory set in canonical JSON (for `heldout_fingerprint`): same records, same fingerprint."""
    from ..trajectories import as_trajectories

    recs = [t.to_dict() for t in as_trajectories(trajectories)]
    return "sha256:" + _sha256_text(json.dumps(recs, sort_keys=True, ensure_ascii=False, separators=(",", ":")))


def _manifest_head(policy: dict, reference: dict, tokenizer: dict) -> dict:
    """The manifest's first keys: format, time, versions, and the three sections that describe stored files."""
    return {
        "format_version": FORMAT_VERSION,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "library_versions": library_versions(),
        "policy": policy,
        "reference": reference,
        "tokenizer": tokenizer,
    }


def _manifest_tail(scoring_config, max_length, training, heldout_metrics, calibration, fingerprint, choice, attribution, provenance):
    training = dict(training)
    beta = training.pop("beta", None)
    temperature = training.pop("temperature", None)
    if isinstance(choice, str):
        choice = {"how": choice}
    prov = {
        "trainer_class": training.pop("trainer_class", None),
        "global_step": training.pop("global_step", None),
        "seed": training.pop("seed", None),
        "heldout_fingerprint": fingerprint,
        **training,  # anything else the caller recorded about the run
        **(provenance or {}),
    }
    return {
        "scoring": {
            "config": scoring_config.to_dict(),
            "action_spans": ACTION_SPANS,
            "token_reduction": scoring_config.token_reduction,
            "step_reduction": scoring_config.step_reduction,
            "reduction_choice": choice or {"how": "default (sum over tokens: the exact A_t; sum over steps)"},
            "attribution": {"rule": "min_cumsum", "threshold": 0.0, **(attribution or {})},
            # the member of the progress-advantage family the critic uses, and what it depends on
            "variant": scoring_config.variant_params(),
        },
        "training": {"beta": beta, "temperature": temperature},
        "max_length": max_length,
        "truncation": TRUNCATION,
        "heldout_metrics": heldout_metrics,
        "calibration": calibration,
        "provenance": prov,
    }


def scoring_config_from_manifest(manifest: dict, **overrides) -> ScoringConfig:
    """The bundle's ScoringConfig (fields this version does not know are reported and ignored), with overrides.
    A bundle from before variants has no `variant`: it loads as plain progress_advantage."""
    scoring = manifest.get("scoring") or {}
    stored = dict(scoring.get("config") or {})
    variant = scoring.get("variant")
    if isinstance(variant, dict) and variant.get("name") and "variant" not in stored:
        # a manifest that records the variant beside the config only: its name and parameters win over defaults
        keys = ("clip", "support_threshold", "plausibility_alpha", "plausibility_alpha_source")
        params = {k: v for k, v in (variant.get("params") or {}).items() if k in keys}
        stored.update(params, variant=variant["name"])
    # a bundle from before variants scored with plain progress advantage, whatever this version's default is
    stored.setdefault("variant", "progress_advantage")
    known = {f.name for f in dataclasses.fields(ScoringConfig)}
    extra = sorted(set(stored) - known)
    if extra:
        warnings.warn(f"bundle scoring config has fields this progadv_trl does not know, ignored: {extra}", stacklevel=2)
    bad = sorted(set(overrides) - known)
    if bad:
        raise BundleError(f"unknown scoring option(s) {bad}; known: {sorted(known)}")
    cfg = {k: v for k, v in stored.items() if k in known}
    cfg.update(overrides)
    return ScoringConfig(**cfg)


