"""Critic bundle: round trips (full, LoRA, two adapters, reference by identity), every refusal, atomic export."""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from conftest import make_trajectory
from progadv_trl import bundle as B
from progadv_trl.bundle import export as E  # private helpers patched below live where export_bundle calls them
from progadv_trl.bundle import (
    MANIFEST_NAME,
    POLICY_DIR,
    REFERENCE_DIR,
    TOKENIZER_DIR,
    BundleError,
    export_bundle,
    export_from_paths,
    inspect_bundle,
    load_bundle,
    verify_bundle,
)
from progadv_trl.critic import ProgressCritic
from progadv_trl.engine import ProgressScorer
from progadv_trl.scoring import ScoringConfig

CFG = ScoringConfig(beta=0.1, step_reduction="min")  # not the defaults, so the test sees them carried over
TRAINING = dict(beta=0.1, temperature=0.9, trainer_class="GRPOTrainer", global_step=7, seed=3)


def _trajs():
    return [make_trajectory(i, n_turns=1 + i % 3, success=bool(i % 2), group=f"g{i // 3}") for i in range(6)]


def _same_scores(a, b, atol=1e-6):
    assert [x.id for x in a] == [y.id for y in b]
    np.testing.assert_allclose([x.score for x in a], [y.score for y in b], rtol=0, atol=atol)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.advantages, y.advantages, rtol=0, atol=atol)
        assert x.baselines.keys() == y.baselines.keys()
        np.testing.assert_allclose(list(x.baselines.values()), list(y.baselines.values()), rtol=0, atol=atol)


def _lora(path, seed=0, adapter="default", model=None):
    """A LoRA policy on the tiny reference with non-zero B (a fresh adapter is the identity, which tests nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    if model is None:
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), cfg, adapter_name=adapter)
    else:
        model.add_adapter(adapter, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f"lora_B.{adapter}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def full_bundle(tmp_path_factory, tiny_models, tiny_tokenizer):
    pol, ref = tiny_models
    out = tmp_path_factory.mktemp("full") / "critic"
    export_bundle(
        out,
        pol,
        ref,
        tiny_tokenizer,
        scoring_config=CFG,
        max_length=64,
        training=TRAINING,
        heldout_metrics={"auroc": 0.7, "auroc_ci": [0.6, float("nan")], "n": 40},
        heldout_fingerprint=B.fingerprint_trajectories(_trajs()),
        reduction_choice="cross-validation",
    )
    return out


@pytest.fixture
def bundle_copy(full_bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(full_bundle, dst)
    return dst


def _load_error(path, **kw) -> str:
    with pytest.raises(BundleError) as e:
        load_bundle(path, **kw)
    return str(e.value)


def _rehash(bundle, rel):
    """Update one file's hash in the manifest (a bundle consistently exported with that file)."""
    m = json.loads((bundle / MANIFEST_NAME).read_text())
    sec, name = rel.split("/", 1)
    m[{POLICY_DIR: "policy", REFERENCE_DIR: "reference", TOKENIZER_DIR: "tokenizer"}[sec]]["files"][name] = {
        "sha256": B.sha256_file(bundle / rel),
        "bytes": (bundle / rel).stat().st_size,
    }
    (bundle / MANIFEST_NAME).write_text(json.dumps(m))


# ----------------------------------------------------------------------------------------------------------------
# Round trips


def test_full_round_trip_scores_identical_and_manifest(full_bundle, tiny_models, tiny_tokenizer):
    pol, ref = tiny_models
    trajs = _trajs()
    before = ProgressScorer(pol, tiny_tokenizer, ref, config=CFG, max_length=64).score(trajs)
    critic = ProgressCritic.from_pretrained(full_bundle)
    assert critic.config == CFG and critic.scorer.max_length == 64
    _same_scores(before, critic.score(trajs))
    assert any(s.truncation for s in before)  # max_length really cut something, so carrying it over mattered

    names = sorted(p.relative_to(full_bundle).as_posix() for p in full_bundle.rglob("*") if p.is_file())
    assert {"manifest.json", "README.md", "policy/model.safetensors", "reference/model.safetensors"} <= set(names)
    assert not [n for n in names if n.endswith((".bin", ".pt"))]
    m = json.loads((full_bundle / MANIFEST_NAME).read_text())  # plain JSON: NaN was stored as null
    assert m["format_version"] == B.FORMAT_VERSION
    assert {"progadv_trl", "trl", "transformers", "peft", "torch"} <= set(m["library_versions"])
    assert m["policy"]["kind"] == "full" and m["reference"]["kind"] == "full"
    for sec in ("policy", "reference", "tokenizer"):
        for rel, info in m[sec]["files"].items():
            assert info["sha256"] == B.sha256_file(full_bundle / m[sec]["dir"] / rel)
    assert m["tokenizer"]["chat_template_sha256"] and m["tokenizer"]["vocab_sha256"]
    assert m["training"] == {"beta": 0.1, "temperature": 0.9}
    assert m["scoring"]["config"]["step_reduction"] == "min" and m["scoring"]["reduction_choice"] == {"how": "cross-validation"}
    assert m["max_length"] == 64 and m["truncation"]["policy"] == "keep_start_and_recent"
    assert m["heldout_metrics"]["auroc_ci"] == [0.6, None]
    assert m["provenance"]["trainer_class"] == "GRPOTrainer" and m["provenance"]["global_step"] == 7
    assert m["provenance"]["heldout_fingerprint"].startswith("sha256:")
    card = (full_bundle / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: progadv_trl\n") and "tags:\n- progadv_trl" in card
    assert "base_model:" not in card  # the reference is a local path here, not a Hub id


def test_lora_round_trip_stores_adapter_and_unmerged_base(tmp_path, tiny_dir, tiny_tokenizer):
    from peft import PeftModel
    from safetensors.torch import load_file

    policy = _lora(tiny_dir["reference"])
    trajs = _trajs()
    before = ProgressScorer(policy, tiny_tokenizer, config=CFG).score(trajs)
    out = export_bundle(tmp_path / "lora", policy, None, tiny_tokenizer, scoring_config=CFG)
    assert (out / POLICY_DIR / "adapter_config.json").is_file() and (out / POLICY_DIR / "adapter_model.safetensors").is_file()
    # The reference is the base exactly as the adapter found it: no LoRA deltas merged, no adapter keys.
    stored = load_file(out / REFERENCE_DIR / "model.safetensors")
    original = load_file(tiny_dir["reference"] / "model.safetensors")
    assert stored.keys() == original.keys()
    assert all(torch.equal(stored[k], original[k]) for k in original)
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["policy"]["kind"] == "lora" and m["reference"]["is_policy_base"]
    assert "lora" in (out / "README.md").read_text()

    pol, tok, ref, _ = load_bundle(out)
    assert isinstance(pol, PeftModel) and ref.kind == "adapter_disabled" and ref.model is None
    _same_scores(before, ProgressCritic.from_pretrained(out).score(trajs))


def test_two_adapters_reference_adapter_merged(tmp_path, tiny_dir, tiny_tokenizer):
    """TRL's "ref" adapter (training an existing adapter with beta > 0): both adapters stored merged, as full weights."""
    from progadv_trl.reference import Reference

    model = _lora(tiny_dir["reference"], seed=0)
    model = _lora(None, seed=1, adapter="ref", model=model)
    model.set_adapter("default")
    trajs = _trajs()[:3]
    before = ProgressScorer(model, tiny_tokenizer, Reference("named_adapter", adapter="ref")).score(trajs)
    with pytest.raises(BundleError, match="reference_adapter='ref'"):
        export_bundle(tmp_path / "x", model, None, tiny_tokenizer)
    assert not (tmp_path / "x").exists()
    out = export_bundle(tmp_path / "two", model, None, tiny_tokenizer, reference_adapter="ref")
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["policy"]["merged_from_adapter"] == "default" and m["reference"]["merged_from_adapter"] == "ref"
    _same_scores(before, ProgressCritic.from_pretrained(out).score(trajs), atol=1e-4)  # merged: float rounding only


def test_lora_policy_with_separate_reference_is_merged(tmp_path, tiny_dir, tiny_models, tiny_tokenizer):
    policy = _lora(tiny_dir["reference"], seed=4)
    ref = tiny_models[0]  # any other model: the adapter's base is then not the reference, so the policy is merged
    trajs = _trajs()[:3]
    before = ProgressScorer(policy, tiny_tokenizer, ref).score(trajs)
    out = export_bundle(tmp_path / "m", policy, ref, tiny_tokenizer)
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["policy"]["kind"] == "full" and m["policy"]["merged_from_adapter"] == "default"
    _same_scores(before, ProgressCritic.from_pretrained(out).score(trajs), atol=1e-4)


def test_reference_by_identity(tmp_path, tiny_dir, tiny_models, tiny_tokenizer, monkeypatch):
    pol, ref = tiny_models
    trajs = _trajs()[:3]
    ident = {"repo_id": "tiny/reference", "revision": "0" * 40, "path": tiny_dir["reference"]}
    out = export_bundle(tmp_path / "id", pol, None, tiny_tokenizer, reference_identity=ident)
    assert not (out / REFERENCE_DIR).exists()
    with pytest.raises(BundleError, match="holds different weights than the model passed as the reference"):
        export_bundle(tmp_path / "wrong", pol, pol, tiny_tokenizer, reference_identity=ident)
    assert not (tmp_path / "wrong").exists()
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["reference"]["kind"] == "identity" and "model.safetensors" in m["reference"]["files"]
    assert "base_model: \"tiny/reference\"" in (out / "README.md").read_text()

    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    err = _load_error(out)
    assert "not in the local Hugging Face cache" in err and "huggingface-cli download tiny/reference" in err
    text = inspect_bundle(out)  # inspect: a warning, not a failure
    assert "warnings:" in text and "huggingface-cli download" in text and text.splitlines()[-1].startswith("OK:")

    before = ProgressScorer(pol, tiny_tokenizer, ref).score(trajs)
    _same_scores(before, ProgressCritic.from_pretrained(out, reference_path=tiny_dir["reference"]).score(trajs))
    # found in the local cache (a hub snapshot folder named after the commit)
    snap = tmp_path / "cache" / "models--tiny--reference" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_dir["reference"], snap)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "cache"))
    _same_scores(before, ProgressCritic.from_pretrained(out).score(trajs))
    # other weights under that name: refused
    err = _load_error(out, reference_path=tiny_dir["policy"])
    assert "does not match the manifest" in err and "is not tiny/reference at revision 000" in err


def test_identity_lookup_not_cached_vs_other_failure(monkeypatch):
    """Only huggingface_hub's not-found/offline errors read "not in the local cache"; any other failure says what
    failed and keeps its cause."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def not_cached(*a, **k):
        raise LocalEntryNotFoundError("no snapshot in the cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_cached)
    with pytest.raises(BundleError) as e:
        B.resolve_reference_dir("tiny/reference", "abc")
    assert "not in the local Hugging Face cache" in str(e.value) and "--revision abc" in str(e.value)
    assert isinstance(e.value.__cause__, LocalEntryNotFoundError)

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", "/cache/models--tiny--reference")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", denied)
    with pytest.raises(BundleError) as e:
        B.resolve_reference_dir("tiny/reference", "abc")
    msg = str(e.value)
    assert "not in the local Hugging Face cache" not in msg
    assert "(tiny/reference at abc) in the local Hugging Face cache failed (PermissionError:" in msg
    assert "Permission denied" in msg and isinstance(e.value.__cause__, PermissionError)


def test_choose_layout_names_one_reference(tiny_models):
    pol, ref = tiny_models
    def layout(*args):
        return B.choose_layout(pol, B.resolve_for_export(pol, *args))

    assert layout(ref, None, None) == "full"
    assert layout(None, {"repo_id": "tiny/reference"}, None) == "full"
    with pytest.raises(BundleError, match="needs its reference"):
        layout(None, None, None)
    with pytest.raises(BundleError, match="needs a PeftModel policy"):
        layout(ref, None, "ref")


def test_load_refuses_a_report_without_reference_dir(full_bundle, monkeypatch):
    """No `assert` as a runtime guard: a verification that yields no reference folder is a BundleError (also
    under python -O)."""
    from progadv_trl.bundle import load as L

    real = L.verify_bundle

    def no_reference_dir(*a, **k):
        report = real(*a, **k)
        report.reference_dir = None
        return report

    monkeypatch.setattr(L, "verify_bundle", no_reference_dir)
    err = _load_error(full_bundle)
    assert "passed verification without a readable manifest or a reference folder" in err


def test_lora_with_reference_by_identity(tmp_path, tiny_dir, tiny_tokenizer):
    policy = _lora(tiny_dir["reference"], seed=2)
    trajs = _trajs()[:3]
    before = ProgressScorer(policy, tiny_tokenizer).score(trajs)
    ident = {"repo_id": "tiny/reference", "revision": "abc", "path": tiny_dir["reference"]}
    out = export_bundle(tmp_path / "lid", policy, None, tiny_tokenizer, reference_identity=ident)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", MANIFEST_NAME, POLICY_DIR, TOKENIZER_DIR]
    _same_scores(before, ProgressCritic.from_pretrained(out, reference_path=tiny_dir["reference"]).score(trajs))


def test_export_from_paths_full_and_lora_adapter(tmp_path, tiny_dir, tiny_tokenizer):
    trajs = _trajs()[:3]
    out = export_from_paths(tiny_dir["policy"], tiny_dir["reference"], tmp_path / "pair", max_length=128)
    direct = ProgressScorer.from_pretrained(tiny_dir["policy"], tiny_dir["reference"], max_length=128).score(trajs)
    _same_scores(direct, ProgressCritic.from_pretrained(out).score(trajs))
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["provenance"]["exported_from"]["policy"] == str(tiny_dir["policy"])

    adapter = tmp_path / "adapter"
    _lora(tiny_dir["reference"], seed=3).save_pretrained(adapter)  # records the tiny reference as its base
    out = export_from_paths(adapter, None, tmp_path / "lora")
    assert json.loads((out / MANIFEST_NAME).read_text())["policy"]["kind"] == "lora"
    _same_scores(ProgressScorer.from_pretrained(adapter).score(trajs), ProgressCritic.from_pretrained(out).score(trajs))
    with pytest.raises(BundleError, match="does not exist"):
        export_from_paths(tmp_path / "nope", None, tmp_path / "x")


# ----------------------------------------------------------------------------------------------------------------
# Refusals


def test_refuses_pickle_weights(bundle_copy):
    torch.save({"w": torch.zeros(2)}, bundle_copy / POLICY_DIR / "pytorch_model.bin")
    err = _load_error(bundle_copy)
    assert "policy/pytorch_model.bin is a pickle file" in err and "safetensors" in err
    assert "pytorch_model.bin is not part of the bundle" not in err  # one message per file, the one that helps


def test_refuses_remote_code_unless_trusted(bundle_copy):
    cfg_path = bundle_copy / POLICY_DIR / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    cfg_path.write_text(json.dumps(cfg))
    _rehash(bundle_copy, "policy/config.json")  # a consistent bundle of a remote-code model
    err = _load_error(bundle_copy)
    assert "auto_map" in err and "trust_remote_code=True" in err
    assert verify_bundle(bundle_copy, trust_remote_code=True).ok  # the user can opt in


def test_refuses_newer_format_and_reports_unknown_keys(bundle_copy):
    mpath = bundle_copy / MANIFEST_NAME
    m = json.loads(mpath.read_text())
    m["a_future_field"] = {"x": 1}
    mpath.write_text(json.dumps(m))
    with pytest.warns(UserWarning, match="a_future_field"):
        load_bundle(bundle_copy)
    m["format_version"] = B.FORMAT_VERSION + 1
    mpath.write_text(json.dumps(m))
    err = _load_error(bundle_copy)
    assert f"manifest format {B.FORMAT_VERSION + 1}" in err and "pip install -U progadv_trl" in err


def test_refuses_missing_and_corrupted_files(bundle_copy):
    (bundle_copy / REFERENCE_DIR / "model.safetensors").unlink()
    p = bundle_copy / POLICY_DIR / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte in the weights
    p.write_bytes(bytes(data))
    (bundle_copy / POLICY_DIR / "extra.safetensors").write_bytes(b"x")
    err = _load_error(bundle_copy)
    assert "reference/model.safetensors is missing" in err
    assert "policy/model.safetensors does not match the manifest" in err
    assert "policy/extra.safetensors is not part of the bundle" in err
    report = inspect_bundle(bundle_copy)
    assert "FAILED: 3 problem(s)" in report and "CORRUPTED" in report and "MISSING" in report


def test_refuses_swapped_tokenizer(bundle_copy, tmp_path):
    from progadv_trl.demo.tiny import build_tokenizer

    other = build_tokenizer(tmp_path / "other_tok", vocab_size=380)
    shutil.rmtree(bundle_copy / TOKENIZER_DIR)
    other.save_pretrained(bundle_copy / TOKENIZER_DIR)
    err = _load_error(bundle_copy)
    assert "vocabulary differs" in err and "tokenizer/tokenizer.json does not match" in err


def test_refuses_changed_chat_template(bundle_copy):
    t = bundle_copy / TOKENIZER_DIR / "chat_template.jinja"
    t.write_text(t.read_text().replace("<|im_start|>system", "<|im_start|>SYSTEM"))
    _rehash(bundle_copy, "tokenizer/chat_template.jinja")  # even with consistent file hashes, the meaning changed
    err = _load_error(bundle_copy)
    assert "chat template differs" in err and "vocabulary" not in err


def test_refuses_non_bundles(tmp_path):
    assert "not a directory" in _load_error(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    assert "no manifest.json" in _load_error(tmp_path / "plain")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST_NAME).write_text("{not json")
    assert "not valid JSON" in _load_error(tmp_path / "bad")


def test_export_refusals(tmp_path, tiny_models, tiny_tokenizer):
    pol, ref = tiny_models
    with pytest.raises(BundleError, match="needs its reference"):
        export_bundle(tmp_path / "a", pol, None, tiny_tokenizer)
    with pytest.raises(BundleError, match="cannot store a object"):
        export_bundle(tmp_path / "a", pol, ref, tiny_tokenizer, heldout_metrics={"x": object()})
    with pytest.raises(BundleError, match="Calibrator.to_dict"):
        export_bundle(tmp_path / "a", pol, ref, tiny_tokenizer, calibration={"coef": 1})
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary folder left


# ----------------------------------------------------------------------------------------------------------------
# Atomic export


def test_interrupted_export_leaves_nothing_loadable(tmp_path, tiny_models, tiny_tokenizer, monkeypatch):
    pol, ref = tiny_models
    out = tmp_path / "critic"

    def crash(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(E, "_save_tokenizer", crash)  # after both models were written: halfway
    with pytest.raises(RuntimeError, match="disk full"):
        export_bundle(out, pol, ref, tiny_tokenizer)
    assert list(tmp_path.iterdir()) == []  # no target, no temporary folder

    # A hard kill gets no cleanup: the leftover temporary folder is never mistaken for a bundle.
    monkeypatch.setattr(E.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(RuntimeError):
        export_bundle(out, pol, ref, tiny_tokenizer)
    (left,) = list(tmp_path.iterdir())
    assert left.name.startswith(".critic.tmp-") and not (left / MANIFEST_NAME).exists()
    assert "not a directory" in _load_error(out)
    assert "did not finish" in _load_error(left)
    # ... even when the kill came after the manifest, just before the rename
    monkeypatch.undo()
    monkeypatch.setattr(E.shutil, "rmtree", lambda *a, **k: None)
    monkeypatch.setattr(E, "_publish", crash)
    with pytest.raises(RuntimeError):
        export_bundle(tmp_path / "c2", pol, ref, tiny_tokenizer)
    (left2,) = [p for p in tmp_path.iterdir() if p.name.startswith(".c2.tmp-")]
    assert (left2 / MANIFEST_NAME).exists() and "did not finish" in _load_error(left2)


def test_overwrite_rules_and_interrupted_overwrite_keeps_old(tmp_path, full_bundle, tiny_models, tiny_tokenizer, monkeypatch):
    pol, ref = tiny_models
    out = tmp_path / "critic"
    shutil.copytree(full_bundle, out)
    with pytest.raises(BundleError, match="overwrite=True"):
        export_bundle(out, pol, ref, tiny_tokenizer)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not a bundle"):
        export_bundle(tmp_path / "notes", pol, ref, tiny_tokenizer, overwrite=True)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"

    monkeypatch.setattr(E, "_save_tokenizer", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        export_bundle(out, pol, ref, tiny_tokenizer, overwrite=True, scoring_config=ScoringConfig(beta=5.0))
    monkeypatch.undo()
    assert verify_bundle(out).ok and load_bundle(out)[3]["scoring"]["config"]["beta"] == CFG.beta  # old bundle intact

    export_bundle(out, pol, ref, tiny_tokenizer, overwrite=True, scoring_config=ScoringConfig(beta=5.0))
    assert load_bundle(out)[3]["scoring"]["config"]["beta"] == 5.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["critic", "notes"]  # no .old / .tmp folders left


# ----------------------------------------------------------------------------------------------------------------
# The critic's uses


def test_critic_uses(tmp_path, full_bundle, tiny_models, tiny_tokenizer):
    from progadv_trl.evaluation import Calibrator, attribute_failure

    trajs = _trajs()
    critic = ProgressCritic.from_pretrained(full_bundle)
    scores = critic.score(trajs)
    with pytest.raises(BundleError, match="no success calibration"):
        critic.predict_success(trajs)

    picks = critic.best_of_n(trajs)
    assert sorted(picks) == ["g0", "g1"]
    for g, kept in picks.items():
        assert kept.score == max(s.score for s in scores if s.group == g)

    failed = trajs[2]
    i = trajs.index(failed)
    assert critic.attribute_failure(failed) == attribute_failure(scores[i].advantages, "min_cumsum")
    assert critic.attribute_failure(failed, rule="min_step") == attribute_failure(scores[i].advantages, "min_step")
    # overrides apply to one call only
    assert critic.score(trajs[:1], beta=1.0)[0].score == pytest.approx(scores[0].score / CFG.beta)
    assert critic.config.beta == CFG.beta

    pol, ref = tiny_models
    cal = Calibrator().fit([s.score for s in scores], [s.success for s in scores])
    out = export_bundle(
        tmp_path / "cal", pol, ref, tiny_tokenizer, scoring_config=CFG, max_length=64, calibration=cal.to_dict(),
        attribution={"rule": "min_step"},
    )  # fmt: skip
    critic = ProgressCritic.from_pretrained(out)
    np.testing.assert_allclose(critic.predict_success(trajs), cal.predict([s.score for s in scores]), atol=1e-9)
    assert critic.attribute_failure(failed) == attribute_failure(scores[i].advantages, "min_step")


def test_inspect_ok(full_bundle):
    text = inspect_bundle(full_bundle)
    assert '"format_version": 1' in text and "OK      " in text and "policy/model.safetensors" in text
    assert text.rstrip().splitlines()[-1].startswith("OK:")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fresh bundle loads without warnings
        load_bundle(full_bundle)
