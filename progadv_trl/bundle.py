"""The critic bundle: what a training run leaves behind, loadable in one line and checked before it is trusted.

Layout (names are the constants below):

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
asked for), a newer manifest format, missing or corrupted files, files nobody exported, and a tokenizer that is not
the one the bundle was exported with.

Export is atomic: everything is written to a hidden temporary directory beside the target, the manifest last, then
the directory is renamed onto the target. A crash leaves either the old state or the whole new bundle.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ATTRIBUTION_RULES
from .scoring import ScoringConfig

MANIFEST_NAME = "manifest.json"
README_NAME = "README.md"
POLICY_DIR = "policy"
REFERENCE_DIR = "reference"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1

# torch.save / pickle formats: loading one can run arbitrary code, so a bundle never holds them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
# Files of a reference recorded by identity that decide what gets loaded (hashed at export, checked at load).
IDENTITY_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json")
_TMP_RE = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]+$")

KNOWN_KEYS = frozenset(
    {
        "format_version",
        "created_at",
        "library_versions",
        "policy",
        "reference",
        "tokenizer",
        "scoring",
        "training",
        "max_length",
        "truncation",
        "heldout_metrics",
        "calibration",
        "provenance",
    }
)

ACTION_SPANS = (
    "one step per assistant turn: the tokens the model generated for that turn (content, tool calls, end-of-turn "
    "token), located by rendering the whole conversation once with the bundled tokenizer's chat template"
)
TRUNCATION = {
    "policy": "keep_start_and_recent",
    "description": (
        "trajectories longer than max_length keep their start (system prompt and task, at most half the budget) and "
        "the most recent context; a step that lost some tokens is scored on the rest and marked truncated, a step "
        "that lost all of them gets no advantage (NaN), never 0"
    ),
}


class BundleError(ValueError):
    """A bundle cannot be written or trusted. The message says what is wrong and what to do."""


# ----------------------------------------------------------------------------------------------------------------
# Small helpers: hashing, versions, JSON


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _hash_dir(root: Path) -> dict[str, dict]:
    """{relative posix path: {"sha256", "bytes"}} for every file under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def library_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    out: dict[str, str | None] = {"progadv_trl": __version__}
    for name in ("trl", "transformers", "peft", "torch", "safetensors", "tokenizers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _json_safe(x: Any) -> Any:
    """Plain JSON: NaN/inf -> null (JSON has no NaN), numpy/torch scalars -> Python, tuples -> lists."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _json_safe(dataclasses.asdict(x))
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):  # numpy arrays/scalars, 0-d tensors
        return _json_safe(x.tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (str, int, bool)):
        return x
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    raise BundleError(f"cannot store a {type(x).__name__} in the manifest ({x!r}): pass plain numbers, strings, lists or dicts")


def tokenizer_fingerprint(tokenizer) -> dict:
    """What must not change between export and load: the token ids (vocabulary) and the chat template."""
    vocab = tokenizer.get_vocab()
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return {
        "vocab_size": len(vocab),
        "vocab_sha256": _sha256_text(json.dumps(sorted(vocab.items()), ensure_ascii=False)),
        "chat_template_sha256": _sha256_text(template) if template else None,
        "eos_token": getattr(tokenizer, "eos_token", None),
        "pad_token": getattr(tokenizer, "pad_token", None),
    }


def fingerprint_trajectories(trajectories) -> str:
    """sha256 of a trajectory set in canonical JSON (for `heldout_fingerprint`): same records, same fingerprint."""
    from .trajectories import as_trajectories

    recs = [t.to_dict() for t in as_trajectories(trajectories)]
    return "sha256:" + _sha256_text(json.dumps(recs, sort_keys=True, ensure_ascii=False, separators=(",", ":")))


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under root, so the rename publishes data that is on disk."""
    for p in sorted(root.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        _fsync_path(p)
    _fsync_path(root)


def _fsync_path(p: Path) -> None:
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms; best effort
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj: dict) -> None:
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------------------
# Models: PEFT handling and saving


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def _unwrap(model):
    """DDP/FSDP-style wrappers keep the real model in `.module`."""
    while model is not None and type(model).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(model, "module"):
        model = model.module
    return model


def _active_adapter(peft_model) -> str:
    a = peft_model.active_adapter
    return a[0] if isinstance(a, (list, tuple)) else a


def _expected_keys(base) -> set[str]:
    """State-dict keys of the base architecture without any adapter (built on the meta device: no memory)."""
    import copy

    import torch

    with torch.device("meta"):
        plain = type(base)(copy.deepcopy(base.config))
    return set(plain.state_dict().keys())


def peft_state_dict(peft_model, merge_adapter: str | None = None) -> dict:
    """Weights of a PeftModel's base model as a plain transformers state dict.

    merge_adapter=None: the base weights exactly as the adapter found them (LoRA deltas NOT merged) - the
    reference of a LoRA policy. merge_adapter="name": the base with that LoRA adapter's delta added (full weights
    of that adapter's model). No copy of the model is made: tensors are shared, deltas are computed per layer.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = peft_model.get_base_model()
    adapter_parts: set[str] = set()
    deltas: dict[str, Any] = {}
    swapped: set[str] = set()  # modules_to_save wrappers whose trained copy replaces the original when merging
    for name, mod in base.named_modules():
        if isinstance(mod, BaseTunerLayer):
            adapter_parts.update(mod.adapter_layer_names)
            if merge_adapter is not None and merge_adapter in getattr(mod, "r", {}):
                if getattr(mod, "use_dora", {}).get(merge_adapter) or getattr(mod, "lora_bias", {}).get(merge_adapter):
                    raise BundleError(
                        f"cannot merge adapter {merge_adapter!r} of layer {name}: DoRA / LoRA bias merging is not "
                        "supported; pass `reference=` and `policy=` as plain models (e.g. peft's merge_and_unload())"
                    )
                deltas[_clean_key(f"{name}.weight")] = mod.get_delta_weight(merge_adapter)
            elif merge_adapter is not None and not hasattr(mod, "r"):
                raise BundleError(
                    f"cannot merge a {type(mod).__name__} adapter (layer {name}); only LoRA adapters merge here. "
                    "Pass plain models (peft's merge_and_unload()) as `policy=` and `reference=`"
                )
        if type(mod).__name__ == "ModulesToSaveWrapper" and merge_adapter in getattr(mod, "modules_to_save", {}):
            swapped.add(name)
    out = {}
    for key, tensor in base.state_dict().items():
        parts = key.split(".")
        if "modules_to_save" in parts:
            i = parts.index("modules_to_save")
            owner = ".".join(parts[:i])
            if owner in swapped and parts[i + 1] == merge_adapter:
                out[_clean_key(".".join(parts[:i] + parts[i + 2 :]))] = tensor
            continue
        if "original_module" in parts:
            i = parts.index("original_module")
            if ".".join(parts[:i]) in swapped:
                continue
        if any(p in adapter_parts for p in parts):
            continue
        out[_clean_key(key)] = tensor
    for key, delta in deltas.items():
        out[key] = (out[key].float() + delta.float()).to(out[key].dtype)
    expected = _expected_keys(base)
    if set(out) != expected:
        missing, extra = sorted(expected - set(out))[:5], sorted(set(out) - expected)[:5]
        raise BundleError(
            f"cannot separate the base weights from the adapter (missing {missing}, unexpected {extra}); pass "
            "`reference=` a plain model and a merged policy instead"
        )
    return out


def _clean_key(key: str) -> str:
    parts = [p for p in key.split(".") if p not in ("base_layer", "original_module")]
    return ".".join(parts)


def _config_source(model) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", None) or None


def _model_info(model) -> dict:
    import torch

    cfg = model.config
    try:
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    except StopIteration:  # pragma: no cover
        dtype = None
    n = sum(p.numel() for p in model.parameters() if p.device.type != "meta") if isinstance(model, torch.nn.Module) else None
    return {
        "source": _config_source(model),
        "model_type": getattr(cfg, "model_type", None),
        "architectures": getattr(cfg, "architectures", None),
        "dtype": dtype,
        "num_parameters": n,
    }


def _save_full(model, out: Path, state_dict: dict | None = None) -> None:
    model.save_pretrained(out, state_dict=state_dict)
    _refuse_pickle_written(out)


def _save_adapter(peft_model, out: Path, adapter: str) -> None:
    # The bundle stores the base model the adapter sits on (resized embeddings included), so the adapter need not
    # carry copies of the base embedding layers (PEFT's "auto" may also ask the Hub whether the vocab changed).
    peft_model.save_pretrained(out, selected_adapters=[adapter], safe_serialization=True, save_embedding_layers=False)
    sub = out / adapter
    if adapter != "default" and (sub / "adapter_config.json").is_file():
        # PEFT puts every adapter but "default" in a subfolder; the bundle keeps one adapter at policy/.
        for p in sub.iterdir():
            os.replace(p, out / p.name)
        sub.rmdir()
    _refuse_pickle_written(out)


def _refuse_pickle_written(out: Path) -> None:
    bad = [p.name for p in out.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if bad:  # a library wrote pickle despite safetensors being asked for; never publish that
        raise BundleError(f"saving wrote pickle files {bad}; a bundle holds safetensors only (upgrade transformers/peft)")


def _check_vocab_fits(model, tokenizer, what: str) -> None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and hasattr(emb, "weight") and len(tokenizer) > emb.weight.shape[0]:
        raise BundleError(
            f"the tokenizer has {len(tokenizer)} tokens but the {what} embeds only {emb.weight.shape[0]}: they do not "
            "belong together. Pass the tokenizer the models were trained with"
        )


# ----------------------------------------------------------------------------------------------------------------
# Reference by identity


def _identity_files(root: Path) -> list[Path]:
    files = sorted({p for pat in IDENTITY_PATTERNS for p in root.glob(pat) if p.is_file()})
    return files


def resolve_reference_dir(repo_id: str, revision: str | None, path: str | os.PathLike | None = None) -> Path:
    """A local directory holding the reference recorded by identity: `path`, else the Hugging Face cache (offline)."""
    if path is not None:
        p = Path(path)
        if not p.is_dir():
            raise BundleError(f"reference path {p} is not a directory: pass the folder holding {repo_id}'s files")
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:
        rev = f" --revision {revision}" if revision else ""
        raise BundleError(
            f"the reference is recorded by identity ({repo_id}" + (f" at {revision}" if revision else "") + ") and is "
            f"not in the local Hugging Face cache: run `huggingface-cli download {repo_id}{rev}`, or pass "
            "reference_path= (--reference) a folder holding those files"
        ) from None


def _identity_record(identity: dict) -> tuple[dict, Path]:
    if not isinstance(identity, dict) or not identity.get("repo_id"):
        raise BundleError('reference_identity must be a dict with "repo_id" (and "revision", optionally "path")')
    unknown = set(identity) - {"repo_id", "revision", "path"}
    if unknown:
        raise BundleError(f"reference_identity has unknown keys {sorted(unknown)}; use repo_id, revision, path")
    root = resolve_reference_dir(identity["repo_id"], identity.get("revision"), identity.get("path"))
    revision = identity.get("revision")
    if revision is None and root.parent.name == "snapshots":  # a hub cache folder is named after its commit
        revision = root.name
    files = _identity_files(root)
    if not any(p.name.endswith(".safetensors") for p in files):
        raise BundleError(
            f"{root} holds no safetensors weights; a reference recorded by identity is loaded from safetensors only. "
            "Use a revision that has them, or store the reference in the bundle (no reference_identity)"
        )
    rec = {
        "kind": "identity",
        "repo_id": identity["repo_id"],
        "revision": revision,
        "files": {p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files},
    }
    if revision is None:
        warnings.warn(
            f"reference {identity['repo_id']} recorded without a revision: pass the commit hash so that users fetch "
            "the same files (the hashes are checked either way)",
            stacklevel=3,
        )
    return rec, root


def _check_identity_matches(state_dict: dict, identity: dict, rec: dict) -> None:
    """The files named by identity must hold the weights the in-memory reference has, or users would score
    against a different reference than training used."""
    import torch
    from safetensors import safe_open

    root = resolve_reference_dir(identity["repo_id"], identity.get("revision"), identity.get("path"))
    compared, differ, dtypes = 0, [], set()
    for f in sorted(root.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            for key in h.keys():
                mine = state_dict.get(key)
                if mine is None or mine.device.type == "meta":
                    continue
                theirs = h.get_tensor(key)
                compared += 1
                if theirs.dtype != mine.dtype:
                    dtypes.add(f"{theirs.dtype} on disk vs {mine.dtype} in memory")
                mine = mine.detach().to("cpu")
                if theirs.shape != mine.shape or not torch.equal(theirs.to(mine.dtype), mine):
                    differ.append(key)
    name = f"{rec['repo_id']}" + (f" at {rec['revision']}" if rec.get("revision") else "")
    if differ:
        raise BundleError(
            f"the reference recorded by identity ({name}, files in {root}) holds different weights than the model "
            f"passed as the reference ({len(differ)} tensors differ, e.g. {differ[:3]}). Record the identity of the "
            "weights the run really used, or store the reference in the bundle (no reference_identity)"
        )
    if compared == 0:
        warnings.warn(f"could not compare the in-memory reference with {name}'s files (no common tensor names)", stacklevel=3)
    elif dtypes:
        warnings.warn(
            f"the reference recorded by identity is loaded as stored ({sorted(dtypes)[0]}): scores after loading may "
            "differ slightly from those at export",
            stacklevel=3,
        )


# ----------------------------------------------------------------------------------------------------------------
# Export


def _is_bundle_dir(p: Path) -> bool:
    return (p / MANIFEST_NAME).is_file()


def _check_target(out: Path, overwrite: bool) -> None:
    if _TMP_RE.match(out.name):
        raise BundleError(f"{out.name} looks like an export's temporary folder; choose another output name")
    if not out.exists():
        return
    if not out.is_dir():
        raise BundleError(f"{out} exists and is not a directory: choose another output path")
    if _is_bundle_dir(out):
        if not overwrite:
            raise BundleError(f"{out} already holds a bundle: pass overwrite=True (--overwrite) to replace it")
        return
    if any(out.iterdir()):
        raise BundleError(
            f"{out} exists and is not a bundle (no {MANIFEST_NAME}); refusing to replace it. Choose a new or empty "
            "output directory"
        )


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished temporary bundle onto `out`; an existing bundle is swapped out, then deleted."""
    old = None
    if out.exists():
        if not any(out.iterdir()):
            out.rmdir()
        else:
            old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
            os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)  # put the previous bundle back
        raise
    _fsync_path(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
        scoring_config: the scoring defaults users get (default: ScoringConfig with training's beta).
        max_length: the truncation length users get by default.
        training: {"beta", "temperature", "trainer_class", "global_step", "seed", ...} of the run.
        heldout_metrics: metrics at export time (with n and intervals), any JSON-able dict.
        calibration: `evaluation.Calibrator.to_dict()`, for `ProgressCritic.predict_success`; it may add "method"
            (the METHODS name whose score it calibrates; default progress_advantage).
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
    from .reference import Reference

    if isinstance(reference, Reference):  # TEMP until the bundle package takes the resolver
        if reference.kind == "named_adapter":
            reference, reference_adapter = None, reference.adapter
        else:
            reference = reference.model
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
    peft = _is_peft(policy)
    if reference_adapter is not None and not peft:
        raise BundleError("reference_adapter= needs a PeftModel policy")
    if peft:
        active = _active_adapter(policy)
        adapters = list(policy.peft_config)
        if reference_adapter is not None:
            if reference_adapter not in adapters:
                raise BundleError(f"reference_adapter {reference_adapter!r} is not one of the policy's adapters {adapters}")
            if reference is not None or reference_identity is not None:
                raise BundleError("give reference_adapter= or reference=/reference_identity=, not both")
            layout = "two_adapters"
        elif reference is None or reference is policy:
            if "ref" in adapters and active != "ref":
                raise BundleError(
                    f"the policy has a 'ref' adapter besides {active!r} (TRL adds one when training an existing "
                    "adapter with beta > 0): the reference is that adapter, not the bare base model. Pass "
                    "reference_adapter='ref'"
                )
            layout = "lora"
        else:
            layout = "merged_policy"
    else:
        if reference is None and reference_identity is None:
            raise BundleError("a full-weight policy needs its reference: pass reference= (a model) or reference_identity=")
        layout = "full"

    if calibration is not None and not (isinstance(calibration, dict) and "kind" in calibration and "params" in calibration):
        raise BundleError("calibration must be evaluation.Calibrator.to_dict() (a dict with 'kind' and 'params')")
    if attribution is not None:
        if attribution.get("rule", "min_cumsum") not in ATTRIBUTION_RULES:
            raise BundleError(f"attribution rule must be one of {ATTRIBUTION_RULES}, got {attribution.get('rule')!r}")
    # Everything JSON-side is checked before any weight is written, so bad metadata fails fast.
    tail = _json_safe(
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

    identity_rec = None
    if reference_identity is not None:
        identity_rec, _ = _identity_record(reference_identity)

    if identity_rec is not None:
        if layout == "lora":
            _check_identity_matches(peft_state_dict(policy, None), reference_identity, identity_rec)
        elif reference is not None:
            _check_identity_matches(reference.state_dict(), reference_identity, identity_rec)

    pol_base = policy.get_base_model() if peft else policy
    _check_vocab_fits(pol_base, tokenizer, "policy")
    if reference is not None and reference is not policy:
        _check_vocab_fits(reference, tokenizer, "reference")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
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
        manifest = _json_safe({**manifest, **tail})
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
        active = _active_adapter(policy)
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
        active = _active_adapter(policy)
        _save_full(base, pol_dir, peft_state_dict(policy, active))
        pol = {"kind": "full", "dir": POLICY_DIR, **_model_info(base), "merged_from_adapter": active}
        _save_full(base, ref_dir, peft_state_dict(policy, reference_adapter))
        ref = {"kind": "full", "dir": REFERENCE_DIR, "is_policy_base": False, **_model_info(base), "merged_from_adapter": reference_adapter}
    else:
        if layout == "merged_policy":
            base = policy.get_base_model()
            active = _active_adapter(policy)
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
    return {
        "format_version": FORMAT_VERSION,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "library_versions": library_versions(),
        "policy": pol,
        "reference": ref,
        "tokenizer": tok,
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
        },
        "training": {"beta": beta, "temperature": temperature},
        "max_length": max_length,
        "truncation": TRUNCATION,
        "heldout_metrics": heldout_metrics,
        "calibration": calibration,
        "provenance": prov,
    }


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
    from .reference import load_pair

    for p in (policy_path, reference_path):
        if p is not None and not Path(p).exists():
            raise BundleError(f"{p} does not exist: pass a local checkpoint directory")
    if reference_identity is not None and reference_path is not None and "path" not in reference_identity:
        reference_identity = {**reference_identity, "path": reference_path}
    from .trajectories import TokenizerMismatchError

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
        reference.model,
        tokenizer,
        scoring_config=scoring_config,
        max_length=max_length,
        reference_identity=reference_identity,
        provenance=prov,
        overwrite=overwrite,
        **kwargs,
    )


# ----------------------------------------------------------------------------------------------------------------
# Model card


def _looks_like_hub_id(name) -> bool:
    """`base_model` in a model card must name a Hub repo; a local training path would be rejected there."""
    return (
        isinstance(name, str)
        and re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name) is not None
        and not Path(name).exists()
    )


def model_card(manifest: dict) -> str:
    pol, ref = manifest["policy"], manifest["reference"]
    base = next((b for b in (ref.get("repo_id"), ref.get("source"), pol.get("source")) if _looks_like_hub_id(b)), None)
    tags = ["progadv_trl", "progress-advantage", "trl", "critic", "process-reward-model", "agents"]
    if pol["kind"] == "lora":
        tags.append("lora")
    front = ["---", "library_name: progadv_trl"]
    if base:
        front.append(f"base_model: {json.dumps(base)}")
    front.append("tags:")
    front += [f"- {t}" for t in tags]
    front.append("---")
    sc = manifest["scoring"]["config"]
    tr = manifest.get("training") or {}
    prov = manifest.get("provenance") or {}
    lines = [
        "",
        "# Progress-advantage critic",
        "",
        "A step-level critic for LLM agent trajectories, read from an RL-trained policy and the reference its KL "
        "term anchored it to:",
        "",
        "    A_t = beta * sum over the tokens of agent step t of (log pi_theta - log pi_ref)",
        "",
        "## Use",
        "",
        "```python",
        "from progadv_trl.critic import ProgressCritic",
        "",
        'critic = ProgressCritic.from_pretrained("path/to/this/bundle")',
        "scores = critic.score(trajectories)            # per-step advantages + trajectory scores",
        "best = critic.best_of_n(trajectories)          # per group, the trajectory most likely to succeed",
        "```",
        "",
        "or `progadv score --bundle BUNDLE TRAJ.jsonl -o OUT.jsonl`; `progadv inspect BUNDLE` verifies every file.",
        "",
        "## Contents",
        "",
        f"- policy: {pol['kind']}" + (f" (adapter on `{pol.get('source')}`)" if pol["kind"] == "lora" else f" (`{pol.get('source')}`)"),
        "- reference: "
        + (
            f"recorded by identity: `{ref.get('repo_id')}` at `{ref.get('revision')}` (fetch it; hashes are checked)"
            if ref["kind"] == "identity"
            else ("the policy's base model, adapter disabled" if ref.get("is_policy_base") else f"full weights (`{ref.get('source')}`)")
        ),
        f"- scoring defaults: beta={sc['beta']}, token reduction `{sc['token_reduction']}`, step reduction "
        f"`{sc['step_reduction']}`, temperature {sc['temperature']}, max_length {manifest.get('max_length')}",
        f"- training: beta={tr.get('beta')}, sampling temperature={tr.get('temperature')}, "
        f"trainer {prov.get('trainer_class')}, step {prov.get('global_step')}, seed {prov.get('seed')}",
        f"- success calibration: {'yes' if manifest.get('calibration') else 'no'}",
    ]
    hm = manifest.get("heldout_metrics")
    if hm:
        lines += ["", "## Held-out metrics at export", "", "```json", json.dumps(hm, indent=2), "```"]
    lines += [
        "",
        "## Trust",
        "",
        "`manifest.json` lists the sha256 of every file, the library versions and the tokenizer's vocabulary and "
        "chat-template hashes; loading checks them and refuses pickle weights and remote code.",
        "",
    ]
    return "\n".join(front + lines)


# ----------------------------------------------------------------------------------------------------------------
# Verification and loading


@dataclass
class FileCheck:
    path: str  # relative to the bundle (or "reference:<name>" for a reference recorded by identity)
    status: str  # ok | missing | corrupted | unexpected | pickle
    detail: str = ""


@dataclass
class BundleReport:
    path: Path
    manifest: dict | None
    files: list[FileCheck] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    reference_dir: Path | None = None  # where the reference is read from (bundle folder or identity folder)
    tokenizer: Any = None  # loaded during verification (reused by load_bundle)

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_for_errors(self) -> None:
        if self.errors:
            head = f"{self.path} cannot be trusted ({len(self.errors)} problem{'s' if len(self.errors) > 1 else ''}):"
            raise BundleError("\n".join([head] + [f"  - {e}" for e in self.errors]))


def _is_pickle(p: Path) -> bool:
    return p.suffix.lower() in PICKLE_SUFFIXES


def _check_files(report: BundleReport, root: Path, expected: dict, label: str, prefix: str, strict_extra: bool) -> None:
    for rel, info in sorted(expected.items()):
        p = root / rel
        shown = f"{prefix}{rel}"
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            report.errors.append(f"{MANIFEST_NAME} lists {rel!r}, a path outside the {label}: the manifest was tampered with")
            continue
        if not p.is_file():
            report.files.append(FileCheck(shown, "missing"))
            report.errors.append(
                f"{shown} is missing: the {label} is incomplete. Re-export the bundle or restore the file"
            )
            continue
        info = info if isinstance(info, dict) else {}
        digest = sha256_file(p)
        if digest != info.get("sha256"):
            report.files.append(FileCheck(shown, "corrupted", f"sha256 {digest[:12]}..., manifest {str(info.get('sha256'))[:12]}..."))
            report.errors.append(
                f"{shown} does not match the manifest (sha256 {digest[:12]}..., expected {str(info.get('sha256'))[:12]}...): "
                f"the file is corrupted or was replaced. Re-download or re-export the bundle"
            )
        else:
            report.files.append(FileCheck(shown, "ok"))
    if not strict_extra:
        return
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        if rel in expected:
            continue
        shown = f"{prefix}{rel}"
        if _is_pickle(p):
            continue  # reported by the pickle scan
        report.files.append(FileCheck(shown, "unexpected"))
        report.errors.append(
            f"{shown} is not part of the bundle as exported (not in the manifest) and could change what gets loaded: "
            "remove it, or re-export"
        )


def _remote_code(json_path: Path) -> Any:
    try:
        cfg = json.loads(json_path.read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("auto_map") if isinstance(cfg, dict) else None


def verify_bundle(
    path: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    reference_path: str | os.PathLike | None = None,
    require_reference: bool = True,
    check_tokenizer: bool = True,
) -> BundleReport:
    """Check a bundle without loading models: manifest, versions, every file's hash, pickle, remote code, tokenizer.

    Returns a report (errors make `load_bundle` refuse; warnings are printed). `require_reference=False` turns a
    reference recorded by identity that is not available locally into a warning (for `progadv inspect`).
    """
    root = Path(path)
    report = BundleReport(root, None)
    if not root.is_dir():
        report.errors.append(f"{root} is not a directory: pass the bundle folder written by export (progadv export)")
        return report
    if _TMP_RE.match(root.name):
        report.errors.append(
            f"{root.name} is the temporary folder of an export that did not finish; it is not a bundle. Delete it and "
            "re-export"
        )
        return report
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        report.errors.append(
            f"no {MANIFEST_NAME} in {root}: not a bundle, or an export that did not finish (the manifest is written "
            "last). Re-export it"
        )
        return report
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        report.errors.append(f"{MANIFEST_NAME} is not valid JSON ({e}): the bundle is damaged. Re-export it")
        return report
    report.manifest = manifest
    fv = manifest.get("format_version")
    if not isinstance(fv, int):
        report.errors.append(f"{MANIFEST_NAME} has no integer format_version: the bundle is damaged. Re-export it")
        return report
    if fv > FORMAT_VERSION:
        report.errors.append(
            f"this bundle uses manifest format {fv}, written by a newer progadv_trl "
            f"({(manifest.get('library_versions') or {}).get('progadv_trl', '?')}); this one reads up to format "
            f"{FORMAT_VERSION}. Upgrade: pip install -U progadv_trl"
        )
        return report
    unknown = sorted(set(manifest) - KNOWN_KEYS)
    if unknown:
        report.warnings.append(f"{MANIFEST_NAME} has keys this progadv_trl does not know, ignored: {unknown}")
    for key in ("policy", "reference", "tokenizer", "scoring"):
        if not isinstance(manifest.get(key), dict):
            report.errors.append(f"{MANIFEST_NAME} has no '{key}' section: the bundle is damaged. Re-export it")
    if report.errors:
        return report
    _check_versions(report, manifest.get("library_versions") or {})

    # Pickle anywhere in the bundle: refused outright, whatever the manifest says.
    for p in sorted(root.rglob("*")):
        if p.is_file() and _is_pickle(p):
            rel = p.relative_to(root).as_posix()
            report.files.append(FileCheck(rel, "pickle"))
            report.errors.append(
                f"{rel} is a pickle file (torch.save format); loading it can run arbitrary code, so bundles hold "
                "safetensors only. Delete it, or convert the checkpoint to safetensors (model.save_pretrained(...)) "
                "and re-export"
            )

    pol, ref, tok = manifest["policy"], manifest["reference"], manifest["tokenizer"]
    sections = [(pol, "policy"), (tok, "tokenizer")]
    if ref.get("kind") == "full":
        sections.insert(1, (ref, "reference"))
    elif ref.get("kind") != "identity":
        report.errors.append(f"{MANIFEST_NAME}: unknown reference kind {ref.get('kind')!r}; upgrade progadv_trl or re-export")
    for sec, label in sections:
        d = sec.get("dir") or {"policy": POLICY_DIR, "reference": REFERENCE_DIR, "tokenizer": TOKENIZER_DIR}[label]
        sub = root / d
        if not sub.is_dir():
            report.errors.append(f"{d}/ is missing: the {label} is not in the bundle. Re-export it")
            continue
        _check_files(report, sub, sec.get("files") or {}, label, f"{d}/", strict_extra=True)
    stored_dirs = {sec.get("dir") for sec, _ in sections}
    for p in sorted(root.iterdir()):
        if p.is_dir() and p.name not in stored_dirs or p.is_file() and p.name not in (MANIFEST_NAME, README_NAME) and not _is_pickle(p):
            report.warnings.append(f"{p.name} at the bundle's top level is not part of the bundle (ignored)")

    # The reference recorded by identity: find it, check its hashes.
    if ref.get("kind") == "full":
        report.reference_dir = root / (ref.get("dir") or REFERENCE_DIR)
    elif ref.get("kind") == "identity":
        try:
            rdir = resolve_reference_dir(ref.get("repo_id"), ref.get("revision"), reference_path)
        except BundleError as e:
            (report.errors if require_reference else report.warnings).append(str(e))
        else:
            before = len(report.errors)
            _check_files(report, rdir, ref.get("files") or {}, f"reference {ref.get('repo_id')}", f"reference:{rdir}/", strict_extra=False)
            if len(report.errors) > before:
                report.errors.append(
                    f"the reference at {rdir} is not {ref.get('repo_id')} at revision {ref.get('revision')} as recorded "
                    "at export: pass reference_path= (--reference) the exact files, or download that revision"
                )
            report.reference_dir = rdir

    # Remote code: a config naming custom classes (auto_map) or shipped .py files.
    tokenizer_remote = False
    if not trust_remote_code:
        places = [(root / (pol.get("dir") or POLICY_DIR), "policy"), (root / (tok.get("dir") or TOKENIZER_DIR), "tokenizer")]
        if report.reference_dir is not None:
            places.append((report.reference_dir, "reference"))
        for d, label in places:
            for name in ("config.json", "tokenizer_config.json", "adapter_config.json"):
                am = _remote_code(d / name)
                if am:
                    tokenizer_remote |= label == "tokenizer"
                    report.errors.append(
                        f"the {label}'s {name} asks for code shipped with the checkpoint (auto_map: {am}); it is not run "
                        "by default. Read that code, then pass trust_remote_code=True (--trust-remote-code)"
                    )
            py = sorted(p.name for p in d.glob("*.py")) if d.is_dir() else []
            if py:
                tokenizer_remote |= label == "tokenizer"
                report.errors.append(
                    f"the {label} ships Python code ({py}); it is not run by default. Read it, then pass "
                    "trust_remote_code=True (--trust-remote-code), or delete it"
                )

    if check_tokenizer and not tokenizer_remote:
        _check_tokenizer(report, root / (tok.get("dir") or TOKENIZER_DIR), tok, trust_remote_code)
    return report


def _check_tokenizer(report: BundleReport, tok_dir: Path, rec: dict, trust_remote_code: bool) -> None:
    """Load the tokenizer and compare what it means (ids, chat template) with the manifest, beyond file hashes:
    a different transformers version can read the same files differently, and a swapped file deserves a clear
    message rather than just "hash mismatch"."""
    if not tok_dir.is_dir():
        return
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any failure to load is reported, not raised
        report.errors.append(f"the tokenizer in {tok_dir.name}/ cannot be loaded ({type(e).__name__}: {e}). Re-export the bundle")
        return
    fp = tokenizer_fingerprint(tokenizer)
    if rec.get("vocab_sha256") and fp["vocab_sha256"] != rec["vocab_sha256"]:
        report.errors.append(
            f"the tokenizer does not match the one the bundle was exported with: its vocabulary differs "
            f"({fp['vocab_size']} tokens, manifest {rec.get('vocab_size')}), so token ids would not match the models. "
            "Restore the bundle's tokenizer files (re-download or re-export)"
        )
    if fp["chat_template_sha256"] != rec.get("chat_template_sha256"):
        report.errors.append(
            "the tokenizer's chat template differs from the one the bundle was exported with, so trajectories would "
            "be rendered to different tokens than the critic was built for. Restore the bundle's tokenizer files "
            "(re-download or re-export with the template you want)"
        )
    report.tokenizer = tokenizer


def _major_minor(v: str | None) -> tuple | None:
    if not v:
        return None
    m = re.match(r"(\d+)\.(\d+)", v)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _check_versions(report: BundleReport, recorded: dict) -> None:
    """Different library versions are allowed (warned): numerics and tokenizer loading may differ slightly."""
    now = library_versions()
    for name in ("transformers", "torch", "peft", "tokenizers"):
        a, b = _major_minor(recorded.get(name)), _major_minor(now.get(name))
        if a and b and a != b:
            report.warnings.append(
                f"exported with {name} {recorded.get(name)}, loading with {now.get(name)}: scores may differ slightly "
                "from the held-out metrics in the manifest"
            )


def load_bundle(
    path: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    reference_path: str | os.PathLike | None = None,
    device: str | None = None,
    dtype=None,
):
    """Verify a bundle, then load it: (policy, tokenizer, reference or None, manifest).

    A LoRA bundle gives a `peft.PeftModel` policy and reference None (the reference is that model with its adapter
    disabled; `ProgressScorer` does this). Raises `BundleError` listing every problem found.
    """
    report = verify_bundle(path, trust_remote_code=trust_remote_code, reference_path=reference_path)
    report.raise_for_errors()
    for w in report.warnings:
        warnings.warn(w, stacklevel=2)
    from transformers import AutoModelForCausalLM

    root, manifest = Path(path), report.manifest
    assert manifest is not None and report.reference_dir is not None
    kw: dict[str, Any] = dict(trust_remote_code=trust_remote_code, use_safetensors=True)
    if dtype is not None:
        from .reference import resolve_dtype as _resolve_dtype

        kw["dtype"] = _resolve_dtype(dtype)
    pol = manifest["policy"]
    pol_dir = root / (pol.get("dir") or POLICY_DIR)
    if pol["kind"] == "lora":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(report.reference_dir, **kw)
        policy = PeftModel.from_pretrained(base, pol_dir, is_trainable=False)
        reference = None
    elif pol["kind"] == "full":
        policy = AutoModelForCausalLM.from_pretrained(pol_dir, **kw)
        reference = AutoModelForCausalLM.from_pretrained(report.reference_dir, **kw)
    else:
        raise BundleError(f"unknown policy kind {pol['kind']!r} in {MANIFEST_NAME}; upgrade progadv_trl or re-export")
    tokenizer = report.tokenizer
    if tokenizer is None:  # pragma: no cover - verify_bundle loads it
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(root / TOKENIZER_DIR, trust_remote_code=trust_remote_code)
    _check_vocab_fits(policy.get_base_model() if pol["kind"] == "lora" else policy, tokenizer, "policy")
    if reference is not None:
        _check_vocab_fits(reference, tokenizer, "reference")
    if device is not None:
        policy.to(device)
        if reference is not None:
            reference.to(device)
    policy.eval()
    if reference is not None:
        reference.eval()
    return policy, tokenizer, reference, manifest


def scoring_config_from_manifest(manifest: dict, **overrides) -> ScoringConfig:
    """The bundle's ScoringConfig (fields this version does not know are reported and ignored), with overrides."""
    stored = dict(((manifest.get("scoring") or {}).get("config")) or {})
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


def inspect_bundle(path: str | os.PathLike, *, reference_path: str | os.PathLike | None = None, trust_remote_code: bool = False) -> str:
    """`progadv inspect`: the manifest, then every file with its verification status, then a verdict."""
    return format_report(
        verify_bundle(path, reference_path=reference_path, require_reference=False, trust_remote_code=trust_remote_code)
    )


def format_report(report: BundleReport) -> str:
    """Human-readable verification report (the CLI exits non-zero when `report.ok` is False)."""
    out = [f"bundle: {report.path}"]
    if report.manifest is not None:
        out += ["", "manifest:", json.dumps(report.manifest, indent=2, ensure_ascii=False)]
    if report.files:
        out += ["", "files:"]
        width = max(len(f.path) for f in report.files)
        for f in report.files:
            out.append(f"  {f.status.upper():<10} {f.path:<{width}}  {f.detail}".rstrip())
    if report.warnings:
        out += ["", "warnings:"] + [f"  - {w}" for w in report.warnings]
    if report.errors:
        out += ["", f"FAILED: {len(report.errors)} problem(s):"] + [f"  - {e}" for e in report.errors]
    else:
        out += ["", f"OK: {sum(f.status == 'ok' for f in report.files)} files verified"]
    return "\n".join(out)
