"""Sharded weights (FSDP2, FSDP1, DeepSpeed ZeRO-3): a full copy for the bundle, and the callback's own forward passes.

Under FSDP or ZeRO-3 no process holds the whole model, so two things the callback does need care:

- Export. `full_state_dict(model)` gathers every tensor to the main process, on CPU (every rank must call it: it is a
  collective). FSDP1 and FSDP2 go through torch's `get_model_state_dict(full_state_dict=True, cpu_offload=True)`;
  ZeRO-3 through `deepspeed.zero.GatheredParameters`, one module at a time (DeepSpeed's own gather; it does not need
  `stage3_gather_16bit_weights_on_model_save`). `materialize(model, state_dict)` then builds, on the main process, a
  plain CPU model of the same architecture (and the same PEFT adapters) holding those tensors, which the bundle code
  saves as it saves any model. Non-persistent buffers (rotary tables) are not in a state dict: they are copied from
  the live model, where FSDP and ZeRO-3 leave them whole.
- Held-out scoring. The engine calls the decoder and the output head directly (so that it never materializes
  [batch, length, vocabulary] logits). FSDP2 gathers a module's weights in that module's forward hook, and the
  embeddings, final norm and head belong to the root module's group, whose hook a direct call skips;
  `scoring_context` gathers the root's own group for the duration (what the root's forward would do) and puts it back.
  FSDP1 is handled the way TRL handles generation (`summon_full_params(recurse=False)`), ZeRO-3 by gathering the
  output embeddings (the engine reads their shape; DeepSpeed's hooks fetch the rest as modules run).

Every function here is a no-op on unsharded models, so single-process and DDP runs take the plain path.
Tested on CPU (gloo, two processes) with FSDP2 only: accelerate ignores its FSDP plugin on a CPU, and DeepSpeed did
not run here (see docs/supported.md).
"""

from __future__ import annotations

import contextlib
import copy

import torch

FSDP1, FSDP2, ZERO3 = "fsdp1", "fsdp2", "zero3"


def kind(model) -> str | None:
    """How `model`'s weights are sharded: FSDP1, FSDP2, ZERO3, or None (whole on every rank)."""
    if model is None:
        return None
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover - a torch built without distributed
        return None
    mods = list(model.modules())
    if any(isinstance(m, FSDP) for m in mods):
        return FSDP1
    if any(isinstance(m, FSDPModule) for m in mods):
        return FSDP2
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return ZERO3
    return None


def full_state_dict(model, *, is_main: bool) -> dict | None:
    """Every tensor of `model`, whole, on CPU, on the main process (None elsewhere). Collective for sharded models:
    every rank must call it, with the same model. FSDP1: pass the wrapped root (the trainer's `model_wrapped`)."""
    k = kind(model)
    if k in (FSDP1, FSDP2):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # cpu_offload=True: the main process receives every tensor on CPU, the others get an empty dict
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if is_main else None
    if k == ZERO3:
        import deepspeed

        out: dict = {}
        for prefix, module in _unwrapped(model).named_modules():  # the engine's own names carry "module."
            params = list(module.named_parameters(recurse=False))
            # modifier_rank=None: read-only, every rank gathers (one module at a time bounds the memory)
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
                if is_main:
                    for name, p in params:
                        out[f"{prefix}.{name}" if prefix else name] = p.detach().cpu().clone()
            if is_main:
                for name, b in module.named_buffers(recurse=False):
                    if name not in module._non_persistent_buffers_set:
                        out[f"{prefix}.{name}" if prefix else name] = b.detach().cpu().clone()
        return out if is_main else None
    return {k: v.detach().cpu() for k, v in model.state_dict().items()} if is_main else None


def _plain_class(module) -> type:
    """FSDP2 turns a module's class into a subclass `FSDP<Name>`; the class to rebuild is the one under it."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def _unwrapped(model):
    """FSDP1 / DeepSpeed / DDP wrappers keep the real model in `.module`."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module) and type(model).__name__ in (
        "FullyShardedDataParallel", "DeepSpeedEngine", "DistributedDataParallel"
    ):  # fmt: skip
        model = model.module
    return model


def _clean(name: str) -> str:
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def materialize(model, state_dict: dict):
    """A plain CPU model with `model`'s architecture (and PEFT adapters, the active one kept) holding `state_dict`.

    Built on the meta device and filled with `load_state_dict(assign=True)`, so the only memory used is the gathered
    tensors themselves. Keys must match exactly (tied weights aside); anything left unfilled is an error."""
    from accelerate import init_empty_weights

    from ..reference import active_adapter, is_peft_model

    src = _unwrapped(model)
    with init_empty_weights(include_buffers=True):
        if is_peft_model(src):
            from peft import PeftModel

            base_src = src.get_base_model()
            base = _plain_class(base_src)(copy.deepcopy(base_src.config))
            names = list(src.peft_config)
            active = active_adapter(src)
            order = [active] + [n for n in names if n != active]
            out = PeftModel(base, copy.deepcopy(src.peft_config[order[0]]), adapter_name=order[0])
            for name in order[1:]:
                out.add_adapter(name, copy.deepcopy(src.peft_config[name]))
            out.set_adapter(active)
        else:
            out = _plain_class(src)(copy.deepcopy(src.config))
    state_dict = {_clean(k): v for k, v in state_dict.items()}
    res = out.load_state_dict(state_dict, strict=False, assign=True)
    if res.unexpected_keys:
        raise RuntimeError(f"gathered weights do not fit the model: unexpected {sorted(res.unexpected_keys)[:5]}")
    plain = out.get_base_model() if is_peft_model(out) else out
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()  # tied keys (lm_head / embed_tokens) share one tensor again
    live = {_clean(n): b for n, b in src.named_buffers()}
    for name, buf in list(out.named_buffers()):
        if buf.device.type == "meta":  # non-persistent buffers (rotary tables): whole on every rank
            if name not in live:
                raise RuntimeError(f"gathered weights do not fit the model: no buffer {name!r} to copy")
            owner, _, leaf = name.rpartition(".")
            out.get_submodule(owner)._buffers[leaf] = live[name].detach().cpu().clone()
    missing = [n for n, p in out.named_parameters() if p.device.type == "meta"]
    if missing:
        raise RuntimeError(f"gathered weights do not fit the model: missing {missing[:5]}")
    gen = getattr(src.get_base_model() if is_peft_model(src) else src, "generation_config", None)
    if gen is not None and hasattr(plain, "generation_config"):
        plain.generation_config = copy.deepcopy(gen)
    return out.eval()


def trainer_models(trainer, reference) -> dict:
    """{"policy": model[, "reference": model]}: the trainer's models as their sharding wrappers hold them (FSDP1
    gathers through the wrapped root), the reference only when it is a separate model (`reference.Reference`)."""
    from .. import trl_hooks

    out = {"policy": getattr(trainer, "model_wrapped", None) or trainer.model}
    if reference is not None and reference.kind == "separate" and reference.model is not None:
        own = trl_hooks.trainer_reference(trainer)
        out["reference"] = trainer.ref_model if own is not None and own is reference.model else reference.model
    return out


def full_model(model, *, is_main: bool):
    """`model` with full weights on the main process: the model itself when it is not sharded, else a CPU copy
    (collective: every rank must call it). None on the other ranks."""
    if kind(model) is None:
        return _unwrapped(model) if is_main else None
    sd = full_state_dict(model, is_main=is_main)
    return materialize(model, sd) if is_main else None


@contextlib.contextmanager
def scoring_context(*models):
    """Make direct calls to the decoder and the head of sharded `models` valid (every rank, in lockstep)."""
    with contextlib.ExitStack() as stack:
        for model in models:
            k = kind(model)
            if k == FSDP2:
                stack.enter_context(_fsdp2_root_gathered(model))
            elif k == FSDP1:
                from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

                stack.enter_context(FSDP.summon_full_params(model, recurse=False, writeback=False))
            elif k == ZERO3:
                import deepspeed

                head = _unwrapped(model)
                head = head.get_base_model() if hasattr(head, "get_base_model") else head
                params = list(head.get_output_embeddings().parameters()) + list(head.get_input_embeddings().parameters())
                stack.enter_context(deepspeed.zero.GatheredParameters(params, modifier_rank=None))
        yield


@contextlib.contextmanager
def _fsdp2_root_gathered(model):
    from torch.distributed.fsdp import FSDPModule

    roots = [m for name, m in model.named_modules() if isinstance(m, FSDPModule)
             and not any(isinstance(a, FSDPModule) for a in _ancestors(model, name))]  # fmt: skip
    for root in roots:
        # The first forward through a root decides that it is the root (FSDP2's lazy init). Held-out scoring may run
        # before any training forward and calls the decoder's layers directly, which would make a layer claim it;
        # so initialise the root first, exactly as its own forward would. (torch has no public call for this.)
        state = root._get_fsdp_state()
        state._lazy_init()
        root.unshard()
    try:
        yield
    finally:
        for root in roots:
            root.reshard()


def _ancestors(model, name: str):
    parts = name.split(".") if name else []
    return [model.get_submodule(".".join(parts[:i])) for i in range(len(parts))]
