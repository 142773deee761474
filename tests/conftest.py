"""Shared fixtures: a tiny Qwen2-style tokenizer and models, built locally, saved and reloaded as a user would."""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """{tokenizer, reference, policy}: paths of a saved tokenizer, a reference model and a perturbed 'policy'."""
    from progadv_trl.demo.tiny import build_model, build_tokenizer, perturbed_copy

    root = tmp_path_factory.mktemp("tiny")
    tok = build_tokenizer(root / "tokenizer")
    ref = build_model(tok, root / "reference")
    perturbed_copy(ref, root / "policy")
    tok.save_pretrained(root / "policy")
    return {"tokenizer": root / "tokenizer", "reference": root / "reference", "policy": root / "policy"}


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir["tokenizer"])


@pytest.fixture(scope="session")
def tiny_models(tiny_dir):
    """(policy, reference) as AutoModelForCausalLM loaded from disk, in eval mode."""
    from transformers import AutoModelForCausalLM

    pol = AutoModelForCausalLM.from_pretrained(tiny_dir["policy"]).eval()
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir["reference"]).eval()
    return pol, ref


from progadv_trl.demo.tiny import WEATHER_TOOL, make_trajectory  # noqa: E402,F401 - tests import them from here


@pytest.fixture
def trajectories():
    return [make_trajectory(i, n_turns=1 + i % 3, success=bool(i % 2), group=f"g{i // 4}") for i in range(8)]
