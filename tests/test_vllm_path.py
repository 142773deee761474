"""GRPO's vLLM path (use_vllm=True), driven without vLLM: TRL's own `_generate_and_score_completions` runs its vLLM
branch with a stand-in for `trainer.vllm_generation` that returns completions and per-token sampling log-probs in
vLLM's format (deliberately not the training model's: a vLLM engine's numerics differ). TRL then builds what it
builds on that path - `old_per_token_logps` from the training model (importance-sampling correction on, TRL's
default), `sampling_per_token_logps`, `importance_sampling_ratio` - and the callback must read the training model's
log-probs, never the sampler's."""

import pytest
import torch

from progadv_trl.demo.tiny import grpo_args, parity_reward, prompts


class FakeVLLM:
    """`trl.generation.vllm_generation.VLLMGeneration`'s interface: generate(prompts, images, num_generations, profiler)
    -> (prompt_ids, completion_ids, logprobs [B][T][1], logprob_token_ids), and sync_weights()."""

    def __init__(self, tokenizer):
        self.eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.words = tokenizer("sunny cloudy rain wind", add_special_tokens=False).input_ids
        self.synced = 0

    def sync_weights(self):
        self.synced += 1

    def generate(self, prompts, images, num_generations, profiler=None):
        completions = [self.words[: 1 + i % len(self.words)] + [self.eos] for i in range(len(prompts))]
        logprobs = [[[-1.0] for _ in c] for c in completions]  # the sampler's, not the training model's
        return prompts, completions, logprobs, [[[t] for t in c] for c in completions]


@pytest.mark.parametrize("is_correction", [True, False])
def test_vllm_path_reads_the_training_model(tiny_dir, tiny_tokenizer, tmp_path, is_correction):
    from trl import GRPOTrainer

    from progadv_trl.callback import ProgressAdvantageCallback

    args = grpo_args(tmp_path, max_steps=2, eval_strategy="no", max_completion_length=8)
    trainer = GRPOTrainer(model=str(tiny_dir["reference"]), args=args, reward_funcs=parity_reward,
                          train_dataset=prompts(8), processing_class=tiny_tokenizer)  # fmt: skip
    # the vLLM branch of TRL 1.16's GRPOTrainer, with the engine replaced
    trainer.use_vllm, trainer.vllm_mode, trainer._last_loaded_step = True, "server", -1
    trainer.vllm_importance_sampling_correction = is_correction
    trainer.vllm_generation = fake = FakeVLLM(tiny_tokenizer)
    cb = ProgressAdvantageCallback(trainer, export=None, write_tables=False)
    trainer.add_callback(cb)
    outs, captured = [], []
    inner = trainer._generate_and_score_completions  # the callback's wrapper around TRL's method

    def spy(inputs):
        out = inner(inputs)
        outs.append({k: v.clone() for k, v in out.items() if torch.is_tensor(v)})
        return out

    trainer._generate_and_score_completions = spy
    on_batch = cb.hooks.on_batch
    cb.hooks.on_batch = lambda b: (captured.append(b), on_batch(b))
    trainer.train()

    assert fake.synced == 2 and cb.errors == 0  # TRL took the vLLM branch at every step
    assert len(outs) == 2 and captured
    for out in outs:
        assert ("importance_sampling_ratio" in out) == is_correction
        assert ("old_per_token_logps" in out) == is_correction  # IS on: TRL scores the rollouts with the training model
        mask = out["completion_mask"].bool()
        assert torch.all(out["sampling_per_token_logps"][mask] == -1.0)  # TRL kept the sampler's log-probs apart
    # the captured policy log-probs are the training model's, never the sampler's (-1.0 everywhere)
    for b in captured:
        m = b.mask.bool()
        assert not torch.allclose(b.policy_logps[m], torch.full_like(b.policy_logps[m], -1.0))
    if is_correction:  # captured at generation: exactly TRL's old_per_token_logps
        got = torch.cat([b.policy_logps for b in captured])
        want = torch.cat([o["old_per_token_logps"].float() for o in outs])
        assert torch.equal(got, want)
        assert torch.equal(torch.cat([b.ref_logps for b in captured]), torch.cat([o["ref_per_token_logps"].float() for o in outs]))
    # and the figures agree with the trainer's own KL, computed from the training model's log-probs
    kls = [(e["kl"], e["progadv/train/kl"]) for e in trainer.state.log_history if "kl" in e]
    assert len(kls) == 2 and kls[-1][0] > 0
    for theirs, ours in kls:
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-7)
