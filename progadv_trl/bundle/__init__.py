"""The critic bundle: what a training run leaves behind, loadable in one line and checked before it is trusted.

    BUNDLE/
      policy/       full weights (safetensors + config.json), or a LoRA adapter (adapter_config.json + safetensors)
      reference/    full weights; for a LoRA policy the base model, stored once (the reference is the base with the
                    adapter disabled). Absent when the reference is recorded by identity (hub id, revision, hashes).
      tokenizer/    the one tokenizer both models read, with its chat template
      README.md     a model card with YAML front matter
      manifest.json written last: its presence means the bundle is complete

The manifest records the sha256 of every file, the library versions, the tokenizer's vocabulary and chat-template
hashes, the scoring rule and its defaults, held-out metrics, the success calibration and provenance. Loading checks
all of it and refuses, with a message that says what is wrong and what to do: pickle weights, remote code (unless
asked for), a newer manifest format, missing or corrupted files, files nobody exported, a tokenizer that is not
the one the bundle was exported with, manifest paths that leave the bundle folder, and symlinks pointing outside it.

Modules (imports point down this list; none imports torch at import time):

    layout    names, FORMAT_VERSION, KNOWN_KEYS, BundleError        (imports nothing of the package)
    files     hashing, fsync, atomic publish, pickle/path/symlink checks
    weights   PEFT state dicts and saving models                    (PEFT's save_and_load, kept apart)
    identity  a reference recorded by hub id + hashes
    manifest  the manifest's schema: versions, fingerprints, scoring section, ScoringConfig back
    card      the model card (README.md)
    export    export_bundle, export_from_paths; the reference (reference.resolve) -> storage layout: choose_layout
    verify    verify_bundle, BundleReport, format_report, inspect_bundle
    load      load_bundle; the reference decision at load: _load_policy_and_reference
"""

from .card import model_card
from .export import LAYOUTS, choose_layout, export_bundle, export_from_paths, resolve_for_export
from .files import sha256_file
from .identity import resolve_reference_dir
from .layout import (
    ACTION_SPANS,
    FORMAT_VERSION,
    IDENTITY_PATTERNS,
    KNOWN_KEYS,
    MANIFEST_NAME,
    PICKLE_SUFFIXES,
    POLICY_DIR,
    README_NAME,
    REFERENCE_DIR,
    TOKENIZER_DIR,
    TRUNCATION,
    BundleError,
)
from .load import load_bundle
from .manifest import fingerprint_trajectories, library_versions, scoring_config_from_manifest, tokenizer_fingerprint
from .verify import BundleReport, FileCheck, format_report, inspect_bundle, verify_bundle
from .weights import peft_state_dict

__all__ = [
    "ACTION_SPANS",
    "FORMAT_VERSION",
    "IDENTITY_PATTERNS",
    "KNOWN_KEYS",
    "LAYOUTS",
    "MANIFEST_NAME",
    "PICKLE_SUFFIXES",
    "POLICY_DIR",
    "README_NAME",
    "REFERENCE_DIR",
    "TOKENIZER_DIR",
    "TRUNCATION",
    "BundleError",
    "BundleReport",
    "FileCheck",
    "choose_layout",
    "resolve_for_export",
    "export_bundle",
    "export_from_paths",
    "fingerprint_trajectories",
    "format_report",
    "inspect_bundle",
    "library_versions",
    "load_bundle",
    "model_card",
    "peft_state_dict",
    "resolve_reference_dir",
    "scoring_config_from_manifest",
    "sha256_file",
    "tokenizer_fingerprint",
    "verify_bundle",
]
