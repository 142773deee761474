"""`progadv study`: the aggregation across seeds (a pure function of the per-seed summaries) and the resume logic,
with stub runs; one real two-seed study of the fast demo through the command line."""

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest

from progadv_trl.demo.study import aggregate, config_diff, run_study, study_markdown


def _summary(seed, ref, pol, pa, lp, extra=None, config=None):
    """A demo summary with two methods on both sets; `pa`, `lp`: AUROC of progress advantage / policy log-prob."""
    methods = {
        "progress_advantage": {"auroc": pa, "auroc_ci": [pa - 0.1, pa + 0.1], "n": 256, "best_of_n": 0.8,
                               "calibration": {"ece": 0.05}, **(extra or {})},
        "policy_logprob": {"auroc": lp, "auroc_ci": [lp - 0.1, lp + 0.1], "n": 256, "best_of_n": 0.8,
                           "calibration": {"ece": 0.10}, "auroc_decision_failures": None},
    }  # fmt: skip
    ev = {"methods": methods, "random_pick": 0.4, "pass_at_n": 0.9, "cv_reduction": {"chosen": "sum/sum",
                                                                                       "out_of_fold_auroc": 0.7}}
    return {
        "reference_success": ref, "policy_success": pol, "reference_success_sampled": ref - 0.1,
        "policy_success_sampled": pol - 0.05, "timings": {"total_s": 280.0 + seed},
        "evaluation": {"policy": ev, "reference": json.loads(json.dumps(ev))},
        "config": {"seed": seed, "out_dir": f"runs/s/seed_{seed}", "progress": False, "grpo_steps": 80, "beta": 0.1,
                   "free_form": False, **(config or {})},
    }  # fmt: skip


def test_aggregate_means_spread_wins_and_success():
    sums = [_summary(0, 0.55, 0.90, 0.90, 0.80), _summary(1, 0.60, 0.80, 0.70, 0.75), _summary(2, 0.58, 0.93, 0.85, 0.85)]
    st = aggregate(sums)
    assert st["seeds"] == [0, 1, 2]
    assert st["config"] == {"beta": 0.1, "free_form": False, "grpo_steps": 80} and st["config_varying"] == {}
    s = st["success"]
    assert [r["gain_points"] for r in s["per_seed"]] == [35.0, 20.0, 35.0]
    assert s["min_gain_points"] == 20.0 and s["all_seeds_clear_bar"] is False  # one seed below 25: not on average
    assert s["per_seed"][0]["policy_sampled"] == pytest.approx(0.85) and s["per_seed"][2]["total_s"] == 282.0

    on = st["table"]["on-policy"]
    assert set(st["table"]) == {"on-policy", "off-policy"}
    pa = on["progress_advantage"]["auroc"]
    assert pa["mean"] == pytest.approx(0.8166667) and pa["min"] == 0.70 and pa["max"] == 0.90 and pa["n_seeds"] == 3
    assert pa["std"] == pytest.approx(math.sqrt(((0.9 - 0.81667) ** 2 + (0.7 - 0.81667) ** 2 + (0.85 - 0.81667) ** 2) / 2), rel=1e-4)
    # wins: PA best on seed 0, the log-prob on seed 1, a tie on seed 2 (0.85 both) counts for both
    assert (pa["wins"], on["policy_logprob"]["auroc"]["wins"]) == (2, 2)
    # a tie on every seed: both win every seed
    assert on["progress_advantage"]["best_of_n"]["wins"] == on["policy_logprob"]["best_of_n"]["wins"] == 3
    # nested figures are flattened; lower is better for ECE
    assert on["progress_advantage"]["calibration/ece"]["wins"] == 3 and on["policy_logprob"]["calibration/ece"]["wins"] == 0
    # counts, CIs and None are not figures; the set's other numbers are reference lines without wins
    assert "n" not in on["progress_advantage"] and "auroc_ci" not in on["progress_advantage"]
    assert "auroc_decision_failures" not in on["policy_logprob"]
    assert on["(set)"]["random_pick"]["mean"] == pytest.approx(0.4) and on["(set)"]["random_pick"]["wins"] is None
    assert on["(set)"]["cv_reduction/out_of_fold_auroc"]["n_seeds"] == 3


def test_aggregate_takes_new_figures_and_reports_differing_config():
    # A figure the evaluation adds later (e.g. a paired bootstrap against the best baseline) flows through as it is.
    extra = {"vs_best_baseline": {"auroc_diff": 0.05, "auroc_diff_ci": [0.01, 0.09]}}
    sums = [_summary(0, 0.5, 0.9, 0.9, 0.8, extra=extra), _summary(3, 0.5, 0.8, 0.9, 0.8, extra=extra, config={"grpo_steps": 60})]
    st = aggregate(sums)
    cell = st["table"]["off-policy"]["progress_advantage"]["vs_best_baseline/auroc_diff"]
    assert cell["n_seeds"] == 2 and cell["mean"] == pytest.approx(0.05) and cell["wins"] == 0  # no other method has it
    assert st["config_varying"] == {"grpo_steps": [80, 60]} and "grpo_steps" not in st["config"]
    assert st["success"]["all_seeds_clear_bar"] is True and st["success"]["min_gain_points"] == 30.0
    md = study_markdown(st, "progadv study --seeds 0 3 --out x")
    assert "| 3 | 0.500 | 0.800 | 30.0 |" in md and "vs_best_baseline/auroc_diff" in md and "differs between seeds" in md
    with pytest.raises(ValueError):
        aggregate([])


class _Cfg:
    def __init__(self, seed, out_dir, steps=80):
        self.seed, self.out_dir, self.grpo_steps, self.progress = seed, out_dir, steps, False


def _stub_run(calls):
    def run(cfg):
        calls.append(cfg.seed)
        s = _summary(cfg.seed, 0.5, 0.9, 0.9, 0.8)
        s["config"] = {"seed": cfg.seed, "out_dir": cfg.out_dir, "grpo_steps": cfg.grpo_steps, "progress": False}
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out_dir) / "summary.json").write_text(json.dumps(s))
        return s

    return run


@pytest.fixture()
def stub_asdict(monkeypatch):
    import progadv_trl.demo.study as study

    monkeypatch.setattr("dataclasses.asdict", lambda c: dict(vars(c)))
    return study


def test_run_study_resumes_finished_seeds_and_refuses_other_configs(tmp_path, stub_asdict):
    calls = []
    out = tmp_path / "study"
    run_study([0, 1], out, lambda s, d: _Cfg(s, d), runner=_stub_run(calls))
    assert calls == [0, 1]
    st = json.loads((out / "study.json").read_text())
    assert st["seeds"] == [0, 1] and (out / "study.md").is_file()
    # a rerun with one more seed runs only the new one (progress bars on or off: the same configuration)
    st = run_study([0, 1, 2], out, lambda s, d: _Cfg(s, d), runner=_stub_run(calls))
    assert calls == [0, 1, 2] and st["seeds"] == [0, 1, 2] and st["run_s"].keys() == {2}
    # another configuration: refused before anything runs
    with pytest.raises(ValueError, match="grpo_steps"):
        run_study([3, 0], out, lambda s, d: _Cfg(s, d, steps=60), runner=_stub_run(calls))
    assert calls == [0, 1, 2]


def test_config_diff():
    a = {"seed": 0, "out_dir": "a", "progress": True, "beta": 0.1}
    assert config_diff(a, {**a, "out_dir": "b", "progress": False}) == []
    assert config_diff(a, {**a, "beta": 0.2, "free_form": True}) == ["beta", "free_form"]
    # a run made before grpo_p_timeout existed trained with the world's timeouts (None), not the new default
    assert config_diff(a, {**a, "grpo_p_timeout": None}) == []
    assert config_diff(a, {**a, "grpo_p_timeout": 0.5}) == ["grpo_p_timeout"]


def test_study_command_runs_two_fast_seeds_and_resumes(tmp_path, capsys):
    from progadv_trl.cli import main
    from progadv_trl.demo.pipeline import DemoConfig

    out = tmp_path / "st"
    # --no-variants: stage 6 without the variants and merged references (covered by test_variants_eval), for time
    assert main(["study", "--seeds", "0", "1", "--out", str(out), "--fast", "--no-progress", "--no-variants"]) == 0
    st = json.loads((out / "study.json").read_text())
    assert st["seeds"] == [0, 1] and len(st["success"]["per_seed"]) == 2
    for regime in ("on-policy", "off-policy"):
        assert st["table"][regime]["progress_advantage"]["best_of_n"]["n_seeds"] == 2  # AUROC: none without successes
    cell = st["step_selection"]["cells"]["policy/k8"]
    assert cell["step"]["progress_advantage"]["n_seeds"] == 2
    v = cell["step_verdicts"]["progress_advantage"]
    assert v["beats"] + v["ties"] + v["losses"] == 2
    assert "Step-level selection" in (out / "study.md").read_text()
    # the study trains the reward models on every seed: baselines in every regime, their cost beside the critic's
    for regime in ("on-policy", "mid-training", "off-policy"):
        assert {"orm", "prm"} <= set(st["table"][regime])
    assert {"orm", "prm"} <= set(cell["step"]) and st["reward_model_costs"]["prm"]["rollouts"]["mean"] == 8
    assert "against reward models trained for the job" in (out / "study.md").read_text()
    for s in (0, 1):
        cfg = json.loads((out / f"seed_{s}" / "summary.json").read_text())["config"]
        want = DemoConfig.fast(seed=s, out_dir=str(out / f"seed_{s}"), reward_models=True)
        assert cfg == json.loads(json.dumps(asdict(want)))
    before = (out / "seed_1" / "summary.json").stat().st_mtime_ns
    assert main(["study", "--seeds", "1", "--out", str(out), "--fast", "--no-progress", "--no-variants"]) == 0
    assert (out / "seed_1" / "summary.json").stat().st_mtime_ns == before  # resumed, not rerun
    assert "not run again" in capsys.readouterr().err
    # --reevaluate: the finished seed's evaluation is computed again (same models and rollouts), nothing retrained
    s1 = json.loads((out / "seed_1" / "summary.json").read_text())
    trained = (out / "seed_1" / "policy" / "model.safetensors").stat().st_mtime_ns
    stale = {**s1, "evaluation": {}}
    (out / "seed_1" / "summary.json").write_text(json.dumps(stale))
    assert main(["study", "--seeds", "1", "--out", str(out), "--fast", "--no-progress", "--reevaluate", "--no-variants"]) == 0
    again = json.loads((out / "seed_1" / "summary.json").read_text())
    assert again["evaluation"] == s1["evaluation"] and again["policy_success"] == s1["policy_success"]
    assert (out / "seed_1" / "policy" / "model.safetensors").stat().st_mtime_ns == trained
    assert "evaluating its saved rollouts again" in capsys.readouterr().err
    # every file the study and its demos wrote is strict JSON (the fast runs have undefined figures: null, not NaN)
    from conftest import strict_json_files

    read = {p.relative_to(out).as_posix() for p in strict_json_files(out)}
    assert {"study.json", "study_ranges.json", "seed_0/summary.json", "seed_0/report/policy/metrics.json",
            "seed_1/bundle/manifest.json"} <= read  # fmt: skip


def _with_comparison(summary, diffs):
    """`diffs`: {set: {application: (difference, verdict, best baseline)}} added as the demo's `comparison`."""
    for set_name, apps in diffs.items():
        summary["evaluation"][set_name]["comparison"] = {
            app: {"best_baseline": b, "difference": d, "difference_ci": [d - 0.05, d + 0.05], "verdict": v}
            for app, (d, v, b) in apps.items()
        }
        summary["evaluation"][set_name]["methods"]["progress_advantage"]["fair_auroc"] = 0.5 + apps["auroc"][0]
    return summary


def test_verdicts_ranges_and_the_demo_beside_the_study():
    from progadv_trl.demo.study import compare_with_study, study_ranges

    sums = [
        _with_comparison(_summary(0, 0.55, 0.90, 0.9, 0.8), {"reference": {"auroc": (0.05, "beats", "policy_logprob")},
                                                             "policy": {"auroc": (-0.30, "loses", "reference_logprob")}}),
        _with_comparison(_summary(1, 0.60, 0.88, 0.9, 0.8), {"reference": {"auroc": (0.01, "ties", "policy_logprob")},
                                                             "policy": {"auroc": (-0.50, "loses", "policy_logprob")}}),
    ]  # fmt: skip
    st = aggregate(sums)
    off = st["verdicts"]["off-policy"]["auroc"]
    assert (off["beats"], off["ties"], off["loses"]) == (1, 1, 0) and off["best_baseline"] == {"policy_logprob": 2}
    assert off["differences"] == [0.05, 0.01] and off["mean"] == pytest.approx(0.03) and off["min"] == 0.01
    on = st["verdicts"]["on-policy"]["auroc"]
    assert on["loses"] == 2 and on["best_baseline"] == {"reference_logprob": 1, "policy_logprob": 1}
    assert [p["chosen"] for p in st["reductions_chosen"]["on-policy"]] == ["sum/sum", "sum/sum"]
    md = study_markdown(st)
    assert "| off-policy | success prediction, AUROC over all rollouts |" in md and "| 1 / 1 / 0 |" in md
    assert "- on-policy: seed 0: sum/sum (0.700); seed 1: sum/sum (0.700)" in md

    r = study_ranges(st)
    assert r["gain_points"] == {"min": 28.0, "mean": 31.5, "max": 35.0} and r["world"] == "plain"
    assert r["regimes"]["on-policy"]["auroc"]["difference"] == {"min": -0.5, "mean": -0.4, "max": -0.3}

    inside = _with_comparison(_summary(7, 0.5, 0.8, 0.9, 0.8), {"reference": {"auroc": (0.02, "ties", "policy_logprob")},
                                                                "policy": {"auroc": (-0.9, "loses", "policy_logprob")}})
    inside["greedy_gain_points"] = 30.0
    lines = compare_with_study(inside, r)
    assert any("greedy gain +30.0" in x and x.endswith("inside") for x in lines)
    assert any(x.startswith("  off-policy, auroc") and x.endswith("inside") for x in lines)
    assert any(x.startswith("  on-policy, auroc") and x.endswith("OUTSIDE (below)") for x in lines)
    assert "another draw" in lines[-1]
    other = dict(inside, config={**inside["config"], "beta": 0.3})  # a changed knob: no comparison
    assert "not comparable" in compare_with_study(other, r)[-1] and "beta" in compare_with_study(other, r)[-1]
    # a study made before a config key existed held that key at its old value: a run with the new value differs
    newer = dict(inside, config={**inside["config"], "grpo_p_timeout": 0.5})
    assert "not comparable" in compare_with_study(newer, r)[-1] and "grpo_p_timeout" in compare_with_study(newer, r)[-1]
    assert "not comparable" not in compare_with_study(dict(inside, config={**inside["config"], "grpo_p_timeout": None}), r)[-1]


def test_a_run_without_reward_models_is_set_beside_the_studys_untrained_baselines():
    # The study trained reward models, and an ORM was the best baseline on one seed; a demo run without them is
    # compared with the study's PA - best untrained baseline, not with PA - ORM (seen: every on-policy line
    # "OUTSIDE (above)" for a run that reproduced a study seed).
    from progadv_trl.demo.study import compare_with_study, study_ranges

    sums = [
        _with_comparison(_summary(0, 0.55, 0.90, 0.9, 0.8), {"reference": {"auroc": (0.05, "beats", "policy_logprob")},
                                                             "policy": {"auroc": (-0.50, "loses", "orm")}}),
        _with_comparison(_summary(1, 0.60, 0.88, 0.9, 0.8), {"reference": {"auroc": (0.01, "ties", "policy_logprob")},
                                                             "policy": {"auroc": (-0.08, "ties", "reference_logprob")}}),
    ]  # fmt: skip
    c = sums[0]["evaluation"]["policy"]["comparison"]["auroc"]
    c["best_untrained_baseline"] = "reference_logprob"
    c["vs_best_untrained"] = {"baseline": "reference_logprob", "difference": -0.10, "difference_ci": [-0.2, 0.0],
                              "verdict": "ties"}  # fmt: skip
    sums[1]["evaluation"]["policy"]["comparison"]["auroc"]["best_untrained_baseline"] = "reference_logprob"
    for s in sums:
        s["reward_models"] = {"orm": {}, "prm": {}}
    st = aggregate(sums)
    on = st["verdicts"]["on-policy"]["auroc"]
    assert on["differences"] == [-0.50, -0.08] and on["untrained"]["differences"] == [-0.10, -0.08]
    assert (on["untrained"]["ties"], on["untrained"]["loses"]) == (2, 0)
    r = study_ranges(st)["regimes"]["on-policy"]["auroc"]
    assert r["difference_untrained"] == {"min": -0.10, "mean": pytest.approx(-0.09), "max": -0.08}
    del c["vs_best_untrained"]  # a summary from before the figure was kept: no untrained range, not a wrong one
    assert "untrained" not in aggregate(sums)["verdicts"]["on-policy"]["auroc"]
    c["vs_best_untrained"] = {"baseline": "reference_logprob", "difference": -0.10, "difference_ci": [-0.2, 0.0],
                              "verdict": "ties"}  # fmt: skip

    run = _with_comparison(_summary(7, 0.5, 0.8, 0.9, 0.8), {"reference": {"auroc": (0.02, "ties", "policy_logprob")},
                                                             "policy": {"auroc": (-0.09, "ties", "reference_logprob")}})
    line = next(x for x in compare_with_study(run, study_ranges(st)) if x.startswith("  on-policy, auroc"))
    assert "best untrained baseline" in line and line.endswith("inside")
    run["reward_models"] = {"orm": {}}  # with reward models of its own, the run is set beside the study's best
    line = next(x for x in compare_with_study(run, study_ranges(st)) if x.startswith("  on-policy, auroc"))
    assert "best untrained" not in line and line.endswith("inside")
    run["evaluation"]["policy"]["comparison"]["auroc"]["difference"] = -0.01
    line = next(x for x in compare_with_study(run, study_ranges(st)) if x.startswith("  on-policy, auroc"))
    assert line.endswith("OUTSIDE (above)")


def test_family_verdicts_from_each_seeds_paired_interval():
    """The variants table: a family member's verdict per seed comes from its paired interval (beats only when the
    interval is above zero), and baselines never appear as members."""
    from progadv_trl.demo.study import family_markdown

    sums = []
    for seed, (d, ci) in enumerate([(0.10, [0.02, 0.18]), (0.01, [-0.03, 0.05]), (-0.2, [-0.3, -0.1])]):
        s = _summary(seed, 0.5, 0.8, 0.9, 0.8)
        for set_name in ("policy", "reference"):
            s["evaluation"][set_name]["methods"]["progress_advantage_clipped"] = {
                "auroc": 0.9, "fair_auroc_minus_best_baseline": d, "fair_auroc_minus_best_baseline_ci": ci}
        sums.append(s)
    st = aggregate(sums)
    v = st["family_verdicts"]["on-policy"]["progress_advantage_clipped"]["auroc"]
    assert (v["beats"], v["ties"], v["loses"]) == (1, 1, 1) and v["mean"] == pytest.approx(-0.03)
    assert set(st["family_verdicts"]["on-policy"]) == {"progress_advantage_clipped"}  # policy_logprob has no row
    md = "\n".join(family_markdown(st))
    assert "| progress_advantage_clipped | -0.030 [-0.200, +0.100] 1/1/1 |" in md


def test_reward_models_head_to_head_and_costs_across_seeds():
    """Trained reward models: progress advantage minus each, per seed's paired interval, and what each cost."""
    from progadv_trl.demo.study import reward_models_markdown

    sums = []
    for seed, (d, ci) in enumerate([(0.10, [0.02, 0.18]), (-0.05, [-0.09, -0.01])]):
        s = _summary(seed, 0.5, 0.8, 0.9, 0.8)
        for set_name in ("policy", "reference"):
            s["evaluation"][set_name]["methods"]["prm"] = {
                "auroc": 0.8, "fair_auroc_progress_advantage_minus_this": d,
                "fair_auroc_progress_advantage_minus_this_ci": ci}
        cost = {"cpu_s": 60.0 + 10 * seed, "wall_s": 90.0, "rollouts": 96, "continuations": 700 + seed,
                "resolved_by_world": 400, "training_steps": 18}
        s["reward_models"] = {"orm": {**cost, "continuations": 0}, "prm": cost, "critic": {"cpu_s": 0.0}}
        s["step_selection"] = {"tasks": 4, "budgets": [4], "agents": {"policy": {"greedy": 0.9, "k4": {
            "sampled": 0.8, "step": {"progress_advantage": 0.9, "prm": 0.8}, "trajectory": {"progress_advantage": 0.9},
            "step_comparison": {"best_baseline": "prm", "family": {}, "versus": {"prm": {
                "difference": 0.1, "difference_ci": [-0.1, 0.3], "verdict": "ties"}}},
            "trajectory_comparison": {"family": {}}}}}}  # fmt: skip
        sums.append(s)
    st = aggregate(sums)
    v = st["versus_verdicts"]["off-policy"]["prm"]["auroc"]
    assert (v["beats"], v["ties"], v["loses"]) == (1, 0, 1) and v["mean"] == pytest.approx(0.025)
    assert set(st["versus_verdicts"]["on-policy"]) == {"prm"}  # only rows that carry a head-to-head figure
    c = st["reward_model_costs"]
    assert c["prm"]["cpu_s"]["mean"] == pytest.approx(65.0) and c["critic"]["cpu_s"] == 0
    assert st["step_selection"]["cells"]["policy/k4"]["step_versus"]["prm"]["ties"] == 2
    md = "\n".join(reward_models_markdown(st))
    assert "| prm | +0.025 [-0.050, +0.100] 1/0/1 |" in md and "| prm | 65 ± 7 |" in md
    assert "| prm | +0.100 (0/2/0) |" in md and "critic (progress advantage) | 0 |" in md
    assert "against reward models trained for the job" in study_markdown(st)
    assert aggregate([_summary(0, 0.5, 0.8, 0.9, 0.8)])["reward_model_costs"] is None
