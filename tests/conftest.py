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


def naive_spans(tokenizer, traj) -> tuple[list[int], list[tuple[int, int]]]:
    """(token ids, [(start, end) per assistant turn]) computed independently of the engine's offset mapping: each
    turn's prefix rendered separately and the *prefix strings* tokenized; turn i is [len(tok(prompt_i)),
    len(tok(upto_i).rstrip())). The float64 reference computations in the tests take their spans from here."""
    msgs, tools = traj["messages"], traj.get("tools")
    ids = tokenizer(tokenizer.apply_chat_template(msgs, tools=tools, tokenize=False), add_special_tokens=False).input_ids
    spans = []
    for mi, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(msgs[:mi], tools=tools, tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(msgs[: mi + 1], tools=tools, tokenize=False).rstrip()
        spans.append((len(tokenizer(before, add_special_tokens=False).input_ids),
                      len(tokenizer(upto, add_special_tokens=False).input_ids)))  # fmt: skip
    return ids, spans


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def strict_json_files(root) -> list:
    """Parse every .json and .jsonl file under `root` with a strict parser (NaN, Infinity and -Infinity refused, as
    RFC 8259 and most non-Python readers do); returns the paths read, so a test can say how many it checked."""
    import json
    from pathlib import Path

    read = []
    for p in sorted(Path(root).rglob("*")):
        if p.suffix not in (".json", ".jsonl") or not p.is_file():
            continue
        text = p.read_text(encoding="utf-8")
        try:
            if p.suffix == ".json":
                json.loads(text, parse_constant=_no_constant)
            else:
                for line in text.splitlines():
                    json.loads(line, parse_constant=_no_constant)
        except ValueError as e:
            raise AssertionError(f"{p} is not strict JSON: {e}") from None
        read.append(p)
    return read
