"""Real agent logs: τ²-bench results and Who&When cases -> trajectories, rendered, scored and evaluated.

Who&When fixtures are four real cases (tests/fixtures/who_and_when/SOURCE.md); the τ²-bench files are hand-made in
the results format (tests/fixtures/tau2/): assistant tool calls (two in one turn), tool errors, user tool calls.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from progadv_trl.cli import main
from progadv_trl.formats import as_trajectory_source, convert, convert_report, detect_format
from progadv_trl.formats.whowhen import whowhen_attribution
from progadv_trl.trajectories import TrajectoryError, load_trajectories, validate_record
from progadv_trl.rendering import render

FIX = Path(__file__).parent / "fixtures"
WW = FIX / "who_and_when"
AIRLINE = FIX / "tau2" / "airline_results.json"
TELECOM = FIX / "tau2" / "telecom_results.json"


def _case(rel):
    return json.loads((WW / rel).read_text())


def _case_in(root, case_id):
    return json.loads((root / f"{case_id}.json").read_text())


def _by_id(records):
    return {r["id"]: r for r in records}


# ----------------------------------------------------------------------------------------------------------------
# Who&When


def test_whowhen_cases_convert_with_their_labels():
    recs = _by_id(convert("whowhen", WW))
    assert sorted(recs) == ["Algorithm-Generated/117", "Algorithm-Generated/34", "Hand-Crafted/42", "Hand-Crafted/52"]
    # failure_step counts agent turns before the labelled history index (terminal output and the human excluded)
    assert {k: r["failure_step"] for k, r in recs.items()} == {
        "Algorithm-Generated/117": 0, "Algorithm-Generated/34": 2, "Hand-Crafted/42": 28, "Hand-Crafted/52": 3,
    }  # fmt: skip
    for rel in ("Algorithm-Generated/117.json", "Algorithm-Generated/34.json", "Hand-Crafted/42.json", "Hand-Crafted/52.json"):
        case, rec = _case(rel), recs[rel[:-5]]
        meta = rec["metadata"]
        assert meta["split"] == rel.split("/")[0]
        assert meta["mistake_step"] == int(case["mistake_step"]) and meta["mistake_agent"] == case["mistake_agent"]
        assert meta["step_agents"][rec["failure_step"]] == case["mistake_agent"]
        steps = [m for m in rec["messages"] if m["role"] == "assistant"]
        assert len(steps) == len(meta["step_agents"])
        # the labelled assistant step is the labelled history message
        assert steps[rec["failure_step"]]["content"] == case["history"][int(case["mistake_step"])]["content"]
        assert rec["success"] is False
        validate_record(rec, rel)


def test_hand_crafted_roles_name_the_agents():
    rec = _by_id(convert("whowhen", WW / "Hand-Crafted"))["Hand-Crafted/42"]
    case = _case("Hand-Crafted/42.json")
    first = rec["messages"][0]
    assert first == {"role": "user", "content": case["history"][0]["content"]}  # role "human": the task
    assert all(m["role"] == "assistant" for m in rec["messages"][1:])  # 31 agent turns in a row, kept in order
    names = [m["name"] for m in rec["messages"][1:]]
    assert names[:3] == ["Orchestrator (thought)", "Orchestrator (thought)", "Orchestrator (-> WebSurfer)"]
    assert set(rec["metadata"]["step_agents"]) == {"Orchestrator", "WebSurfer"}  # suffixes stripped


def test_algorithm_generated_agents_speak_as_user_and_terminal_output_is_context():
    rec = _by_id(convert("whowhen", WW))["Algorithm-Generated/34"]
    case = _case("Algorithm-Generated/34.json")
    assert rec["messages"][0] == {"role": "user", "content": case["question"]}  # the task before the first agent turn
    body = rec["messages"][1:]
    assert len(body) == len(case["history"])
    for m, h in zip(body, case["history"]):
        assert m["name"] == h["name"] and m["content"] == h["content"]
        # Locomotive_Expert's turns have role "user" in the file: they are agent steps here
        assert m["role"] == ("user" if h["name"] == "Computer_terminal" else "assistant")
    assert rec["metadata"]["step_agents"] == [h["name"] for h in case["history"] if h["name"] != "Computer_terminal"]


def test_whowhen_empty_content_is_an_empty_step():
    case = _case("Algorithm-Generated/117.json")
    case["history"][3]["content"] = None
    rec = convert("whowhen", case)[0]
    assert rec["messages"][4] == {"role": "assistant", "content": "", "name": "Debugging_Expert"}


MOVED = FIX / "who_and_when_moved"  # hand-written, shaped like the three cases issue 22 found refused (SOURCE.md)


def test_labels_on_terminal_output_move_to_the_turn_that_produced_it():
    conv = convert_report("whowhen", MOVED, on_error="raise")
    recs = _by_id(conv.records)
    assert sorted(recs) == ["Algorithm-Generated/14", "Algorithm-Generated/59", "Hand-Crafted/14"] and not conv.skipped
    # AG 14: history[2] is Computer_terminal's output of history[1]'s code; AG 59: history[1] after history[0]
    for cid, labelled, acting, step in (("Algorithm-Generated/14", 2, 1, 1), ("Algorithm-Generated/59", 1, 0, 0)):
        rec, case = recs[cid], _case_in(MOVED, cid)
        meta = rec["metadata"]
        assert meta["label_moved_from"] == {"history_index": labelled, "speaker": "Computer_terminal"}
        assert meta["label_history_index"] == acting and meta["mistake_step"] == labelled  # the dataset's label kept
        assert rec["failure_step"] == step
        steps = [m for m in rec["messages"] if m["role"] == "assistant"]
        assert steps[step]["content"] == case["history"][acting]["content"]
        assert meta["step_agents"][step] == case["mistake_agent"]
    assert conv.moved == 2 and "2 labels moved" in conv.summary()


def test_an_agent_addressing_the_terminal_is_an_agent_turn():
    rec = _by_id(convert("whowhen", MOVED / "Hand-Crafted"))["Hand-Crafted/14"]
    case = _case_in(MOVED, "Hand-Crafted/14")
    steps = [m for m in rec["messages"] if m["role"] == "assistant"]
    assert steps[rec["failure_step"]] == {"role": "assistant", "name": "Orchestrator (-> ComputerTerminal)",
                                          "content": case["history"][14]["content"]}  # fmt: skip
    assert "label_moved_from" not in rec["metadata"] and rec["metadata"]["mistake_step"] == 14
    # the terminal's own output is still context, not a step
    terminal = [m for m in rec["messages"] if m.get("name") == "ComputerTerminal"]
    assert len(terminal) == 2 and all(m["role"] == "user" for m in terminal)
    assert rec["metadata"]["step_agents"][rec["failure_step"]] == case["mistake_agent"] == "Orchestrator"


def test_a_folder_of_both_subsets_converts_every_case_and_skips_with_reasons(tmp_path, capsys):
    src = tmp_path / "Who&When"
    for sub in ("Hand-Crafted", "Algorithm-Generated"):
        (src / sub).mkdir(parents=True)
        for f in sorted((WW / sub).glob("*.json")) + sorted((MOVED / sub).glob("*.json")):
            (src / sub / f"{f.parent.parent.name}-{f.name}").write_text(f.read_text())
    (src / "Hand-Crafted" / "bad-task.json").write_text(json.dumps({**_case("Hand-Crafted/52.json"), "mistake_step": "0"}))
    (src / "Hand-Crafted" / "broken.json").write_text('{"history": [')
    out = tmp_path / "ww.jsonl"
    assert main(["convert", "--from", "whowhen", str(src), str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one summary line
    line = err[0]
    assert "converted 7 trajectories" in line and "2 labels moved" in line and "2 skipped" in line
    assert "Hand-Crafted/bad-task.json: field 'mistake_step': points at history[0] ('human'), the task" in line
    assert "Hand-Crafted/broken.json: field '<file>': not valid JSON" in line
    assert len(load_trajectories(out).trajectories) == 7
    # --strict: the skips are errors, every one named, nothing written
    out2 = tmp_path / "strict.jsonl"
    assert main(["convert", "--from", "whowhen", "--strict", str(src), str(out2)]) == 2
    assert "bad-task.json" in capsys.readouterr().err and not out2.exists()


def test_tau2_folder_of_results_files(tmp_path, capsys):
    src = tmp_path / "results"
    (src / "telecom").mkdir(parents=True)
    (src / "airline.json").write_text(AIRLINE.read_text())
    (src / "telecom" / "run.json").write_text(TELECOM.read_text())
    (src / "notes.json").write_text('{"comment": "not a results file"}')
    out = tmp_path / "tau2.jsonl"
    assert main(["convert", "--from", "tau2", str(src), str(out)]) == 0
    line = capsys.readouterr().err.strip()
    assert "converted 5 trajectories" in line and "1 skipped: notes.json: field 'simulations'" in line
    ids = [t.id for t in load_trajectories(out).trajectories]
    assert ids == [r["id"] for r in convert("tau2", AIRLINE) + convert("tau2", TELECOM)]
    assert main(["convert", "--from", "tau2", "--strict", str(src), str(tmp_path / "s.jsonl")]) == 2


def test_one_bad_simulation_is_skipped_and_the_file_goes_on(tmp_path, capsys):
    src = tmp_path / "bad.json"
    src.write_text(_tau2_with(lambda d: d["simulations"][1]["messages"][1].update(role="robot")))
    out = tmp_path / "t.jsonl"
    assert main(["convert", "--from", "tau2", str(src), str(out)]) == 0
    line = capsys.readouterr().err
    assert "converted 2 trajectories" in line and "bad.json simulations[1] (id 'sim-0-1'): field 'messages[1].role'" in line
    assert [t.id for t in load_trajectories(out).trajectories] == ["sim-0-0", "sim-1-0"]


# ----------------------------------------------------------------------------------------------------------------
# τ²-bench


def test_tau2_assistant_tool_calls_errors_groups_and_rewards():
    recs = _by_id(convert("tau2", AIRLINE))
    assert sorted(recs) == ["sim-0-0", "sim-0-1", "sim-1-0"]
    assert {k: (r["group"], r["success"], r["metadata"]["reward"]) for k, r in recs.items()} == {
        "sim-0-0": ("0", True, 1.0), "sim-0-1": ("0", False, 0.0), "sim-1-0": ("1", False, 0.0),
    }  # fmt: skip
    r = recs["sim-0-1"]
    assert r["messages"][0]["role"] == "system" and "Airline Agent Policy" in r["messages"][0]["content"]
    assert r["metadata"]["system_from_policy"] is True
    assert [t["function"]["name"] for t in r["tools"]] == ["get_reservation_details", "cancel_reservation"]
    two = r["messages"][3]
    assert two["role"] == "assistant" and two["content"] == ""
    assert two["tool_calls"] == [
        {"type": "function", "id": "call_3", "function": {"name": "cancel_reservation", "arguments": {"reservation_id": "ZFA04"}}},
        {"type": "function", "id": "call_4", "function": {"name": "get_reservation_details", "arguments": {"reservation_id": "ZFA04Y"}}},
    ]  # fmt: skip
    # the error stays in the context as the agent read it, and is flagged with the step whose call failed
    assert r["metadata"]["tool_errors"] == [{"step": 1, "message_index": 4, "tool_call_id": "call_3"}]
    assert r["messages"][4] == {"role": "tool", "content": "Error: Reservation ZFA04 not found", "tool_call_id": "call_3"}
    assert recs["sim-0-0"]["metadata"]["tool_errors"] == []
    # an empty assistant turn is a step (of the 4 in sim-1-0), not dropped
    assert [m["content"] for m in recs["sim-1-0"]["messages"] if m["role"] == "assistant"][2] == ""


def test_tau2_user_tool_calls_are_kept_outside_the_agents_context():
    recs = _by_id(convert("tau2", TELECOM))
    r = recs["sim-t-0"]
    text = json.dumps(r["messages"])
    assert "check_status_bar" not in text and "no signal" not in text  # the agent never saw them
    assert [m["role"] for m in r["messages"]] == ["system", "assistant", "user", "assistant", "user", "assistant", "user"]
    calls = r["metadata"]["user_tool_calls"]
    assert [(c["before_step"], c["tool_calls"][0]["name"]) for c in calls] == [
        (2, "check_status_bar"), (3, "toggle_airplane_mode"), (3, "toggle_airplane_mode")]  # fmt: skip
    assert calls[1]["tool_calls"][0] == {"id": "ucall_2", "name": "toggle_airplane_mode", "arguments": {"on": False}}
    assert calls[1]["results"] == [{"id": "ucall_2", "content": "Error: permission denied", "error": True}]
    assert r["metadata"]["agent_llm"] == "Qwen/Qwen2.5-7B-Instruct" and "tools" not in r
    # no reward: unlabelled; a logged system message is kept instead of the policy
    u = recs["sim-t-1"]
    assert "success" not in u and u["messages"][0]["content"] == "You are a telecom support agent."
    assert u["metadata"]["system_from_policy"] is False


def test_converted_records_render_through_the_chat_template(tiny_tokenizer):
    tok = tiny_tokenizer
    recs = convert("tau2", AIRLINE) + convert("tau2", TELECOM) + convert("whowhen", WW)
    for rec in recs:
        t = validate_record(rec, rec["id"])
        r = render(t, tok)
        assert r.n_steps == sum(m["role"] == "assistant" for m in rec["messages"])
        assert all(e > s for s, e in r.spans)
    t = validate_record(_by_id(recs)["sim-0-1"], "x")
    r = render(t, tok)
    step1 = tok.decode(r.input_ids[slice(*r.spans[1])])
    assert step1.count("<tool_call>") == 2 and '"name": "cancel_reservation"' in step1 and step1.endswith("<|im_end|>")
    context = tok.decode(r.input_ids[r.spans[1][1] : r.spans[2][0]])
    assert "<tool_response>\nError: Reservation ZFA04 not found\n</tool_response>" in context
    assert '"name": "get_reservation_details"' in tok.decode(r.input_ids[: r.spans[0][0]])  # the tool schemas
    hc = validate_record(_by_id(recs)["Hand-Crafted/52"], "y")
    r = render(hc, tok)
    i = next(k for k, m in enumerate(m for m in hc.messages if m["role"] == "assistant") if m["content"] == "Next speaker WebSurfer")
    assert tok.decode(r.input_ids[slice(*r.spans[i])]) == "Next speaker WebSurfer<|im_end|>"


# ----------------------------------------------------------------------------------------------------------------
# Detection, light import, malformed files


def test_detect_format(tmp_path):
    assert detect_format(WW) == "whowhen" and detect_format(WW / "Hand-Crafted" / "42.json") == "whowhen"
    assert detect_format(AIRLINE) == "tau2"
    (tmp_path / "t.jsonl").write_text("{}\n")
    (tmp_path / "list.json").write_text("[]")
    (tmp_path / "other.json").write_text('{"foo": 1}')
    assert detect_format(tmp_path / "t.jsonl") == "progadv" and detect_format(tmp_path / "list.json") == "progadv"
    assert detect_format(tmp_path / "other.json") is None
    with pytest.raises(TrajectoryError, match="other.json.*name its format"):
        as_trajectory_source(tmp_path / "other.json")


def test_formats_import_is_light():
    code = "import sys, progadv_trl.formats; print(sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _tau2_with(mutate):
    d = json.loads(AIRLINE.read_text())
    mutate(d)
    return json.dumps(d)


BAD = {
    "no_simulations": ("tau2", lambda: json.dumps({"info": {}, "tasks": []}), "bad.json", "field 'simulations'"),
    "tool_call_name": (
        "tau2", lambda: _tau2_with(lambda d: d["simulations"][1]["messages"][2]["tool_calls"][0].pop("name")),
        "bad.json simulations[1] (id 'sim-0-1')", "field 'messages[2].tool_calls[0].name'",
    ),
    "tool_args": (
        "tau2", lambda: _tau2_with(lambda d: d["simulations"][2]["messages"][2]["tool_calls"][0].update(arguments=[1])),
        "bad.json simulations[2] (id 'sim-1-0')", "field 'messages[2].tool_calls[0].arguments'",
    ),
    "role": ("tau2", lambda: _tau2_with(lambda d: d["simulations"][0]["messages"][1].update(role="robot")),
             "bad.json simulations[0] (id 'sim-0-0')", "field 'messages[1].role'"),
    "not_json": ("tau2", lambda: '{"simulations": [', "bad.json", "not valid JSON"),
    "mistake_step": ("whowhen", lambda: json.dumps({**_case("Hand-Crafted/52.json"), "mistake_step": "four"}),
                     "bad.json", "field 'mistake_step'"),
    "mistake_on_task": ("whowhen", lambda: json.dumps({**_case("Hand-Crafted/52.json"), "mistake_step": "0"}),
                        "bad.json", "the task, not an agent's turn"),
    "terminal_first": (
        "whowhen",
        lambda: json.dumps({**_case("Algorithm-Generated/34.json"), "mistake_step": "0",
                            "history": _case("Algorithm-Generated/34.json")["history"][1:]}),
        "bad.json", "tool output with no agent turn before it",
    ),  # fmt: skip
    "content_type": (
        "whowhen",
        lambda: json.dumps({**_case("Hand-Crafted/52.json"),
                            "history": [*_case("Hand-Crafted/52.json")["history"][:3], {"role": "WebSurfer", "content": [1]}]}),
        "bad.json", "field 'history[3].content'",
    ),  # fmt: skip
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_malformed_file_is_one_message_naming_file_record_and_field(kind, tmp_path, capsys):
    fmt, text, record, field = BAD[kind]
    src = tmp_path / "bad.json"
    src.write_text(text())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "t.jsonl"
    out.write_text("previous\n")
    rc = main(["convert", "--from", fmt, "--strict", str(src), str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert record in err and field in err and "Traceback" not in err
    assert out.read_text() == "previous\n" and list(out_dir.iterdir()) == [out]  # untouched, no temporary file


def test_one_bad_case_in_a_directory_writes_nothing_with_strict(tmp_path, capsys):
    src = tmp_path / "cases" / "Hand-Crafted"
    src.mkdir(parents=True)
    (src / "42.json").write_text((WW / "Hand-Crafted" / "42.json").read_text())
    (src / "99.json").write_text(json.dumps({**_case("Hand-Crafted/52.json"), "mistake_step": "21"}))
    out = tmp_path / "t.jsonl"
    assert main(["convert", "--from", "whowhen", "--strict", str(tmp_path / "cases"), str(out)]) == 2
    err = capsys.readouterr().err
    assert "Hand-Crafted/99.json: field 'mistake_step': is 21 but history has 21 messages" in err
    assert not out.exists()


def test_convert_cli_writes_records_that_load(tmp_path, capsys):
    out = tmp_path / "cases.jsonl"
    assert main(["convert", "--from", "whowhen", str(WW), str(out)]) == 0
    assert "converted 4 trajectories" in capsys.readouterr().err  # nothing moved, nothing skipped
    loaded = load_trajectories(out).trajectories
    assert [t.to_dict() for t in loaded] == convert("whowhen", WW)


# ----------------------------------------------------------------------------------------------------------------
# Scoring and evaluation


def _pair(tiny_dir):
    return ["--policy", str(tiny_dir["policy"]), "--reference", str(tiny_dir["reference"])]


def test_score_reads_tau2_results_directly(tiny_dir, tmp_path):
    conv = tmp_path / "conv.jsonl"
    assert main(["convert", "--from", "tau2", str(AIRLINE), str(conv)]) == 0
    direct, via = tmp_path / "direct.jsonl", tmp_path / "via.jsonl"
    assert main(["score", *_pair(tiny_dir), str(AIRLINE), "-o", str(direct)]) == 0  # detected as tau2
    assert main(["score", *_pair(tiny_dir), "--format", "progadv", str(conv), "-o", str(via)]) == 0
    a = [json.loads(x) for x in direct.read_text().splitlines()]
    b = [json.loads(x) for x in via.read_text().splitlines()]
    assert [r["id"] for r in a] == ["sim-0-0", "sim-0-1", "sim-1-0"]
    assert [len(r["steps"]) for r in a] == [5, 4, 4]
    assert a == b
    assert a[1]["metadata"]["tool_errors"][0]["step"] == 1 and a[0]["group"] == "0" and a[0]["success"] is True


def test_evaluate_on_converted_whowhen_cases_reports_step_and_agent_accuracy(tiny_dir, tmp_path, capsys):
    conv = tmp_path / "ww.jsonl"
    assert main(["convert", "--from", "whowhen", str(WW), str(conv)]) == 0
    out = tmp_path / "eval"
    rc = main(["evaluate", *_pair(tiny_dir), str(conv), "-o", str(out), "--n-boot", "0", "--max-length", "1024"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Who&When attribution: step accuracy / agent accuracy (n=4 cases)" in printed
    assert "(random step)" in printed and "(first step)" in printed
    m = json.loads((out / "metrics.json").read_text())
    ww = m["whowhen_attribution"]
    assert ww["n"] == 4 and ww["n_skipped"] == 0
    # first step: only case 117 is labelled at step 0; its agent is guilty in 117 (JSON_Expert) and 42 (Orchestrator)
    assert ww["first_step"] == {"step_accuracy": 0.25, "agent_accuracy": 0.5, "n": 4}
    # random step: the guilty agent's share of each case's steps, from the raw files
    shares = []
    for rel in ("Algorithm-Generated/117.json", "Algorithm-Generated/34.json", "Hand-Crafted/42.json", "Hand-Crafted/52.json"):
        case = _case(rel)
        who = [h.get("name") or h["role"].split(" (")[0] for h in case["history"]]
        who = [w for w in who if w not in ("human", "Computer_terminal")]
        shares.append(who.count(case["mistake_agent"]) / len(who))
    assert ww["random_step"]["agent_accuracy"] == pytest.approx(sum(shares) / 4)
    # step level agrees with evaluate's own attribution figures on the same scores
    assert ww["random_step"]["step_accuracy"] == pytest.approx(m["attribution_chance"]["exact"])
    for rule in ("min_cumsum", "min_step"):
        pa = ww["methods"]["progress_advantage"][rule]
        assert pa["step_accuracy"] == m["methods"]["progress_advantage"]["failure_attribution"][rule]["exact"]
        assert pa["n"] == 4 and 0 <= pa["agent_accuracy"] <= 1
    assert set(ww["methods"]) >= {"progress_advantage", "policy_logprob", "self_certainty"}


def _ts(id, adv, agents=None, mistake=None, f=None):
    from progadv_trl.scoring import StepScore, TrajectoryScore

    steps = [StepScore(i, i, a, 1, False) for i, a in enumerate(adv)]
    meta = {"step_agents": agents, "mistake_agent": mistake} if agents is not None else None
    return TrajectoryScore(id=id, score=0.0, steps=steps, success=False, failure_step=f, metadata=meta)


def test_whowhen_attribution_by_hand():
    nan = float("nan")
    scores = [
        _ts("a", [1, -5, 2], ["X", "Y", "X"], "Y", 1),  # min_cumsum -> 1: right step, right agent
        _ts("b", [-3, 1, 1], ["X", "Y", "X"], "X", 2),  # -> 0: wrong step, right agent
        _ts("c", [0.5, 0.2], ["Y", "Y"], "Z", 1),  # -> 0: wrong step, wrong agent
        _ts("d", [nan], ["X"], "X", 0),  # no value: out of the method's n, in the baselines
        _ts("e", [1, 2, 3], ["X", "Y"], "X", 0),  # labels do not fit the steps: skipped
        _ts("f", [1, 2]),  # not a Who&When record: ignored
    ]
    res = whowhen_attribution(scores, rules=("min_cumsum",))
    assert res["n"] == 4 and res["n_skipped"] == 1 and list(res["methods"]) == ["progress_advantage"]
    pa = res["methods"]["progress_advantage"]["min_cumsum"]
    assert pa["n"] == 3
    assert pa["step_accuracy"] == pytest.approx(1 / 3) and pa["agent_accuracy"] == pytest.approx(2 / 3)
    assert res["first_step"] == {"step_accuracy": 0.25, "agent_accuracy": 0.5, "n": 4}
    assert res["random_step"]["step_accuracy"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 2 + 1) / 4)
    assert res["random_step"]["agent_accuracy"] == pytest.approx((1 / 3 + 2 / 3 + 0 + 1) / 4)
    json.dumps(res, allow_nan=False)  # JSON-safe
    assert not any(isinstance(v, float) and math.isnan(v) for v in res["first_step"].values())
