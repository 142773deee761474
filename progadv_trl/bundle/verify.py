"""Checking a bundle before it is trusted, without loading models: `verify_bundle`, and its report.

Refused, with a message that says what is wrong and what to do: pickle weights, remote code (unless asked for), a
newer manifest format, missing or corrupted files, files nobody exported, a tokenizer that is not the one the bundle
was exported with, paths in the manifest that leave the bundle folder, and symlinks that point outside it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .files import _escaping_symlinks, _is_pickle, _is_relative_inside, sha256_file
from .identity import resolve_reference_dir
from .layout import DEFAULT_DIRS, FORMAT_VERSION, KNOWN_KEYS, MANIFEST_NAME, README_NAME, TMP_RE, BundleError
from .manifest import library_versions, tokenizer_fingerprint


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


def _section_dir(report: BundleReport, root: Path, sec: dict, label: str) -> Path | None:
    """The folder a manifest section's files live in, inside the bundle; None (and an error) for a `dir` that is
    not a relative path below the bundle folder."""
    d = sec.get("dir") or DEFAULT_DIRS[label]
    if not isinstance(d, str):
        report.errors.append(f"{MANIFEST_NAME}: the {label}'s dir is {d!r}, not a folder name: the bundle is damaged. Re-export it")
        return None
    if not _is_relative_inside(d):
        report.errors.append(
            f"{MANIFEST_NAME}: the {label}'s dir {d!r} points outside the bundle folder (an absolute path or '..'); "
            "a bundle only reads files inside its folder, so the manifest was tampered with. Re-download or re-export "
            "the bundle"
        )
        return None
    return root / d


def _check_files(report: BundleReport, root: Path, expected: dict, label: str, prefix: str, strict_extra: bool) -> None:
    if not isinstance(expected, dict):
        report.errors.append(f"{MANIFEST_NAME}: the {label}'s files are not a JSON object: the bundle is damaged. Re-export it")
        return
    for rel, info in sorted(expected.items()):
        if not _is_relative_inside(rel):
            report.errors.append(f"{MANIFEST_NAME} lists {rel!r}, a path outside the {label}: the manifest was tampered with")
            continue
        p, shown = root / rel, f"{prefix}{rel}"
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
    """Check a bundle without loading models: manifest, versions, every file's hash, pickle, remote code, tokenizer,
    paths and symlinks that leave the bundle folder.

    Returns a report (errors make `load_bundle` refuse; warnings are printed). `require_reference=False` turns a
    reference recorded by identity that is not available locally into a warning (for `progadv inspect`).
    """
    root = Path(path)
    report = BundleReport(root, None)
    if not root.is_dir():
        report.errors.append(f"{root} is not a directory: pass the bundle folder written by export (progadv export)")
        return report
    if TMP_RE.match(root.name):
        report.errors.append(
            f"{root.name} is the temporary folder of an export that did not finish; it is not a bundle. Delete it and "
            "re-export"
        )
        return report
    # A symlink to a file or folder outside the bundle: what gets loaded could change behind the manifest's back.
    # Nothing is read through such a link; the bundle is refused before its manifest is opened.
    for rel, target in _escaping_symlinks(root):
        where = "cannot be resolved (a symlink loop)" if target is None else f"points outside the bundle, to {target}"
        report.errors.append(
            f"{rel} is a symlink that {where}; a bundle holds its own files, so it is not loaded. Replace the link "
            "with the file or folder itself, or re-export the bundle"
        )
    if report.errors:
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

    ref, tok = manifest["reference"], manifest["tokenizer"]
    labels = ["policy", "tokenizer"]
    if ref.get("kind") == "full":
        labels.insert(1, "reference")
    elif ref.get("kind") != "identity":
        report.errors.append(f"{MANIFEST_NAME}: unknown reference kind {ref.get('kind')!r}; upgrade progadv_trl or re-export")
    dirs = {label: _section_dir(report, root, manifest[label], label) for label in labels}
    for label, sub in dirs.items():
        if sub is None:
            continue
        d = sub.relative_to(root).as_posix()
        if not sub.is_dir():
            report.errors.append(f"{d}/ is missing: the {label} is not in the bundle. Re-export it")
            continue
        _check_files(report, sub, manifest[label].get("files") or {}, label, f"{d}/", strict_extra=True)
    stored = {PurePosixPath(sub.relative_to(root).as_posix()).parts[0] for sub in dirs.values() if sub is not None and sub != root}
    for p in sorted(root.iterdir()):
        if p.is_dir() and p.name not in stored or p.is_file() and p.name not in (MANIFEST_NAME, README_NAME) and not _is_pickle(p):
            report.warnings.append(f"{p.name} at the bundle's top level is not part of the bundle (ignored)")

    # The reference recorded by identity: find it, check its hashes.
    if ref.get("kind") == "full":
        report.reference_dir = dirs["reference"]
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
        places = [(d, label) for label, d in dirs.items() if label != "reference" and d is not None]
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

    if check_tokenizer and not tokenizer_remote and dirs["tokenizer"] is not None:
        _check_tokenizer(report, dirs["tokenizer"], tok, trust_remote_code)
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
    elif rec.get("probe_ids_sha256") and fp["probe_ids_sha256"] != rec["probe_ids_sha256"]:
        report.errors.append(
            f"the tokenizer loads as {type(tokenizer).__name__} and reads a probe conversation (tool calls, non-ASCII "
            "text, digits) into other token ids than at export, so the critic would score other tokens than it was "
            "built for. Load it with the transformers version and tokenizer class recorded in the manifest, or "
            "re-export the bundle"
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
