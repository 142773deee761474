"""ProgressAdvantageCallback beyond the basic GRPO run: LoRA (new adapter and TRL's "ref" adapter), beta == 0
(skip with a warning, or the opt-in reference pass), RLOOTrainer, multi-turn rollouts (`tools=` and
`rollout_func`), and resuming from a checkpoint."""

import json
import warnings
from pathlib import Path

import pytest
import torch

from dist_callback import count_forwards, grpo_args, heldout_records, parity_reward, prompts


def _tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _grpo(model, out_dir, tok, train_n=16, **kw):
    from trl import GRPOTrainer

    trainer_kw = {k: kw.pop(k) for k in ("peft_config", "tools", "rollout_func", "environment_factory") if k in kw}
    reward = kw.pop("reward", parity_reward)
    kw.setdefault("max_steps", 2)
    kw.setdefault("eval_strategy", "no")
    return GRPOTrainer(
        model=model, args=grpo_args(out_dir, **kw), reward_funcs=reward,
        train_dataset=prompts(train_n), processing_class=tok, **trainer_kw,
    )  # fmt: skip


def _held(log):
    return [e for e in log if "eval_progadv/heldout/global_step" in e]


def _assert_kl_matches(log, n):
    kls = [(e["kl"], e["progadv/train/kl"]) for e in log if "kl" in e]
    assert len(kls) == n
    for grpo, ours in kls:
        assert ours == pytest.approx(grpo, rel=1e-5, abs=1e-7)
    return kls


# ----------------------------------------------------------------------------------------------------------------
# LoRA


def test_lora_new_adapter(tiny_dir, tmp_path):
    from peft import LoraConfig

    from progadv_trl.callback import ProgressAdvantageCallback

    d = tiny_dir["reference"]
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    t = _grpo(str(d), tmp_path, _tok(d), peft_config=lora, learning_rate=5e-2)
    assert t.ref_model is None  # the reference is the model with its adapter disabled
    cb = ProgressAdvantageCallback(t, heldout=heldout_records(4))
    t.add_callback(cb)
    t.train()
    log = t.state.log_history
    kls = _assert_kl_matches(log, 2)
    assert kls[-1][0] > 0
    held = _held(log)
    assert [e["eval_progadv/heldout/global_step"] for e in held] == [0, 2]
    assert held[0]["eval_progadv/heldout/step_advantage_mean"] == 0.0  # LoRA B starts at 0: policy == reference
    assert held[1]["eval_progadv/heldout/step_advantage_mean"] != 0.0
    assert cb.errors == 0
    manifest = json.loads((Path(tmp_path) / "progadv_bundle" / "manifest.json").read_text())
    assert manifest["policy"]["kind"] == "lora" and manifest["reference"]["is_policy_base"]


def test_lora_existing_adapter_uses_trl_ref_adapter(tiny_dir, tmp_path):
    """Re-training an existing adapter with beta > 0: TRL's frozen "ref" adapter is the reference, not the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from progadv_trl.callback import ProgressAdvantageCallback

    d = tiny_dir["reference"]
    base = AutoModelForCausalLM.from_pretrained(d)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():  # a trained adapter: not the base model
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    t = _grpo(model, tmp_path, _tok(d), max_steps=1)
    assert "ref" in t.model.peft_config
    cb = ProgressAdvantageCallback(t, heldout=heldout_records(4))
    t.add_callback(cb)
    t.train()
    held = _held(t.state.log_history)
    assert held[0]["eval_progadv/heldout/step_advantage_mean"] == 0.0  # "ref" == the adapter at the start
    _assert_kl_matches(t.state.log_history, 1)
    # Scoring against the bare base instead would have given non-zero advantages at the start
    from progadv_trl.engine import ProgressScorer

    bare = ProgressScorer(t.model, t.processing_class).score(heldout_records(2))
    assert any(abs(s.score) > 1e-3 for s in bare)
    # ...and the bundle stores the "ref" adapter's weights as the reference
    manifest = json.loads((Path(tmp_path) / "progadv_bundle" / "manifest.json").read_text())
    assert manifest["reference"]["merged_from_adapter"] == "ref"
    assert cb.errors == 0


# ----------------------------------------------------------------------------------------------------------------
# beta == 0


def test_beta_zero_skips_training_figures_with_one_warning(tiny_dir, tmp_path):
    from progadv_trl.callback import ProgressAdvantageCallback

    d = tiny_dir["reference"]
    t = _grpo(str(d), tmp_path, _tok(d), beta=0.0)
    assert t.ref_model is None
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cb = ProgressAdvantageCallback(t, heldout=heldout_records(4), export=None)
        t.add_callback(cb)
        t.train()
    assert sum("beta == 0" in str(x.message) for x in w) == 1
    log = t.state.log_history
    assert not any(k.startswith("progadv/train/") for e in log for k in e)
    held = _held(log)  # held-out scoring loads a frozen reference from the initial checkpoint
    assert [e["eval_progadv/heldout/global_step"] for e in held] == [0, 2]
    assert held[0]["eval_progadv/heldout/step_advantage_mean"] == 0.0
    assert held[1]["eval_progadv/heldout/step_advantage_mean"] != 0.0
    assert cb.errors == 0


def test_beta_zero_reference_pass_full_model(tiny_dir, tmp_path):
    from progadv_trl.callback import ProgressAdvantageCallback

    d = tiny_dir["reference"]
    t = _grpo(str(d), tmp_path, _tok(d), beta=0.0)
    cb = ProgressAdvantageCallback(t, reference_pass=True, export=None)
    t.add_callback(cb)
    assert cb.hooks.reference.kind == "separate"
    ref = cb.hooks.reference.model
    assert ref is not None and not any(p.requires_grad for p in ref.parameters())
    c = count_forwards(ref)
    t.train()
    assert c.n == 2  # one extra reference pass per generation batch, nothing else
    train = [e for e in t.state.log_history if "progadv/train/token_log_ratio_mean" in e]
    assert len(train) == 2
    assert train[0]["progadv/train/token_log_ratio_mean"] == pytest.approx(0.0, abs=1e-6)  # step 1: policy == ref
    assert train[1]["progadv/train/token_log_ratio_mean"] != pytest.approx(0.0, abs=1e-4)
    assert all(e["progadv/train/ref_pass_seconds"] > 0 for e in train)
    assert "kl" not in train[0] and "progadv/train/kl" in train[0]


def test_beta_zero_reference_pass_lora(tiny_dir, tmp_path):
    from peft import LoraConfig

    from progadv_trl.callback import ProgressAdvantageCallback

    d = tiny_dir["reference"]
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    t = _grpo(str(d), tmp_path, _tok(d), beta=0.0, peft_config=lora, learning_rate=5e-2)
    cb = ProgressAdvantageCallback(t, reference_pass=True, export=None)
    assert cb.hooks.reference.kind == "adapter_disabled"  # no second copy of the weights
    t.add_callback(cb)
    t.train()
    train = [e for e in t.state.log_history if "progadv/train/token_log_ratio_mean" in e]
    assert len(train) == 2
    assert train[0]["progadv/train/token_log_ratio_mean"] == pytest.approx(0.0, abs=1e-6)
    assert train[1]["progadv/train/token_log_ratio_mean"] != pytest.approx(0.0, abs=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# RLOO


def test_rloo(tiny_dir, tmp_path):
    from trl import RLOOConfig, RLOOTrainer

    from progadv_trl.callback import ProgressAdvantageCallback

    d = tiny_dir["reference"]
    args = RLOOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, beta=0.05, learning_rate=1e-2, gradient_checkpointing=False,
        num_generations=4, max_completion_length=10, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        max_steps=2, logging_steps=1, eval_strategy="steps", eval_steps=2, save_strategy="no", report_to=[],
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    t = RLOOTrainer(model=str(d), reward_funcs=parity_reward, args=args, train_dataset=prompts(16),
                    eval_dataset=prompts(2, offset=100), processing_class=_tok(d))  # fmt: skip
    cb = ProgressAdvantageCallback(t, heldout=heldout_records(4), export=None)
    t.add_callback(cb)
    t.train()
    log = t.state.log_history
    # RLOO's kl is the first-order estimate: the mean token log-ratio over the completion tokens, per batch
    kls = _assert_kl_matches(log, 2)
    assert kls[-1][0] != 0
    assert all(e["progadv/train/token_log_ratio_mean"] == e["progadv/train/kl"] for e in log if "kl" in e)
    ev = [e for e in log if "eval_kl" in e]
    assert len(ev) == 1 and ev[0]["eval_progadv/eval/kl"] == pytest.approx(ev[0]["eval_kl"], rel=1e-5)
    assert ev[0]["eval_progadv/eval/best_of_n/groups"] == 2
    assert [e["eval_progadv/heldout/global_step"] for e in _held(log)] == [0, 2]
    assert cb.errors == 0


# ----------------------------------------------------------------------------------------------------------------
# Multi-turn


def get_weather(city: str) -> str:
    """Weather in a city.

    Args:
        city: the city
    """
    return "sunny"


def _alternating(completions, **kwargs):
    return [float(i % 2) for i in range(len(completions))]


class WeatherEnv:
    def reset(self, **kwargs):
        return None

    def get_weather(self, city: str) -> str:
        """Weather in a city.

        Args:
            city: the city
        """
        return "sunny"


@pytest.mark.parametrize("how", ["tools", "environment_factory"])
def test_multi_turn_tools(tiny_dir, tmp_path, monkeypatch, how):
    """TRL's own tool loop builds tool_mask; generation is canned so that every rollout calls the tool."""
    from progadv_trl.callback import ProgressAdvantageCallback

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    d = tiny_dir["reference"]
    tok = _tok(d)
    source = {"tools": [get_weather]} if how == "tools" else {"environment_factory": WeatherEnv}
    t = _grpo(str(d), tmp_path, tok, reward=_alternating, max_completion_length=96, **source)
    call = tok('<tool_call>\n{"name": "get_weather", "arguments": {"city": "paris"}}\n</tool_call><|im_end|>',
               add_special_tokens=False)["input_ids"]  # fmt: skip
    answer = tok("It is sunny.<|im_end|>", add_special_tokens=False)["input_ids"]

    def canned(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        # TRL asks for num_generations > 1 on the first turn and for 1 after each tool result
        return [list(call if num_generations > 1 else answer) for _ in prompt_ids], None

    t._generate_single_turn = canned
    cb = ProgressAdvantageCallback(t, export=None)
    t.add_callback(cb)
    t.train()
    log = t.state.log_history
    train = [e for e in log if "loss" in e]
    assert all(e["tools/call_frequency"] == 1.0 for e in train)
    for e in train:
        assert e["progadv/train/steps_per_rollout"] == 2.0
        assert "progadv/train/step_advantage_by_turn/0" in e and "progadv/train/step_advantage_by_turn/1" in e
    kls = _assert_kl_matches(log, 2)
    assert kls[-1][0] > 0
    b = cb.last_train_batches[0]
    m = b.mask[0]
    assert m[: len(call)].tolist() == [1] * len(call) and 0 in m.tolist()  # the tool result is not the agent's


def test_multi_turn_rollout_func(tiny_dir, tmp_path, monkeypatch):
    from progadv_trl.callback import ProgressAdvantageCallback

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")

    d = tiny_dir["reference"]
    tok = _tok(d)
    turn1, env, turn2 = (tok(s, add_special_tokens=False)["input_ids"] for s in
                         ("Let me check.<|im_end|>", "\n<|im_start|>user\nsunny<|im_end|>\n<|im_start|>assistant\n",
                          "It is sunny.<|im_end|>"))  # fmt: skip

    def rollout(prompts_, trainer):
        p = [tok.apply_chat_template(x, add_generation_prompt=True, tokenize=True, return_dict=False) for x in prompts_]
        c = [turn1 + env + turn2 for _ in prompts_]
        return {"prompt_ids": p, "completion_ids": c, "logprobs": [[0.0] * len(x) for x in c],
                "env_mask": [[1] * len(turn1) + [0] * len(env) + [1] * len(turn2) for _ in prompts_]}  # fmt: skip

    t = _grpo(str(d), tmp_path, tok, rollout_func=rollout, reward=_alternating, max_completion_length=64)
    cb = ProgressAdvantageCallback(t, export=None)
    t.add_callback(cb)
    t.train()
    log = t.state.log_history
    _assert_kl_matches(log, 2)
    last = [e for e in log if "loss" in e][-1]
    assert last["progadv/train/steps_per_rollout"] == 2.0
    assert last["progadv/train/tokens"] == 4 * (len(turn1) + len(turn2))
    s = cb.last_train_batches[0]
    from progadv_trl.callback import batch_scores

    scores, _ = batch_scores(s, cb.config)
    assert [st.tokens for st in scores[0].steps] == [len(turn1), len(turn2)]


# ----------------------------------------------------------------------------------------------------------------
# Resume


def test_resume_restores_history(tiny_dir, tmp_path):
    from progadv_trl.callback import ProgressAdvantageCallback

    d = tiny_dir["reference"]
    tok = _tok(d)
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, eval_strategy="no")
    t = _grpo(str(d), tmp_path, tok, **kw)
    cb = ProgressAdvantageCallback(t, heldout=heldout_records(2), eval_steps=2, export="save")
    t.add_callback(cb)
    t.train()
    first = [(h["kind"], h["step"]) for h in cb.history]
    assert first == [("heldout", 0), ("heldout", 2), ("heldout", 4)]
    # export="save": a critic bundle in every checkpoint, and one at the end
    for sub in ("checkpoint-2/progadv_bundle", "checkpoint-4/progadv_bundle", "progadv_bundle"):
        assert (Path(tmp_path) / sub / "manifest.json").is_file(), sub
    assert cb.errors == 0

    t2 = _grpo(str(d), tmp_path, tok, **kw)
    cb2 = ProgressAdvantageCallback(t2, heldout=heldout_records(2), eval_steps=2, export=None)
    t2.add_callback(cb2)
    calls = []
    orig = cb2.score_heldout
    cb2.score_heldout = lambda: calls.append(t2.state.global_step) or orig()
    t2.train(resume_from_checkpoint=str(Path(tmp_path) / "checkpoint-2"))
    assert calls == [4]  # no new baseline: steps 0 and 2 come back from the checkpoint
    assert [(h["kind"], h["step"]) for h in cb2.history] == first
    assert cb2.history[:2] == cb.history[:2]


# ----------------------------------------------------------------------------------------------------------------
# A configured progress-advantage variant (issue 12)


def test_heldout_scoring_uses_the_configured_variant_and_the_bundle_records_it(tiny_dir, tmp_path):
    from progadv_trl.callback import ProgressAdvantageCallback
    from progadv_trl.critic import ProgressCritic
    from progadv_trl.scoring import ScoringConfig

    d = tiny_dir["reference"]
    t = _grpo(str(d), tmp_path, _tok(d), learning_rate=5e-2)
    v = "progress_advantage_centred_policy"
    cfg = ScoringConfig(beta=0.5, variant=v, support_threshold=-6.0)
    cb = ProgressAdvantageCallback(t, heldout=heldout_records(4), scoring_config=cfg)
    t.add_callback(cb)
    t.train()
    held = _held(t.state.log_history)
    assert [e["eval_progadv/heldout/global_step"] for e in held] == [0, 2] and cb.errors == 0
    for e in held:
        assert 0.0 <= e["eval_progadv/heldout/out_of_support"] <= 1.0  # the progadv/heldout/out_of_support
    last = cb.last_heldout
    assert all(v in ts.variants and ts.support for ts in last)
    # the step figures are the variant's: centred on-policy, their mean is the variant's, not the plain score's
    means = [ts.variants[v] for ts in last]
    assert held[-1]["eval_progadv/heldout/score_mean"] == pytest.approx(sum(means) / len(means))
    bundle = Path(tmp_path) / "progadv_bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["scoring"]["variant"]["name"] == v and manifest["scoring"]["variant"]["params"]["support_threshold"] == -6.0
    critic = ProgressCritic.from_pretrained(bundle)
    assert critic.variant == v
    assert critic.score(heldout_records(1))[0].method_score(v) == pytest.approx(last[0].variants[v], abs=1e-4)
