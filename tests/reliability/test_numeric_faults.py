"""NaN or inf logits (a checkpoint with a NaN weight) are detected per trajectory: `error` set, score and every step
and baseline NaN (null in JSON), batch-mates untouched, and the trajectory out of every metric."""

import copy
import json
import math

import numpy as np
import pytest
import torch

from reliability_helpers import one_torch_thread  # noqa: F401 - autouse
from conftest import make_trajectory
from progadv_trl.evaluation import best_of_n, evaluate
from progadv_trl.cli import main
from progadv_trl.engine import ProgressScorer
from progadv_trl.evaluation import split_faults
from progadv_trl.scoring import ScoringConfig, TokenStats, TrajectoryScore, score_from_token_stats
from progadv_trl.trajectories import as_trajectories
from progadv_trl.rendering import render

POISON = "ζ"  # a character no other trajectory holds: its byte tokens occur only in the poisoned one


def _trajectories(n=8):
    recs = [make_trajectory(i, n_turns=1 + i % 3, success=bool(i % 2), group=f"g{i // 4}", failure_step=None if i % 2 else 0)
            for i in range(n)]
    recs[2]["messages"][1]["content"] += f" {POISON}"
    return recs


def _poison_token(tokenizer, recs):
    """A token id of trajectory 2's task (before its first action) that no other trajectory contains."""
    rs = [render(t, tokenizer) for t in as_trajectories(recs)]
    others = set().union(*(r.input_ids for i, r in enumerate(rs) if i != 2))
    mine = rs[2].input_ids[: rs[2].spans[0][0]]
    return next(t for t in mine if t not in others)


def _nan_embedding(model, token):
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.get_input_embeddings().weight[token] = float("nan")
    return bad


def test_nan_weight_faults_only_its_trajectory(tiny_models, tiny_tokenizer):
    pol, ref = tiny_models
    recs = _trajectories()
    tok = _poison_token(tiny_tokenizer, recs)
    clean = ProgressScorer(pol, tiny_tokenizer, ref).score(recs)
    scorer = ProgressScorer(_nan_embedding(pol, tok), tiny_tokenizer, ref, batch_tokens=10**6)
    assert len(scorer._batches(scorer.render(recs)[1])) == 1  # all in one padded batch with the poisoned one
    with pytest.warns(UserWarning, match=r"1 of 8 trajectories have no score because of a numeric fault.*'t2'"):
        got = scorer.score(recs, with_token_ratios=True)
    bad = got[2]
    assert bad.error.startswith("non-finite logits in policy (") and "steps 0" in bad.error
    assert math.isnan(bad.score) and all(math.isnan(s.advantage) for s in bad.steps)
    assert all(math.isnan(v) for v in bad.baselines.values()) and bad.baselines  # the baselines go too
    assert all(s.tokens > 0 for s in bad.steps)  # what was attempted stays visible
    d = bad.to_dict()
    json.dumps(d, allow_nan=False)  # strict JSON: nulls, no NaN
    assert d["score"] is None and d["error"] == bad.error and TrajectoryScore.from_dict(d).error == bad.error
    for i in (0, 1, 3, 4, 5, 6, 7):  # batch-mates: exactly the clean model's scores
        assert got[i].error is None
        assert got[i].score == pytest.approx(clean[i].score, abs=1e-5)


def test_nan_in_reference_and_in_the_output_layer(tiny_models, tiny_tokenizer):
    pol, ref = tiny_models
    recs = _trajectories(4)
    tok = _poison_token(tiny_tokenizer, recs)
    with pytest.warns(UserWarning, match="numeric fault"):
        got = ProgressScorer(pol, tiny_tokenizer, _nan_embedding(ref, tok)).score(recs)
    assert [s.error is not None for s in got] == [False, False, True, False]
    assert got[2].error.startswith("non-finite logits in reference (")
    # an inf in the output layer: every trajectory has a target whose log-prob is no number; all reported, none scored
    broken = copy.deepcopy(pol)
    with torch.no_grad():
        broken.get_output_embeddings().weight[5, 0] = float("inf")
    with pytest.warns(UserWarning, match="4 of 4 trajectories"):
        got = ProgressScorer(broken, tiny_tokenizer, ref).score(recs)
    assert all(s.error and "in policy" in s.error and math.isnan(s.score) for s in got)


def test_detection_is_in_the_shared_math():
    """The callback and the engine both end in score_from_token_stats: an inf log-prob there is a fault too."""
    stats = TokenStats(step=np.array([0, 0, 1]), policy_logp=np.array([-1.0, -np.inf, -2.0]), reference_logp=np.array([-1.0, -1.0, -1.0]))
    ts = score_from_token_stats(stats, 2, ScoringConfig())
    assert ts.error == "non-finite logits in policy (1 of 3 action tokens; steps 0)" and math.isnan(ts.score)
    fine = score_from_token_stats(TokenStats(step=np.array([0]), policy_logp=np.array([-1.0]), reference_logp=np.array([-2.0])), 1, ScoringConfig())
    assert fine.error is None and fine.score == pytest.approx(1.0)


def test_public_evaluate_leaves_a_faulted_trajectory_out(tiny_models, tiny_tokenizer):
    """Through `evaluation.evaluate`: the NaN score is excluded from AUROC, calibration and attribution
    (their finite filters) and never picked by best-of-N while its group has a scored member."""
    pol, ref = tiny_models
    recs = [make_trajectory(i, n_turns=1 + i % 3, success=i % 3 != 0, group=f"g{i // 4}", failure_step=None if i % 3 else 0)
            for i in range(16)]
    scores = ProgressScorer(pol, tiny_tokenizer, ref).score(recs)
    faulted = copy.deepcopy(scores[0])  # a failed trajectory of group g0, as a NaN checkpoint would leave it
    faulted.id, faulted.error, faulted.score = "t_fault", "non-finite logits in policy (all)", float("nan")
    for s in faulted.steps:
        s.advantage = float("nan")
    faulted.baselines = {k: float("nan") for k in faulted.baselines}
    faulted.step_baselines = {k: [float("nan")] * len(v) for k, v in faulted.step_baselines.items()}
    faulted.variants = {k: float("nan") for k in faulted.variants}  # as score_from_token_stats leaves a fault
    faulted.step_variants = {k: [float("nan")] * len(v) for k, v in faulted.step_variants.items()}
    faulted.success = True  # a label that would move AUROC if the NaN were ranked anywhere
    a = evaluate(scores + [faulted], n_boot=0)
    b = evaluate(scores, n_boot=0)
    for m, e in b["methods"].items():
        ea = a["methods"][m]
        assert ea["success_prediction"] == e["success_prediction"]
        for rule in ("min_cumsum", "min_step"):
            fa, fb = ea["failure_attribution"][rule], e["failure_attribution"][rule]
            assert (fa["exact"], fa["n"]) == (fb["exact"], fb["n"])
        assert "t_fault" not in best_of_n(scores + [faulted], m, n_boot=0)["selected"].values()
    assert split_faults(scores + [faulted]) == (scores, [faulted])


def test_cli_reports_the_fault_and_evaluate_excludes_it(tiny_dir, tiny_tokenizer, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    recs = _trajectories(12)
    tok = _poison_token(tiny_tokenizer, recs)
    broken = tmp_path / "broken"
    _nan_embedding(AutoModelForCausalLM.from_pretrained(tiny_dir["policy"]), tok).save_pretrained(broken)
    tiny_tokenizer.save_pretrained(broken)
    src = tmp_path / "t.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    args = ["--policy", str(broken), "--reference", str(tiny_dir["reference"]), str(src)]
    assert main(["score", *args, "-o", str(tmp_path / "s.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "1 trajectory has no score (numeric fault)" in err and "id 't2': non-finite logits in policy" in err
    rows = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and rows[2]["score"] is None and rows[2]["error"].startswith("non-finite logits in policy")
    assert all(r["score"] is not None and "error" not in r for i, r in enumerate(rows) if i != 2)

    out = tmp_path / "eval"
    assert main(["evaluate", *args, "-o", str(out), "--n-boot", "0", "--choose-reduction", "auroc", "--folds", "2"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_trajectories"] == 11 and list(m["excluded"]["numeric_faults"]) == ["t2"]
    assert all(e["best_of_n"]["n_trajectories"] == 11 for e in m["methods"].values())
    assert all(e["success_prediction"]["n"] == 11 for e in m["methods"].values())
