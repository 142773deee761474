"""The critic in the agent loop (session.py): candidates at one state, over cached conversations.

Every figure must equal what `critic.score` gives the candidate's step when the candidate is appended to the
conversation and the whole is scored (full-weight and LoRA bundles); a state built by `append` must equal one built
at once; `score` must not change the cache; truncation is reported, never silent.
"""

import json

import numpy as np
import pytest
import torch

from progadv_trl import ProgressCritic
from progadv_trl.bundle import export_bundle
from progadv_trl.scoring import ScoringConfig
from progadv_trl.session import CriticSession, from_step
from progadv_trl.trajectories import TrajectoryError

from conftest import WEATHER_TOOL, make_trajectory

ATOL = 1e-5
CFG = ScoringConfig(beta=0.1, support=True)  # every variant too


def _state(i=3, n_turns=2):
    """A tool-calling conversation ending with a tool result: the state before the next assistant turn."""
    msgs = make_trajectory(i, n_turns=n_turns)["messages"][:-1]
    assert msgs[-1]["role"] == "tool"
    return msgs


CANDIDATES = [
    {"content": "It is sunny in city 3."},
    {"content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "c31"}}}]},
    {"role": "assistant", "content": "Let me check again.",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
    {"content": "I could not find it; the weather service said: error 404 — sorry!"},
]  # fmt: skip


def _whole(critic, msgs, cands, tools=(WEATHER_TOOL,)):
    """What critic.score gives the last step of each state + candidate conversation."""
    recs = [{"id": f"c{i}", "messages": msgs + [{"role": "assistant", **c}], "tools": list(tools)}
            for i, c in enumerate(cands)]  # fmt: skip
    return [from_step(ts, len(ts.steps) - 1) for ts in critic.score(recs)]


def _same(a, b, atol=ATOL):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.tokens == y.tokens and x.tokens > 0
        for k in ("advantage", "log_ratio"):
            np.testing.assert_allclose(getattr(x, k), getattr(y, k), rtol=0, atol=atol, err_msg=k)
        for k in ("policy_logprob", "reference_logprob"):  # sums of hundreds of nats: float32 rounding is relative
            np.testing.assert_allclose(getattr(x, k), getattr(y, k), rtol=1e-7, atol=atol, err_msg=k)
        assert x.baselines.keys() == y.baselines.keys() and x.variants.keys() == y.variants.keys()
        for k in x.baselines:
            np.testing.assert_allclose(x.baselines[k], y.baselines[k], rtol=0, atol=atol, err_msg=k)
        for k in x.variants:
            np.testing.assert_allclose(x.variants[k], y.variants[k], rtol=0, atol=atol, err_msg=k)
        # the plausibility of the candidate: the same gap (policy top-1 minus its worst token) and verdict
        assert x.gap is not None and y.gap is not None and x.plausible == y.plausible
        np.testing.assert_allclose(x.gap, y.gap, rtol=0, atol=atol, err_msg="gap")


@pytest.fixture(scope="module")
def critics(tmp_path_factory, tiny_models, tiny_tokenizer, tiny_dir):
    from test_bundle import _lora

    pol, ref = tiny_models
    root = tmp_path_factory.mktemp("session")
    full = export_bundle(root / "full", pol, ref, tiny_tokenizer, scoring_config=CFG)
    lora = export_bundle(root / "lora", _lora(tiny_dir["reference"]), None, tiny_tokenizer, scoring_config=CFG)
    return {"full": ProgressCritic.from_pretrained(full), "lora": ProgressCritic.from_pretrained(lora)}


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_candidates_equal_whole_conversation_scores(critics, kind):
    critic = critics[kind]
    msgs = _state()
    s = critic.session(msgs, tools=[WEATHER_TOOL])
    assert s.cached
    got = s.score(CANDIDATES)
    _same(got, _whole(critic, msgs, CANDIDATES))
    # the one-step figures the issue names, and the variants (support statistics on)
    r = got[1]
    assert r.advantage == pytest.approx(0.1 * r.log_ratio, abs=1e-12)
    assert set(r.variants) >= {"progress_advantage_centred_policy", "progress_advantage_in_support"}
    assert {"policy_logprob", "self_certainty", "deepconf_tail"} <= set(r.baselines)
    assert "progress_advantage_plausible" in r.variants and r.shortfall >= 0 and r.gap >= r.shortfall
    # the policy differs from the reference, so the critic has an opinion: not all candidates equal
    assert len({round(x.advantage, 6) for x in got}) == len(got)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_appended_state_equals_state_built_at_once(critics, kind):
    critic = critics[kind]
    msgs = _state(5, n_turns=3)
    at_once = critic.session(msgs, tools=[WEATHER_TOOL])
    grown = critic.session(msgs[:2], tools=[WEATHER_TOOL])
    for m in msgs[2:]:
        grown.append(m)
    assert grown._ids == at_once._ids
    # append reads only the new tokens: the grown session's passes read the state once in all (both models)
    assert grown.tokens_read == 2 * len(at_once._ids) == at_once.tokens_read
    _same(grown.score(CANDIDATES), at_once.score(CANDIDATES), atol=1e-5)


def test_score_does_not_change_the_cache(critics):
    critic = critics["full"]
    s = critic.session(_state(), tools=[WEATHER_TOOL])
    kv = [(k.clone(), v.clone()) for k, v in s._kv["policy"]]
    first = s.score(CANDIDATES)
    again = s.score(CANDIDATES)
    reordered = s.score(CANDIDATES[::-1])[::-1]
    alone = [s.score([c])[0] for c in CANDIDATES]
    for other in (again, reordered, alone):
        _same(first, other, atol=1e-5)
    assert all(torch.equal(k, k2) and torch.equal(v, v2) for (k, v), (k2, v2) in zip(kv, s._kv["policy"]))


def test_choose_uses_the_one_tie_rule_and_any_method(critics):
    critic = critics["full"]
    s = critic.session(_state(), tools=[WEATHER_TOOL])
    res = s.score(CANDIDATES)
    for method in ("progress_advantage", "policy_logprob", "progress_advantage_centred_policy"):
        vals = [r.method_score(method) for r in res]
        assert s.choose(CANDIDATES, method) == int(np.argmax(vals))
    # identical candidates tie: the pick is the seeded draw of evaluation.pick_best, the same every call
    same = [CANDIDATES[0]] * 4
    picks = {s.choose(same, seed=7) for _ in range(3)}
    assert len(picks) == 1
    with pytest.raises(KeyError, match="not scored here"):
        res[0].method_score("no_such_method")


def test_truncation_is_reported_and_equals_the_engine(tiny_models, tiny_tokenizer, tmp_path):
    pol, ref = tiny_models
    out = export_bundle(tmp_path / "b", pol, ref, tiny_tokenizer, scoring_config=CFG, max_length=120)
    critic = ProgressCritic.from_pretrained(out)
    msgs = _state(4, n_turns=3)
    long_ = {"content": "word " * 40}
    s = critic.session(msgs, tools=[WEATHER_TOOL])
    got = s.score([CANDIDATES[0], long_])
    whole = _whole(critic, msgs, [CANDIDATES[0], long_])
    assert got[1].truncated and got[1].truncation["original_tokens"] > 120
    _same(got, whole)
    assert got[0].truncated == whole[0].truncated


def test_position_limit_of_the_model_is_a_cut_not_silence(critics):
    critic = critics["full"]
    s = critic.session(_state(), tools=[WEATHER_TOOL])
    s.limit = len(s._ids) + 5  # as if the model had only that many positions
    (r,) = s.score([{"content": "a much longer answer than five tokens, surely"}])
    assert r.truncated and r.truncation["kept_tokens"] == s.limit


def test_bad_candidates_and_messages_name_the_field(critics):
    critic = critics["full"]
    s = critic.session(_state(), tools=[WEATHER_TOOL])
    with pytest.raises(TrajectoryError, match=r"candidate 1.*tool_calls\[0\]"):
        s.score([CANDIDATES[0], {"content": "x", "tool_calls": [{"function": {"arguments": {}}}]}])
    with pytest.raises(TrajectoryError, match=r"candidate 0.*role"):
        s.score([{"role": "user", "content": "hi"}])
    with pytest.raises(TrajectoryError, match=r"session.append.*role"):
        s.append({"role": "robot", "content": "hi"})
    n = len(s.messages)
    assert len(s.messages) == n  # nothing half-appended


def test_uncacheable_models_take_the_engine_path(critics):
    critic = critics["full"]
    s = critic.session(_state(), tools=[WEATHER_TOOL])
    s.cached = False
    _same(s.score(CANDIDATES), _whole(critic, _state(), CANDIDATES))
    assert json.loads(json.dumps(s.score(CANDIDATES[:1])[0].to_dict()))["tokens"] > 0


def test_candidate_ranking_counts_correct_over_mistake_pairs():
    from progadv_trl.demo.steering import candidate_ranking
    from progadv_trl.session import CandidateScore

    def c(pa, lp):
        return CandidateScore(advantage=pa, log_ratio=pa, policy_logprob=lp, reference_logprob=0.0, tokens=1,
                              baselines={"policy_logprob": lp})

    results = {"a": [c(2.0, -1.0), c(1.0, -0.5), c(0.0, -0.1)],  # PA orders the correct first; the log-prob last
               "b": [c(1.0, -1.0), c(1.0, -1.0)],  # a tie: half a pair each
               "c": [c(5.0, 0.0), c(4.0, 0.0)]}  # no choice: both correct, left out
    labels = {"a": [True, False, False], "b": [False, True], "c": [True, True]}
    r = candidate_ranking(results, labels, ["progress_advantage", "policy_logprob"])
    assert r["states_with_a_choice"] == 2 and r["pairs"] == 3
    assert r["methods"]["progress_advantage"] == pytest.approx(2.5 / 3)
    assert r["methods"]["policy_logprob"] == pytest.approx(0.5 / 3)
