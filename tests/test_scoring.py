import math

import numpy as np
import pytest
import torch

from progadv_trl.scoring import (
    ScoringConfig,
    TokenStats,
    TrajectoryScore,
    baseline_scores,
    reduce_steps,
    score_from_token_stats,
    step_advantages,
    token_logprob_stats,
)


def _stats():
    # two steps: step 0 tokens 0-2, step 1 tokens 3-4
    return TokenStats(
        step=np.array([0, 0, 0, 1, 1]),
        policy_logp=np.array([-1.0, -0.5, -2.0, -0.1, -3.0]),
        reference_logp=np.array([-2.0, -0.5, -1.0, -1.1, -1.0]),
    )


def test_step_advantages_by_hand():
    s = _stats()  # log-ratios: [1, 0, -1 | 1, -2]
    np.testing.assert_allclose(step_advantages(s, 2, beta=0.5), [0.0, -0.5])
    np.testing.assert_allclose(step_advantages(s, 2, token_reduction="mean"), [0.0, -0.5])
    np.testing.assert_allclose(step_advantages(s, 2, token_reduction="min"), [-1.0, -2.0])
    np.testing.assert_allclose(step_advantages(s, 2, token_reduction="max"), [1.0, 1.0])
    np.testing.assert_allclose(step_advantages(s, 2, token_reduction="last"), [-1.0, -2.0])
    # the paper's variant reduces each model first: min(pi) - min(ref) != min(pi - ref)
    np.testing.assert_allclose(step_advantages(s, 2, token_reduction="paper_min"), [-2.0 + 2.0, -3.0 + 1.1])
    # a step without tokens (cut by truncation) is NaN, not 0
    assert math.isnan(step_advantages(s, 3)[2])


def test_step_reductions_by_hand():
    v = np.array([1.0, -2.0, 0.5, np.nan, -1.0])
    assert reduce_steps(v, "sum") == pytest.approx(-1.5)
    assert reduce_steps(v, "mean") == pytest.approx(-1.5 / 4)
    assert reduce_steps(v, "min") == -2.0 and reduce_steps(v, "max") == 1.0 and reduce_steps(v, "last") == -1.0
    assert reduce_steps(v, "min_cumsum") == pytest.approx(-1.5)  # cumsum 1, -1, -0.5, -1.5
    assert reduce_steps(v, "bottom10") == -2.0  # ceil(0.1 * 4) = 1 lowest
    assert reduce_steps(np.arange(20.0), "bottom10") == pytest.approx(0.5)  # two lowest of 20
    assert math.isnan(reduce_steps(np.array([np.nan]), "sum"))


def test_token_logprob_stats_matches_log_softmax_in_chunks():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    h, t = torch.randn(37, 8), torch.randint(0, 50, (37,))
    out = token_logprob_stats(h, head, t, temperature=0.7, topk=5, chunk_size=4, with_vocab_stats=True)
    ref = torch.log_softmax(head(h).double() / 0.7, -1)
    torch.testing.assert_close(out["logp"].double(), ref.gather(-1, t[:, None]).squeeze(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out["mean_logp"].double(), ref.mean(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out["topk_logp"].double(), ref.topk(5, -1).values.mean(-1), atol=1e-5, rtol=0)


def test_confidence_baselines_have_the_right_sign():
    """A peaked distribution must be more confident than a flat one, for self-certainty and DeepConf."""
    V = 100
    head = torch.nn.Identity()
    peaked = torch.full((1, V), -10.0)
    peaked[0, 0] = 10.0
    flat = torch.zeros((1, V))
    res = {}
    for name, logits in (("peaked", peaked), ("flat", flat)):
        st = token_logprob_stats(logits, head, torch.tensor([0]), topk=20, with_vocab_stats=True)
        ts = TokenStats(step=np.array([0]), policy_logp=st["logp"].double().numpy(), reference_logp=np.zeros(1),
                        policy_mean_logp=st["mean_logp"].double().numpy(), policy_topk_logp=st["topk_logp"].double().numpy(), vocab_size=V)
        res[name] = baseline_scores(ts, 1, ScoringConfig())
    for m in ("self_certainty", "deepconf_tail", "deepconf_bottom10", "policy_logprob"):
        assert res["peaked"][m]["score"] > res["flat"][m]["score"], m
    assert res["flat"]["self_certainty"]["score"] == pytest.approx(0.0, abs=1e-5)  # KL(U || U) = 0


def test_deepconf_bottom10_by_hand():
    conf = np.array([5.0, 5.0, 1.0, 5.0, 5.0, 5.0])  # one unconfident token
    ts = TokenStats(step=np.zeros(6, dtype=int), policy_logp=np.zeros(6), reference_logp=np.zeros(6),
                    policy_mean_logp=np.zeros(6), policy_topk_logp=-conf, vocab_size=10)
    b = baseline_scores(ts, 1, ScoringConfig(deepconf_window=2, deepconf_tail_tokens=2))
    assert b["deepconf_tail"]["score"] == pytest.approx(5.0)
    assert b["deepconf_bottom10"]["score"] == pytest.approx(3.0)  # windows 5,3,3,5,5 -> lowest 1 of 5


def test_config_rejects_unknown_reductions():
    with pytest.raises(ValueError, match="token_reduction"):
        ScoringConfig(token_reduction="median")
    with pytest.raises(ValueError, match="step_reduction"):
        ScoringConfig(step_reduction="median")


def test_trajectory_score_json_round_trip():
    s = score_from_token_stats(_stats(), 3, ScoringConfig(), id="x", message_indices=[2, 4, 6], truncated_steps={2})
    d = s.to_dict()
    assert d["steps"][2]["advantage"] is None and d["steps"][2]["truncated"] is True
    back = TrajectoryScore.from_dict(d)
    np.testing.assert_allclose(back.advantages, s.advantages)
    assert back.score == s.score == pytest.approx(-1.0)
    assert [st.message_index for st in back.steps] == [2, 4, 6]
