"""ProgressAdvantageCallback on GRPOTrainer (full fine-tuning, beta > 0, single-turn), CPU, tiny local model.

Two short GRPO runs with the same seed, one without and one with the callback (held-out set + eval dataset), are
compared: GRPO's own figures must be identical, the callback must add no forward pass beyond its held-out scoring,
and the captured tensors must reproduce GRPO's `kl`.
"""

import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from dist_callback import count_forwards, grpo_args, grpo_figures, heldout_records, parity_reward, prompts

N_HELDOUT = 8


def _trainer(model_dir, out_dir, **overrides):
    from transformers import AutoTokenizer
    from trl import GRPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return GRPOTrainer(
        model=str(model_dir), args=grpo_args(out_dir, **overrides), reward_funcs=parity_reward,
        train_dataset=prompts(32), eval_dataset=prompts(2, offset=100), processing_class=tok,
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    from progadv_trl.callback import ProgressAdvantageCallback

    model_dir = tiny_dir["reference"]
    out = {}
    # Without the callback
    t = _trainer(model_dir, tmp_path_factory.mktemp("plain"))
    c = count_forwards(t.model, t.ref_model)
    t.train()
    out["plain"] = {"log": t.state.log_history, "forwards": c.n}
    # With it
    t = _trainer(model_dir, tmp_path_factory.mktemp("cb"))
    backend = Backend()  # stands in for report_to integrations, which the trainer registers before user callbacks
    t.add_callback(backend)
    cb = ProgressAdvantageCallback(t, heldout=heldout_records(N_HELDOUT), eval_steps=2, heldout_batch_size=N_HELDOUT)
    t.add_callback(cb)
    c = count_forwards(t.model, t.ref_model)
    t.train()
    out["cb"] = {"log": t.state.log_history, "forwards": c.n, "trainer": t, "callback": cb, "backend": backend.logs}
    return out


class Backend(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def _entries(log, prefix):
    return [e for e in log if any(k.startswith(prefix) for k in e)]


def test_figures_reach_log_history(runs):
    log = runs["cb"]["log"]
    train = [e for e in log if "loss" in e]
    assert train and all("progadv/train/step_advantage_mean" in e and "progadv/train/token_log_ratio_mean" in e for e in train)
    for e in train:
        assert 0.0 <= e["progadv/train/step_advantage_positive_frac"] <= 1.0
        q = [e[f"progadv/train/step_advantage_q{p}"] for p in ("10", "25", "50", "75", "90")]
        assert q == sorted(q)
    ev = [e for e in log if "eval_loss" in e]
    assert len(ev) == 2 and all("eval_progadv/eval/step_advantage_mean" in e for e in ev)
    # Rewards are the labels: per-prompt-group best-of-N over the 2 eval prompts, with its reference points
    for e in ev:
        assert e["eval_progadv/eval/best_of_n/groups"] == 2
        assert e["eval_progadv/eval/rollouts"] == 8
        assert 0.0 <= e["eval_progadv/eval/best_of_n/random_pick"] <= e["eval_progadv/eval/best_of_n/pass_at_n"] <= 1.0
    held = _entries(log, "eval_progadv/heldout/")
    assert [e["eval_progadv/heldout/global_step"] for e in held] == [0, 2, 4]  # baseline, every eval_steps, end
    assert held[0]["step"] == 0
    for e in held:
        assert e["eval_progadv/heldout/rollouts"] == N_HELDOUT
        assert "eval_progadv/heldout/auroc/progress_advantage" in e and "eval_progadv/heldout/auroc/self_certainty" in e
        assert "eval_progadv/heldout/best_of_n/progress_advantage" in e
        assert "eval_progadv/heldout/attribution_exact/progress_advantage" in e
        assert "eval_progadv/heldout/step_advantage_by_step/0" in e
        assert e["progadv/errors"] == 0
    # Before the first step the policy is the reference: every advantage is exactly 0
    assert held[0]["eval_progadv/heldout/step_advantage_mean"] == 0.0
    assert held[-1]["eval_progadv/heldout/step_advantage_mean"] != 0.0


def test_trackers_file_evaluation_figures_with_evaluation(runs):
    """TensorBoard and wandb rename keys with transformers' `rewrite_logs`: eval_X -> eval/X, anything else -> train/X.
    Held-out and evaluation-rollout figures must land beside the trainer's own eval figures, training ones under train/."""
    from transformers.integrations.integration_utils import rewrite_logs

    names = {k for e in runs["cb"]["log"] for k in rewrite_logs(dict(e))}
    held = {k for k in names if "progadv/heldout/" in k}
    ev = {k for k in names if "progadv/eval/" in k}
    train = {k for k in names if "progadv/train/" in k}
    assert held and all(k.startswith("eval/progadv/heldout/") for k in held)
    assert ev and all(k.startswith("eval/progadv/eval/") for k in ev)
    assert train and all(k.startswith("train/progadv/train/") for k in train)


def test_every_backend_gets_the_figures(runs):
    log, seen = runs["cb"]["log"], runs["cb"]["backend"]
    ours = [{k: v for k, v in e.items() if k.startswith(("progadv/", "eval_progadv/"))} for e in log]
    assert [{k: v for k, v in e.items() if k.startswith(("progadv/", "eval_progadv/"))} for e in seen] == ours
    assert sum(bool(e) for e in ours) >= 6


def test_grpo_figures_unchanged(runs):
    plain, cb = grpo_figures(runs["plain"]["log"]), grpo_figures(runs["cb"]["log"])
    assert len(plain) == len(cb) > 0
    for a, b in zip(plain, cb):
        assert a == b


def test_captured_tensors_reproduce_grpo_kl(runs):
    log = runs["cb"]["log"]
    kls = [(e["kl"], e["progadv/train/kl"]) for e in log if "kl" in e]
    assert len(kls) == 4 and max(k for k, _ in kls) > 0.01  # the policy moved: the check is not 0 == 0
    for grpo, ours in kls:
        assert ours == pytest.approx(grpo, rel=1e-5, abs=1e-7)
    ev = [(e["eval_kl"], e["eval_progadv/eval/kl"]) for e in log if "eval_kl" in e]
    assert len(ev) == 2
    for grpo, ours in ev:
        assert ours == pytest.approx(grpo, rel=1e-5, abs=1e-7)


def test_no_extra_forward_pass_for_captures(runs):
    # The only extra passes are the held-out scorings: 3 (before, step 2, end) x 1 batch x (policy + reference)
    assert runs["cb"]["forwards"] == runs["plain"]["forwards"] + 3 * 2


def test_tables_history_and_bundle(runs):
    t, cb = runs["cb"]["trainer"], runs["cb"]["callback"]
    import pandas as pd

    root = Path(t.args.output_dir) / "progadv"
    held = sorted((root / "heldout").glob("*.parquet"))
    assert [p.name for p in held] == ["step_000000.parquet", "step_000002.parquet", "step_000004.parquet"]
    df = pd.read_parquet(held[-1])
    assert {"global_step", "id", "group", "success", "step", "advantage", "tokens", "score"} <= set(df.columns)
    assert df["id"].nunique() == N_HELDOUT
    assert len(df) == sum(len(s.steps) for s in cb.last_heldout)
    ev = sorted((root / "eval").glob("*.parquet"))
    assert len(ev) == 2 and len(pd.read_parquet(ev[0])) == 8
    assert not (root / "train").exists()  # train tables are opt-in
    assert [(h["kind"], h["step"]) for h in cb.history] == [("heldout", 0), ("heldout", 2), ("eval", 2), ("heldout", 4), ("eval", 4)]
    assert t.state.stateful_callbacks["progadv_trl"]["history"] == cb.history
    assert (Path(t.args.output_dir) / "progadv_bundle" / "manifest.json").is_file()


def test_bundle_carries_a_calibration_fitted_on_the_heldout_set(runs, tiny_dir):
    from progadv_trl.evaluation import Calibrator
    from progadv_trl.critic import ProgressCritic

    t, cb = runs["cb"]["trainer"], runs["cb"]["callback"]
    critic = ProgressCritic.from_pretrained(Path(t.args.output_dir) / "progadv_bundle")
    cal = critic.calibration
    assert cal["method"] == "progress_advantage" and f"n={N_HELDOUT}" in cal["fitted_on"]
    # the stored calibration is the Platt fit of the final held-out scores and their labels
    expected = Calibrator("platt").fit([s.score for s in cb.last_heldout], [bool(s.success) for s in cb.last_heldout])
    recs = heldout_records(N_HELDOUT)
    p = critic.predict_success(recs)
    assert np.allclose(p, expected.predict([s.score for s in critic.score(recs)]), atol=1e-6)
    assert all(0.0 <= x <= 1.0 for x in p)


# ----------------------------------------------------------------------------------------------------------------
# Units


def test_turn_ids():
    from progadv_trl.callback import turn_ids

    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0], [0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0]])
    assert turn_ids(mask).tolist() == [[0, 0, -1, -1, 1, 1, -1], [-1, 0, 0, 0, 0, -1, -1], [-1] * 7]


def test_batch_scores_turns_and_groups():
    from progadv_trl.callback import batch_scores
    from progadv_trl.scoring import ScoringConfig
    from progadv_trl.trl_hooks import RolloutBatch

    g = torch.Generator().manual_seed(0)
    pol, ref = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 0, 1, 0, 1, 0]])
    b = RolloutBatch("eval", pol, ref, mask, True, torch.tensor([1.0, 0.0, 1.0, float("nan")]), torch.tensor([4, 5, 6, 7]), 3, 2)
    scores, sums = batch_scores(b, ScoringConfig(beta=0.5))
    assert len(scores) == 3  # the row without a model-written token is left out
    lr = (pol - ref).double()
    assert scores[0].advantages.tolist() == pytest.approx([0.5 * float(lr[0, :2].sum()), 0.5 * float(lr[0, 3])])
    assert scores[2].advantages.tolist() == pytest.approx([0.5 * float(lr[3, i]) for i in (0, 2, 4)])
    assert [s.group for s in scores] == ["eval-g3-p2", "eval-g3-p2", "eval-g3-p3"]
    assert [s.success for s in scores] == [1.0, 0.0, None]
    assert sums["n"] == int(mask.sum()) and sums["lr_sum"] == pytest.approx(float(lr[mask.bool()].sum()))
    assert sums["faulted"] == 0


def test_a_nan_log_prob_is_counted_not_logged():
    """A non-finite log-prob (a broken checkpoint) marks its rollout and stays out of the logged sums and figures."""
    from progadv_trl.callback import batch_scores, label_figures, step_figures, token_figures
    from progadv_trl.scoring import ScoringConfig
    from progadv_trl.trl_hooks import RolloutBatch

    g = torch.Generator().manual_seed(0)
    pol, ref = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    pol[1, 2] = float("nan")
    mask = torch.ones(3, 4, dtype=torch.long)
    b = RolloutBatch("train", pol, ref, mask, False, torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0, 1, 2]), 0, 3)
    scores, sums = batch_scores(b, ScoringConfig())
    assert [s.error is not None for s in scores] == [False, True, False]
    ok = torch.ones(3, 4, dtype=torch.bool)
    ok[1, 2] = False
    assert sums["faulted"] == 1 and sums["n"] == 11
    assert sums["lr_sum"] == pytest.approx(float((pol - ref).double()[ok].sum()))
    figs = token_figures("p/", [[sums]], "grpo")
    figs.update(step_figures(scores, "p/", 4))
    figs.update(label_figures(scores, "p/", success_threshold=None, attribution_rule="min_cumsum", seed=0))
    assert figs["p/numeric_faults"] == 1 and all(np.isfinite(v) for v in figs.values())
    assert figs["p/success_rate"] == 0.5  # the faulted rollout is not among the labelled ones


def test_version_check(monkeypatch):
    from progadv_trl.trl_hooks import SKIP_VERSION_CHECK_ENV, UnsupportedTRLError, check_trl_version

    assert check_trl_version("1.16.3") == "1.16.3"
    monkeypatch.delenv(SKIP_VERSION_CHECK_ENV, raising=False)
    with pytest.raises(UnsupportedTRLError, match=r"supports TRL 1\.16\.x; found TRL 1\.17\.0"):
        check_trl_version("1.17.0")
    monkeypatch.setenv(SKIP_VERSION_CHECK_ENV, "1")
    with pytest.warns(UserWarning, match="not a supported version"):
        assert check_trl_version("1.17.0") == "1.17.0"


def test_rejects_other_trainers():
    from progadv_trl.trl_hooks import trainer_kind

    with pytest.raises(TypeError, match="GRPOTrainer and trl.RLOOTrainer"):
        trainer_kind(object())


def test_tables_go_to_wandb_and_trackio_when_asked(runs, monkeypatch):
    import pandas as pd

    cb = runs["cb"]["callback"]
    sent = []

    def fake(name):
        m = types.ModuleType(name)
        m.run = object()
        m.Table = lambda dataframe: ("table", len(dataframe))
        m.log = lambda d: sent.append((name, d))
        return m

    monkeypatch.setitem(sys.modules, "wandb", fake("wandb"))
    monkeypatch.setitem(sys.modules, "trackio", fake("trackio"))
    df = pd.DataFrame({"a": [1, 2]})
    monkeypatch.setattr(cb.trainer.args, "report_to", [])
    cb.outputs.send_table("progadv/heldout_steps", df)
    assert sent == []
    monkeypatch.setattr(cb.trainer.args, "report_to", ["wandb", "trackio"])
    cb.outputs.send_table("progadv/heldout_steps", df)
    assert sent == [("wandb", {"progadv/heldout_steps": ("table", 2)}), ("trackio", {"progadv/heldout_steps": ("table", 2)})]


def test_errors_are_counted_not_raised(tiny_dir, tmp_path):
    from progadv_trl.callback import ProgressAdvantageCallback

    t = _trainer(tiny_dir["reference"], tmp_path, max_steps=2, eval_strategy="no")
    cb = ProgressAdvantageCallback(t, heldout=heldout_records(2), eval_steps=1, export=None)

    def broken():
        raise RuntimeError("boom")

    cb.heldout.make_scorer = broken
    t.add_callback(cb)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t.train()  # training goes on
    assert sum("held-out scoring failed" in str(x.message) for x in w) == 1  # one warning, then a counter
    assert cb.errors == 3  # before the first step, step 1, step 2
    last = [e for e in t.state.log_history if "progadv/errors" in e][-1]
    assert last["progadv/errors"] == 3
    assert any("progadv/train/kl" in e for e in t.state.log_history)  # the rest keeps working

    strict = ProgressAdvantageCallback(t, heldout=heldout_records(2), strict=True, export=None)
    strict.heldout.make_scorer = broken
    with pytest.raises(RuntimeError, match="boom"):
        strict.score_heldout()
    strict.hooks.uninstall()
    cb.hooks.uninstall()
    assert "log" not in t.__dict__ and "_compute_loss" not in t.__dict__  # instance wrappers removed cleanly


def test_bad_heldout_records_are_named(tiny_dir, tmp_path):
    from progadv_trl.callback import ProgressAdvantageCallback
    from progadv_trl.trajectories import TrajectoryError

    t = _trainer(tiny_dir["reference"], tmp_path, max_steps=1, eval_strategy="no")
    recs = heldout_records(2) + [{"id": "bad", "messages": "not a list"}]
    with pytest.warns(UserWarning, match=r"1 bad record\(s\) skipped.*bad"):
        cb = ProgressAdvantageCallback(t, heldout=recs, export=None)
    assert [tr.id for tr in cb.heldout.trajectories] == ["t0", "t1"]
    cb.hooks.uninstall()
    with pytest.raises(TrajectoryError, match="messages"):
        ProgressAdvantageCallback(t, heldout=recs, export=None, strict=True)
    with pytest.raises(ValueError, match="export must be one of"):
        ProgressAdvantageCallback(t, export="always")
