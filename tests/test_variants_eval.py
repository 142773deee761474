"""Issue 12: evaluation enumerates the variants, the fair comparison has a row per variant, --choose-variant never
chooses on the folds it reports, and a bundle exported with a variant scores with it after loading."""

import json

import numpy as np
import pytest

from progadv_trl.config import VARIANTS, method_names
from progadv_trl.evaluation import available_methods, choose_variant, evaluate
from progadv_trl.evaluation.fair import fair_comparison
from progadv_trl.scoring import ScoringConfig
from test_fair import _world

RUNTIME = "progress_advantage_merged_linear_a0.5"  # a name nobody registered: filled at run time


def _with_variants(scores, seed=0):
    """Every known variant plus a run-time one, as noisier copies of progress advantage."""
    rng = np.random.default_rng(seed)
    for j, ts in enumerate(scores):
        for i, v in enumerate((*VARIANTS, RUNTIME)):
            steps = ts.advantages + rng.normal(0, 0.2 * (i + 1), len(ts.steps))
            ts.variants[v], ts.step_variants[v] = float(steps.sum()), list(steps)
        ts.support = {"threshold": -9.2, "out_of_support": 0.5,
                      "steps": [{"ref_mean_logp": -1.0, "ref_min_logp": -10.0 if i % 2 else -1.0, "kl": 0.1,
                                 "out_of_support": bool(i % 2)} for i in range(len(ts.steps))]}  # fmt: skip
    return scores


def test_methods_are_METHODS_then_variants_in_a_stable_order():
    scores = _with_variants(_world(n_groups=4))
    expected = method_names(()) + VARIANTS + (RUNTIME,)
    assert available_methods(scores) == expected
    assert available_methods(list(reversed(scores))) == expected
    with pytest.raises(ValueError, match="unknown_method"):
        from progadv_trl.evaluation import select_best

        select_best(scores, "unknown_method")


def test_evaluate_and_fair_comparison_have_a_row_per_variant():
    scores = _with_variants(_world(n_groups=12))
    m = evaluate(scores, n_boot=50)
    assert set(m["methods"]) >= {"progress_advantage", *VARIANTS, RUNTIME}
    assert m["out_of_support"]["share"] == pytest.approx(
        np.mean([st["out_of_support"] for ts in scores for st in ts.support["steps"]]))
    for app in ("auroc", "best_of_n", "attribution"):
        f = m["fair"][app]
        # the family is never a baseline: the best baseline is the only baseline here
        assert f["best_baseline"] == "policy_logprob"
        assert list(f["family"]) == ["progress_advantage", *VARIANTS, RUNTIME]
        for v, row in f["family"].items():
            assert row["difference"] == pytest.approx(f["methods"][v]["value"] - f["methods"]["policy_logprob"]["value"])
            assert row["verdict"] in ("beats", "ties", "loses", "undetermined")
        assert f["difference"] == f["family"]["progress_advantage"]["difference"]
    json.dumps(m, allow_nan=False)
    from progadv_trl.evaluation import format_markdown, format_table

    md, txt = format_markdown(m), format_table(m)
    assert RUNTIME in md and "out of the reference's support" in md and "PA - best baseline" in txt


def test_fair_comparison_without_variants_is_unchanged():
    f = fair_comparison(_world(n_groups=12), n_boot=50)["auroc"]
    assert list(f["family"]) == ["progress_advantage"] and f["best_baseline"] == "policy_logprob"


def test_choose_variant_never_chooses_on_the_folds_it_reports():
    """A planted variant is perfect on fold 0 and inverted on the other folds. Chosen on all the data it could not
    win; the point is the protocol: when fold 0 is held out, the choice is made on folds 1-4, where the planted
    variant is worst, so fold 0's reported figure is never the planted 1.0."""
    scores = _world(n_groups=20, seed=1, pa_noise=1.5)  # plain PA: weak, AUROC well below 1
    ids = [ts.id for ts in scores]
    folds = {i: n % 5 for n, i in enumerate(ids)}
    for ts in scores:
        y = 1.0 if ts.success else -1.0
        planted = y if folds[ts.id] == 0 else -y
        ts.variants["progress_advantage_planted"] = planted
        ts.step_variants["progress_advantage_planted"] = [planted / len(ts.steps)] * len(ts.steps)
    res = choose_variant(scores, "auroc", k=5, folds=folds)
    assert res["candidates"] == ["progress_advantage", "progress_advantage_planted"]
    fold0 = next(f for f in res["per_fold"] if f["fold"] == 0)
    assert fold0["chosen"] == "progress_advantage" and fold0["held_out"] < 0.99
    # had the choice seen fold 0 (in-sample on fold 0 alone), the planted variant would have scored 1.0 there
    assert res["in_sample"]["progress_advantage_planted"] < res["in_sample"]["progress_advantage"]
    assert all(f["chosen"] == "progress_advantage" for f in res["per_fold"])
    assert res["out_of_fold"] < 0.99


def test_choose_variant_picks_a_good_variant_and_evaluate_records_it():
    scores = _world(n_groups=20, seed=4, pa_noise=1.5)
    for ts in scores:  # a variant that sees the bad step clearly: the right choice on every fold
        good = ts.advantages * 0 + (0.5 if ts.success else -0.5)
        ts.variants["progress_advantage_clipped"], ts.step_variants["progress_advantage_clipped"] = float(good.sum()), list(good)
    res = choose_variant(scores, "auroc", k=5)
    assert res["chosen"] == "progress_advantage_clipped" and res["out_of_fold"] > 0.95
    m = evaluate(scores, n_boot=0, variant_selection=res)
    assert m["variant_selection"]["chosen"] == "progress_advantage_clipped" and "fold_of" not in m["variant_selection"]


def test_cli_choose_variant_is_a_flag():
    from progadv_trl.cli import parse

    _, vals = parse(["evaluate", "t.jsonl", "-o", "out", "--choose-variant"])
    assert vals[-1].choose_variant is True
    _, vals = parse(["export", "out", "--policy", "p", "--variant", "progress_advantage_clipped", "--clip", "2"])
    assert vals[-1].overrides() == {"variant": "progress_advantage_clipped", "clip": 2.0}
    with pytest.raises(SystemExit):
        parse(["score", "t.jsonl", "-o", "x", "--variant", "policy_logprob"])


def test_config_validates_variant():
    assert ScoringConfig(variant="progress_advantage_centred_policy").wants_support
    assert not ScoringConfig().wants_support and ScoringConfig(support=True).wants_support
    with pytest.raises(ValueError, match="variant"):
        ScoringConfig(variant="policy_logprob")


def test_bundle_exported_with_a_variant_scores_with_it(tmp_path, tiny_dir, tiny_models, tiny_tokenizer):
    from progadv_trl.cli import main
    from progadv_trl.critic import ProgressCritic
    from progadv_trl.demo.tiny import make_trajectory
    from progadv_trl.engine import ProgressScorer
    from progadv_trl.evaluation import attribute_failure

    trajs = [make_trajectory(i, n_turns=2 + i % 3, success=bool(i % 2), group=f"g{i // 3}") for i in range(6)]
    v = "progress_advantage_in_support"
    out = tmp_path / "critic"
    assert main(["export", str(out), "--policy", str(tiny_dir["policy"]), "--reference", str(tiny_dir["reference"]),
                 "--variant", v, "--support-threshold", "-6", "--step-reduction", "min"]) == 0  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["scoring"]["variant"]["name"] == v
    assert manifest["scoring"]["variant"]["params"]["support_threshold"] == -6
    critic = ProgressCritic.from_pretrained(out)
    assert critic.variant == v
    got = critic.score(trajs)
    pol, ref = tiny_models
    cfg = ScoringConfig(support=True, support_threshold=-6, step_reduction="min")
    direct = ProgressScorer(pol, tiny_tokenizer, ref, config=cfg).score(trajs)
    np.testing.assert_allclose([s.method_score(v) for s in got], [s.variants[v] for s in direct], atol=1e-5)
    # the variant is not the plain score here (tokens below the threshold were left out), so the test can fail
    assert not np.allclose([s.variants[v] for s in direct], [s.score for s in direct], atol=1e-3)
    picks = critic.best_of_n(trajs)
    for g, kept in picks.items():
        assert kept.method_score(v) == max(s.method_score(v) for s in got if s.group == g)
    i = next(j for j, s in enumerate(direct) if attribute_failure(s.method_steps(v), "min_cumsum")
             != attribute_failure(s.advantages, "min_cumsum"))  # fmt: skip
    assert critic.attribute_failure(trajs[i]) == attribute_failure(direct[i].method_steps(v), "min_cumsum")


def test_old_bundle_without_variant_loads_as_progress_advantage(tmp_path, tiny_models, tiny_tokenizer):
    from progadv_trl.bundle import export_bundle, scoring_config_from_manifest
    from progadv_trl.critic import ProgressCritic

    pol, ref = tiny_models
    out = export_bundle(tmp_path / "critic", pol, ref, tiny_tokenizer, scoring_config=ScoringConfig(beta=0.5))
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["scoring"]["variant"]
    for k in ("variant", "support", "support_threshold", "clip"):  # what a bundle written before variants holds
        del manifest["scoring"]["config"][k]
    path.write_text(json.dumps(manifest))
    assert scoring_config_from_manifest(manifest) == ScoringConfig(beta=0.5)
    critic = ProgressCritic.from_pretrained(out)
    assert critic.variant == "progress_advantage" and not critic.config.wants_support
    ts = critic.score([_one()])[0]
    assert list(ts.variants) == ["progress_advantage_plausible"] and critic.attribute_failure(_one()) >= 0


def _one():
    from progadv_trl.demo.tiny import make_trajectory

    return make_trajectory(0, n_turns=3, success=False)


def test_cli_score_and_evaluate_report_support_and_the_chosen_variant(tiny_dir, tmp_path, capsys):
    from progadv_trl.cli import main
    from progadv_trl.demo.tiny import make_trajectory

    recs = []
    for i in range(24):
        ok = i % 3 != 0
        recs.append(make_trajectory(i, n_turns=1 + i % 3, success=ok, failure_step=None if ok else 0, group=f"g{i // 4}"))
    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    models = ["--policy", str(tiny_dir["policy"]), "--reference", str(tiny_dir["reference"])]
    # a flag before the positional never swallows it
    assert main(["score", *models, "--support", str(src), "-o", str(tmp_path / "s.jsonl"), "--support-threshold", "-6"]) == 0
    assert "out of the reference's support" in capsys.readouterr().err
    line = json.loads((tmp_path / "s.jsonl").read_text().splitlines()[0])
    assert list(line["variants"]) == [*VARIANTS, "progress_advantage_plausible"] and 0 <= line["support"]["out_of_support"] <= 1
    assert set(line["support"]["steps"][0]) == {"ref_mean_logp", "ref_min_logp", "kl", "out_of_support"}
    out = tmp_path / "eval"
    assert main(["evaluate", *models, "--choose-variant", str(src), "-o", str(out), "--n-boot", "20", "--folds", "3"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    sel = m["variant_selection"]
    assert sel["chosen"] in ("progress_advantage", *VARIANTS) and len(sel["per_fold"]) == 3
    assert sel["candidates"] == ["progress_advantage", "progress_advantage_plausible", *VARIANTS] and "fold_of" not in sel
    assert m["out_of_support"]["n_steps"] > 0 and set(m["methods"]) >= set(VARIANTS)
    assert list(m["fair"]["auroc"]["family"]) == ["progress_advantage", "progress_advantage_plausible", *VARIANTS]


def test_heldout_figures_use_the_variant_and_report_out_of_support():
    from progadv_trl.training.figures import label_figures, step_figures
    from progadv_trl.training.heldout import PREFIX

    scores = _with_variants(_world(n_groups=6))
    v = "progress_advantage_clipped"
    plain = step_figures(scores, PREFIX, 4, by="step")
    figs = step_figures(scores, PREFIX, 4, by="step", method=v)
    assert figs[f"{PREFIX}out_of_support"] == pytest.approx(
        np.mean([st["out_of_support"] for ts in scores for st in ts.support["steps"]]))
    assert PREFIX == "eval_progadv/heldout/"  # the progadv/heldout/out_of_support, under our eval_ prefix
    assert figs[f"{PREFIX}score_mean"] == pytest.approx(np.mean([ts.variants[v] for ts in scores]))
    assert figs[f"{PREFIX}score_mean"] != plain[f"{PREFIX}score_mean"]
    labels = label_figures(scores, PREFIX, success_threshold=None, attribution_rule="min_step", seed=0)
    assert f"{PREFIX}auroc/{v}" in labels and f"{PREFIX}auroc/{RUNTIME}" in labels


def test_demo_headline_has_a_row_per_variant_with_its_difference():
    from progadv_trl.demo.main import headline

    scores = _with_variants(_world(n_groups=12))
    for ts in scores:
        ts.metadata = {"failure_kind": "decision"} if not ts.success else None
    m = evaluate(scores, n_boot=20, variant_selection=choose_variant(scores, k=3))
    h = headline(json.loads(json.dumps(m)))
    for v in ("progress_advantage", *VARIANTS, RUNTIME):
        row = h["methods"][v]
        assert row["fair_auroc_minus_best_baseline"] == pytest.approx(m["fair"]["auroc"]["family"][v]["difference"])
        assert "fair_best_of_n_minus_best_baseline" in row
    assert "fair_auroc_minus_best_baseline" not in h["methods"]["policy_logprob"]
    assert h["cv_variant"]["chosen"] and h["out_of_support"] == m["out_of_support"]["share"]


def test_demo_stage6_evaluates_every_variant_without_changing_the_critic(tiny_models, tiny_tokenizer, tmp_path):
    """What `progadv demo` stage 6 and `reevaluate` run on each rollout set, on the tiny models."""
    from progadv_trl.critic import ProgressCritic
    from progadv_trl.demo.main import evaluate_set, headline
    from progadv_trl.demo.pipeline import DemoConfig
    from progadv_trl.demo.tiny import make_trajectory
    from progadv_trl.engine import ProgressScorer

    recs = [make_trajectory(i, n_turns=1 + i % 3, success=i % 3 != 0, failure_step=None if i % 3 else 0,
                            group=f"g{i // 4}") for i in range(20)]  # fmt: skip
    src = tmp_path / "rollouts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    pol, ref = tiny_models
    critic = ProgressCritic(ProgressScorer(pol, tiny_tokenizer, ref))
    plain = evaluate_set(critic, str(src), tmp_path / "plain", DemoConfig(out_dir=str(tmp_path), n_boot=20))
    # the demo's default: no support variants; the plausible one needs no support pass and is always there
    assert [k for k in plain["methods"] if k.startswith("progress_advantage_")] == ["progress_advantage_plausible"]
    m = evaluate_set(critic, str(src), tmp_path / "policy", DemoConfig(out_dir=str(tmp_path), n_boot=20, variants=True))
    assert not critic.config.support  # the bundle's critic is untouched: support is for this evaluation only
    assert set(m["methods"]) >= set(VARIANTS) and m["variant_selection"]["chosen"]
    from progadv_trl.demo.main import MERGE_ALPHAS, MERGES_EVALUATED

    assert sum(k.startswith("progress_advantage_merged_") for k in m["methods"]) == len(MERGE_ALPHAS) * len(MERGES_EVALUATED)
    h = headline(m)
    assert set(h["methods"]) >= set(VARIANTS) and h["out_of_support"] is not None
