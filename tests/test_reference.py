"""The one reference resolver: what each kind of policy gets as pi_ref, and that `active` really switches it."""

import pytest
import torch

from progadv_trl.reference import ADAPTER_DISABLED, NAMED_ADAPTER, SEPARATE, Reference, load_pair, resolve


def _lora(model, adapter="default", seed=0):
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    if isinstance(model, PeftModel):
        model.add_adapter(adapter, cfg)
        return model
    return get_peft_model(model, cfg, adapter_name=adapter)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_resolution_rules(tiny_dir):
    from transformers import AutoModelForCausalLM

    pol = AutoModelForCausalLM.from_pretrained(tiny_dir["policy"])
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir["reference"])
    r = resolve(pol, ref)
    assert r.kind == SEPARATE and r.model is ref and r.model_for(pol) is ref
    assert resolve(pol, r) is r  # a Reference is taken as is
    assert resolve(pol, identity={"repo_id": "x/y"}).kind == SEPARATE  # recorded by identity, weights not loaded
    with pytest.raises(ValueError, match="no reference"):
        resolve(pol)
    with pytest.raises(ValueError, match="needs a PEFT policy"):
        resolve(pol, adapter="ref")

    peft = _lora(AutoModelForCausalLM.from_pretrained(tiny_dir["reference"]))
    assert resolve(peft).kind == ADAPTER_DISABLED and resolve(peft, peft).kind == ADAPTER_DISABLED
    _lora(peft, "ref", seed=1)  # TRL's frozen "ref" adapter: the reference its KL term uses
    peft.set_adapter("default")
    r = resolve(peft)
    assert r.kind == NAMED_ADAPTER and r.adapter == "ref"
    with pytest.raises(ValueError, match="not one of the policy's adapters"):
        resolve(peft, adapter="nope")


def test_active_switches_to_the_reference_and_back(tiny_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir["reference"])
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    plain = _logits(base, ids)
    peft = _lora(base)
    _lora(peft, "ref", seed=1)
    peft.set_adapter("default")
    policy_logits = _logits(peft, ids)
    with Reference(ADAPTER_DISABLED).active(peft):
        torch.testing.assert_close(_logits(peft, ids), plain)  # the base
    with Reference(NAMED_ADAPTER, adapter="ref").active(peft):
        ref_logits = _logits(peft, ids)
    assert not torch.allclose(ref_logits, plain) and not torch.allclose(ref_logits, policy_logits)
    torch.testing.assert_close(_logits(peft, ids), policy_logits)  # back to the policy's adapter afterwards


def test_load_pair_from_paths(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    pol, ref, tok = load_pair(tiny_dir["policy"], tiny_dir["reference"])
    assert ref.kind == SEPARATE and ref.model is not None and tok.chat_template
    peft = _lora(AutoModelForCausalLM.from_pretrained(tiny_dir["reference"]))
    peft.save_pretrained(tmp_path / "adapter")
    pol, ref, _ = load_pair(tmp_path / "adapter", tiny_dir["reference"])
    assert ref.kind == ADAPTER_DISABLED and ref.model is None and ref.model_for(pol) is pol
    with pytest.raises(ValueError, match="needs a reference"):
        load_pair(tiny_dir["policy"])
