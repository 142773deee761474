"""Evaluation: every metric against the ecosystem's implementation (sklearn, scipy) and hand-computed examples."""

import json
import math
import zlib

import numpy as np
import pytest
from scipy import stats
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from progadv_trl.evaluation import (
    Calibrator,
    attribute_failure,
    attribution_chance,
    auroc,
    auroc_stat,
    best_of_n,
    best_of_n_table,
    bootstrap_ci,
    choose_reduction,
    evaluate,
    failure_attribution,
    format_markdown,
    format_table,
    spearman_stat,
    success_prediction,
    write_report,
)
from progadv_trl.scoring import StepScore, TrajectoryScore


def ts(id, steps, success=None, group=None, failure_step=None, score=None, baselines=None, step_baselines=None, **kw):
    """A TrajectoryScore from per-step advantages; the score defaults to their sum (the default reduction)."""
    return TrajectoryScore(
        id=id,
        score=float(np.nansum(steps)) if score is None else score,
        steps=[StepScore(i, 2 * i + 2, float(a), 3, False) for i, a in enumerate(steps)],
        baselines=baselines or {},
        step_baselines=step_baselines or {},
        group=group,
        success=success,
        failure_step=failure_step,
        **kw,
    )


def synthetic(n_groups=30, n=8, seed=0):
    """Groups of rollouts; a decision failure has one step 3 below the rest (its labelled failure_step), a luck
    failure has none. policy_logprob is noise; the other baselines are not computed (NaN)."""
    rng = np.random.default_rng(seed)
    out = []
    for g in range(n_groups):
        for j in range(n):
            k = int(rng.integers(3, 7))
            adv = rng.normal(0.1, 0.3, k)
            r = rng.random()
            fs, kind, succ = None, None, True
            if r > 0.45:
                succ = False
                if r < 0.8:
                    fs, kind = int(rng.integers(0, k)), "decision"
                    adv[fs] -= 3.0
                else:
                    kind = "luck"
            lp = rng.normal(-1, 0.2, k)
            out.append(
                ts(f"g{g}_{j}", adv, success=succ, group=f"g{g}", failure_step=fs,
                   baselines={"policy_logprob": float(lp.mean())}, step_baselines={"policy_logprob": lp.tolist()},
                   metadata={"failure_kind": kind} if kind else None)
            )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------------
# AUROC, Spearman, bootstrap


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(1)
    s = np.round(rng.normal(size=200), 1)  # coarse rounding: many ties, also across classes
    y = (s + rng.normal(size=200) > 0).astype(float)
    assert len(np.unique(s)) < 60
    ref = roc_auc_score(y, s)
    assert auroc(s, y) == pytest.approx(ref, abs=1e-12)
    assert float(auroc_stat(s[y == 1], s[y == 0])) == pytest.approx(ref, abs=1e-12)
    # Vectorised over a batch of resamples: each row equals sklearn on that row.
    batch_pos = rng.choice(s[y == 1], size=(5, int(y.sum())))
    batch_neg = rng.choice(s[y == 0], size=(5, int((1 - y).sum())))
    got = auroc_stat(batch_pos, batch_neg, axis=-1)
    for b in range(5):
        lab = np.r_[np.ones(batch_pos.shape[1]), np.zeros(batch_neg.shape[1])]
        assert got[b] == pytest.approx(roc_auc_score(lab, np.r_[batch_pos[b], batch_neg[b]]), abs=1e-12)
    # Hand example: pos {2, 1}, neg {1, 0}: pairs 2>1, 2>0, 1=1 (half), 1>0 -> 3.5 / 4.
    assert auroc([2, 1, 1, 0], [1, 1, 0, 0]) == 0.875
    assert math.isnan(auroc([1, 2], [1, 1]))


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(2)
    x = np.round(rng.normal(size=80), 1)
    y = (x + rng.normal(size=80) > 0).astype(float)
    ref = stats.spearmanr(x, y).statistic
    assert float(spearman_stat(x, y)) == pytest.approx(ref, abs=1e-12)
    X = np.stack([x, x[::-1], rng.normal(size=80)])
    got = spearman_stat(X, np.broadcast_to(y, X.shape), axis=-1)
    for b in range(3):
        assert got[b] == pytest.approx(stats.spearmanr(X[b], y).statistic, abs=1e-12)
    assert np.isnan(spearman_stat(np.ones(5), np.arange(5.0)))


def test_bootstrap_ci_is_scipys_and_contains_the_estimate():
    rng = np.random.default_rng(3)
    pos, neg = rng.normal(1.0, 1, 60), rng.normal(0, 1, 90)
    ci = bootstrap_ci((pos, neg), auroc_stat, paired=False, n_boot=500, seed=7)
    ref = stats.bootstrap((pos, neg), auroc_stat, paired=False, vectorized=True, n_resamples=500,
                          method="BCa", rng=np.random.default_rng(7)).confidence_interval  # fmt: skip
    assert ci == pytest.approx([ref.low, ref.high], abs=1e-12)
    point = float(auroc_stat(pos, neg))
    assert ci[0] < point < ci[1] and ci[1] - ci[0] < 0.3
    # Degenerate data: every value equal -> [v, v], not scipy's NaN; n_boot=0 -> no interval.
    assert bootstrap_ci((np.ones(10),), lambda x, axis=-1: x.mean(axis=axis), paired=False) == [1.0, 1.0]
    assert bootstrap_ci((pos, neg), auroc_stat, paired=False, n_boot=0) is None


def test_success_prediction_against_sklearn_scipy():
    scores = synthetic(n_groups=15)
    res = success_prediction(scores, "progress_advantage", n_boot=300, seed=0)
    s = np.array([t.score for t in scores])
    y = np.array([float(t.success) for t in scores])
    assert res["n"] == len(scores) and res["n_pos"] == int(y.sum())
    assert res["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert res["spearman"] == pytest.approx(stats.spearmanr(s, y).statistic)
    assert res["auroc_ci"][0] <= res["auroc"] <= res["auroc_ci"][1]
    assert res["spearman_ci"][0] <= res["spearman"] <= res["spearman_ci"][1]
    # Float rewards: success = reward > threshold for AUROC, Spearman against the raw reward.
    rw = [ts(f"r{i}", [v], success=r) for i, (v, r) in enumerate([(0.1, 0.2), (0.5, 0.9), (0.3, 0.6), (0.0, 0.0)])]
    res = success_prediction(rw, n_boot=0, success_threshold=0.5)
    assert (res["n"], res["n_pos"]) == (4, 2)
    assert res["auroc"] == 1.0 and res["spearman"] == pytest.approx(1.0) and res["auroc_ci"] is None


def test_bad_label_names_record_and_field():
    with pytest.raises(ValueError, match=r"'bad'.*'success'"):
        evaluate([ts("ok", [1.0], success=True), ts("bad", [1.0], success="yes")], n_boot=0)


# ---------------------------------------------------------------------------------------------------------------
# Best-of-N


def _bon_example():
    return [
        ts("a0", [0.9], True, "A"), ts("a1", [0.5], False, "A"), ts("a2", [0.1], False, "A"),
        ts("b0", [0.2], True, "B"), ts("b1", [0.8], False, "B"), ts("b2", [0.8], True, "B"), ts("b3", [0.3], False, "B"),
        ts("c0", [0.4], False, "C"), ts("c1", [0.6], False, "C"),
        ts("lone", [5.0], True, "D"),  # a group of one: nothing to select
        ts("nogroup", [5.0], True),
        ts("unlabelled", [9.0], None, "A"),
    ]  # fmt: skip


def test_best_of_n_hand_example():
    r = best_of_n(_bon_example(), seed=0, n_boot=0)
    assert r["n_groups"] == 3 and r["n_trajectories"] == 9
    assert r["selected"]["A"] == "a0" and r["selected"]["C"] == "c1"
    assert r["selected"]["B"] in ("b1", "b2")  # tied top score
    assert r["success"] == pytest.approx((1 + (r["selected"]["B"] == "b2") + 0) / 3)
    assert r["success_tie_expected"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert r["random_pick"] == pytest.approx((1 / 3 + 2 / 4 + 0) / 3)  # mean of group means
    assert r["mean_at_n"] == pytest.approx(3 / 9)  # pooled over rollouts
    assert r["pass_at_n"] == pytest.approx(2 / 3)
    assert r["gain_over_random"] == pytest.approx(r["success"] - r["random_pick"])
    # Seeded tie-breaking: same seed, same pick; over seeds both tied rollouts get picked.
    assert best_of_n(_bon_example(), seed=0, n_boot=0)["selected"] == r["selected"]
    picks = {best_of_n(_bon_example(), seed=s, n_boot=0)["selected"]["B"] for s in range(20)}
    assert picks == {"b1", "b2"}


def test_best_of_n_nan_ranks_last_and_table_skips_missing_methods():
    ex = [ts("x0", [0.0], True, "G", score=float("nan")), ts("x1", [0.0], False, "G", score=-100.0)]
    assert best_of_n(ex, n_boot=0)["selected"]["G"] == "x1"
    tab = best_of_n_table(_bon_example(), methods=("progress_advantage", "self_certainty"), n_boot=200)
    assert list(tab["methods"]) == ["progress_advantage"] and tab["skipped"] == ["self_certainty"]
    ref = tab["reference"]
    assert ref["pass_at_n"] == pytest.approx(2 / 3)
    lo, hi = ref["random_pick_ci"]
    assert lo <= ref["random_pick"] <= hi


def test_pick_best_one_tie_rule():
    from progadv_trl.evaluation import pick_best, select_best

    nan = float("nan")
    assert pick_best([nan, -100.0, nan], "G") == 1  # NaN ranks below every number
    assert pick_best([1.0, 3.0, 2.0], "G", seed=5) == 1
    # Ties: uniform over the tied top, seeded by (seed, group), reproducible.
    picks = [pick_best([2.0, 1.0, 2.0, 2.0], "G", seed=s) for s in range(40)]
    assert set(picks) == {0, 2, 3} and picks == [pick_best([2.0, 1.0, 2.0, 2.0], "G", seed=s) for s in range(40)]
    # A group's pick does not depend on which other groups are present, or in what order the groups come.
    ex = [t for t in _bon_example() if t.id not in ("lone", "nogroup", "unlabelled")]
    only_b = [t for t in ex if t.group == "B"]
    for s in range(10):
        full = best_of_n(ex, seed=s, n_boot=0)["selected"]
        assert best_of_n(only_b, seed=s, n_boot=0)["selected"]["B"] == full["B"]
        groups_reversed = sorted(ex, key=lambda t: t.group, reverse=True)  # stable: members keep their order
        assert best_of_n(groups_reversed, seed=s, n_boot=0)["selected"] == full
        assert {g: t.id for g, t in select_best(ex, seed=s).items()} == full


class _StubScorer:
    """Stands in for a ProgressScorer: the 'trajectories' are already TrajectoryScores."""

    def score(self, trajectories, **_):
        return list(trajectories)


def test_critic_best_of_n_picks_what_metrics_json_selects(tmp_path):
    from progadv_trl.critic import ProgressCritic

    rng = np.random.default_rng(6)
    scores = [ts(f"g{g}_{j}", [float(rng.integers(0, 3))], bool(rng.random() < 0.5), f"g{g}",
                 baselines={"policy_logprob": float(rng.integers(0, 2))})
              for g in range(12) for j in range(4)]  # fmt: skip  (coarse scores: many ties)
    critic = ProgressCritic(_StubScorer())
    for seed in (0, 1, 2):
        write_report(evaluate(scores, n_boot=0, seed=seed, calibration_split=None), scores, tmp_path / str(seed))
        m = json.loads((tmp_path / str(seed) / "metrics.json").read_text())
        for method in ("progress_advantage", "policy_logprob"):
            picks = critic.best_of_n(scores, method=method, seed=seed)
            assert {g: t.id for g, t in picks.items()} == m["methods"][method]["best_of_n"]["selected"]


def test_metrics_json_keeps_best_of_n_selections(tmp_path):
    m = evaluate(_hand_set(), n_boot=0, calibration_split=None, attribution_threshold=0.0)
    # scores: a 2, b 1 | c 1, d 3 | e 1, f -2: no ties
    assert m["methods"]["progress_advantage"]["best_of_n"]["selected"] == {"g0": "a", "g1": "d", "g2": "e"}
    write_report(m, _hand_set(), tmp_path)
    back = json.loads((tmp_path / "metrics.json").read_text())
    assert back["methods"]["progress_advantage"]["best_of_n"]["selected"] == {"g0": "a", "g1": "d", "g2": "e"}
    assert "selected" not in back["best_of_n_reference"]  # per method, not a shared reference point


# ---------------------------------------------------------------------------------------------------------------
# Failure attribution


def test_attribute_failure_rules_by_hand():
    v = [0.5, -1.0, 0.2, -0.3, 1.0]  # cumsum 0.5, -0.5, -0.3, -0.6, 0.4
    assert attribute_failure(v, "min_cumsum") == 3
    assert attribute_failure(v, "min_step") == 1
    assert attribute_failure(v, "threshold", 0.0) == 1
    assert attribute_failure(v, "threshold", -0.2) == 1
    assert attribute_failure(v, "threshold", 0.3) == 1
    w = [-0.1, 0.3, -0.2, 0.4]  # cumsum -0.1, 0.2, 0.0, 0.4
    assert attribute_failure(w, "min_cumsum") == 0
    assert attribute_failure(w, "min_step") == 2
    assert attribute_failure(w, "threshold", 0.0) == 0
    assert attribute_failure(w, "threshold", -0.15) == 2
    assert attribute_failure(w, "threshold", -5.0) == 2  # nothing below: falls back to the lowest step
    assert attribute_failure([-1.0, -1.0], "min_step") == 0  # ties: earliest
    nan = float("nan")
    assert attribute_failure([0.2, nan, -0.5, nan], "min_cumsum") == 2  # NaN steps never predicted
    assert attribute_failure([nan, 0.3], "min_step") == 1
    with pytest.raises(ValueError):
        attribute_failure([nan, nan])
    with pytest.raises(ValueError):
        attribute_failure([1.0], "argmax")


def test_failure_attribution_metrics_by_hand():
    scores = [
        ts("b", [1.0, -0.5, 0.5], False, failure_step=1),  # all rules -> 1 (right)
        ts("c", [0.5, 0.5], False, failure_step=1),  # all rules -> 0 (off by one)
        ts("f", [0.0, -2.0, 0.1, 0.1], False, failure_step=3),  # all rules -> 1 (off by two)
        ts("s", [-3.0, 1.0], True, failure_step=0),  # a success: not a failure to attribute
        ts("bad", [1.0, -1.0], False, failure_step=5),  # label outside the steps
        ts("nolabel", [1.0, -1.0], False),
    ]
    for rule in ("min_cumsum", "min_step", "threshold"):
        r = failure_attribution(scores, rule=rule, threshold=0.0)
        assert r["n"] == 3 and r["n_invalid"] == 1
        assert r["exact"] == pytest.approx(1 / 3)
        assert r["within1"] == pytest.approx(2 / 3)
        assert r["mae"] == pytest.approx((0 + 1 + 2) / 3)
    ch = attribution_chance(scores)
    # b: 3 steps, label 1 -> 1/3, 3/3, 2/3; c: 2 steps, label 1 -> 1/2, 1, 1/2; f: 4 steps, label 3 -> 1/4, 2/4, 6/4
    assert ch["n"] == 3
    assert ch["exact"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 4) / 3)
    assert ch["within1"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert ch["mae"] == pytest.approx((2 / 3 + 1 / 2 + 6 / 4) / 3)


def test_threshold_chosen_by_cv():
    scores = synthetic(n_groups=6)
    r = failure_attribution(scores, rule="threshold", threshold="cv", k=4)
    assert r["threshold"] == "cv" and len(r["thresholds"]) == 4 and r["k"] == 4
    # The decisive step sits ~3 below the rest, so a threshold learnt on other folds finds it nearly always,
    # while threshold 0 fires on the first slightly negative step.
    assert r["exact"] > 0.9
    assert failure_attribution(scores, rule="threshold", threshold=0.0)["exact"] < r["exact"]
    assert all(-4 < t < -0.5 for t in r["thresholds"])


# ---------------------------------------------------------------------------------------------------------------
# Calibration


def test_calibrator_platt_and_isotonic():
    rng = np.random.default_rng(4)
    s = rng.normal(size=300)
    y = (rng.random(300) < 1 / (1 + np.exp(-2 * s))).astype(float)
    grid = np.linspace(-4, 4, 101)
    for kind in ("platt", "isotonic"):
        cal = Calibrator(kind).fit(s, y)
        p = cal.predict(grid)
        assert np.all((p >= 0) & (p <= 1))
        assert np.all(np.diff(p) >= -1e-12)  # monotone (non-decreasing: the score predicts success here)
        assert p[-1] - p[0] > 0.5
        back = Calibrator.from_dict(json.loads(json.dumps(cal.to_dict())))
        np.testing.assert_array_equal(back.predict(grid), p)
    # Same numbers as sklearn's own predict.
    platt = Calibrator("platt").fit(s, y)
    z = ((s - s.mean()) / s.std())[:, None]
    lr = LogisticRegression(C=1e4).fit(z, y)
    np.testing.assert_allclose(platt.predict(s), lr.predict_proba(z)[:, 1], atol=1e-10)
    iso = IsotonicRegression(out_of_bounds="clip", increasing="auto", y_min=0, y_max=1).fit(s, y)
    np.testing.assert_allclose(Calibrator("isotonic").fit(s, y).predict(grid), iso.predict(grid), atol=1e-12)
    # An inverted score is calibrated too (probability falls as the score rises).
    assert np.all(np.diff(Calibrator("platt").fit(-s, y).predict(grid)) <= 1e-12)
    with pytest.raises(ValueError, match="both"):
        Calibrator().fit([1.0, 2.0], [1, 1])


# ---------------------------------------------------------------------------------------------------------------
# Reduction choice by cross-validation


def _two_fold_case():
    """Candidate A is perfect on fold 0 and inverted on fold 1; candidate B is 0.92 on both.
    In-sample on all data B wins (A pools to 0.5); each fold's own best differs from the other fold's."""
    ys = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    b_scores = [3, 5, 6, 7, 8, 1, 2, 4, 3.5, 0]  # AUROC: 23/25 = 0.92 within each fold
    cands = {"A/sum": [], "B/sum": []}
    folds = {}
    for f in (0, 1):
        for i, y in enumerate(ys):
            tid = f"f{f}_{i}"
            folds[tid] = f
            a = float(y) if f == 0 else float(1 - y)
            cands["A/sum"].append(ts(tid, [a], bool(y)))
            cands["B/sum"].append(ts(tid, [float(b_scores[i])], bool(y)))
    return cands, folds


def test_choose_reduction_never_uses_the_evaluated_fold():
    cands, folds = _two_fold_case()
    ids0 = [i for i, f in folds.items() if f == 0]
    on = lambda name, fold: auroc(*zip(*[(t.score, t.success) for t in cands[name] if folds[t.id] == fold]))  # noqa
    assert (on("A/sum", 0), on("A/sum", 1), on("B/sum", 0), on("B/sum", 1)) == (1.0, 0.0, 0.92, 0.92)
    r = choose_reduction(cands, metric="auroc", folds=folds)
    by_fold = {f["fold"]: f for f in r["per_fold"]}
    # Held-out fold 0 is chosen on fold 1 (B wins there), held-out fold 1 on fold 0 (A wins there).
    assert by_fold[0]["chosen"] == "B/sum" and by_fold[0]["held_out"] == pytest.approx(0.92)
    assert by_fold[1]["chosen"] == "A/sum" and by_fold[1]["held_out"] == 0.0
    assert r["out_of_fold"] == pytest.approx(0.46)
    # A leak would show: choosing on the evaluated fold gives (1.0 + 0.92) / 2, choosing on all data 0.92.
    assert r["out_of_fold"] < 0.92
    assert r["chosen"] == "B/sum" and r["in_sample"]["A/sum"] == pytest.approx(0.5)
    assert "cross-validation" in r["how"]
    # A labelled validation split: choose on fold 0's trajectories, report on the rest.
    v = choose_reduction(cands, metric="auroc", validation=ids0)
    assert v["chosen"] == "A/sum" and v["held_out"] == 0.0 and v["n_validation"] == 10 and v["n_held_out"] == 10


def test_choose_reduction_default_folds_stratified_and_grouped():
    scores = synthetic(n_groups=10)
    noisy = [ts(t.id, [t.score + np.random.default_rng(zlib.crc32(t.id.encode())).normal(0, 3)], t.success, t.group)
             for t in scores]  # fmt: skip
    cands = {"sum/sum": scores, "noisy/sum": noisy}
    r = choose_reduction(cands, metric="auroc", k=5, seed=1)
    assert r["k"] == 5 and r["chosen"] == "sum/sum" and r["out_of_fold"] > 0.7
    by_id = {t.id: t for t in scores}
    for j in range(5):
        members = [by_id[i].success for i, f in r["fold_of"].items() if f == j]
        assert any(members) and not all(members)  # both classes in every held-out fold
    g = choose_reduction(cands, metric="best_of_n", k=3, seed=0)
    fold_of_group = {}
    for i, f in g["fold_of"].items():
        assert fold_of_group.setdefault(by_id[i].group, f) == f  # a group is never split across folds
    assert g["k"] == 3 and g["n"] == len(scores)
    with pytest.raises(ValueError, match="same trajectory ids"):
        choose_reduction({"a": scores, "b": scores[:-1]})


# ---------------------------------------------------------------------------------------------------------------
# evaluate + write_report end to end


def _hand_set():
    """Three groups of two; every figure below is computed by hand."""
    return [
        ts("a", [1.0, 1.0], True, "g0"),
        ts("b", [1.0, -0.5, 0.5], False, "g0", failure_step=1, metadata={"failure_kind": "decision"}),
        ts("c", [0.5, 0.5], False, "g1", failure_step=1, metadata={"failure_kind": "luck"}),
        ts("d", [3.0, 0.0], True, "g1"),
        ts("e", [-1.0, 2.0], True, "g2"),
        ts("f", [0.0, -2.0], False, "g2", failure_step=1, metadata={"failure_kind": "decision"}),
    ]


def test_evaluate_hand_example():
    m = evaluate(_hand_set(), n_boot=200, calibration_split=None, attribution_threshold=0.0)
    json.dumps(m, allow_nan=False)
    assert m["n_trajectories"] == 6 and m["n_success"] == 3
    assert m["skipped_methods"] == ["policy_logprob", "reference_logprob", "self_certainty", "deepconf_tail",
                                    "deepconf_bottom10"]  # fmt: skip
    pa = m["methods"]["progress_advantage"]
    # scores: a 2, b 1, c 1, d 3, e 1, f -2. Pairs (success vs failure): a 3, d 3, e 1 + 0.5 + 0.5 -> 8 / 9.
    assert pa["success_prediction"]["auroc"] == pytest.approx(8 / 9)
    assert pa["success_prediction"]["n"] == 6 and pa["success_prediction"]["n_pos"] == 3
    assert pa["best_of_n"]["success"] == 1.0 and pa["best_of_n"]["n_groups"] == 3
    ref = m["best_of_n_reference"]
    assert (ref["random_pick"], ref["mean_at_n"], ref["pass_at_n"]) == (0.5, 0.5, 1.0)
    for rule in ("min_cumsum", "min_step", "threshold"):
        fa = pa["failure_attribution"][rule]  # b right, c off by one, f right
        assert (fa["exact"], fa["within1"], fa["mae"], fa["n"]) == (pytest.approx(2 / 3), 1.0, pytest.approx(1 / 3), 3)
    ch = m["attribution_chance"]
    assert ch["exact"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3) and ch["mae"] == pytest.approx((2 / 3 + 0.5 + 0.5) / 3)
    # Successes + decision failures only: a 2, d 3, e 1 vs b 1, f -2 -> (2 + 2 + 1.5) / 6.
    kinds = pa["success_prediction_by_failure_kind"]
    assert kinds["decision"]["auroc"] == pytest.approx(5.5 / 6) and kinds["decision"]["n"] == 5
    assert kinds["luck"]["auroc"] == pytest.approx(2.5 / 3) and kinds["luck"]["n"] == 4
    table = format_table(m)
    assert "0.89 [" in table and "n=6" in table and "(random pick)" in table and "(oracle pass@N)" in table


def test_evaluate_and_write_report_end_to_end(tmp_path):
    scores = synthetic(n_groups=20)
    sel = choose_reduction({"sum/sum": scores, "flat/sum": [ts(t.id, [0.0], t.success, t.group) for t in scores]},
                           metric="auroc", k=3)  # fmt: skip
    m = evaluate(scores, n_boot=200, seed=0, reduction={"token_reduction": "sum", "step_reduction": "sum",
                                                        "chosen_by": "theory default"}, reduction_selection=sel)  # fmt: skip
    assert set(m["methods"]) == {"progress_advantage", "policy_logprob"}
    pa, lp = m["methods"]["progress_advantage"], m["methods"]["policy_logprob"]
    y = np.array([t.success for t in scores], dtype=float)
    assert pa["success_prediction"]["auroc"] == pytest.approx(roc_auc_score(y, [t.score for t in scores]))
    assert lp["success_prediction"]["auroc"] == pytest.approx(
        roc_auc_score(y, [t.baselines["policy_logprob"] for t in scores])
    )
    groups = {}
    for t in scores:
        groups.setdefault(t.group, []).append(float(t.success))
    assert m["best_of_n_reference"]["random_pick"] == pytest.approx(np.mean([np.mean(v) for v in groups.values()]))
    assert m["best_of_n_reference"]["pass_at_n"] == pytest.approx(np.mean([max(v) for v in groups.values()]))
    # The planted decisive step is the lowest one: min_step finds every labelled mistake; noise does not.
    assert pa["failure_attribution"]["min_step"]["exact"] == 1.0
    assert lp["failure_attribution"]["min_step"]["exact"] < 0.6
    dec = pa["success_prediction_by_failure_kind"]["decision"]
    assert dec["auroc"] > pa["success_prediction"]["auroc"] > 0.5  # luck failures are what it cannot see
    cal = pa["calibration"]
    assert cal["n_fit"] + cal["n_eval"] == len(scores) and cal["brier"] < cal["brier_base_rate"]
    assert Calibrator.from_dict(cal["calibrator"]).predict([10.0])[0] > 0.5

    paths = write_report(m, scores, tmp_path / "out", title="synthetic")
    for name in ("metrics.json", "metrics.md", "roc.png", "best_of_n.png", "traces.png"):
        p = tmp_path / "out" / name
        assert p.exists() and p.stat().st_size > 0 and paths[name] == p
        if name.endswith(".png"):
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    back = json.loads((tmp_path / "out" / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert back == m
    assert not list((tmp_path / "out").glob(".*tmp"))  # the atomic write left no temporary behind
    md = (tmp_path / "out" / "metrics.md").read_text()
    assert md.startswith("# synthetic") and "n=160" in md and "cross-validation" in md and "decision failures" in md
    assert format_markdown(m, title="synthetic") == md


def test_candidate_reductions_rescore_from_token_ratios():
    from progadv_trl.evaluation import candidate_reductions
    from progadv_trl.scoring import ScoringConfig, TokenStats, score_from_token_stats

    rng = np.random.default_rng(5)
    step = np.array([0, 0, 0, 1, 1, 2])
    scores = []
    for i in range(6):
        st = TokenStats(step=step, policy_logp=rng.normal(-1, 0.3, 6), reference_logp=rng.normal(-1, 0.3, 6))
        scores.append((st, score_from_token_stats(st, 3, ScoringConfig(beta=0.5), id=f"t{i}", with_token_ratios=True)))
    cands = candidate_reductions([s for _, s in scores], ("sum", "max"), ("sum", "min_cumsum"), beta=0.5)
    assert list(cands) == ["sum/sum", "sum/min_cumsum", "max/sum", "max/min_cumsum"]
    for name, rescored in cands.items():
        tr, sr = name.split("/")
        for (st, _), got in zip(scores, rescored):  # same numbers as scoring the token stats under that config
            ref = score_from_token_stats(st, 3, ScoringConfig(beta=0.5, token_reduction=tr, step_reduction=sr))
            assert got.score == pytest.approx(ref.score)
            np.testing.assert_allclose(got.advantages, ref.advantages)
    with pytest.raises(ValueError, match="token_log_ratios"):
        candidate_reductions([ts("x", [1.0])])


def test_run_evaluation_scores_chooses_evaluates_and_writes(tmp_path):
    from progadv_trl.config import ScoringConfig
    from progadv_trl.evaluation import reduction_grid, run_evaluation

    scores = synthetic(n_groups=6)
    flat = [ts(t.id, [0.0], t.success, t.group) for t in scores]

    class Scorer(_StubScorer):
        config = ScoringConfig()

        def score_many(self, trajectories, configs, **_):
            assert list(configs) == list(reduction_grid(self.config))
            return {name: (list(trajectories) if name == "sum/sum" else flat) for name in configs}

    info = {"beta": 1.0, "chosen_by": "test"}
    m = run_evaluation(Scorer(), scores, tmp_path / "cv", choose_reduction="auroc", k=3, n_boot=0, reduction_info=info,
                       title="stub")  # fmt: skip
    many = {name: (scores if name == "sum/sum" else flat) for name in reduction_grid()}
    sel = choose_reduction(many, metric="auroc", k=3, seed=0)
    assert m.pop("excluded") == {"skipped": [], "numeric_faults": {}}
    assert m == evaluate(scores, n_boot=0, k=3, reduction=info, reduction_selection=sel)
    assert m["reduction_selection"]["chosen"] == "sum/sum"
    assert json.loads((tmp_path / "cv" / "metrics.json").read_text()) == {**m, "excluded": {"skipped": [], "numeric_faults": {}}}
    assert (tmp_path / "cv" / "metrics.md").read_text().startswith("# stub")
    plain = run_evaluation(_StubScorer(), scores, tmp_path / "plain", n_boot=0)
    assert "reduction_selection" not in plain and plain["reduction"] == {"chosen_by": "as scored (not tuned here)"}
    assert plain.pop("excluded") == {"skipped": [], "numeric_faults": {}} and plain == evaluate(scores, n_boot=0)


def test_evaluation_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, progadv_trl.evaluation; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
