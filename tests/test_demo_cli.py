"""`progadv demo --fast`: every stage runs, the files the README promises exist, and a seed reproduces the run.

The fast configuration learns little (seconds of training), so these tests check the plumbing and the contracts,
not the demo's numbers; those are measured by the full `progadv demo` and reported in the README.
"""

import json

import pytest

from progadv_trl.cli import main

SUMMARY_KEYS = {"reference_success", "policy_success", "reference_success_sampled", "policy_success_sampled",
                "timings", "evaluation", "paths", "training_curves"}  # fmt: skip


CONSOLE = {}  # the first run's stdout and stderr


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    import contextlib
    import io

    runs = []
    for k in range(2):
        out = tmp_path_factory.mktemp(f"demo{k}")
        so, se = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
            assert main(["demo", "--out", str(out), "--fast", "--no-progress"]) == 0
        if k == 0:
            CONSOLE.update(stdout=so.getvalue(), stderr=se.getvalue())
        runs.append(out)
    return runs


def test_demo_console_is_stage_lines_and_the_final_block(demo_runs):
    out = demo_runs[0]
    # stdout: the final block (tables, the comparison with the study), no line a person cannot read
    lines = CONSOLE["stdout"].splitlines()
    assert lines and max(map(len, lines)) <= 300
    assert any(line.startswith("success on held-out tasks") for line in lines)
    # stderr with --no-progress: one line when a stage starts and one when it ends, nothing else (no log dicts)
    err = [line for line in CONSOLE["stderr"].splitlines() if line.strip()]
    assert err and all(line.startswith("[progadv demo] ") for line in err), [x for x in err if not x.startswith("[")][:3]
    assert not any("{" in line for line in err)
    assert sum(" done in " in line for line in err) >= 6
    # the trainers' log dicts went to files under the run directory
    for name in ("sft", "grpo"):
        logged = [json.loads(x) for x in (out / "logs" / f"{name}.jsonl").read_text().splitlines()]
        assert logged and all("step" in e for e in logged)
    assert any(any(k.startswith("eval_progadv/heldout/") for k in e) for e in logged)


def test_demo_writes_summary_report_and_bundle(demo_runs, capsys):
    out = demo_runs[0]
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert 0.0 <= summary["reference_success"] <= 1.0 and 0.0 <= summary["policy_success"] <= 1.0
    assert summary["callback_errors"] == 0
    for name in ("policy", "reference"):
        h = summary["evaluation"][name]
        assert "progress_advantage" in h["methods"] and "reference_logprob" in h["methods"]
        for f in ("metrics.json", "metrics.md", "roc.png", "best_of_n.png", "traces.png"):
            assert (out / "report" / name / f).is_file()
    assert (out / "report" / "training.png").is_file()
    assert "## policy rollouts" in (out / "report" / "README.md").read_text()
    # the callback scored the held-out set before the first step and at the end
    steps = summary["training_curves"]["heldout_steps"]
    assert steps[0] == 0 and steps[-1] == summary["grpo_steps"]
    assert (out / "bundle" / "manifest.json").is_file()
    from conftest import strict_json_files

    read = {p.relative_to(out).as_posix() for p in strict_json_files(out)}  # strict: no bare NaN anywhere
    assert {"summary.json", "report/policy/metrics.json", "rollouts_policy.jsonl", "bundle/manifest.json"} <= read


def test_demo_step_selection_block(demo_runs):
    from progadv_trl.demo.steering import STEER_METHODS

    summary = json.loads((demo_runs[0] / "summary.json").read_text())
    st = summary["step_selection"]
    assert st["tasks"] == 3 and st["budgets"] == [4, 8] and st["methods"] == list(STEER_METHODS)
    for agent in ("reference", "policy"):
        e = st["agents"][agent]
        for k in (4, 8):
            r = e[f"k{k}"]
            assert set(r["step"]) == set(STEER_METHODS) and all(0.0 <= v <= 1.0 for v in r["step"].values())
            assert r["candidates"] == k * r["states"] and r["states"] >= st["tasks"]  # at least each first state
            assert r["step_comparison"]["best_baseline"] not in ("progress_advantage", None)
            assert "progress_advantage" in r["step_comparison"]["family"]
            assert "progress_advantage" in r["trajectory"] and 0.0 <= r["sampled"] <= 1.0
            cr = r["candidate_ranking"]
            assert cr["states_with_a_choice"] <= r["states"] and "random" not in cr["methods"]
            assert all(v is None or 0.0 <= v <= 1.0 for v in cr["methods"].values())
    assert "Step-level selection" in (demo_runs[0] / "report" / "README.md").read_text()


def test_demo_bundle_loads_and_scores_the_heldout_set(demo_runs):
    from progadv_trl.critic import ProgressCritic
    from progadv_trl.trajectories import load_trajectories

    out = demo_runs[0]
    critic = ProgressCritic.from_pretrained(out / "bundle")
    assert critic.manifest["provenance"]["trainer_class"] == "GRPOTrainer"
    trajs = load_trajectories(out / "heldout_reference.jsonl").trajectories
    scores = critic.score(trajs)
    assert len(scores) == len(trajs) and all(len(s.steps) == sum(m["role"] == "assistant" for m in t.messages)
                                             for s, t in zip(scores, trajs))  # fmt: skip


def test_demo_is_reproducible(demo_runs):
    a, b = demo_runs
    for f in ("heldout_reference.jsonl", "rollouts_policy.jsonl", "rollouts_reference.jsonl"):
        assert (a / f).read_text() == (b / f).read_text(), f
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["evaluation"] == sb["evaluation"]
    assert sa["step_selection"] == sb["step_selection"]
    assert sa["training_curves"]["heldout_step_advantage_mean"] == sb["training_curves"]["heldout_step_advantage_mean"]


def test_demo_bad_config_is_a_message(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- not\n- a mapping\n")
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(tmp_path / "o"), "--config", str(bad)])
    assert "must be a mapping" in str(e.value)
    assert not (tmp_path / "o").exists()
