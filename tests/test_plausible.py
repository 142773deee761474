"""progress_advantage_plausible: the semantics of each application, and alpha chosen by cross-validation."""

import math

import numpy as np
import pytest

from progadv_trl.config import IMPLAUSIBLE_OFFSET, PLAUSIBLE, ScoringConfig
from progadv_trl.evaluation.attribution import attribute_failure
from progadv_trl.evaluation.fair import fair_comparison, rule_values
from progadv_trl.evaluation.labels import implausible_share
from progadv_trl.evaluation.selection import pick_best
from progadv_trl.scoring import (
    TokenStats,
    TrajectoryScore,
    plausible_step_values,
    reduce_steps,
    score_from_token_stats,
    shortfalls,
    step_gaps,
)
from progadv_trl.session import from_step

LOG10 = math.log(10)  # the gap at which a token is exactly 0.1 x the top choice


def _stats(steps, logp, top1, ref=None):
    logp = np.asarray(logp, dtype=np.float64)
    return TokenStats(step=np.asarray(steps), policy_logp=logp, policy_top1_logp=np.asarray(top1, dtype=np.float64),
                      reference_logp=np.asarray(ref if ref is not None else logp - 1.0, dtype=np.float64))


def test_gap_is_the_worst_token_below_the_top_choice():
    st = _stats([0, 0, 1, 1], logp=[-0.1, -3.0, -0.5, -0.5], top1=[-0.1, -0.2, -0.5, -0.4])
    np.testing.assert_allclose(step_gaps(st, 3), [2.8, 0.1, np.nan])  # step 2 has no tokens: NaN
    # the argmax itself may come out a hair above its own log-prob in float32: never a negative gap
    assert step_gaps(_stats([0], [-0.2], [-0.2 - 1e-7]), 1)[0] == 0.0
    np.testing.assert_allclose(shortfalls(np.array([2.8, 0.1, np.nan]), 0.1), [2.8 - LOG10, 0.0, np.nan])


def test_at_one_state_implausible_candidates_rank_below_plausible_ones_smallest_shortfall_first():
    adv = np.array([5.0, -3.0, 9.0, 8.0])
    gaps = np.array([0.5, 2.0, LOG10 + 0.2, LOG10 + 1.5])  # two plausible at alpha 0.1, two not
    v = plausible_step_values(adv, gaps, 0.1)
    order = list(np.argsort(-v))
    assert order == [0, 1, 2, 3]  # plausible by advantage (5 > -3), then implausible by shortfall (0.2 < 1.5)
    np.testing.assert_allclose(v[2:], [-(IMPLAUSIBLE_OFFSET + 0.2), -(IMPLAUSIBLE_OFFSET + 1.5)])
    # the same ranking as the session's choose: pick_best over the candidates' values
    assert pick_best(v, "state", 0) == 0
    # at a looser alpha (0.01) candidate 2 is plausible and its advantage wins
    assert pick_best(plausible_step_values(adv, gaps, 0.01), "state", 0) == 2


def test_over_a_trajectory_sum_counts_implausible_steps_first_and_attribution_blames_them():
    cfg = ScoringConfig(beta=1.0)
    # trajectory a: high advantage but one implausible step; b: lower advantage, all plausible
    a = score_from_token_stats(_stats([0, 1, 2], [-0.1, -5.0, -0.1], [-0.1, -0.1, -0.1], ref=[-9, -9, -9]), 3, cfg)
    b = score_from_token_stats(_stats([0, 1, 2], [-0.1, -0.2, -0.1], [-0.1, -0.1, -0.1], ref=[-0.2, -0.3, -0.2]), 3, cfg)
    assert a.score > b.score  # plain progress advantage prefers a ...
    assert b.method_score(PLAUSIBLE) > a.method_score(PLAUSIBLE)  # ... the plausible variant prefers b
    assert a.method_score(PLAUSIBLE) < -IMPLAUSIBLE_OFFSET / 2  # one implausible step: below every all-plausible run
    # attribution by the lowest step names the implausible step, not the lowest advantage
    steps = a.method_steps(PLAUSIBLE)
    assert attribute_failure(steps, "min_step", 0.0) == 1
    assert [s.gap > LOG10 for s in a.steps] == [False, True, False]
    d = a.to_dict()
    assert [s["plausible"] for s in d["steps"]] == [True, False, True] and d["plausibility_alpha"] == 0.1
    back = TrajectoryScore.from_dict(d)
    np.testing.assert_allclose(back.gaps, a.gaps)
    np.testing.assert_allclose(back.method_steps(PLAUSIBLE), steps)
    assert implausible_share([a, b])["share"] == pytest.approx(1 / 6)
    # a step's candidate figures carry the verdict and the shortfall
    c = from_step(a, 1)
    assert c.plausible is False and c.shortfall == pytest.approx(4.9 - LOG10) and c.gap == pytest.approx(4.9)
    assert from_step(a, 0).plausible is True and from_step(a, 0).shortfall == 0.0


def _labelled(n, seed, alpha_sep):
    """Failures hold one step whose gap lies just above -log(alpha_sep): plausible at looser (smaller) alphas,
    implausible at alpha_sep and tighter. Successes hold one step just below it, implausible at the next tighter
    alpha of the grid. Advantages are noise, so only alpha_sep separates."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ok = i % 2 == 0
        adv = rng.normal(0, 1, 3)
        gaps = rng.uniform(0, 0.1, 3)
        if not ok:
            gaps[1] = -math.log(alpha_sep) + 0.05
        else:
            gaps[2] = -math.log(alpha_sep) - 0.3  # 0.9 for 0.3: implausible from alpha 0.5 on (-log 0.5 = 0.69)
        from progadv_trl.scoring import StepScore

        steps = [StepScore(index=j, message_index=j, advantage=float(adv[j]), tokens=3, truncated=False, gap=float(g))
                 for j, g in enumerate(gaps)]
        pv = plausible_step_values(adv, gaps, 0.1)
        out.append(TrajectoryScore(id=f"t{i}", score=float(adv.sum()), steps=steps, success=ok, group=f"g{i // 4}",
                                   failure_step=None if ok else 1, plausibility_alpha=0.1,
                                   variants={PLAUSIBLE: reduce_steps(pv, "sum")}, step_variants={PLAUSIBLE: list(pv)},
                                   baselines={"policy_logprob": float(rng.normal())},
                                   step_baselines={"policy_logprob": list(rng.normal(size=3))}))
    return out


def test_alpha_is_part_of_the_rule_chosen_by_cross_validation():
    # the failures' bad step is implausible only at alpha >= 0.3 (gap just above -log 0.3 = 1.2); from 0.5 on every
    # success holds an implausible step too
    scores = _labelled(80, 0, 0.3)
    rv = rule_values(scores[1], PLAUSIBLE)
    assert {"sum@a0.01", "sum@a0.03", "sum@a0.1", "sum@a0.3", "sum@a0.9", "native"} <= set(rv)
    fair = fair_comparison(scores, methods=["progress_advantage", "policy_logprob", PLAUSIBLE], k=4, n_boot=200)
    r = fair["auroc"]["methods"][PLAUSIBLE]
    assert r["rule"].endswith("@a0.3") and r["value"] > 0.95
    assert fair["auroc"]["methods"]["progress_advantage"]["value"] < 0.75  # the plain one sees only noise
    assert fair["attribution"]["methods"][PLAUSIBLE]["rule"].endswith("@a0.3")
    assert fair["attribution"]["methods"][PLAUSIBLE]["value"] == 1.0
    # the variant is compared with the best baseline and, paired the same way, with plain progress advantage
    vs = fair["auroc"]["family"][PLAUSIBLE]["vs_progress_advantage"]
    assert vs["verdict"] == "beats" and vs["difference"] > 0.2
    assert "vs_progress_advantage" not in fair["auroc"]["family"]["progress_advantage"]


def test_config_checks_alpha_and_records_it():
    with pytest.raises(ValueError, match="plausibility_alpha"):
        ScoringConfig(plausibility_alpha=0.0)
    p = ScoringConfig(variant=PLAUSIBLE, plausibility_alpha=0.3).variant_params()
    assert p["name"] == PLAUSIBLE and p["params"]["plausibility_alpha"] == 0.3 and "plausibility_alpha_source" in p["params"]


def test_held_out_figures_of_the_plausible_variant_are_advantages_not_the_ordering_offset():
    from progadv_trl.training.figures import step_figures

    cfg = ScoringConfig(beta=1.0)
    a = score_from_token_stats(_stats([0, 1, 2], [-0.1, -5.0, -0.1], [-0.1, -0.1, -0.1], ref=[-1, -9, -2]), 3, cfg)
    fig = step_figures([a], "p/", 3, method=PLAUSIBLE)
    # the plausible steps' advantages (0.9 and 1.9); the implausible step is counted by `implausible`, not averaged
    assert fig["p/step_advantage_mean"] == pytest.approx(1.4) and fig["p/implausible"] == pytest.approx(1 / 3)
    assert "p/score_mean" not in fig


def test_with_a_trained_baseline_each_member_is_also_set_against_the_best_untrained_one():
    scores = _labelled(80, 1, 0.3)
    for ts in scores:  # an oracle "reward model": the best baseline by construction
        ts.baselines["orm"] = float(bool(ts.success))
        ts.step_baselines["orm"] = [float(bool(ts.success))] * len(ts.steps)
    fair = fair_comparison(scores, methods=["progress_advantage", "policy_logprob", PLAUSIBLE, "orm"], k=4, n_boot=200)
    a = fair["auroc"]
    assert a["best_baseline"] == "orm" and a["best_untrained_baseline"] == "policy_logprob"
    vs = a["family"][PLAUSIBLE]["vs_best_untrained"]
    assert vs["baseline"] == "policy_logprob" and vs["verdict"] == "beats"
    assert a["family"][PLAUSIBLE]["verdict"] in ("ties", "loses")  # against the oracle
    assert a["family"][PLAUSIBLE]["versus"]["orm"]["verdict"] == a["family"][PLAUSIBLE]["verdict"]
