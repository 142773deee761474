"""Real agent logs as progadv trajectories: τ²-bench results files and Who&When cases.

    from progadv_trl.formats import convert, detect_format, write
    records = convert("whowhen", "Who&When/Hand-Crafted")      # a file, or a directory of *.json files
    write(records, "cases.jsonl")                              # atomically: nothing half-written

`progadv convert --from tau2|whowhen IN OUT.jsonl` does the same, and `progadv score|evaluate` read these files
directly (`as_trajectory_source`). Pure Python: importing this package loads neither torch nor numpy.

Every converted record is checked by the trajectory validator before it is returned, so a converter never hands on
a record `progadv score` would refuse; a malformed file raises `TrajectoryError` naming the file, the record
(simulation or case) and the field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..trajectories import RecordError, TrajectoryError, validate_record

FORMATS = ("tau2", "whowhen")


def _read_json(path: Path, name: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TrajectoryError([RecordError(name, "<file>", f"not valid JSON ({e.msg} at line {e.lineno})")]) from None
    except UnicodeDecodeError as e:
        raise TrajectoryError([RecordError(name, "<file>", f"not UTF-8 text ({e.reason})")]) from None


def _files(path: Path) -> list[tuple[Path, str]]:
    """(file, display name) of a file, or of every *.json under a directory (sorted; names relative to it)."""
    if not path.exists():
        raise FileNotFoundError(f"not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.json") if p.is_file())
        if not files:
            raise TrajectoryError([RecordError(str(path), "<directory>", "holds no .json files")])
        return [(p, p.relative_to(path).as_posix()) for p in files]
    return [(path, path.name)]


def _kind(obj: Any) -> str | None:
    """The format of a parsed .json file's content."""
    if isinstance(obj, dict) and isinstance(obj.get("simulations"), list):
        return "tau2"
    if isinstance(obj, dict) and "history" in obj and ("mistake_step" in obj or "mistake_agent" in obj):
        return "whowhen"
    if isinstance(obj, list) or (isinstance(obj, dict) and "messages" in obj):
        return "progadv"
    return None


def detect_format(path: str | os.PathLike) -> str | None:
    """"tau2", "whowhen", "progadv" (the project's own format) or None (none of these).

    .jsonl and .parquet files are progadv's; a .json file is recognised by its content; a directory by its first
    .json file (Who&When ships one case per file).
    """
    path = Path(path)
    if path.is_dir():
        first = next(iter(sorted(p for p in path.rglob("*.json") if p.is_file())), None)
        return None if first is None else detect_format(first)
    if path.suffix.lower() != ".json":
        return "progadv"
    return _kind(_read_json(path, path.name))


def _convert_one(fmt: str, obj: Any, name: str) -> list[dict]:
    if fmt == "tau2":
        from .tau2 import convert_results

        return convert_results(obj, name)
    from .whowhen import convert_case

    return [convert_case(obj, name)]


def _check(fmt: str, records: list[dict], names: list[str]) -> list[dict]:
    seen: dict[str, str] = {}
    for rec, where in zip(records, names):
        validate_record(rec, where)  # raises TrajectoryError naming `where`, the id and the field
        if rec["id"] in seen:
            raise TrajectoryError([RecordError(f"{where} (id {rec['id']!r})", "id", f"duplicate of {seen[rec['id']]}")])
        seen[rec["id"]] = where
    return records


def convert(fmt: str, src) -> list[dict]:
    """Records in progadv's trajectory format from `src`: a path (a file, or a directory of .json files), or an
    already parsed file (a τ²-bench results dict, one Who&When case dict). Raises `TrajectoryError` on a malformed
    input, naming the file, the record and the field; `FileNotFoundError` when `src` does not exist."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if isinstance(src, (dict, list)):
        items = [(src, "<input>")]
    else:
        items = [(_read_json(p, name), name) for p, name in _files(Path(src))]
    records, names = [], []
    for obj, name in items:
        recs = _convert_one(fmt, obj, name)
        records += recs
        names += [name] * len(recs) if fmt == "whowhen" else [f"{name} simulations[{i}]" for i in range(len(recs))]
    if not records:
        raise TrajectoryError([RecordError(str(src) if not isinstance(src, (dict, list)) else "<input>", "<file>",
                                           f"no trajectories in this {fmt} input")])  # fmt: skip
    return _check(fmt, records, names)


def as_trajectory_source(path: str | os.PathLike, fmt: str = "auto"):
    """What `load_trajectories` should read for `path`: the path itself when it is in progadv's own format (so its
    errors keep their file and line), else the records converted from it. `fmt`: auto | progadv | tau2 | whowhen."""
    if fmt == "progadv":
        return path
    if fmt == "auto":
        try:
            fmt = detect_format(path)
        except (TrajectoryError, OSError):
            # unreadable (not UTF-8, not JSON, missing): load_trajectories reads it and names what is wrong (file,
            # line, record, field) in its own words
            return path
        if fmt is None and Path(path).is_file():  # parseable JSON of no known shape: say which formats exist
            name = Path(path).name
            raise TrajectoryError([RecordError(name, "<file>", "not a progadv trajectory file, a τ²-bench results "
                                               "file or a Who&When case; name its format with --format")])  # fmt: skip
        if fmt not in FORMATS:
            return path
    return convert(fmt, path)


__all__ = ["FORMATS", "as_trajectory_source", "convert", "detect_format"]
