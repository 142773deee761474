"""Issue 12: support diagnostics (both KLs over the vocabulary) and the progress-advantage variants."""

import copy
import math

import numpy as np
import pytest
import torch

from progadv_trl.config import VARIANTS, method_names
from progadv_trl.engine import ProgressScorer
from progadv_trl.scoring import ScoringConfig, TrajectoryScore
from test_engine import _groups, naive_float64


def _reduce(vals, how):
    return {"sum": np.sum, "mean": np.mean, "min": np.min, "max": np.max, "last": lambda v: v[-1]}[how](vals)


def naive_support(pol64, ref64, tokenizer, traj, cfg):
    """Per action token, from full float64 log-softmax rows and no batching: taken log-probs, both KLs; then every
    variant's per-step values and score, and the support report, written out independently of scoring.py."""
    msgs, tools = traj["messages"], traj.get("tools")
    ids = tokenizer(tokenizer.apply_chat_template(msgs, tools=tools, tokenize=False), add_special_tokens=False).input_ids
    spans = []
    for mi, m in enumerate(msgs):
        if m["role"] == "assistant":
            before = tokenizer.apply_chat_template(msgs[:mi], tools=tools, tokenize=False, add_generation_prompt=True)
            upto = tokenizer.apply_chat_template(msgs[: mi + 1], tools=tools, tokenize=False).rstrip()
            spans.append((len(tokenizer(before, add_special_tokens=False).input_ids),
                          len(tokenizer(upto, add_special_tokens=False).input_ids)))  # fmt: skip
    x = torch.tensor([ids])
    with torch.no_grad():
        lp = torch.log_softmax(pol64(x).logits[0].double() / cfg.temperature, -1)
        lq = torch.log_softmax(ref64(x).logits[0].double() / cfg.temperature, -1)
    per_step = []
    for s, e in spans:
        a, b = lp[s - 1 : e - 1], lq[s - 1 : e - 1]
        tgt = x[0, s:e, None]
        pl, rl = a.gather(-1, tgt)[:, 0].numpy(), b.gather(-1, tgt)[:, 0].numpy()
        kl_pr = (a.exp() * (a - b)).sum(-1).numpy()
        kl_rp = (b.exp() * (b - a)).sum(-1).numpy()
        per_step.append((pl, rl, kl_pr, kl_rp))
    how = cfg.token_reduction
    steps = {v: [] for v in VARIANTS}
    for pl, rl, kl_pr, kl_rp in per_step:
        lr = pl - rl
        steps["progress_advantage_centred_policy"].append(cfg.beta * _reduce(lr - kl_pr, how))
        steps["progress_advantage_centred_reference"].append(cfg.beta * _reduce(lr + kl_rp, how))
        steps["progress_advantage_clipped"].append(cfg.beta * _reduce(np.clip(lr, -cfg.clip, cfg.clip), how))
        kept = lr[rl >= cfg.support_threshold]
        steps["progress_advantage_in_support"].append(cfg.beta * _reduce(kept, how) if kept.size else math.nan)
    scores = {v: _reduce(np.array([a for a in st if not math.isnan(a)]), cfg.step_reduction) for v, st in steps.items()}
    support = [(rl.mean(), rl.min(), kl_pr.mean(), bool(rl.min() < cfg.support_threshold)) for _, rl, kl_pr, _ in per_step]
    return steps, scores, support


def _double(m):
    return copy.deepcopy(m).double().eval()


@pytest.mark.parametrize("reductions", [("sum", "sum"), ("mean", "min")])
def test_support_and_variants_agree_with_float64(tiny_models, tiny_tokenizer, trajectories, reductions):
    pol, ref = tiny_models
    # a threshold inside the range of the tiny model's reference log-probs, so in_support leaves some tokens out
    # and some steps are flagged; a clip the log-ratios cross
    cfg = ScoringConfig(support=True, support_threshold=-6.0, clip=0.05, beta=0.7,
                        token_reduction=reductions[0], step_reduction=reductions[1])  # fmt: skip
    scores = ProgressScorer(pol, tiny_tokenizer, ref, config=cfg).score(trajectories)
    pol64, ref64 = _double(pol), _double(ref)
    flagged = clipped = 0
    for sc, tr in zip(scores, trajectories):
        steps, var, support = naive_support(pol64, ref64, tiny_tokenizer, tr, cfg)
        assert list(sc.variants) == [*VARIANTS, "progress_advantage_plausible"]  # plausible: from the same policy pass
        for v in VARIANTS:
            np.testing.assert_allclose(sc.step_variants[v], steps[v], atol=1e-4, rtol=0)
            np.testing.assert_allclose(sc.variants[v], var[v], atol=1e-4, rtol=0)
            np.testing.assert_allclose(sc.method_steps(v), steps[v], atol=1e-4, rtol=0)
        got = sc.support["steps"]
        np.testing.assert_allclose([s["ref_mean_logp"] for s in got], [s[0] for s in support], atol=1e-4)
        np.testing.assert_allclose([s["ref_min_logp"] for s in got], [s[1] for s in support], atol=1e-4)
        np.testing.assert_allclose([s["kl"] for s in got], [s[2] for s in support], atol=1e-5)
        assert [s["out_of_support"] for s in got] == [s[3] for s in support]
        assert sc.out_of_support == pytest.approx(np.mean([s[3] for s in support]))
        flagged += sum(s[3] for s in support)
        clipped += not np.allclose(sc.step_variants["progress_advantage_clipped"], sc.advantages / 1.0)
        # the plain score is untouched by the variants
        plain, *_ = naive_float64(pol64, ref64, tiny_tokenizer, tr)
        if reductions == ("sum", "sum"):
            np.testing.assert_allclose(sc.advantages, [0.7 * a for a in plain], atol=1e-4)
    assert flagged and clipped  # the checks above could fail: flags and clipping happen
    # both KLs are real numbers >= 0 and differ from each other (not one computed twice)
    sc = scores[0]
    assert sc.variants["progress_advantage_centred_policy"] != sc.variants["progress_advantage_centred_reference"]


def test_no_support_only_the_plausible_variant(tiny_models, tiny_tokenizer, trajectories):
    # the plausible variant needs only the policy pass's own top-1 log-probs: it is there without the support pass
    pol, ref = tiny_models
    sc = ProgressScorer(pol, tiny_tokenizer, ref).score(trajectories[:2])[0]
    assert list(sc.variants) == ["progress_advantage_plausible"]
    assert sc.support is None and math.isnan(sc.out_of_support)
    d = sc.to_dict()
    assert "support" not in d and list(d["variants"]) == ["progress_advantage_plausible"]
    assert all({"gap", "plausible", "shortfall"} <= set(st) for st in d["steps"])


def test_support_shared_prefix_matches_plain(tiny_models, tiny_tokenizer):
    from progadv_trl.prefix import plan

    pol, ref = tiny_models
    trajs = _groups()
    cfg = ScoringConfig(support=True, support_threshold=-6.0)
    shared = ProgressScorer(pol, tiny_tokenizer, ref, config=cfg, batch_tokens=2600)
    groups, _ = plan(shared.render(trajs)[1], shared.batch_tokens)
    assert groups and sum(len(g.batches) > 1 for g in groups)  # the shared path, with several batches per prefix
    a = shared.score(trajs)
    b = ProgressScorer(pol, tiny_tokenizer, ref, config=cfg, batch_tokens=2600, share_prefix=False).score(trajs)
    for x, y in zip(a, b, strict=True):
        assert list(x.variants) == [*VARIANTS, "progress_advantage_plausible"]
        for v in VARIANTS:
            np.testing.assert_allclose(x.step_variants[v], y.step_variants[v], atol=1e-4, rtol=0)
        np.testing.assert_allclose([s["kl"] for s in x.support["steps"]], [s["kl"] for s in y.support["steps"]], atol=1e-5)
        assert [s["out_of_support"] for s in x.support["steps"]] == [s["out_of_support"] for s in y.support["steps"]]
    assert max(s["kl"] for x in a for s in x.support["steps"]) > 1e-3  # not 0 == 0


def test_variants_json_round_trip():
    import json

    ts = TrajectoryScore(id="t", score=1.0, steps=[], variants={"progress_advantage_clipped": 0.5,
                                                                "progress_advantage_merged_linear_a0.5": float("nan")},
                         step_variants={"progress_advantage_clipped": [0.5, float("nan")]},
                         support={"threshold": -9.2, "out_of_support": 0.5,
                                  "steps": [{"ref_mean_logp": -1.0, "ref_min_logp": -10.0, "kl": 0.1, "out_of_support": True},
                                            {"ref_mean_logp": float("nan"), "ref_min_logp": float("nan"), "kl": float("nan"),
                                             "out_of_support": None}]})  # fmt: skip
    d = json.loads(json.dumps(ts.to_dict(), allow_nan=False))  # strict JSON: NaN written as null
    assert d["variants"]["progress_advantage_merged_linear_a0.5"] is None and d["step_variants"]["progress_advantage_clipped"] == [0.5, None]
    back = TrajectoryScore.from_dict(d)
    assert back.method_score("progress_advantage_clipped") == 0.5
    assert math.isnan(back.method_score("progress_advantage_merged_linear_a0.5"))
    np.testing.assert_array_equal(back.method_steps("progress_advantage_clipped"), [0.5, np.nan])
    assert back.out_of_support == 0.5 and math.isnan(back.support["steps"][1]["kl"])
    assert back.support["steps"][0]["out_of_support"] is True
    assert method_names(back.variants)[-2:] == ("progress_advantage_clipped", "progress_advantage_merged_linear_a0.5")


def test_a_numeric_fault_takes_the_variants_too():
    from progadv_trl.scoring import TokenStats, score_from_token_stats

    st = TokenStats(step=np.array([0, 0, 1]), policy_logp=np.array([-1.0, np.nan, -2.0]),
                    reference_logp=np.array([-1.5, -1.0, -12.0]), kl_policy_ref=np.array([0.1, 0.2, 0.3]),
                    kl_ref_policy=np.array([0.1, 0.2, 0.3]))  # fmt: skip
    ts = score_from_token_stats(st, 2, ScoringConfig(support=True))
    assert ts.error and list(ts.variants) == list(VARIANTS)  # no top-1 log-probs here: no plausible variant
    assert all(math.isnan(v) for v in ts.variants.values())
    assert all(math.isnan(x) for v in ts.step_variants.values() for x in v)
    # the support report stays: it reads only the reference, which is sound here (step 1 is out of support)
    assert [s["out_of_support"] for s in ts.support["steps"]] == [False, True] and ts.out_of_support == 0.5
