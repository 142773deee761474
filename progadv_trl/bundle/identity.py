"""A reference recorded by identity (hub id, revision and the sha256 of the files that decide what gets loaded)
instead of stored in the bundle: find its folder, record it at export, check it holds the weights training used."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from .files import sha256_file
from .layout import IDENTITY_PATTERNS, BundleError


def _identity_files(root: Path) -> list[Path]:
    files = sorted({p for pat in IDENTITY_PATTERNS for p in root.glob(pat) if p.is_file()})
    return files


def _not_cached_errors() -> tuple[type[BaseException], ...]:
    """huggingface_hub's errors for "these files are not in the local cache" (offline lookups find nothing)."""
    from huggingface_hub import errors

    names = ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "IncompleteSnapshotError", "CachedRepoTreeNotFoundError")
    return tuple(getattr(errors, n) for n in names if isinstance(getattr(errors, n, None), type))


def resolve_reference_dir(repo_id: str, revision: str | None, path: str | os.PathLike | None = None) -> Path:
    """A local directory holding the reference recorded by identity: `path`, else the Hugging Face cache (offline).

    Not in the cache: a BundleError that says how to get the files. Any other failure of the lookup (an invalid
    repo id, an unreadable cache, ...): a BundleError that says what failed, chained to its cause.
    """
    if path is not None:
        p = Path(path)
        if not p.is_dir():
            raise BundleError(f"reference path {p} is not a directory: pass the folder holding {repo_id}'s files")
        return p
    from huggingface_hub import snapshot_download

    name = f"{repo_id}" + (f" at {revision}" if revision else "")
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except _not_cached_errors() as e:
        rev = f" --revision {revision}" if revision else ""
        raise BundleError(
            f"the reference is recorded by identity ({name}) and is not in the local Hugging Face cache: run "
            f"`huggingface-cli download {repo_id}{rev}`, or pass reference_path= (--reference) a folder holding those "
            "files"
        ) from e
    except Exception as e:  # noqa: BLE001 - reported with its cause, never as "not cached"
        raise BundleError(
            f"looking up the reference recorded by identity ({name}) in the local Hugging Face cache failed "
            f"({type(e).__name__}: {e}). Fix that, or pass reference_path= (--reference) a folder holding its files"
        ) from e


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
            stacklevel=4,
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
        warnings.warn(f"could not compare the in-memory reference with {name}'s files (no common tensor names)", stacklevel=4)
    elif dtypes:
        warnings.warn(
            f"the reference recorded by identity is loaded as stored ({sorted(dtypes)[0]}): scores after loading may "
            "differ slightly from those at export",
            stacklevel=4,
        )


