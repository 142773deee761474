"""File I/O of a bundle: hashing, fsync, the manifest write, the target checks, the atomic publish, pickle and
paths that leave the bundle.

Export is atomic: everything is written to a hidden temporary directory beside the target, the manifest last, then
the directory is renamed onto the target (`_publish`). A crash leaves either the old state or the whole new bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path, PurePosixPath, PureWindowsPath

from .layout import MANIFEST_NAME, PICKLE_SUFFIXES, TMP_RE, BundleError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _hash_dir(root: Path) -> dict[str, dict]:
    """{relative posix path: {"sha256", "bytes"}} for every file under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under root, so the rename publishes data that is on disk."""
    for p in sorted(root.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        _fsync_path(p)
    _fsync_path(root)


def _fsync_path(p: Path) -> None:
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms; best effort
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj: dict) -> None:
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------------------
# The export target and the atomic publish


def _is_bundle_dir(p: Path) -> bool:
    return (p / MANIFEST_NAME).is_file()


def _check_target(out: Path, overwrite: bool) -> None:
    if TMP_RE.match(out.name):
        raise BundleError(f"{out.name} looks like an export's temporary folder; choose another output name")
    if not out.exists():
        return
    if not out.is_dir():
        raise BundleError(f"{out} exists and is not a directory: choose another output path")
    if _is_bundle_dir(out):
        if not overwrite:
            raise BundleError(f"{out} already holds a bundle: pass overwrite=True (--overwrite) to replace it")
        return
    if any(out.iterdir()):
        raise BundleError(
            f"{out} exists and is not a bundle (no {MANIFEST_NAME}); refusing to replace it. Choose a new or empty "
            "output directory"
        )


def _new_tmp_dir(out: Path) -> Path:
    """The hidden temporary folder beside `out` an export writes into (never mistaken for a bundle: TMP_RE)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished temporary bundle onto `out`; an existing bundle is swapped out, then deleted."""
    old = None
    if out.exists():
        if not any(out.iterdir()):
            out.rmdir()
        else:
            old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
            os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)  # put the previous bundle back
        raise
    _fsync_path(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# What a bundle may not hold: pickle, paths and links that leave it


def _is_pickle(p: Path) -> bool:
    return p.suffix.lower() in PICKLE_SUFFIXES


def _refuse_pickle_written(out: Path) -> None:
    bad = [p.name for p in out.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if bad:  # a library wrote pickle despite safetensors being asked for; never publish that
        raise BundleError(f"saving wrote pickle files {bad}; a bundle holds safetensors only (upgrade transformers/peft)")


def _is_relative_inside(rel: str) -> bool:
    """`rel` (a path read from a manifest) names something below the folder it is relative to: not absolute (POSIX
    or Windows style), no `..` component, not empty."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        return False
    for flavour in (PurePosixPath, PureWindowsPath):
        p = flavour(rel)
        if p.is_absolute() or p.drive or p.root or ".." in p.parts:
            return False
    return True


def _escaping_symlinks(root: Path) -> list[tuple[str, Path | None]]:
    """Every symlink under `root` (file or folder, dangling or not) whose target lies outside `root`, as
    (path relative to root, resolved target, or None for a link that cannot be resolved: a loop). Symlinked folders
    are not descended into."""
    real_root = root.resolve()
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath, name)
            if not p.is_symlink():
                continue
            try:
                target = p.resolve()
            except (OSError, RuntimeError):  # a symlink loop
                target = None
            if target is None or target != real_root and real_root not in target.parents:
                out.append((p.relative_to(root).as_posix(), target))
    return sorted(out, key=lambda x: x[0])
