"""Fair comparison: every method gets its best rule by cross-validation; paired bootstrap of PA - best baseline."""

import numpy as np

from progadv_trl.evaluation import evaluate, format_markdown, format_table
from progadv_trl.evaluation.fair import fair_comparison, rule_values, verdict
from progadv_trl.scoring import StepScore, TrajectoryScore


def _ts(id, adv, logp, success, failure_step=None, group=None):
    adv, logp = np.asarray(adv, float), np.asarray(logp, float)
    return TrajectoryScore(
        id=id, score=float(adv.sum()), steps=[StepScore(i, 2 * i + 2, float(a), 3, False) for i, a in enumerate(adv)],
        baselines={"policy_logprob": float(logp.mean())}, step_baselines={"policy_logprob": list(logp)},
        group=group, success=success, failure_step=failure_step,
    )  # fmt: skip


def _world(n_groups=24, n=6, seed=0, pa_noise=0.3):
    """Failed runs have one bad step. The log-prob (every step <= 0) is lowest exactly at that step, so min_step
    finds it while min_cumsum, on values that only fall, always names the last step. Progress advantage sees the
    bad step through noise `pa_noise`."""
    rng = np.random.default_rng(seed)
    out = []
    for g in range(n_groups):
        for j in range(n):
            k = int(rng.integers(3, 7))
            fail = rng.random() < 0.5
            f = int(rng.integers(0, k - 1)) if fail else None
            adv = rng.normal(0.2, pa_noise, k)
            logp = -rng.uniform(0.1, 0.5, k)
            if fail:
                adv[f] -= 1.0
                logp[f] -= 2.0
            out.append(_ts(f"g{g}-{j}", adv, logp, not fail, f, f"g{g}"))
    return out


def test_a_log_prob_baseline_gets_its_own_best_attribution_rule():
    scores = _world(pa_noise=0.8)
    fair = fair_comparison(scores, n_boot=200)
    lp = fair["attribution"]["methods"]["policy_logprob"]
    assert lp["rule"] == "min_step" and lp["value"] == 1.0  # the baseline's natural rule, found by CV
    # the old default handicapped it: min_cumsum on an always-negative series names the last step
    failed = [s for s in scores if s.success is False]
    from progadv_trl.evaluation import attribute_failure

    last = [attribute_failure(s.method_steps("policy_logprob"), "min_cumsum") == len(s.steps) - 1 for s in failed]
    assert all(last) and any(s.failure_step != len(s.steps) - 1 for s in failed)
    # and so progress advantage, with noisier steps, loses this comparison: the interval says so
    att = fair["attribution"]
    assert att["best_baseline"] == "policy_logprob" and att["difference"] < 0
    assert att["difference_ci"][1] < 0 and att["verdict"] == "loses"


def test_candidates_include_the_native_score_and_every_step_reduction():
    s = _ts("a", [1.0, -2.0, 0.5], [-0.1, -0.2, -0.3], True)
    v = rule_values(s, "policy_logprob")
    assert v["native"] == s.baselines["policy_logprob"]
    assert v["min"] == -0.3 and abs(v["sum"] + 0.6) < 1e-12 and v["last"] == -0.3
    assert rule_values(s, "progress_advantage")["min_cumsum"] == -1.0


def test_paired_bootstrap_verdicts():
    assert verdict([0.01, 0.2]) == "beats" and verdict([-0.3, -0.01]) == "loses" and verdict([-0.1, 0.1]) == "ties"
    assert verdict(None) == "undetermined"
    # identical methods: the paired difference is exactly 0 on every resample, so they tie
    scores = _world(seed=1)
    for s in scores:
        s.baselines["reference_logprob"] = s.score
        s.step_baselines["reference_logprob"] = list(s.advantages)
    fair = fair_comparison(scores, n_boot=200, methods=("progress_advantage", "reference_logprob"))
    for app in ("auroc", "best_of_n", "attribution"):
        e = fair[app]
        assert e["difference"] == 0.0 and e["difference_ci"] == [0.0, 0.0] and e["verdict"] == "ties", app


def test_progress_advantage_beats_a_useless_baseline_on_success_prediction():
    rng = np.random.default_rng(3)
    scores = _world(seed=2, pa_noise=0.05)
    for s in scores:  # a baseline that knows nothing
        noise = rng.normal(size=len(s.steps))
        s.baselines["policy_logprob"], s.step_baselines["policy_logprob"] = float(noise.mean()), list(noise)
    e = fair_comparison(scores, n_boot=300)["auroc"]
    assert e["methods"]["progress_advantage"]["value"] > 0.9
    assert e["difference_ci"][0] > 0 and e["verdict"] == "beats"
    assert len(e["methods"]["progress_advantage"]["per_fold"]) == 5


def test_evaluate_reports_the_fair_comparison():
    scores = _world(n_groups=12)
    m = evaluate(scores, n_boot=50)
    assert set(m["fair"]) >= {"auroc", "best_of_n", "attribution"}
    assert "Fair comparison" in format_markdown(m) and "PA - best baseline" in format_table(m)
