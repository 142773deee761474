"""The merged reference pi_alpha: its end points, a LoRA policy against an explicit float64 interpolation, the
reference restored bitwise, seeded TIES/DARE, and the refusals."""

import copy

import numpy as np
import pytest
import torch

from conftest import naive_spans
from progadv_trl.engine import ProgressScorer
from progadv_trl.merging import MERGES, alpha_sweep, merged_reference
from progadv_trl.reference import NAMED_ADAPTER, Reference
from progadv_trl.scoring import ScoringConfig


def _pair(tiny_dir):
    """A fresh full-weight (policy, reference): these tests rewrite the reference, so not the session's models."""
    from transformers import AutoModelForCausalLM

    pol = AutoModelForCausalLM.from_pretrained(tiny_dir["policy"]).eval()
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir["reference"]).eval()
    return pol, ref


def _lora(tiny_dir):
    """A LoRA policy on the tiny reference, with B non-zero so the adapter moves the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir["reference"])
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return model.eval()


def _advantages(scores):
    return np.concatenate([s.advantages for s in scores])


def _naive_steps(policy, reference, tokenizer, traj):
    """Per step, sum of log pi - log ref over the step's own tokens: full logits, float64, one trajectory at a time,
    spans from `conftest.naive_spans` (not the engine's offset mapping)."""
    ids, spans = naive_spans(tokenizer, traj)
    x = torch.tensor([ids])
    with torch.no_grad():
        lp = torch.log_softmax(policy(x).logits[0].double(), -1)
        lr = torch.log_softmax(reference(x).logits[0].double(), -1)
    return [float((lp[s - 1 : e - 1].gather(-1, x[0, s:e, None]) - lr[s - 1 : e - 1].gather(-1, x[0, s:e, None])).sum())
            for s, e in spans]  # fmt: skip


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("merge", ["linear", "ties"])
def test_alpha_zero_is_plain_and_alpha_one_is_zero(tiny_dir, tiny_tokenizer, trajectories, kind, merge):
    pol, ref = _pair(tiny_dir) if kind == "full" else (_lora(tiny_dir), None)
    scorer = ProgressScorer(pol, tiny_tokenizer, ref, config=ScoringConfig(beta=0.5), batch_tokens=1500)
    plain = scorer.score(trajectories)
    swept = alpha_sweep(scorer, trajectories, [0.0, 1.0], merge, density=0.5)
    assert np.abs(_advantages(plain)).max() > 0.01  # so "equal" and "zero" below are not 0 == 0
    np.testing.assert_allclose(_advantages(swept[0.0]), _advantages(plain), atol=1e-6, rtol=0)
    np.testing.assert_allclose([s.score for s in swept[0.0]], [s.score for s in plain], atol=1e-6, rtol=0)
    if merge == "linear":  # pi_1 is the policy
        np.testing.assert_allclose(_advantages(swept[1.0]), 0.0, atol=1e-5)
    else:  # ties at alpha 1 keeps half the task vector: not the policy
        assert np.abs(_advantages(swept[1.0])).max() > 1e-3
    assert scorer.reference.kind == ("separate" if kind == "full" else "adapter_disabled")
    assert type(scorer.reference) is Reference  # the scorer's own reference is back
    np.testing.assert_allclose(_advantages(scorer.score(trajectories)), _advantages(plain), atol=0, rtol=0)


def test_lora_scaled_adapter_is_the_weight_interpolation(tiny_dir, tiny_tokenizer, trajectories):
    """adapter * alpha == base + alpha * (merged - base), the latter built explicitly in float64 and scored apart."""
    peft_model = _lora(tiny_dir)
    scorer = ProgressScorer(peft_model, tiny_tokenizer)
    alphas = [0.3, 0.7]
    swept = alpha_sweep(scorer, trajectories, alphas)
    from transformers import AutoModelForCausalLM

    merged64 = copy.deepcopy(peft_model).merge_and_unload().double().eval()
    merged_sd = merged64.state_dict()
    plain_steps = _advantages(scorer.score(trajectories))
    for a in alphas:
        interp = AutoModelForCausalLM.from_pretrained(tiny_dir["reference"]).double().eval()  # the base, float64
        with torch.no_grad():
            for n, p in interp.named_parameters():
                p.copy_(p + a * (merged_sd[n] - p))
        steps = [st for tr in trajectories for st in _naive_steps(merged64, interp, tiny_tokenizer, tr)]
        np.testing.assert_allclose(_advantages(swept[a]), steps, atol=1e-4, rtol=0)
    # the interpolation moved the scores (else the comparison above could pass with the plain reference)
    assert np.abs(_advantages(swept[0.7]) - plain_steps).max() > 0.01
    # the policy pass saw the unscaled adapter: its baselines are the plain scorer's
    plain = scorer.score(trajectories)
    np.testing.assert_allclose(
        [s.baselines["policy_logprob"] for s in swept[0.3]], [s.baselines["policy_logprob"] for s in plain], atol=1e-6
    )


def test_lora_ties_prunes_the_task_vector(tiny_dir, tiny_tokenizer, trajectories):
    """ties on a LoRA policy: base + alpha * (top-density |s B A| of each layer), built by hand in float64."""
    peft_model = _lora(tiny_dir)
    scorer = ProgressScorer(peft_model, tiny_tokenizer)
    density, alpha = 0.3, 0.8
    swept = alpha_sweep(scorer, trajectories, [alpha], "ties", density=density)
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    merged64 = copy.deepcopy(peft_model).merge_and_unload().double().eval()
    interp = AutoModelForCausalLM.from_pretrained(tiny_dir["reference"]).double().eval()  # the base, float64
    modules = dict(interp.named_modules())
    with torch.no_grad():
        for name, m in peft_model.get_base_model().named_modules():
            if isinstance(m, LoraLayer):
                d = m.get_delta_weight("default").double()
                k = int(density * d.numel())
                keep = d.abs() >= d.abs().flatten().sort(descending=True).values[k - 1]
                modules[name].weight += alpha * d * keep
    steps = [st for tr in trajectories for st in _naive_steps(merged64, interp, tiny_tokenizer, tr)]
    np.testing.assert_allclose(_advantages(swept[alpha]), steps, atol=1e-4, rtol=0)
    linear = alpha_sweep(scorer, trajectories, [alpha])[alpha]
    assert np.abs(_advantages(linear) - _advantages(swept[alpha])).max() > 1e-3
    # the policy pass saw the base weights untouched and the adapter on
    np.testing.assert_allclose(
        [s.baselines["policy_logprob"] for s in swept[alpha]], [s.baselines["policy_logprob"] for s in linear], atol=1e-6
    )


def test_reference_restored_bitwise(tiny_dir, tiny_tokenizer, trajectories):
    pol, ref = _pair(tiny_dir)
    before = {n: (p.detach().clone(), p.data_ptr()) for n, p in ref.named_parameters()}
    pol_before = {n: p.detach().clone() for n, p in pol.named_parameters()}
    scorer = ProgressScorer(pol, tiny_tokenizer, ref)
    for merge in MERGES:
        alpha_sweep(scorer, trajectories[:3], [0.25, 1.0, 1.5], merge, density=0.4, seed=3)
    for n, p in ref.named_parameters():
        assert p.data_ptr() == before[n][1] and torch.equal(p, before[n][0]), n
    for n, p in pol.named_parameters():
        assert torch.equal(p, pol_before[n]), n
    # LoRA: base weights and scales as they were, after ties (weights swapped) and linear (scales changed)
    peft_model = _lora(tiny_dir)
    state = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    from peft.tuners.lora import LoraLayer

    scales = [dict(m.scaling) for m in peft_model.modules() if isinstance(m, LoraLayer)]
    lscorer = ProgressScorer(peft_model, tiny_tokenizer)
    for merge in ("linear", "dare_ties"):
        alpha_sweep(lscorer, trajectories[:3], [0.5], merge, density=0.5)
    assert all(torch.equal(p, state[n]) for n, p in peft_model.named_parameters())
    assert scales == [dict(m.scaling) for m in peft_model.modules() if isinstance(m, LoraLayer)]


def test_ties_and_dare_are_seeded_and_differ_from_linear(tiny_dir, tiny_tokenizer, trajectories):
    pol, ref = _pair(tiny_dir)
    scorer = ProgressScorer(pol, tiny_tokenizer, ref)
    trajs, a = trajectories[:4], 0.5
    rng = torch.get_rng_state()
    run = {
        (m, s): _advantages(alpha_sweep(scorer, trajs, [a], m, density=0.5, seed=s)[a])
        for m, s in [("linear", 0), ("ties", 0), ("ties", 1), ("dare_linear", 0), ("dare_linear", 1), ("dare_ties", 0)]
    }
    assert torch.equal(torch.get_rng_state(), rng)  # DARE's draws left the caller's generator alone
    for m, s in [("ties", 0), ("dare_linear", 0), ("dare_ties", 0)]:
        again = _advantages(alpha_sweep(scorer, trajs, [a], m, density=0.5, seed=s)[a])
        np.testing.assert_array_equal(again, run[(m, s)])  # same seed, same numbers
        assert np.abs(run[(m, s)] - run[("linear", 0)]).max() > 1e-3
    np.testing.assert_array_equal(run[("ties", 0)], run[("ties", 1)])  # magnitude pruning: no randomness
    assert np.abs(run[("dare_linear", 0)] - run[("dare_linear", 1)]).max() > 1e-4  # another seed, another mask


def test_refusals(tiny_dir, tiny_tokenizer, trajectories):
    pol, ref = _pair(tiny_dir)
    scorer = ProgressScorer(pol, tiny_tokenizer, ref)
    with pytest.raises(ValueError, match=r"merge must be one of \('linear', 'ties', 'dare_linear', 'dare_ties'\), got 'slerp'"):
        alpha_sweep(scorer, trajectories[:1], [0.5], "slerp")
    with pytest.raises(ValueError, match="needs density"):
        alpha_sweep(scorer, trajectories[:1], [0.5], "ties")
    with pytest.raises(ValueError, match="density must be in"):
        merged_reference(pol, ref, alpha=0.5, merge="dare_linear", density=0.0)
    with pytest.raises(ValueError, match="alphas is empty"):
        alpha_sweep(scorer, trajectories[:1], [])
    peft_model = _lora(tiny_dir)
    with pytest.raises(ValueError, match="both adapters"):
        merged_reference(peft_model, Reference(NAMED_ADAPTER, adapter="default"), alpha=0.5)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    saved = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir["reference"]), cfg)
    with pytest.raises(ValueError, match="modules_to_save"):
        merged_reference(saved, alpha=0.5)
    with pytest.raises(ValueError, match="another policy"):
        with merged_reference(pol, ref, alpha=0.5).active(peft_model):
            pass


def test_run_evaluation_adds_each_merge_and_alpha_as_a_variant(tiny_dir, tiny_tokenizer, trajectories, tmp_path):
    """`progadv evaluate --merge-alphas` (run_evaluation): each (merge, alpha) is a variant on the scores, evaluated
    like the others; alpha 0 is the plain progress advantage, alpha 1 (linear) is zero; the reference is untouched."""
    import json

    from progadv_trl.evaluation import run_evaluation

    pol, ref = _pair(tiny_dir)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    scorer = ProgressScorer(pol, tiny_tokenizer, ref)
    seen = {}
    metrics = run_evaluation(scorer, trajectories, tmp_path / "ev", n_boot=0, merge_alphas=(0.0, 1.0),
                             merge=("linear", "ties"), merge_density=0.5, on_scored=lambda s: seen.update(s=s))
    names = ["progress_advantage_merged_linear_a0", "progress_advantage_merged_linear_a1",
             "progress_advantage_merged_ties_a0", "progress_advantage_merged_ties_a1"]
    for ts in seen["s"]:
        assert ts.variants["progress_advantage_merged_linear_a0"] == pytest.approx(ts.score, abs=1e-6)
        assert ts.variants["progress_advantage_merged_linear_a1"] == pytest.approx(0.0, abs=1e-5)
        assert ts.variants["progress_advantage_merged_ties_a1"] != pytest.approx(0.0, abs=1e-5)  # trimmed: not pi
        np.testing.assert_allclose(ts.step_variants["progress_advantage_merged_linear_a0"], ts.advantages, atol=1e-6)
    assert all(n in metrics["methods"] for n in names)
    assert all(n in json.loads((tmp_path / "ev" / "metrics.json").read_text())["methods"] for n in names)
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_alpha_sweep_runs_the_policy_pass_once_with_the_same_numbers(tiny_dir, tiny_tokenizer, trajectories, kind):
    """The sweep keeps the policy's pass (one run for every alpha) and gives, bit for bit, what scoring each alpha
    with its own two passes gives (the loop the sweep used to be)."""
    pol, ref = _pair(tiny_dir) if kind == "full" else (_lora(tiny_dir), None)
    scorer = ProgressScorer(pol, tiny_tokenizer, ref, config=ScoringConfig(beta=0.5), batch_tokens=1500)
    alphas = [0.25, 0.5, 0.75]
    merged = merged_reference(scorer.policy, scorer.reference, alpha=alphas[0], merge="linear")
    base, each = scorer.reference, {}
    try:
        for a in alphas:
            scorer.reference = merged.set_alpha(a)
            each[a] = scorer.score(trajectories, with_token_ratios=True)
    finally:
        scorer.reference = base
        merged.release()

    # decoder calls: of the policy and of the reference apart (full weights), of the one shared model (LoRA)
    decoders = [pol.get_decoder(), ref.get_decoder()] if kind == "full" else [pol.get_base_model().get_decoder()]
    calls = {id(d): [] for d in decoders}
    hooks = [d.register_forward_hook(lambda m, *_: calls[id(m)].append(1)) for d in decoders]
    try:
        scorer.score(trajectories)
        one = {k: len(v) for k, v in calls.items()}
        for v in calls.values():
            v.clear()
        swept = alpha_sweep(scorer, trajectories, alphas, "linear", with_token_ratios=True)
    finally:
        for h in hooks:
            h.remove()
    if kind == "full":
        n_pol, n_ref = (one[id(d)] for d in decoders)
        assert n_pol > 0 and len(calls[id(decoders[0])]) == n_pol  # the policy's pass once for every alpha
        assert len(calls[id(decoders[1])]) == n_ref * len(alphas)  # the reference's per alpha
    else:
        per_pass = one[id(decoders[0])] // 2  # both passes run the shared model
        assert len(calls[id(decoders[0])]) == per_pass * (1 + len(alphas))
    for a in alphas:
        for got, want in zip(swept[a], each[a], strict=True):
            assert got.id == want.id
            for k in ("score", "advantages", "token_log_ratios", "baselines", "step_baselines"):
                np.testing.assert_equal(getattr(got, k), getattr(want, k))  # exact (NaN equals NaN)
    assert not np.array_equal(_advantages(swept[0.25]), _advantages(swept[0.75]))  # the reference did move
