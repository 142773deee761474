"""PEFT state-dict handling and model saving: the weights side of a bundle, kept apart from export's decisions the
way PEFT keeps `utils/save_and_load.py` apart from its model class.

`peft_state_dict` turns a PeftModel into plain transformers weights (its base as the adapter found it, or with one
LoRA adapter merged) without copying the model. Torch and PEFT are imported inside the functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .files import _refuse_pickle_written
from .layout import BundleError


def _unwrap(model):
    """DDP/FSDP-style wrappers keep the real model in `.module`."""
    while model is not None and type(model).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(model, "module"):
        model = model.module
    return model



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


def _check_vocab_fits(model, tokenizer, what: str) -> None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and hasattr(emb, "weight") and len(tokenizer) > emb.weight.shape[0]:
        raise BundleError(
            f"the tokenizer has {len(tokenizer)} tokens but the {what} embeds only {emb.weight.shape[0]}: they do not "
            "belong together. Pass the tokenizer the models were trained with"
        )


