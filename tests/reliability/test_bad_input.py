"""A corpus of bad trajectory files through `progadv score` and `progadv evaluate`: every one ends in one message that
names the file, the record and the field (exit status 2, no traceback, no output); `--skip-invalid` scores the good
records and names the skipped ones; odd but valid inputs (huge, long, exotic text) are scored.

The corpus is generated here, not committed: binary files in the repository would hide what they hold.
"""

import json
import random
import shutil

import pytest

from reliability_helpers import one_torch_thread  # noqa: F401 - autouse
from conftest import make_trajectory
from progadv_trl.cli import main


def _good(i=0):
    return json.dumps(make_trajectory(i))


def _with(**changes):
    """A valid record (id 'bad') with some fields replaced; a callable value edits the messages in place."""
    rec = make_trajectory(7)
    rec["id"] = "bad"
    for k, v in changes.items():
        if callable(v):
            v(rec["messages"])
        else:
            rec[k] = v
    return json.dumps(rec)


def _set(i, key, value):
    def edit(msgs):
        if value is _DEL:
            msgs[i].pop(key)
        else:
            msgs[i][key] = value

    return edit


_DEL = object()
_BINARY = b"\x00\x01\x02\xf5" + random.Random(0).randbytes(4096)

# (file name, content: bytes, record named in the message, field named in the message, words of the explanation)
# Records on line 2 follow a good record on line 1: the message must point past it.
CORPUS = [
    ("malformed.jsonl", f'{_good()}\n{{"id": "x", "messages": [\n', "malformed.jsonl line 2", "<record>", "not valid JSON"),
    ("binary.jsonl", _BINARY, "binary.jsonl line 1", "<record>", "not UTF-8 text (byte 0xf5"),
    ("latin1.jsonl", f"{_good()}\n".encode() + _good(1).replace("city 1", "cit\u00e9").encode("latin-1"),
     "latin1.jsonl line 2", "<record>", "not UTF-8 text (byte 0xe9"),
    ("binary.json", _BINARY, "binary.json", "<record>", "not UTF-8 text"),
    ("array_line.jsonl", f"{_good()}\n[1, 2, 3]\n", "array_line.jsonl line 2", "<record>", "must be a JSON object"),
    ("messages_string.jsonl", f"{_good()}\n{_with(messages='hello')}\n", "line 2 (id 'bad')", "messages", "non-empty list"),
    ("content_number.jsonl", f"{_good()}\n{_with(m=_set(1, 'content', 42))}\n", "line 2 (id 'bad')", "messages[1].content", "must be a string"),
    ("success_string.jsonl", f"{_good()}\n{_with(success='yes')}\n", "line 2 (id 'bad')", "success", "boolean or a finite number"),
    ("success_infinite.jsonl", f"{_good()}\n" + _with(success=1.0).replace('"success": 1.0', '"success": Infinity') + "\n",
     "line 2 (id 'bad')", "success", "finite"),
    ("failure_step_string.jsonl", f"{_good()}\n{_with(failure_step='2')}\n", "line 2 (id 'bad')", "failure_step", "integer"),
    ("failure_step_range.jsonl", f"{_good()}\n{_with(failure_step=9)}\n", "line 2 (id 'bad')", "failure_step", "assistant turns"),
    ("tools_object.jsonl", f"{_good()}\n{_with(tools={'name': 'x'})}\n", "line 2 (id 'bad')", "tools", "list"),
    ("id_list.jsonl", f"{_good()}\n{_with(id=['a'])}\n", "id_list.jsonl line 2", "id", "string or an integer"),
    ("duplicate_id.jsonl", f"{_good()}\n{_good()}\n", "line 2 (id 't0')", "id", "duplicate of duplicate_id.jsonl line 1"),
    ("missing_role.jsonl", f"{_good()}\n{_with(m=_set(1, 'role', _DEL))}\n", "line 2 (id 'bad')", "messages[1].role", "got None"),
    ("unknown_role.jsonl", f"{_good()}\n{_with(m=_set(1, 'role', 'robot'))}\n", "line 2 (id 'bad')", "messages[1].role", "'robot'"),
    ("no_assistant.jsonl", f'{_good()}\n{json.dumps({"id": "bad", "messages": [{"role": "user", "content": "hi"}]})}\n',
     "line 2 (id 'bad')", "messages", "no assistant message"),
    ("no_messages.jsonl", f'{_good()}\n{json.dumps({"id": "bad", "messages": []})}\n', "line 2 (id 'bad')", "messages", "empty"),
    ("null_assistant.jsonl", f"{_good()}\n{_with(m=_set(6, 'content', None))}\n",
     "line 2 (id 'bad')", "messages[6].content", "needs content or tool_calls"),
    ("arguments_not_json.jsonl",
     _good() + "\n" + _with(m=lambda ms: ms[2]["tool_calls"][0]["function"].update(arguments='{"city": ')) + "\n",
     "line 2 (id 'bad')", "messages[2].tool_calls[0].function.arguments", "not valid JSON"),
    ("tool_call_not_object.jsonl", f"{_good()}\n{_with(m=_set(2, 'tool_calls', ['get_weather']))}\n",
     "line 2 (id 'bad')", "messages[2].tool_calls[0]", "must be an object"),
    ("surrogate.jsonl", f"{_good()}\n" + _with(m=_set(1, "content", "SURROGATE")).replace("SURROGATE", "\\ud800 x") + "\n",
     "line 2 (id 'bad')", "messages[1].content", "unpaired surrogate"),
    ("raw_control.jsonl", f"{_good()}\n" + _with(m=_set(1, "content", "CTRL")).replace("CTRL", "a\x07b") + "\n",
     "line 2", "<record>", "Invalid control character"),
    ("deep.jsonl", f"{_good()}\n" + "[" * 200_000 + "]" * 200_000 + "\n", "deep.jsonl line 2", "<record>", "nested too deeply"),
    ("empty.jsonl", b"", "empty.jsonl", "<file>", "empty"),
    ("blank.jsonl", "\n   \n\t\n", "blank.jsonl", "<file>", "empty"),
    ("empty_list.json", "[]", "empty_list.json", "<file>", "empty list"),
    ("huge_line.jsonl", '{"id": "h", "messages": "' + "x" * 8_000_000, "huge_line.jsonl line 1", "<record>", "not valid JSON"),
    ("garbage.parquet", _BINARY, "garbage.parquet", "<file>", "cannot be read as Parquet"),
]


def _write(path, content):
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def _models(tiny_dir):
    return ["--policy", str(tiny_dir["policy"]), "--reference", str(tiny_dir["reference"])]


@pytest.mark.parametrize("command", ["score", "evaluate"])
@pytest.mark.parametrize("name,content,record,field,words", CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_file_is_one_message(tiny_dir, tmp_path, capsys, command, name, content, record, field, words):
    src = _write(tmp_path / name, content)
    out = tmp_path / "out"
    rc = main([command, *_models(tiny_dir), str(src), "-o", str(out)])  # a traceback would fail the test here
    err = capsys.readouterr().err
    assert rc == 2, err
    line = next(x for x in err.splitlines() if x.startswith("progadv: error:"))
    assert record in line and f"field '{field}" in line and words in line, line
    assert len(err) < 2000  # the message names the record; it never echoes a huge line back
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary file either


def test_directory_and_missing_file_are_messages(tiny_dir, tmp_path, capsys):
    (tmp_path / "d.jsonl").mkdir()
    assert main(["score", *_models(tiny_dir), str(tmp_path / "d.jsonl"), "-o", str(tmp_path / "o")]) == 2
    assert "d.jsonl: field '<file>': is a directory" in capsys.readouterr().err
    assert main(["score", *_models(tiny_dir), str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--max-length", "1"), ("--max-length", "x"), ("--batch-tokens", "0")])
def test_bad_numbers_on_the_command_line(tiny_dir, tmp_path, capsys, flag, value):
    src = _write(tmp_path / "t.jsonl", _good())
    with pytest.raises(SystemExit) as e:  # argparse's own usage error: status 2, one line
        main(["score", *_models(tiny_dir), str(src), "-o", str(tmp_path / "o"), flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument" in err and flag in err


def _mixed_corpus():
    """Every record-level bad line of the corpus, binary bytes and the huge line, each after a good record:
    (lines, good ids, line numbers of the bad ones)."""
    bad_lines = [
        (c if isinstance(c, bytes) else c.encode()).split(b"\n")[1]
        for n, c, r, _, _ in CORPUS
        if "line 2" in r and n != "duplicate_id.jsonl"
    ]
    bad_lines += [_BINARY.replace(b"\n", b""), next(c for n, c, *_ in CORPUS if n == "huge_line.jsonl").encode()]
    lines, good, bad = [], [], []
    for i, b in enumerate(bad_lines):
        ok = i % 2 == 1
        rec = make_trajectory(100 + i, n_turns=1 + i % 2, success=ok, group=f"g{i // 4}", failure_step=None if ok else 0)
        lines.append(json.dumps(rec).encode())
        good.append(rec["id"])
        lines.append(b)
        bad.append(len(lines))
    lines.append(json.dumps(make_trajectory(100)).encode())  # a duplicate id: skipped too
    bad.append(len(lines))
    return lines, good, bad


def test_skip_invalid_scores_the_good_and_names_the_skipped(tiny_dir, tmp_path, capsys):
    lines, good, bad = _mixed_corpus()
    assert len(bad) >= 20  # the whole record-level corpus is in there
    src = _write(tmp_path / "mixed.jsonl", b"\n".join(lines) + b"\n")
    out = tmp_path / "s.jsonl"
    assert main(["score", *_models(tiny_dir), str(src), "-o", str(out), "--skip-invalid"]) == 0
    err = capsys.readouterr().err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == good  # every good record scored, in order: none lost
    assert all(r["score"] is not None for r in rows)
    assert f"skipped {len(bad)} invalid records:" in err
    for n in bad:
        assert f"mixed.jsonl line {n}" in err
    # the skipped ones are counted after the scoring line, as the last thing said
    assert err.index("progadv: scored") < err.index("skipped")

    report = tmp_path / "eval"
    assert main(["evaluate", *_models(tiny_dir), str(src), "-o", str(report), "--skip-invalid", "--n-boot", "0"]) == 0
    m = json.loads((report / "metrics.json").read_text())
    assert m["n_trajectories"] == len(good)
    assert len(m["excluded"]["skipped"]) == len(bad) and m["excluded"]["numeric_faults"] == {}
    assert f"mixed.jsonl line {bad[0]}" in m["excluded"]["skipped"][0]


def test_skip_invalid_with_nothing_valid_names_every_record(tiny_dir, tmp_path, capsys):
    src = _write(tmp_path / "all_bad.jsonl", "{oops\n[1]\n")
    assert main(["score", *_models(tiny_dir), str(src), "-o", str(tmp_path / "o"), "--skip-invalid"]) == 2
    err = capsys.readouterr().err
    assert "progadv: error: all_bad.jsonl line 1" in err and "all_bad.jsonl line 2" in err
    assert not (tmp_path / "o").exists()


def test_unrenderable_record_is_skipped_or_named(tiny_dir, tmp_path, capsys):
    """A record the chat template refuses: a message naming it (record and message) or, with --skip-invalid, skipped."""
    pair = {}
    for k in ("policy", "reference"):
        pair[k] = tmp_path / k
        shutil.copytree(tiny_dir[k], pair[k])
        cfg = pair[k] / "chat_template.jinja"
        # the template's own raise_exception, as real templates use it for conversations they do not support
        cfg.write_text("{% for m in messages %}{% if m.content == 'FORBIDDEN' %}{{ raise_exception('no forbidden turns') }}"
                       "{% endif %}{% endfor %}" + cfg.read_text())
    bad = make_trajectory(1)
    bad["messages"][1]["content"] = "FORBIDDEN"
    src = _write(tmp_path / "t.jsonl", f"{_good()}\n{json.dumps(bad)}\n{_good(2)}\n")
    args = ["--policy", str(pair["policy"]), "--reference", str(pair["reference"]), str(src), "-o", str(tmp_path / "o.jsonl")]
    assert main(["score", *args]) == 2
    err = capsys.readouterr().err
    assert "trajectory 't1' (t.jsonl line 2)" in err and "no forbidden turns" in err and "Traceback" not in err
    assert not (tmp_path / "o.jsonl").exists()
    assert main(["score", *args, "--skip-invalid"]) == 0
    err = capsys.readouterr().err
    assert [json.loads(x)["id"] for x in (tmp_path / "o.jsonl").read_text().splitlines()] == ["t0", "t2"]
    assert "skipped 1 invalid record:" in err and "t.jsonl line 2 (id 't1'): field 'messages'" in err


def test_odd_but_valid_inputs_are_scored(tiny_dir, tmp_path, capsys):
    """Exotic text, an empty assistant turn, a trajectory longer than --max-length, thousands of messages and a huge
    single line are not errors: each is scored, and truncation is reported per trajectory."""
    exotic = make_trajectory(1)
    exotic["id"] = "exotic"
    exotic["messages"][1]["content"] = "NUL\u0000 ESC\u001b[31m bell\u0007 tab\t RTL \u202eabc\u202c 東京 😀 cafe\u0301 \u200d\ufeff \u2028 end"
    empty_turn = make_trajectory(2)
    empty_turn["id"] = "empty_turn"
    empty_turn["messages"][-1]["content"] = ""  # the model ended its turn at once: one end-of-turn token
    long = make_trajectory(3, n_turns=30)
    long["id"] = "long"
    thousands = make_trajectory(4, n_turns=1000)
    thousands["id"] = "thousands"
    huge = make_trajectory(5)
    huge["id"] = "huge"
    huge["messages"][1]["content"] = "weather " * 250_000  # a 2 MB line
    recs = [exotic, empty_turn, long, thousands, huge]
    assert len(thousands["messages"]) > 2000
    src = _write(tmp_path / "odd.jsonl", "\n".join(json.dumps(r) for r in recs) + "\n")
    out = tmp_path / "s.jsonl"
    assert main(["score", *_models(tiny_dir), str(src), "-o", str(out), "--max-length", "1024"]) == 0
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(rows) == [r["id"] for r in recs]
    assert rows["exotic"]["score"] is not None and "truncation" not in rows["exotic"]
    last = rows["empty_turn"]["steps"][-1]
    assert last["tokens"] == 1 and last["advantage"] is not None  # just <|im_end|>, scored
    for rid in ("long", "thousands", "huge"):
        tr = rows[rid]["truncation"]
        assert tr["kept_tokens"] == 1024 and tr["dropped_tokens"] > 0
        assert rows[rid]["score"] is not None  # the kept steps are scored
    th = rows["thousands"]
    assert len(th["steps"]) == 1001
    dropped = set(th["truncation"]["dropped_steps"])
    assert len(dropped) > 900 and all(th["steps"][i]["advantage"] is None for i in dropped)  # null, never a silent 0
    assert th["steps"][-1]["advantage"] is not None
