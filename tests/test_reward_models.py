"""The trained reward models (demo/reward_models.py): PRM labels are the continuations' success rate, training reads
the train split only, one scoring interface for trajectories and candidates, and the models flow into the
evaluation, the fair comparison and step selection as baselines."""

import math
import random

import numpy as np
import pytest

from progadv_trl.demo.world import WorldConfig, correct_agent, make_tasks, run_episode


# ----------------------------------------------------------------------------------------------------------------
# PRM labels on hand-built records (scripted agents, no model)


def _finish_with(agent):
    """A `finish` for prm_labels that plays scripted turns (the rollout's model, in the demo)."""

    def finish(eps):
        rng = random.Random(0)
        for ep in eps:
            while not ep.done:
                ep.step(agent(ep, rng))

    return finish


def _refuse_after_lookup(ep, rng):
    """Looks up (retrying timeouts), then refuses: a decision mistake on an allowed reservation."""
    if not ep.looked_up:
        return correct_agent(ep, rng)
    return {"role": "assistant", "content": "Sorry, this reservation cannot be cancelled under our policy."}


def test_prm_labels_are_the_success_rate_of_the_continuations():
    from progadv_trl.demo.reward_models import prm_labels

    world = WorldConfig(p_timeout=0.5, p_hangup=0.5)  # a lot of luck: labels strictly between 0 and 1 appear
    tasks = [t for t in make_tasks(40, 7, config=world) if t.insured][:6]
    recs = [run_episode(t, correct_agent, seed=10 + i, config=world).record(id=f"ok-{i}") for i, t in enumerate(tasks)]
    bad = next(r for r in (run_episode(tasks[0], _refuse_after_lookup, seed=s, config=world).record(id="bad")
                           for s in range(50)) if r["failure_step"] is not None)  # not hung up before the mistake
    k = 8
    labels, stats = prm_labels(recs + [bad], tasks, _finish_with(correct_agent), k=k, seed=1, world=world)
    eps = stats["episodes"]
    fractional = 0
    for i, rec in enumerate(recs + [bad]):
        where = [j for j, m in enumerate(rec["messages"]) if m["role"] == "assistant"]
        turns = [rec["messages"][j] for j in where]
        assert len(labels[i]) == len(turns)
        for t, lab in enumerate(labels[i]):
            if rec["failure_step"] is not None and t >= rec["failure_step"]:
                assert lab == 0.0 and (i, t) not in eps  # after the mistake: 0, nothing played
                continue
            conts = eps[i, t]
            assert len(conts) == k
            assert lab == pytest.approx(np.mean([ep.success for ep in conts]))
            fractional += 0 < lab < 1
            n_before = where[t]
            for ep in conts:  # each continuation is the record's state before turn t, then turn t taken
                assert ep.messages[:n_before] == rec["messages"][:n_before]
                assert ep.messages[n_before] == {"role": "assistant", **turns[t]}
    assert fractional > 0  # fresh dice per continuation: some turns' continuations disagree
    played = sum(not ep.done for conts in eps.values() for ep in conts)
    assert played == 0 and stats["continuations"] + stats["resolved_by_world"] == k * sum(map(len, labels))


def test_prm_labels_without_luck_are_exact():
    from progadv_trl.demo.reward_models import prm_labels

    world = WorldConfig(p_timeout=0.0)  # a deterministic world: a correct prefix continued correctly always succeeds
    tasks = make_tasks(5, 2, config=world)
    recs = [run_episode(t, correct_agent, seed=i, config=world).record(id=f"r{i}") for i, t in enumerate(tasks)]
    labels, _ = prm_labels(recs, tasks, _finish_with(correct_agent), k=2, seed=0, world=world)
    assert all(x == 1.0 for row in labels for x in row)


# ----------------------------------------------------------------------------------------------------------------
# Trained on a fast run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from progadv_trl.demo import reward_models as R
    from progadv_trl.demo.pipeline import DemoConfig, build_assets, load_models, sample_rollouts, train_reference

    cfg = DemoConfig.fast(out_dir=str(tmp_path_factory.mktemp("rm_fast")))
    build_assets(cfg.out_dir, cfg.seed, cfg)
    train_reference(cfg)
    tok, models = load_models(cfg, ("reference",))
    _, other = load_models(cfg, ("reference",))  # a second copy stands in for the policy
    models = {"reference": models["reference"], "policy": other["reference"]}
    seen = []
    real = R.sample_training_rollouts

    def spy(*a, **kw):
        out = real(*a, **kw)
        seen.extend(r for recs in out[0].values() for r in recs)
        return out

    R.sample_training_rollouts = spy
    try:
        rms, block = R.train_reward_models(cfg, models, tok)
    finally:
        R.sample_training_rollouts = real
    test = sample_rollouts(models["reference"], tok, cfg.tasks("test"), 2, seed=cfg.seed, world=cfg.world,
                           max_new_tokens=cfg.max_new_tokens, tag="test")  # fmt: skip
    return cfg, tok, models, rms, block, seen, test


def test_reward_models_train_on_the_train_split_only(trained):
    from progadv_trl.demo.reward_models import check_train_split

    cfg, *_, block, seen, test = trained
    train = {t.id for t in cfg.tasks("train")}
    held = {t.id for split in ("eval", "test", "heldout") for t in cfg.tasks(split)}
    assert seen and {r["group"] for r in seen} <= train and not {r["group"] for r in seen} & held
    assert len(seen) == 2 * cfg.rm_rollouts  # both models
    with pytest.raises(ValueError, match="train split"):
        check_train_split(cfg, test)
    orm, prm = block["orm"], block["prm"]
    assert orm["rollouts"] == 2 * cfg.rm_rollouts and prm["rollouts"] == 2 * cfg.rm_prm_rollouts
    assert orm["continuations"] == 0 and prm["continuations"] + prm["resolved_by_world"] > 0
    assert orm["cpu_s"] > 0 and prm["cpu_s"] > 0 and orm["training_steps"] >= 1 and prm["training_steps"] >= 1
    assert block["critic"]["cpu_s"] == 0 and block["critic"]["rollouts"] == 0


def test_scores_are_finite_and_candidates_match_records(trained):
    cfg, *_, rms, _, _, test = trained
    for name, rm in rms.items():
        res = rm.score_records(test)
        for rec, r in zip(test, res):
            n_turns = sum(m["role"] == "assistant" for m in rec["messages"])
            assert len(r["steps"]) == n_turns and all(0 < x < 1 for x in r["steps"]) and math.isfinite(r["score"])
            if name == "prm":
                assert r["score"] == pytest.approx(min(r["steps"]))
        # a candidate's value is the last step value of the conversation it ends
        task = next(t for t in cfg.tasks("test") if t.allowed)  # a scripted run: the fast model's turns are noise
        rec = run_episode(task, correct_agent, seed=0, config=cfg.world).record()
        idx = [i for i, m in enumerate(rec["messages"]) if m["role"] == "assistant"]
        state = rec["messages"][: idx[1]]
        cands = [rec["messages"][idx[1]], {"role": "assistant", "content": "Sorry, our system is down. Please try again later."}]
        got = rm.score_candidates(state, cands)
        want = [r["steps"][-1] for r in rm.score_records([{"messages": state + [c]} for c in cands])]
        assert got == pytest.approx(want, abs=1e-5)
        assert got[0] == pytest.approx(rm.score_records([rec])[0]["steps"][1], abs=1e-5)  # causal: the prefix's value


def test_reward_models_join_run_evaluation_and_the_fair_comparison(trained, tmp_path):
    from progadv_trl.demo.reward_models import add_reward_model_scores
    from progadv_trl.evaluation import run_evaluation
    from progadv_trl.scoring import StepScore, TrajectoryScore

    *_, rms, _, _, test = trained
    rng = np.random.default_rng(0)
    scores = []
    for i, rec in enumerate(test):  # labels set here: the plumbing, not the fast models' (poor) skill
        n = sum(m["role"] == "assistant" for m in rec["messages"])
        adv = rng.normal(size=n)
        steps = [StepScore(index=j, message_index=j, advantage=float(a), tokens=1, truncated=False) for j, a in enumerate(adv)]
        scores.append(TrajectoryScore(id=rec["id"], score=float(adv.sum()), steps=steps, group=rec["group"],
                                      success=bool(i % 2), metadata={}))  # fmt: skip

    class Stub:
        def score(self, trajectories, **_):
            return list(trajectories)

    m = run_evaluation(Stub(), scores, tmp_path, n_boot=20, k=2,
                       on_scored=lambda sc: add_reward_model_scores(sc, test, rms))  # fmt: skip
    assert {"orm", "prm"} <= set(m["methods"])
    fair = m["fair"]["auroc"]
    assert {"orm", "prm"} <= set(fair["methods"]) and set(fair["versus"]) == {"orm", "prm"}
    assert "orm" not in fair["family"] and "prm" not in fair["family"]


def test_a_reward_model_can_be_the_best_baseline():
    from progadv_trl.demo.reward_models import add_reward_model_scores
    from progadv_trl.evaluation import available_methods
    from progadv_trl.evaluation.fair import fair_comparison
    from progadv_trl.scoring import StepScore, TrajectoryScore

    rng = np.random.default_rng(1)
    y = rng.random(60) < 0.5
    scores = [TrajectoryScore(id=f"t{i}", score=float(rng.normal()), group=f"g{i // 4}", success=bool(s),
                              steps=[StepScore(index=0, message_index=2, advantage=0.0, tokens=1, truncated=False)],
                              baselines={"policy_logprob": float(rng.normal())}) for i, s in enumerate(y)]  # fmt: skip

    class Oracle:  # a reward model that knows the outcome
        def score_records(self, records):
            return [{"score": float(ok), "steps": [float(ok)]} for ok in y[: len(records)]]

    add_reward_model_scores(scores, [{"id": f"t{i}"} for i in range(60)], {"orm": Oracle()})
    assert available_methods(scores)[-1] == "orm"
    f = fair_comparison(scores, n_boot=50, applications=("auroc", "best_of_n"))
    for app in ("auroc", "best_of_n"):
        assert f[app]["best_baseline"] == "orm" and f[app]["verdict"] == "loses"
        assert f[app]["versus"]["orm"]["verdict"] == "loses"


def test_step_selection_with_reward_models(trained):
    from progadv_trl.critic import ProgressCritic
    from progadv_trl.demo.steering import format_step_selection, step_selection, step_selection_markdown
    from progadv_trl.engine import ProgressScorer

    cfg, tok, models, rms, *_ = trained
    critic = ProgressCritic(ProgressScorer(models["policy"], tok, models["reference"]))
    cfg.steer_tasks = 2
    block = step_selection(critic, models, tok, cfg, ks=(2,), n_boot=20, reward_models=rms)
    assert {"orm", "prm"} <= set(block["methods"]) and block["methods"][-1] == "random"
    for e in block["agents"].values():
        r = e["k2"]
        assert {"orm", "prm"} <= set(r["step"]) and {"orm", "prm"} <= set(r["trajectory"])
        assert set(r["step_comparison"].get("versus") or {}) == {"orm", "prm"}
    assert any("PA - orm" in line for line in format_step_selection(block))
    assert any("progress_advantage - prm" in line for line in step_selection_markdown(block))
