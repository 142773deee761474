"""The one shared place for writing files, making values JSON-safe, and choosing how OpenMP threads wait (torch-free).

Used by the CLI, the evaluation report, the bundle and the demo, so that "written atomically" and "no NaN in
JSON" mean the same thing everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from .cpu import openmp_wait_policy  # noqa: F401 - its home is cpu.py; the recipes import it from here


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers see the old file or the whole new one."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers see the old file or the whole new one. On any
    exception, KeyboardInterrupt included, the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the file we replace would have had the umask's mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore
    os.umask(mask)
    return mask


def to_json(obj: Any, *, indent: int | None = None, default=None) -> str:
    """Strict JSON text (RFC 8259): `json_safe` first (NaN and +-inf become null, numpy and paths plain values), then
    `allow_nan=False`, so a non-finite number can never reach a file as a bare NaN or Infinity. Non-ASCII is kept.
    `default`: as json.dumps's, for other objects (e.g. `str`)."""
    safe = json_safe(obj)
    text = json.dumps(safe, ensure_ascii=False, indent=indent, allow_nan=False, default=default)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (e.g. in a record's metadata): JSON's \ud800 escape holds it
            text = json.dumps(safe, ensure_ascii=True, indent=indent, allow_nan=False, default=default)
    return text


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, default=None) -> None:
    """`to_json(obj)` and a newline, written atomically."""
    atomic_write_text(path, to_json(obj, indent=indent, default=default) + "\n")


def write_jsonl(path: str | os.PathLike, records) -> None:
    """Records (dicts), one strict JSON line each (`to_json`: NaN/inf -> null), written atomically."""
    atomic_write_text(path, "".join(to_json(r) + "\n" for r in records))


def json_safe(x: Any, *, strict: bool = False) -> Any:
    """Plain JSON values: NaN/inf -> None (JSON has no NaN), numpy/torch scalars and arrays -> Python, tuples ->
    lists, dataclasses -> dicts, paths -> str. Anything else is returned as is, or with `strict=True` raises a
    TypeError naming it (the bundle manifest must hold only plain data)."""
    if isinstance(x, dict):
        return {str(k): json_safe(v, strict=strict) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v, strict=strict) for v in x]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return json_safe(dataclasses.asdict(x), strict=strict)
    if isinstance(x, bool) or x is None or isinstance(x, (str, int)):
        return x
    if isinstance(x, float):  # np.float64 too (a float subclass): returned as a plain float
        return float(x) if math.isfinite(x) else None
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):  # numpy arrays/scalars (np.bool_ too), 0-d tensors
        return json_safe(x.tolist(), strict=strict)
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if strict:
        raise TypeError(f"cannot store a {type(x).__name__} as JSON ({x!r}): pass plain numbers, strings, lists or dicts")
    return x
