"""Every JSON file the project writes is strict JSON (no bare NaN or Infinity), and no trajectory is run past the
models' positions without a flag.

The demo's and the study's files (summary.json, study.json, study_ranges.json, metrics.json, the rollouts) are
checked where those runs already happen: tests/test_demo_cli.py and tests/test_demo_study.py."""

import json
import math
import warnings
from pathlib import Path

import pytest

from conftest import make_trajectory, strict_json_files
from progadv_trl.cli import main
from progadv_trl.utils import to_json, write_jsonl

WW = Path(__file__).parent / "fixtures" / "who_and_when"


def test_strict_parser_refuses_what_python_writes_by_default(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"x": float("nan")}))  # Python's default: a bare NaN
    with pytest.raises(AssertionError, match="not strict JSON"):
        strict_json_files(tmp_path)
    assert to_json({"x": float("nan"), "y": [float("inf"), -float("inf"), 1.5]}) == '{"x": null, "y": [null, null, 1.5]}'


def test_every_file_the_commands_write_is_strict_json(tiny_dir, tmp_path, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    recs = []
    for i in range(12):
        ok = i % 3 != 0
        r = make_trajectory(i, n_turns=1 + i % 2, success=ok, failure_step=None if ok else 0, group=f"g{i // 4}")
        r["metadata"] = {"reward": float("nan") if i == 0 else 1.0, "cost": float("inf"), "note": "é"}
        if i == 1:
            r["metadata"]["raw"] = "\ud800"  # a lone surrogate: JSON can escape it, UTF-8 cannot hold it
        recs.append(r)
    inputs.mkdir()
    src = inputs / "t.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))  # the user's file may hold NaN: Python reads it
    pair = ["--policy", str(tiny_dir["policy"]), "--reference", str(tiny_dir["reference"])]
    assert main(["score", *pair, "--support", str(src), "-o", str(out / "scores.jsonl")]) == 0
    assert main(["evaluate", *pair, str(src), "-o", str(out / "eval"), "--n-boot", "20", "--folds", "2"]) == 0
    assert main(["export", *pair, str(out / "bundle")]) == 0
    assert main(["convert", "--from", "whowhen", str(WW), str(out / "ww.jsonl")]) == 0
    capsys.readouterr()
    written = {p.relative_to(out).as_posix() for p in strict_json_files(out)}
    assert {"scores.jsonl", "eval/metrics.json", "bundle/manifest.json", "ww.jsonl"} <= written
    first = json.loads((out / "scores.jsonl").read_text().splitlines()[0])
    assert first["metadata"] == {"reward": None, "cost": None, "note": "é"}  # NaN and inf written as null
    second = json.loads((out / "scores.jsonl").read_text().splitlines()[1])
    assert second["metadata"]["raw"] == "\ud800"  # written escaped, not a crash


def _long(n_turns):
    r = make_trajectory(0, n_turns=n_turns)
    r["messages"][0]["content"] = "You are a helpful agent. " * 3
    return r


def test_a_trajectory_longer_than_the_positions_is_cut_there_and_flagged(tiny_tokenizer):
    from progadv_trl.demo.tiny import build_model, perturbed_copy
    from progadv_trl.engine import ProgressScorer

    ref = build_model(tiny_tokenizer, max_position_embeddings=64)
    pol = perturbed_copy(ref)
    traj = _long(6)
    text = tiny_tokenizer.apply_chat_template(traj["messages"], tools=traj.get("tools"), tokenize=False)
    n_tokens = len(tiny_tokenizer(text, add_special_tokens=False).input_ids)
    assert n_tokens > 64  # the premise: longer than the model's positions
    (s,) = ProgressScorer(pol, tiny_tokenizer, ref).score([traj])
    assert s.truncation["limit"] == "max_position_embeddings" and s.truncation["kept_tokens"] == 64
    assert s.truncation["original_tokens"] == n_tokens
    assert any(st.truncated for st in s.steps) and math.isfinite(s.score)
    # a max_length within the positions is the user's choice, and says so
    (s,) = ProgressScorer(pol, tiny_tokenizer, ref, max_length=48).score([traj])
    assert s.truncation["limit"] == "max_length" and s.truncation["kept_tokens"] == 48
    # one beyond them is lowered to them, with a warning: never run past the positions
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        (s,) = ProgressScorer(pol, tiny_tokenizer, ref, max_length=4096).score([traj])
    assert s.truncation["kept_tokens"] == 64 and any("max_position_embeddings" in str(x.message) for x in w)
    # the same model with room for it: nothing is cut
    big = build_model(tiny_tokenizer, max_position_embeddings=4096)
    (s,) = ProgressScorer(perturbed_copy(big), tiny_tokenizer, big).score([traj])
    assert s.truncation is None and not any(st.truncated for st in s.steps)


def test_score_says_when_it_cut_at_the_positions(tiny_tokenizer, tmp_path, capsys):
    from progadv_trl.demo.tiny import build_model, perturbed_copy

    ref = build_model(tiny_tokenizer, tmp_path / "ref", max_position_embeddings=64)
    perturbed_copy(ref, tmp_path / "pol")
    tiny_tokenizer.save_pretrained(tmp_path / "pol")
    write_jsonl(tmp_path / "t.jsonl", [_long(6)])
    out = tmp_path / "s.jsonl"
    assert main(["score", "--policy", str(tmp_path / "pol"), "--reference", str(tmp_path / "ref"),
                 str(tmp_path / "t.jsonl"), "-o", str(out)]) == 0  # fmt: skip
    assert "1 trajectory truncated (by max_position_embeddings" in capsys.readouterr().err
    assert json.loads(out.read_text())["truncation"]["limit"] == "max_position_embeddings"
