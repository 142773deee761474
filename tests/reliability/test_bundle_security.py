"""Security of the critic bundle (issue 15): safetensors only, no remote code unless asked, nothing read from outside
the bundle folder (manifest paths, section folders, symlinks). Each case is a bundle that would otherwise verify."""

import json
import os
import pickle
import shutil

import pytest

from progadv_trl.bundle import (
    MANIFEST_NAME,
    POLICY_DIR,
    TOKENIZER_DIR,
    BundleError,
    export_bundle,
    load_bundle,
    sha256_file,
    verify_bundle,
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_models, tiny_tokenizer):
    pol, ref = tiny_models
    out = tmp_path_factory.mktemp("sec") / "critic"
    export_bundle(out, pol, ref, tiny_tokenizer)
    return out


@pytest.fixture
def bundle(exported, tmp_path):
    """A fresh copy, with room beside it (tmp_path/...) for files outside the bundle."""
    dst = tmp_path / "bundle"
    shutil.copytree(exported, dst)
    assert verify_bundle(dst).ok  # every case below starts from a bundle that verifies
    return dst


def _manifest(bundle) -> dict:
    return json.loads((bundle / MANIFEST_NAME).read_text())


def _save_manifest(bundle, m) -> None:
    (bundle / MANIFEST_NAME).write_text(json.dumps(m))


def _list_file(bundle, section, rel) -> None:
    """Add a file to the manifest with its true hash: a bundle consistently exported with that file."""
    m = _manifest(bundle)
    p = bundle / m[section]["dir"] / rel
    m[section]["files"][rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    _save_manifest(bundle, m)


def _errors(bundle, **kw) -> str:
    report = verify_bundle(bundle, **kw)
    assert not report.ok
    with pytest.raises(BundleError) as e:
        load_bundle(bundle, **kw)
    return str(e.value)


# ----------------------------------------------------------------------------------------------------------------
# Safetensors only, no remote code


class _Payload:
    """Unpickling this creates a file: the proof that pickle code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_is_never_unpickled_even_when_listed(bundle, tmp_path):
    sentinel = tmp_path / "pickle_code_ran"
    (bundle / POLICY_DIR / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(sentinel)))
    (bundle / POLICY_DIR / "model.safetensors").unlink()  # transformers would fall back to the .bin
    m = _manifest(bundle)
    del m["policy"]["files"]["model.safetensors"]
    _save_manifest(bundle, m)
    _list_file(bundle, "policy", "pytorch_model.bin")  # listed with its true hash: still refused
    err = _errors(bundle)
    assert "policy/pytorch_model.bin is a pickle file" in err and "safetensors only" in err
    assert not sentinel.exists()


def test_python_files_are_remote_code(bundle):
    (bundle / TOKENIZER_DIR / "tokenization_evil.py").write_text("raise SystemExit('ran')\n")
    _list_file(bundle, "tokenizer", "tokenization_evil.py")
    err = _errors(bundle)
    assert "the tokenizer ships Python code (['tokenization_evil.py'])" in err and "trust_remote_code=True" in err


# ----------------------------------------------------------------------------------------------------------------
# Paths in the manifest


@pytest.mark.parametrize("rel", ["../outside.json", "sub/../../outside.json", "/etc/hostname"])
def test_file_entry_outside_the_section_is_refused(bundle, rel):
    (bundle.parent / "outside.json").write_text("{}")
    m = _manifest(bundle)
    m["policy"]["files"][rel] = {"sha256": sha256_file(bundle.parent / "outside.json"), "bytes": 2}
    _save_manifest(bundle, m)
    err = _errors(bundle)
    assert f"{MANIFEST_NAME} lists {rel!r}, a path outside the policy: the manifest was tampered with" in err


@pytest.mark.parametrize("section", ["policy", "reference", "tokenizer"])
def test_section_dir_with_dotdot_is_refused(bundle, section):
    m = _manifest(bundle)
    outside = bundle.parent / f"outside_{section}"
    shutil.copytree(bundle / m[section]["dir"], outside)  # the same files: every hash would match
    m[section]["dir"] = f"../outside_{section}"
    _save_manifest(bundle, m)
    err = _errors(bundle)
    assert f"the {section}'s dir '../outside_{section}' points outside the bundle folder" in err


def test_section_dir_absolute_is_refused(bundle):
    m = _manifest(bundle)
    outside = (bundle.parent / "outside_tok").absolute()
    shutil.copytree(bundle / TOKENIZER_DIR, outside)
    m["tokenizer"]["dir"] = str(outside)
    _save_manifest(bundle, m)
    report = verify_bundle(bundle)
    assert f"the tokenizer's dir {str(outside)!r} points outside the bundle folder" in " ".join(report.errors)
    assert report.tokenizer is None and not [f for f in report.files if f.path.startswith(str(outside))]  # not read


def test_section_dir_not_a_string_is_refused(bundle):
    m = _manifest(bundle)
    m["policy"]["dir"] = ["policy"]
    _save_manifest(bundle, m)
    assert "the policy's dir is ['policy'], not a folder name" in _errors(bundle)


# ----------------------------------------------------------------------------------------------------------------
# Symlinks


def test_symlinked_file_pointing_outside_is_refused(bundle):
    weights = bundle / POLICY_DIR / "model.safetensors"
    outside = bundle.parent / "model.safetensors"
    shutil.move(weights, outside)
    os.symlink(outside, weights)  # same bytes, same hash: only the link gives it away
    err = _errors(bundle)
    assert f"policy/model.safetensors is a symlink that points outside the bundle, to {outside.resolve()}" in err


def test_symlinked_folder_pointing_outside_is_refused(bundle):
    outside = bundle.parent / "tok_elsewhere"
    shutil.move(bundle / TOKENIZER_DIR, outside)
    os.symlink(outside, bundle / TOKENIZER_DIR, target_is_directory=True)
    err = _errors(bundle)
    assert f"{TOKENIZER_DIR} is a symlink that points outside the bundle, to {outside.resolve()}" in err


def test_relative_and_dangling_symlinks_and_loops_are_refused(bundle):
    (bundle / POLICY_DIR / "a.json").symlink_to("../../elsewhere.json")  # relative, dangling, outside
    (bundle / POLICY_DIR / "loop").symlink_to("loop")
    err = _errors(bundle)
    assert "policy/a.json is a symlink that points outside the bundle" in err
    assert "policy/loop is a symlink that cannot be resolved (a symlink loop)" in err


def test_symlinked_manifest_pointing_outside_is_refused(bundle):
    outside = bundle.parent / "manifest_elsewhere.json"
    shutil.move(bundle / MANIFEST_NAME, outside)
    os.symlink(outside, bundle / MANIFEST_NAME)
    report = verify_bundle(bundle)
    assert report.manifest is None  # refused before the manifest was read
    assert any(e.startswith(f"{MANIFEST_NAME} is a symlink that points outside the bundle") for e in report.errors)


def test_symlink_inside_the_bundle_is_allowed(bundle):
    (bundle / "current").symlink_to(POLICY_DIR, target_is_directory=True)  # points inside: harmless
    report = verify_bundle(bundle)
    assert report.ok, report.errors
    assert any("current at the bundle's top level is not part of the bundle" in w for w in report.warnings)
