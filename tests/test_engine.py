"""The batched engine against an independent, one-trajectory-at-a-time float64 computation."""

import copy
import math

import numpy as np
import pytest
import torch

from progadv_trl.engine import ProgressScorer
from progadv_trl.scoring import ScoringConfig
from progadv_trl.trajectories import as_trajectories


def naive_float64(policy, reference, tokenizer, traj, temperature=1.0, topk=20):
    """Per step: sum of log-ratios, and per-token policy stats, with full logits in float64 and no batching.

    Spans come from rendering each turn's prefix separately and tokenizing the *prefix strings* (independent of the
    engine's offset mapping): the action of turn i is tokens [len(tok(prompt_i)), len(tok(upto_i).rstrip())).
    """
    msgs, tools = traj["messages"], traj.get("tools")
    full = tokenizer.apply_chat_template(msgs, tools=tools, tokenize=False)
    ids = tokenizer(full, add_special_tokens=False).input_ids
    spans = []
    for mi, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(msgs[:mi], tools=tools, tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(msgs[: mi + 1], tools=tools, tokenize=False).rstrip()
        s = len(tokenizer(before, add_special_tokens=False).input_ids)
        e = len(tokenizer(upto, add_special_tokens=False).input_ids)
        spans.append((s, e))
    x = torch.tensor([ids])
    with torch.no_grad():
        lp = torch.log_softmax(policy(x).logits[0].double() / temperature, -1)
        lr = torch.log_softmax(reference(x).logits[0].double() / temperature, -1)
    steps, pol_tok, topk_tok, mean_tok = [], [], [], []
    for s, e in spans:
        tgt = x[0, s:e]
        a = lp[s - 1 : e - 1].gather(-1, tgt[:, None]).squeeze(-1)
        b = lr[s - 1 : e - 1].gather(-1, tgt[:, None]).squeeze(-1)
        steps.append(float((a - b).sum()))
        pol_tok.append(a)
        topk_tok.append(lp[s - 1 : e - 1].topk(topk, -1).values.mean(-1))
        mean_tok.append(lp[s - 1 : e - 1].mean(-1))
    return steps, torch.cat(pol_tok), torch.cat(topk_tok), torch.cat(mean_tok), lp.shape[-1]


def _double(m):
    return copy.deepcopy(m).double().eval()


def _check_agreement(scores, trajs, pol64, ref64, tokenizer, beta=1.0):
    for sc, tr in zip(scores, trajs):
        steps, pol_tok, topk_tok, mean_tok, V = naive_float64(pol64, ref64, tokenizer, tr)
        got = [s.advantage for s in sc.steps]
        assert len(got) == len(steps)
        np.testing.assert_allclose(got, [beta * s for s in steps], atol=1e-4, rtol=0)
        assert sum(s.tokens for s in sc.steps) == pol_tok.numel()
        # baselines from the same passes
        np.testing.assert_allclose(sc.baselines["policy_logprob"], float(pol_tok.mean()), atol=1e-5)
        np.testing.assert_allclose(sc.baselines["self_certainty"], float((-math.log(V) - mean_tok).mean()), atol=1e-5)
        conf = -topk_tok
        np.testing.assert_allclose(sc.baselines["deepconf_tail"], float(conf[-64:].mean()), atol=1e-5)


def test_full_policy_agrees_with_float64(tiny_models, tiny_tokenizer, trajectories):
    pol, ref = tiny_models
    # batch_tokens small enough to force several batches of different padded lengths
    scorer = ProgressScorer(pol, tiny_tokenizer, ref, config=ScoringConfig(beta=0.5), batch_tokens=1500)
    assert len(scorer._batches(scorer.render(trajectories)[1])) > 1
    scores = scorer.score(trajectories)
    assert [s.id for s in scores] == [t["id"] for t in trajectories]
    _check_agreement(scores, trajectories, _double(pol), _double(ref), tiny_tokenizer, beta=0.5)
    # the policy really differs from the reference, so the check above is not 0 == 0
    assert max(abs(s.advantage) for sc in scores for s in sc.steps) > 0.1


def test_lora_policy_agrees_with_float64(tiny_models, tiny_tokenizer, trajectories):
    from peft import LoraConfig, get_peft_model

    _, ref = tiny_models
    peft_model = get_peft_model(copy.deepcopy(ref), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    peft_model.eval()
    scorer = ProgressScorer(peft_model, tiny_tokenizer)  # reference = adapter disabled
    scores = scorer.score(trajectories)
    merged = copy.deepcopy(peft_model).merge_and_unload().double().eval()
    _check_agreement(scores, trajectories, merged, _double(ref), tiny_tokenizer)
    assert max(abs(s.advantage) for sc in scores for s in sc.steps) > 0.01
    # disabling the adapter left it enabled afterwards
    assert not peft_model.base_model.model.model.layers[0].self_attn.q_proj.disable_adapters


def test_batching_does_not_change_scores(tiny_models, tiny_tokenizer, trajectories):
    pol, ref = tiny_models
    one = ProgressScorer(pol, tiny_tokenizer, ref, batch_tokens=1).score(trajectories)
    many = ProgressScorer(pol, tiny_tokenizer, ref, batch_tokens=10**6).score(trajectories)
    for a, b in zip(one, many):
        np.testing.assert_allclose(a.advantages, b.advantages, atol=1e-4)


def test_reductions_and_token_ratios(tiny_models, tiny_tokenizer, trajectories):
    pol, ref = tiny_models
    base = ProgressScorer(pol, tiny_tokenizer, ref).score(trajectories[:3], with_token_ratios=True)
    mean = ProgressScorer(pol, tiny_tokenizer, ref, config=ScoringConfig(token_reduction="mean", step_reduction="min"))
    res = mean.score(trajectories[:3])
    for b, m in zip(base, res):
        ratios = [np.array(r) for r in b.token_log_ratios]
        np.testing.assert_allclose([r.sum() for r in ratios], b.advantages, atol=1e-6)
        np.testing.assert_allclose(m.advantages, [r.mean() for r in ratios], atol=1e-5)
        assert m.score == pytest.approx(min(r.mean() for r in ratios), abs=1e-5)
        assert b.score == pytest.approx(sum(r.sum() for r in ratios), abs=1e-5)


def test_truncated_steps_are_marked_not_zeroed(tiny_models, tiny_tokenizer):
    from conftest import make_trajectory

    pol, ref = tiny_models
    tr = [make_trajectory(1, n_turns=4)]
    full = ProgressScorer(pol, tiny_tokenizer, ref).score(tr)[0]
    cut = ProgressScorer(pol, tiny_tokenizer, ref, max_length=150).score(tr)[0]
    assert cut.truncation is not None and cut.truncation["kept_tokens"] == 150
    assert any(s.truncated for s in cut.steps)
    dropped = set(cut.truncation["dropped_steps"])
    for s in cut.steps:
        if s.index in dropped:
            assert math.isnan(s.advantage) and s.tokens == 0
        elif not s.truncated:
            assert s.tokens == full.steps[s.index].tokens
    # the last step keeps all its tokens
    assert not cut.steps[-1].truncated and cut.steps[-1].tokens == full.steps[-1].tokens
    assert not math.isnan(cut.score)


def test_scorer_needs_a_reference(tiny_models, tiny_tokenizer):
    pol, _ = tiny_models
    with pytest.raises(ValueError, match="no reference"):
        ProgressScorer(pol, tiny_tokenizer)


def test_from_pretrained_lora_dir(tiny_dir, tiny_tokenizer, trajectories, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir["reference"])
    pm = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    pm.save_pretrained(tmp_path / "adapter")
    in_memory = ProgressScorer(pm.eval(), tiny_tokenizer).score(trajectories[:2])
    loaded = ProgressScorer.from_pretrained(tmp_path / "adapter", tiny_dir["reference"]).score(trajectories[:2])
    for a, b in zip(in_memory, loaded):
        np.testing.assert_allclose(a.advantages, b.advantages, atol=1e-6)


def test_llama_architecture(tiny_tokenizer, trajectories, tmp_path):
    from progadv_trl.demo.tiny import build_model, perturbed_copy

    ref = build_model(tiny_tokenizer, tmp_path / "ref", arch="llama").eval()
    pol = perturbed_copy(ref).eval()
    scores = ProgressScorer(pol, tiny_tokenizer, ref).score(trajectories[:2])
    _check_agreement(scores, as_dicts(trajectories[:2]), _double(pol), _double(ref), tiny_tokenizer)


def as_dicts(items):
    return [t.to_dict() for t in as_trajectories(items)]


def test_score_many_matches_separate_scoring(tiny_models, tiny_tokenizer, trajectories):
    from progadv_trl.evaluation import reduction_grid

    pol, ref = tiny_models
    grid = reduction_grid(ScoringConfig(beta=0.3))
    assert len(grid) == 9 * 7 and "paper_min/min_cumsum" in grid
    picked = {k: grid[k] for k in ("sum/sum", "mean/min", "paper_last/bottom10")}
    many = ProgressScorer(pol, tiny_tokenizer, ref).score_many(trajectories[:3], picked)
    for name, cfg in picked.items():
        alone = ProgressScorer(pol, tiny_tokenizer, ref, config=cfg).score(trajectories[:3])
        np.testing.assert_allclose([s.score for s in many[name]], [s.score for s in alone], atol=1e-9)
