"""Tokenizers that disagree: compared on the ids of a probe conversation, not only on vocabulary and template.

The gap reproduced first: a LoRA adapter directory saved with the base's tokenizer files. transformers 5 loads
`TokenizersBackend` there (no config.json) and `Qwen2Tokenizer` for the base (config.json says qwen2), which builds
its own pre-tokenizer in code. When tokenizer.json's pre-tokenizer is not Qwen2's, the same files give different ids.
"""

import json
import shutil
import unicodedata
import warnings

import pytest
import torch

from reliability_helpers import one_torch_thread  # noqa: F401 - autouse
from conftest import make_trajectory
from progadv_trl.cli import main
from progadv_trl.trajectories import as_trajectories
from progadv_trl.rendering import TokenizerMismatchError, check_same_tokenizer, probe_ids, probe_text, render

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _save_lora(base_dir, out_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # a fresh adapter is the identity; give it something to score
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(out_dir)  # records base_dir as its base model


def _copy_tokenizer(src, dst):
    for f in TOKENIZER_FILES:
        shutil.copy(src / f, dst / f)


@pytest.fixture(scope="module")
def drifted(tmp_path_factory, tiny_dir):
    """{base, adapter}: a qwen2 base whose tokenizer.json uses GPT-2's byte-level split, and a LoRA adapter holding
    the very same tokenizer files."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("drift")
    base = root / "base"
    AutoModelForCausalLM.from_pretrained(tiny_dir["reference"]).save_pretrained(base)
    _copy_tokenizer(tiny_dir["reference"], base)
    tj = json.loads((base / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    (base / "tokenizer.json").write_text(json.dumps(tj))
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "TokenizersBackend"  # what save_pretrained writes for a tokenizer loaded from a bare file
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    adapter = root / "adapter"
    _save_lora(base, adapter)
    _copy_tokenizer(base, adapter)
    return {"base": base, "adapter": adapter}


def test_the_gap_same_files_different_ids(drifted):
    """What the old check missed: same vocabulary, same template, yet different ids for a plain conversation."""
    from transformers import AutoTokenizer

    a, b = AutoTokenizer.from_pretrained(drifted["adapter"]), AutoTokenizer.from_pretrained(drifted["base"])
    assert (type(a).__name__, type(b).__name__) == ("TokenizersBackend", "Qwen2Tokenizer")
    assert a.get_vocab() == b.get_vocab() and a.chat_template == b.chat_template
    t = as_trajectories([make_trajectory(3, n_turns=2)])[0]
    assert render(t, a).input_ids != render(t, b).input_ids
    with pytest.raises(TokenizerMismatchError, match=r"TokenizersBackend.*Qwen2Tokenizer.*different tokens.*first differing at token"):
        check_same_tokenizer(a, b)


def test_probe_covers_tool_calls_non_ascii_and_digits(tiny_tokenizer):
    text = probe_text(tiny_tokenizer)
    assert "<tool_call>" in text and "search_flights" in text  # the tool call, as the chat template writes it
    assert "東京" in text and "😀" in text and "1234.50" in text and "e\u0301" in text  # decomposed: normalizers differ
    decoded = tiny_tokenizer.decode(probe_ids(tiny_tokenizer))
    assert decoded == unicodedata.normalize("NFC", text)  # all of it is tokenized (Qwen2 normalizes to NFC)


@pytest.mark.parametrize("with_reference", [True, False])
def test_score_refuses_adapter_and_base_that_disagree(drifted, tmp_path, capsys, with_reference):
    src = tmp_path / "t.jsonl"
    src.write_text(json.dumps(make_trajectory(0)) + "\n")
    out = tmp_path / "s.jsonl"
    ref = ["--reference", str(drifted["base"])] if with_reference else []  # else: the base the adapter records
    rc = main(["score", "--policy", str(drifted["adapter"]), *ref, str(src), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists() and "Traceback" not in err
    assert f"adapter's ({drifted['adapter']}) tokenizer (TokenizersBackend)" in err
    assert f"base model's ({drifted['base']}) tokenizer (Qwen2Tokenizer)" in err
    assert f"Use the base model's tokenizer" in err and "tokenizer.json" in err  # which directory, which files


def test_export_refuses_the_same_pair(drifted, tmp_path):
    from progadv_trl.bundle import export_from_paths

    with pytest.raises(TokenizerMismatchError, match="Use the base model's tokenizer"):
        export_from_paths(drifted["adapter"], None, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_following_the_message_scores_with_the_base_ids(drifted, tmp_path):
    """Delete the adapter's tokenizer files, as the message says: the base's tokenizer is used, and the scores are
    those of a scorer given the base's tokenizer directly."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from progadv_trl.engine import ProgressScorer

    fixed = tmp_path / "adapter"
    shutil.copytree(drifted["adapter"], fixed)
    for f in TOKENIZER_FILES:
        (fixed / f).unlink()
    trajs = [make_trajectory(i) for i in range(3)]
    scorer = ProgressScorer.from_pretrained(fixed, drifted["base"])
    assert type(scorer.tokenizer).__name__ == "Qwen2Tokenizer"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(drifted["base"]), fixed)
    direct = ProgressScorer(model, AutoTokenizer.from_pretrained(drifted["base"])).score(trajs)
    got = scorer.score(trajs)
    assert [s.score for s in got] == pytest.approx([s.score for s in direct], abs=1e-5)
    assert max(abs(s.score) for s in got) > 0.01  # the adapter does something: not 0 == 0


def test_adapter_tokenizer_of_another_class_that_agrees_is_used_and_said(tiny_dir, tmp_path):
    """Same ids on the probe but another class: allowed, with a warning that says which one is used and why."""
    from progadv_trl.reference import load_pair

    adapter = tmp_path / "adapter"
    _save_lora(tiny_dir["reference"], adapter)
    _copy_tokenizer(tiny_dir["reference"], adapter)
    cfg = json.loads((adapter / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "TokenizersBackend"
    (adapter / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match=r"TokenizersBackend.*Qwen2Tokenizer.*agree on.*adapter's is used"):
        _, _, tok = load_pair(adapter, tiny_dir["reference"])
    assert type(tok).__name__ == "TokenizersBackend"
    # and an adapter whose tokenizer is the base's own class: nothing to say
    _copy_tokenizer(tiny_dir["reference"], adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        load_pair(adapter, tiny_dir["reference"])


def test_full_weight_pair_that_disagrees_names_the_policy_tokenizer(tiny_dir, tmp_path):
    """Two full checkpoints, same vocabulary and template, but the policy's tokenizer_config asks for a prefix space:
    refused on the probe ids, telling to use the policy's tokenizer."""
    from progadv_trl.reference import load_pair

    policy = tmp_path / "policy"
    shutil.copytree(tiny_dir["policy"], policy)
    cfg = json.loads((policy / "tokenizer_config.json").read_text())
    cfg["add_prefix_space"] = True
    (policy / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerMismatchError, match=rf"different tokens.*Use the policy's tokenizer \({policy}\)"):
        load_pair(policy, tiny_dir["reference"])


def test_bundle_tokenizer_reads_the_probe_as_the_models_did(tiny_dir, tmp_path):
    """A bundle's tokenizer/ directory has no config.json, so it loads by the class its tokenizer_config names: it
    must still give the ids the exported pair read."""
    from transformers import AutoTokenizer

    from progadv_trl.bundle import export_from_paths
    from progadv_trl.critic import ProgressCritic

    out = export_from_paths(tiny_dir["policy"], tiny_dir["reference"], tmp_path / "bundle")
    critic = ProgressCritic.from_pretrained(out)
    original = AutoTokenizer.from_pretrained(tiny_dir["reference"])
    assert probe_ids(critic.scorer.tokenizer) == probe_ids(original)
    check_same_tokenizer(critic.scorer.tokenizer, original, ("bundle", "exported"))
