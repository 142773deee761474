"""Real agent logs as progadv trajectories: τ²-bench results files and Who&When cases.

    from progadv_trl.formats import convert, convert_report
    records = convert("whowhen", "Who&When")                   # a file, or a folder (recursive) of *.json files
    conv = convert_report("whowhen", "Who&When", on_error="skip")   # go on past a case that cannot be mapped
    print(conv.summary())                                      # converted, moved labels, skipped with reasons

`progadv convert --from tau2|whowhen IN OUT.jsonl` does the same, and `progadv score|evaluate` read these files
directly (`as_trajectory_source`). Pure Python: importing this package loads neither torch nor numpy.

Every converted record is checked by the trajectory validator before it is returned, so a converter never hands on
a record `progadv score` would refuse; a malformed file raises `TrajectoryError` naming the file, the record
(simulation or case) and the field, or, with on_error="skip", is listed with that reason while the rest goes on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
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


@dataclass
class Conversion:
    """What a conversion made: the records, and the cases it skipped (each a `RecordError` naming the file, the case
    or simulation, the field and why)."""

    records: list[dict]
    skipped: list[RecordError] = field(default_factory=list)

    @property
    def moved(self) -> int:
        """Records whose labelled mistake was moved from a tool's output to the agent turn that produced it."""
        return sum("label_moved_from" in (r.get("metadata") or {}) for r in self.records)

    def summary(self) -> str:
        """One line: converted, moved labels, skipped with their reasons."""
        steps = sum(sum(m["role"] == "assistant" for m in r["messages"]) for r in self.records)
        line = f"converted {len(self.records)} trajectories ({steps} steps)"
        if self.moved:
            line += f", {self.moved} labels moved from a tool's output to the agent turn that produced it"
        if self.skipped:
            reasons = "; ".join(str(e) for e in self.skipped[:10])
            more = f" (and {len(self.skipped) - 10} more)" if len(self.skipped) > 10 else ""
            line += f", {len(self.skipped)} skipped: {reasons}{more}"
        return line


def _convert_one(fmt: str, obj: Any, name: str, skipped: list[RecordError] | None) -> list[tuple[dict, str]]:
    """(record, where) pairs of one parsed file; with `skipped`, a simulation that cannot be converted is added to
    it and the file goes on."""
    if fmt == "tau2":
        from .tau2 import convert_results

        return convert_results(obj, name, skipped=skipped)
    from .whowhen import convert_case

    return [(convert_case(obj, name), name)]


def convert_report(fmt: str, src, *, on_error: str = "raise") -> Conversion:
    """Records in progadv's trajectory format from `src`: a path (a file, or a folder searched recursively for .json
    files: both Who&When subsets, or several τ²-bench results files), or an already parsed file (a τ²-bench results
    dict, one Who&When case dict).

    on_error="raise": the first file, case or simulation that cannot be converted raises `TrajectoryError` naming the
    file, the record and the field. "skip": it is listed in `Conversion.skipped` with that reason and the rest goes
    on; a `TrajectoryError` only when nothing could be converted. `FileNotFoundError` when `src` does not exist."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    skipped: list[RecordError] | None = [] if on_error == "skip" else None
    if isinstance(src, (dict, list)):
        files: list = [(src, "<input>")]
    else:
        files = _files(Path(src))
    records: list[dict] = []
    seen: dict[str, str] = {}
    for item, name in files:
        try:
            obj = item if isinstance(item, (dict, list)) else _read_json(item, name)
            pairs = _convert_one(fmt, obj, name, skipped)
        except TrajectoryError as e:
            if skipped is None:
                raise
            skipped.extend(e.errors)
            continue
        for rec, where in pairs:
            try:
                validate_record(rec, where)  # raises TrajectoryError naming `where`, the id and the field
                if rec["id"] in seen:
                    raise TrajectoryError([RecordError(f"{where} (id {rec['id']!r})", "id", f"duplicate of {seen[rec['id']]}")])
            except TrajectoryError as e:
                if skipped is None:
                    raise
                skipped.extend(e.errors)
                continue
            seen[rec["id"]] = where
            records.append(rec)
    if not records:
        where = "<input>" if isinstance(src, (dict, list)) else str(src)
        raise TrajectoryError(skipped or [RecordError(where, "<file>", f"no trajectories in this {fmt} input")])
    return Conversion(records, skipped or [])


def convert(fmt: str, src, *, on_error: str = "raise") -> list[dict]:
    """The records of `convert_report(fmt, src, on_error=...)`."""
    return convert_report(fmt, src, on_error=on_error).records


def as_trajectory_source(path: str | os.PathLike, fmt: str = "auto", *, on_error: str = "raise"):
    """(what `load_trajectories` should read for `path`, the cases skipped in converting it). The source is the path
    itself when it is in progadv's own format (so its errors keep their file and line), else the records converted
    from it (`on_error` as in `convert_report`). `fmt`: auto | progadv | tau2 | whowhen."""
    if fmt == "progadv":
        return path, []
    if fmt == "auto":
        try:
            fmt = detect_format(path)
        except (TrajectoryError, OSError):
            # unreadable (not UTF-8, not JSON, missing): load_trajectories reads it and names what is wrong (file,
            # line, record, field) in its own words
            return path, []
        if fmt is None and Path(path).is_file():  # parseable JSON of no known shape: say which formats exist
            name = Path(path).name
            raise TrajectoryError([RecordError(name, "<file>", "not a progadv trajectory file, a τ²-bench results "
                                               "file or a Who&When case; name its format with --format")])  # fmt: skip
        if fmt not in FORMATS:
            return path, []
    conv = convert_report(fmt, path, on_error=on_error)
    return conv.records, conv.skipped


__all__ = ["FORMATS", "Conversion", "as_trajectory_source", "convert", "convert_report", "detect_format"]
