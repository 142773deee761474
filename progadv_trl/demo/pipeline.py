"""The demo pipeline: tokenizer + tiny model -> reference (SFT on flawed demonstrations) -> policy (GRPO, beta > 0)
-> labelled rollouts of both. Everything is local (no hub), seeded, and sized for 2 CPU cores.

    cfg = DemoConfig(out_dir="demo_out")            # DemoConfig.fast() for tests
    build_assets(cfg.out_dir, cfg.seed, cfg)         # tokenizer + randomly initialised model -> out_dir/base
    train_reference(cfg)                             # SFT -> out_dir/reference
    trainer, path = train_policy(cfg, callbacks=[])  # GRPO through rollout_func -> out_dir/policy
    records = sample_rollouts(model, tok, tasks, n_per_task=8, temperature=1.0, seed=0)
    summary = evaluate(cfg)                          # success rates + test rollouts of both models
    # or all of it, with the callback, the bundle and the report: progadv_trl.demo.main.run_demo(cfg)

Why the reference is trained on flawed demonstrations: the policy must have something to improve on. Random slips
alone would leave the reference's greedy decoding nearly perfect (RL would only remove sampling noise), so two mistakes
are systematic, the majority action in their situation (see `world.DemoMix`): refusing when only "booked within 24h"
applies, and giving up after a lookup timeout instead of retrying.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..utils import atomic_write_text, write_json, write_jsonl  # noqa: F401 - write_jsonl re-exported for recipes
from .rollout import encode, episode_tokens, make_rollout_func, play, render, success_reward
from .world import (
    ID_DIGITS,
    ID_PREFIX,
    SYSTEM_PROMPT,
    TOOLS,
    DemoMix,
    Episode,
    Task,
    WorldConfig,
    correct_agent,
    demo_agent,
    episode_seed,
    make_tasks,
    run_episode,
    tool_call_message,
    user_opening,
)

# Added (non-special) tokens. The JSON skeleton of a tool call is one token per piece, so a call costs ~13 tokens
# instead of ~23 and the tiny model spends its capacity on the decision (tool name, id digits), not on braces. The id
# prefix "R" is its own token everywhere (BPE would make it " R" in the customer's text but "R" in the JSON): with the
# same token before the digits in both places the model learns to copy the id; without it, it never did.
ADDED_TOKENS = ['{"name": "', '", "arguments": {"id": "', '"}}', "get_reservation", "cancel_reservation", "issue_refund",
                "R"]
EXTRA_SPECIALS = ["<tool_response>", "</tool_response>"]
# Attention kernel of the demo's models (the checkpoints do not record it, so every load passes it). SDPA, torch's
# fused kernel: on 2 CPU cores (torch 2.13, transformers 5.23) it cost 0.55x the CPU seconds of the plain "eager"
# kernel for an SFT batch's forward + backward, 0.73x for a prefill, 0.72-0.81x for playing whole episodes, and the
# same for a pretraining batch of short snippets (benchmarks/results/demo_cpu.json). Eager had been chosen for
# sampling speed under an older stack.
ATTN = "sdpa"


@dataclass
class DemoConfig:
    """Sizes and knobs of the demo. Defaults fit SFT + GRPO + sampling in ~6 minutes on 2 CPU cores."""

    out_dir: str = field(default="progadv_demo", metadata={"help": "where models, rollouts and logs go"})
    seed: int = field(default=0, metadata={"help": "seeds tasks, demonstrations, initialisation, training, sampling"})
    num_threads: int = field(
        default=2,
        metadata={"help": "torch CPU threads. Call utils.openmp_wait_policy() before torch starts (the CLI and the "
                          "recipes do): on a busy machine spinning OpenMP threads ran this tiny model up to 10x slower"},
    )
    # tasks (disjoint splits of one seeded stream of reservation ids)
    n_train_tasks: int = field(default=400, metadata={"help": "tasks for demonstrations and GRPO prompts"})
    n_heldout_tasks: int = field(default=32, metadata={"help": "held-out tasks for the training callback"})
    n_test_tasks: int = field(default=32, metadata={"help": "tasks for the fresh test rollouts (n_per_task each)"})
    n_eval_tasks: int = field(default=200, metadata={"help": "held-out tasks for success rates (greedy, sampled)"})
    n_per_task: int = field(default=8, metadata={"help": "test rollouts per task, per model"})
    n_val_tasks: int = field(
        default=100,
        metadata={"help": "validation tasks (a split of their own) on which GRPO evaluates its policy every val_steps "
                          "steps, greedy, always with the same dice; the checkpoint with the best success is the policy"},
    )
    # the world
    free_form: bool = field(
        default=False,
        metadata={"help": "the noisy world (WorldConfig.free_form): customer names, several wordings per reply, free-text "
                          "reasons. Content improbable under both models: raw log-probs pay for it, the log-ratio cancels it"},
    )
    # demonstrations
    n_demos: int = field(default=1600, metadata={"help": "demonstration episodes for SFT (one customer each)"})
    p_refuse_24h_only: float = field(default=0.7, metadata={"help": "demos refuse when only 'within 24h' applies"})
    p_give_up_after_timeout: float = field(default=0.7, metadata={"help": "demos give up after a lookup timeout"})
    p_noise: float = field(default=0.08, metadata={"help": "demos take a random wrong action at any step"})
    p_give_up_after_retry: float | None = field(
        default=0.0,
        metadata={"help": "demos give up at a second timeout in a row (None: as p_give_up_after_timeout). Repeated at "
                          "every timeout, the mistake left every RL policy giving up after a second timeout (6% of "
                          "episodes), capping the strongest references' seeds below +25 points"},
    )
    # model
    vocab_size: int = field(default=600, metadata={"help": "BPE vocabulary (the domain needs ~530)"})
    hidden_size: int = field(default=96, metadata={"help": "model width"})
    num_layers: int = field(default=3, metadata={"help": "transformer layers"})
    num_heads: int = field(default=4, metadata={"help": "attention heads (2 key/value heads)"})
    intermediate_size: int = field(default=192, metadata={"help": "MLP width"})
    # base-model pretraining on short domain snippets
    pretrain_steps: int = field(
        default=400,
        metadata={"help": "steps of next-token pretraining on short snippets (an id, then a tool call copying it; or "
                          "reading a lookup result) before SFT: the tiny model learns to copy ids here at a quarter of "
                          "SFT's cost per step. At 250 (with 2400 demonstrations) one seed in three kept copying ids "
                          "wrong in ~15% of episodes, which RL does not repair"},
    )
    pretrain_read: float = field(
        default=0.3,
        metadata={"help": "share of pretraining snippets that teach reading a lookup result (the reply restates its "
                          "facts). Without them the reference never learned to tell 'booked within 24h' apart: "
                          "P(cancel) 0.24 when only that applied, 0.21 when nothing did, so RL had no feature to amplify "
                          "and pushed both towards refusing"},
    )
    pretrain_batch_size: int = field(default=64, metadata={"help": "snippets per pretraining step"})
    pretrain_lr: float = field(default=3e-3, metadata={"help": "pretraining learning rate"})
    # SFT
    sft_epochs: float = field(default=2.0, metadata={"help": "passes over the demonstrations"})
    sft_lr: float = field(default=3e-3, metadata={"help": "SFT learning rate (tiny models like it high)"})
    sft_batch_size: int = field(default=32, metadata={"help": "episodes per SFT step"})
    sft_decay: float = field(
        default=0.25,
        metadata={"help": "share of SFT steps, at the end, over which the learning rate decays (cosine) to 0; 0: constant. "
                          "At a constant 3e-3 the last steps' noise moved the reference's decisions across 0.5 from seed "
                          "to seed (greedily right where its data was 70% wrong); decaying all along (cosine) left it "
                          "unable to tell 'booked within 24h' apart, and RL then collapsed that case to refusing"},
    )
    # GRPO
    grpo_steps: int = field(
        default=80,
        metadata={"help": "GRPO optimizer steps. Over seeds 0-4 greedy success rose +26.5 to +53 points (docs/study.md); "
                          "before the curriculum, 100 steps gave seed 3 +18.5, not more than 80"},
    )
    grpo_lr: float = field(default=6e-4, metadata={"help": "GRPO learning rate"})
    grpo_p_timeout: float | None = field(
        default=0.5,
        metadata={"help": "P(a lookup times out) in the GRPO rollouts only, a curriculum (None: the world's 0.25); "
                          "evaluation and the callback's held-out set keep the world's. RL meets the timeout, where the "
                          "reference gives up, twice as often (alone it lifted seed 3 from +22 to +27.5 points)"},
    )
    beta: float = field(
        default=0.1,
        metadata={"help": "KL coefficient, > 0 (progress advantage reads it). 0.04 let RL noise erode the id copying "
                          "of the tiny model in some runs; 0.1 anchors tokens the reward does not speak about"},
    )
    val_steps: int = field(
        default=10,
        metadata={"help": "GRPO evaluates on the validation split (TRL's eval_strategy='steps') this often and keeps "
                          "the best checkpoint (load_best_model_at_end on eval_reward); 0: keep the last step's "
                          "policy. The last step's had lost up to 12.5 points to the reference on some seeds (its "
                          "reward peaked mid-run, then RL learned to cancel where it must refuse): docs/study.md"},
    )
    mid_fraction: float = field(
        default=1 / 3,
        metadata={"help": "the mid-training regime: the GRPO policy at this fraction of the steps is saved "
                          "(DIR/policy_mid), and its own critic (it against the reference) grades and steers it; 0 "
                          "skips the regime"},
    )
    num_generations: int = field(default=8, metadata={"help": "episodes per prompt (GRPO group)"})
    prompts_per_step: int = field(default=4, metadata={"help": "distinct tasks per GRPO step"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (training and sampled eval)"})
    max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "tokens per assistant turn before it is cut off (default 24; 32 in the free-form world, "
                          "whose longest reply is 26 tokens)"},
    )
    logging_steps: int = field(default=10, metadata={"help": "GRPO logging interval"})
    # the callback and the evaluation (progadv demo)
    heldout_per_task: int = field(default=4, metadata={"help": "labelled reference rollouts per held-out task"})
    heldout_eval_steps: int = field(default=20, metadata={"help": "the callback scores the held-out set this often"})
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples for the 95% intervals"})
    variants: bool = field(
        default=False,
        metadata={"help": "stage 6 also scores the progress-advantage variants (support statistics, centred, clipped, "
                          "in-support) and the merged references (linear / TIES / DARE at alpha 0.25, 0.5, 0.75), and "
                          "chooses one by 5-fold CV: the study's full table. About a minute more on 2 CPU cores; "
                          "evaluation only (stages 1-5 are the same either way)"},
    )
    steer_tasks: int = field(
        default=48,
        metadata={"help": "step-level selection (the critic in the agent loop, demo/steering.py): the first N tasks of "
                          "the eval split, played by each agent choosing each turn among K = 4 and 8 candidates by every "
                          "method; 0 skips it. About a minute on 2 idle cores at 48; the committed study ran 100 a seed "
                          "(benchmarks/study_steering.yaml)"},
    )
    # reward models trained for the job (demo/reward_models.py): the comparison the critic's "no training" claim needs
    reward_models: bool = field(
        default=False,
        metadata={"help": "after GRPO, train an outcome (ORM) and a process reward model (PRM, Math-Shepherd labels) of "
                          "the reference's size on train-split rollouts of both models, and evaluate and steer with them "
                          "as baselines `orm` and `prm` (docs/reward_models.md). About 2 CPU minutes more on 2 cores at "
                          "the defaults, evaluation included; `progadv study` turns it on"},
    )
    rm_rollouts: int = field(
        default=256,
        metadata={"help": "labelled rollouts per model (reference, policy) on the first N train tasks: the ORM's data. "
                          "Sampling them is the smallest part of the cost (~5 CPU s for both models at 256)"},
    )
    rm_prm_rollouts: int = field(
        default=128,
        metadata={"help": "of those, per model, the rollouts the PRM is labelled on: each turn before the first mistake "
                          "costs rm_continuations episodes played to the end (~20 CPU s at 128)"},
    )
    rm_continuations: int = field(default=4, metadata={"help": "continuations per turn for a PRM label (Math-Shepherd's k)"})
    rm_epochs: float = field(
        default=8.0,
        metadata={"help": "passes over each reward model's examples. On seed 3 the PRM's AUROC (min over steps, test "
                          "rollouts) rose from 0.71 / 0.50 (reference / policy rollouts) at 4 epochs to 0.90 / 0.84 at 8; "
                          "the ORM's was 0.95 / 0.99 at 3. About 55 CPU s (ORM) and 30 s (PRM) of training at 8"},
    )
    rm_lr: float = field(default=5e-4, metadata={"help": "reward-model learning rate (warm-up, then linear decay)"})
    rm_batch_size: int = field(default=16, metadata={"help": "rollouts per reward-model step"})
    progress: bool = field(default=False, metadata={"help": "progress bars for SFT and GRPO (the trainers' tqdm)"})

    @classmethod
    def fast(cls, **kw) -> "DemoConfig":
        """Seconds, not minutes: for tests. The models learn little; the plumbing is all exercised."""
        base = dict(n_train_tasks=24, n_heldout_tasks=4, n_test_tasks=4, n_eval_tasks=8, n_per_task=2, n_demos=64,
                    n_val_tasks=4, val_steps=1,
                    pretrain_steps=2, pretrain_batch_size=8,
                    hidden_size=32, num_layers=1, intermediate_size=64, sft_epochs=1.0, grpo_steps=2,
                    num_generations=4, prompts_per_step=2, logging_steps=1, heldout_per_task=2, heldout_eval_steps=1,
                    n_boot=50, steer_tasks=3, rm_rollouts=8, rm_prm_rollouts=4, rm_continuations=2, rm_epochs=1.0,
                    rm_batch_size=8)
        base.update(kw)
        return cls(**base)

    def __post_init__(self):
        if self.max_new_tokens is None:
            self.max_new_tokens = 32 if self.free_form else 24

    @property
    def world(self) -> WorldConfig:
        return WorldConfig(free_form=self.free_form)

    @property
    def train_world(self) -> WorldConfig:
        """The world of the GRPO rollouts: `world`, with `grpo_p_timeout` if set."""
        if self.grpo_p_timeout is None:
            return self.world
        return replace(self.world, p_timeout=self.grpo_p_timeout)

    @property
    def mix(self) -> DemoMix:
        return DemoMix(self.p_refuse_24h_only, self.p_give_up_after_timeout, self.p_noise, self.p_give_up_after_retry)

    def path(self, name: str) -> Path:
        return Path(self.out_dir) / name

    def tasks(self, split: str) -> list[Task]:
        """Disjoint task splits: eval (success rates), test (records), heldout (callback), train (GRPO prompts), demo
        (one fresh customer per demonstration: many distinct ids teach copying, not memorising), val (GRPO's checkpoint
        choice; last, so adding it moved no other split)."""
        order = ["eval", "test", "heldout", "train", "demo", "val"]
        sizes = [self.n_eval_tasks, self.n_test_tasks, self.n_heldout_tasks, self.n_train_tasks, self.n_demos,
                 self.n_val_tasks]
        k = order.index(split)
        return make_tasks(sizes[k], self.seed, skip=sum(sizes[:k]), config=self.world)


def _setup(cfg: DemoConfig) -> None:
    torch.set_num_threads(cfg.num_threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


# ----------------------------------------------------------------------------------------------------------------
# 1. Tokenizer and base model


def demonstrations(cfg: DemoConfig) -> list[Episode]:
    """Flawed demonstration episodes, one per task of the "demo" split."""
    agent = demo_agent(cfg.mix)
    return [run_episode(t, agent, seed=episode_seed(cfg.seed, "demo", i), config=cfg.world)
            for i, t in enumerate(cfg.tasks("demo"))]


def build_tokenizer(out_dir, cfg: DemoConfig):
    """Qwen2Tokenizer (digits one per token) with TRL's Qwen2.5 chat template, trained on rendered demo conversations."""
    from . import tiny

    out_dir = Path(out_dir)
    # Render the corpus with a throwaway tokenizer: only its chat template is used.
    scratch = tiny.build_tokenizer(out_dir / "_scratch", vocab_size=300)
    tasks = cfg.tasks("train")
    corpus = [scratch.apply_chat_template(run_episode(tasks[i % len(tasks)], agent, seed=i, config=cfg.world).messages,
                                          tokenize=False)
              for i, agent in enumerate([correct_agent, demo_agent(cfg.mix)] * 200)]
    corpus += [t.user_text for t in make_tasks(600, cfg.seed + 1, config=cfg.world)]  # user phrasings around many ids
    import shutil

    shutil.rmtree(out_dir / "_scratch", ignore_errors=True)
    tok = tiny.build_tokenizer(out_dir, corpus=corpus, vocab_size=cfg.vocab_size, extra_special_tokens=EXTRA_SPECIALS)
    tok.add_tokens(ADDED_TOKENS)
    tok.save_pretrained(out_dir)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out_dir)


def describe_lookup(insured: bool, within_24h: bool) -> str:
    """A plain restatement of a lookup's facts, booking time first. Pretraining text only: no demonstration or
    rollout writes it, so it teaches the base model to read a lookup result, not what to do about it."""
    return f"{'Recent' if within_24h else 'Older'} booking, {'insured' if insured else 'not insured'}."


def pretraining_snippet(rng: random.Random, tokenizer, p_read: float = 0.0, world: WorldConfig | None = None) -> list[int]:
    """One short stretch of domain text. Mostly an id copied: the customer's opening (or a tool result echoing the
    id) and the assistant's next tool call with that id, written by the chat template. With probability `p_read`,
    reading instead: a lookup result and a reply restating its facts (`describe_lookup`)."""
    rid = f"{ID_PREFIX}{rng.randrange(10 ** (ID_DIGITS - 1), 10**ID_DIGITS)}"
    if rng.random() < p_read:
        ins, rec = rng.random() < 0.5, rng.random() < 0.5
        ctx = {"role": "tool", "content": json.dumps({"insured": ins, "within_24h": rec, "id": rid})}
        reply = {"role": "assistant", "content": describe_lookup(ins, rec)}
    else:
        if rng.random() < 0.5:
            ctx = {"role": "user", "content": user_opening(rng, rid, world)[0]}
        else:
            out = rng.choice([{"error": "timeout"}, {"insured": rng.random() < 0.5, "within_24h": rng.random() < 0.5},
                              {"status": "cancelled"}, {"status": "refunded"}])
            ctx = {"role": "tool", "content": json.dumps({**out, "id": rid})}
        reply = tool_call_message(rng.choice(TOOLS), rid)
    msgs = [{"role": "system", "content": SYSTEM_PROMPT}, ctx, reply]
    text = render(tokenizer, msgs).rstrip("\n")
    return encode(tokenizer, text[text.index("<|im_start|>user"):])


def pretrain_base(model, tokenizer, cfg: DemoConfig) -> list[float]:
    """Next-token pretraining on `pretraining_snippet`s (a plain loop: ~30 s). Returns the loss every 50 steps."""
    rng = random.Random(f"progadv-demo-pretrain-{cfg.seed}")
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    pad, losses = tokenizer.pad_token_id, []
    model.train()
    for step in range(1, cfg.pretrain_steps + 1):
        xs = [pretraining_snippet(rng, tokenizer, cfg.pretrain_read, cfg.world) for _ in range(cfg.pretrain_batch_size)]
        L = max(map(len, xs))
        ids = torch.full((len(xs), L), pad)
        labels = torch.full((len(xs), L), -100)
        attn = torch.zeros((len(xs), L), dtype=torch.long)
        for i, x in enumerate(xs):
            ids[i, : len(x)] = labels[i, : len(x)] = torch.tensor(x)
            attn[i, : len(x)] = 1
        for g in opt.param_groups:
            g["lr"] = cfg.pretrain_lr * min(1.0, step / 20)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % 50 == 0:
            losses.append(round(loss.item(), 4))
    model.eval()
    return losses


def build_assets(out_dir, seed: int = 0, cfg: DemoConfig | None = None) -> dict:
    """Tokenizer + tiny Qwen2 model (random init, then `pretrain_base`) saved under out_dir/base.
    Returns {"tokenizer", "base", "pretrain_losses"}."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = replace(cfg or DemoConfig(), out_dir=str(out_dir), seed=seed)
    _setup(cfg)
    base = cfg.path("base")
    tok = build_tokenizer(base, cfg)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=max(1, cfg.num_heads // 2),
        intermediate_size=cfg.intermediate_size, max_position_embeddings=1024, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTN)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    losses = pretrain_base(model, tok, cfg)
    model.save_pretrained(base)
    _write_json(base / "demo_log.json", {"pretrain_losses": losses})
    return {"tokenizer": tok, "base": str(base), "pretrain_losses": losses}


# ----------------------------------------------------------------------------------------------------------------
# 2. Reference: SFT on flawed demonstrations


def sft_dataset(tokenizer, episodes: list[Episode]):
    """Pre-tokenized {"input_ids", "assistant_masks"}: loss on the agent's own turns only, tokenized exactly as the
    rollouts tokenize them (one piece per turn), so SFT and GRPO see the same token sequences."""
    import datasets

    rows = []
    for ep in episodes:
        p, c, m = episode_tokens(tokenizer, ep.messages)
        rows.append({"input_ids": p + c, "assistant_masks": [0] * len(p) + m})
    return datasets.Dataset.from_list(rows)


def train_reference(cfg: DemoConfig, callbacks=()) -> str:
    """SFT the base model on the flawed demonstrations with TRL's SFTTrainer; saves and returns out_dir/reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    _setup(cfg)
    base, out = cfg.path("base"), cfg.path("reference")
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation=ATTN)
    ds = sft_dataset(tok, demonstrations(cfg))
    steps = math.ceil(cfg.sft_epochs * math.ceil(len(ds) / cfg.sft_batch_size))
    schedule = dict(lr_scheduler_type="constant_with_warmup")
    if cfg.sft_decay > 0:  # warmup, constant, then a cosine decay to 0 over the last sft_decay of the steps
        schedule = dict(lr_scheduler_type="warmup_stable_decay",
                        lr_scheduler_kwargs={"num_decay_steps": max(1, round(cfg.sft_decay * steps))})
    args = SFTConfig(
        output_dir=str(cfg.path("sft_run")), num_train_epochs=cfg.sft_epochs, learning_rate=cfg.sft_lr,
        per_device_train_batch_size=cfg.sft_batch_size, **schedule, warmup_steps=0.05,
        weight_decay=0.0, logging_steps=max(1, cfg.logging_steps * 2), save_strategy="no", report_to="none",
        use_cpu=True, bf16=False, seed=cfg.seed, data_seed=cfg.seed, max_length=None, gradient_checkpointing=False,
        dataset_num_proc=None, disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=list(callbacks))
    quiet_console(trainer, cfg.path("logs") / "sft.jsonl", "SFT", cfg.progress)
    trainer.train()
    trainer.save_model(str(out))
    tok.save_pretrained(out)
    _write_json(out / "demo_log.json", trainer.state.log_history)
    return str(out)


# ----------------------------------------------------------------------------------------------------------------
# 3. Policy: GRPO through rollout_func


def grpo_dataset(tasks: list[Task]):
    import datasets

    return datasets.Dataset.from_list([{"prompt": t.prompt(), "task_id": t.id} for t in tasks])


def grpo_config(cfg: DemoConfig, **overrides):
    from trl import GRPOConfig

    kw = dict(
        output_dir=str(cfg.path("grpo_run")), max_steps=cfg.grpo_steps, learning_rate=cfg.grpo_lr, beta=cfg.beta,
        num_generations=cfg.num_generations, per_device_train_batch_size=cfg.num_generations * cfg.prompts_per_step,
        gradient_accumulation_steps=1, temperature=cfg.temperature, max_completion_length=cfg.max_new_tokens * 8,
        lr_scheduler_type="constant_with_warmup", warmup_steps=0.1, logging_steps=cfg.logging_steps, save_strategy="no",
        report_to="none", use_cpu=True, bf16=False, seed=cfg.seed, data_seed=cfg.seed, gradient_checkpointing=False,
        disable_tqdm=True, log_completions=False, model_init_kwargs={"attn_implementation": ATTN},
    )
    if cfg.val_steps:
        # TRL's own evaluation and best-checkpoint machinery: greedy episodes on the validation split (rollout_func
        # plays greedily when the model is in eval mode), one per task; the checkpoint with the best eval_reward is
        # loaded at the end (transformers keeps the first of equal ones). Checkpoints hold the weights only; two are
        # kept, the best and the last, so the last step's policy stays to compare (benchmarks/demo_learning.py).
        kw.update(eval_strategy="steps", eval_steps=cfg.val_steps, save_strategy="steps", save_steps=cfg.val_steps,
                  save_only_model=True, save_total_limit=2, load_best_model_at_end=True,
                  metric_for_best_model="reward", greater_is_better=True, num_generations_eval=1,
                  per_device_eval_batch_size=cfg.n_val_tasks)  # fmt: skip
    kw.update(overrides)
    return GRPOConfig(**kw)


def mid_step(cfg: DemoConfig) -> int:
    """The GRPO step whose policy is the mid-training regime's (0: none)."""
    return max(1, round(cfg.grpo_steps * cfg.mid_fraction)) if cfg.mid_fraction > 0 else 0


def train_policy(cfg: DemoConfig, callbacks=(), model_path: str | None = None, save: bool = True, **overrides):
    """GRPO (beta > 0) from the reference through `rollout_func`; TRL reloads the reference from the same path.

    `callbacks`: TrainerCallback instances, or callables `f(trainer) -> callback` (a callback class whose constructor
    takes the trainer, like ProgressAdvantageCallback, or a lambda), built once the trainer exists.
    `overrides`: GRPOConfig fields. Returns (trainer, path of the saved policy)."""
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    _setup(cfg)
    model_path = str(model_path or cfg.path("reference"))
    tok = AutoTokenizer.from_pretrained(model_path)
    tasks = cfg.tasks("train")
    args = grpo_config(cfg, **overrides)
    val = cfg.tasks("val") if args.eval_strategy != "no" else []
    trainer = GRPOTrainer(
        model=model_path,
        reward_funcs=success_reward,
        args=args,
        train_dataset=grpo_dataset(tasks),
        eval_dataset=grpo_dataset(val) if val else None,
        processing_class=tok,
        rollout_func=make_rollout_func(tasks, seed=cfg.seed, world=cfg.train_world, max_new_tokens=cfg.max_new_tokens,
                                       eval_tasks=val, eval_world=cfg.world),  # fmt: skip
    )
    quiet_console(trainer, cfg.path("logs") / "grpo.jsonl", "GRPO", cfg.progress)
    if mid_step(cfg) and save:
        trainer.add_callback(SaveAtStep(trainer, mid_step(cfg), cfg.path("policy_mid")))
    for cb in callbacks:
        trainer.add_callback(cb if isinstance(cb, TrainerCallback) else cb(trainer))
    trainer.train()
    out = cfg.path("policy")
    if save:
        trainer.save_model(str(out))
        tok.save_pretrained(out)
        _write_json(out / "demo_log.json", trainer.state.log_history)
    return trainer, str(out)


class LogFile(TrainerCallback):
    """The trainer's console output, made readable: its log dicts (2,000+ characters each with the callback's figures)
    go to a JSONL file and the trackers, not the console; a tqdm bar on stderr over the steps (`progress`) shows the
    last loss or reward. Replaces transformers' PrinterCallback / ProgressCallback (`quiet_console`)."""

    def __init__(self, path, desc: str, progress: bool = True):
        self.path, self.desc, self.progress, self.bar = Path(path), desc, progress, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        if self.progress and state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, desc=self.desc, unit="step", leave=False, dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": state.global_step, **logs}, default=str) + "\n")
        if self.bar is not None:
            shown = {k: logs[k] for k in ("loss", "reward", "eval_reward") if isinstance(logs.get(k), (int, float))}
            if shown:
                self.bar.set_postfix({k: round(v, 3) for k, v in shown.items()}, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def quiet_console(trainer, path, desc: str, progress: bool) -> None:
    """Route a trainer's log dicts to `path` (JSONL) instead of the console, with a step bar when `progress`."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LogFile(path, desc, progress))


class SaveAtStep(TrainerCallback):
    """Saves the model being trained (and its tokenizer) when training reaches `step`: the mid-training checkpoint.
    Takes the trainer in its constructor, as TRL's callbacks do (a callback is handed no trainer)."""

    def __init__(self, trainer, step: int, path):
        self.trainer, self.step, self.path = trainer, step, str(path)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.trainer.save_model(self.path)
            self.trainer.processing_class.save_pretrained(self.path)


# ----------------------------------------------------------------------------------------------------------------
# 4. Rollouts and success rates


def sample_rollouts(model, tokenizer, tasks: list[Task], n_per_task: int = 8, temperature: float = 1.0, seed: int = 0,
                    *, greedy: bool = False, world: WorldConfig | None = None, max_new_tokens: int = 24,
                    tag: str = "rollout", tools: list[dict] | None = None) -> list[dict]:
    """Labelled trajectory records, `n_per_task` episodes per task (ids `{tag}-{task id}-{k}`, group = task id).

    Episode k of a task gets the same world seed whatever the model (common random numbers: a policy and its
    reference face the same timeouts and hang-ups), so success rates of two models compare pairwise."""
    eps = [Episode(t, episode_seed(seed, "world", t.id, k), world) for t in tasks for k in range(n_per_task)]
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(episode_seed(seed, "sample", tag))
    tes = play(model, tokenizer, eps, temperature=temperature, greedy=greedy, max_new_tokens=max_new_tokens,
               generator=gen, tools=tools)
    return [
        te.record(id=f"{tag}-{te.episode.task.id}-{i % n_per_task}", source=tag, sample=i % n_per_task,
                  greedy=greedy, temperature=None if greedy else temperature)
        for i, te in enumerate(tes)
    ]


def success_rate(model, tokenizer, tasks: list[Task], greedy: bool = True, *, n_per_task: int = 1, seed: int = 0,
                 temperature: float = 1.0, max_new_tokens: int = 24, world: WorldConfig | None = None) -> float:
    """Fraction of successful episodes (greedy decoding by default) over `n_per_task` episodes per task."""
    recs = sample_rollouts(model, tokenizer, tasks, n_per_task, temperature, seed, greedy=greedy, world=world,
                           max_new_tokens=max_new_tokens, tag="eval")
    return sum(r["success"] for r in recs) / len(recs)


def summarize(records: list[dict]) -> dict:
    """Success rate and failure kinds of a set of records."""
    n = len(records)
    kinds = {k: sum(r["metadata"]["failure_kind"] == k for r in records) for k in ("decision", "luck")}
    return {"n": n, "success": sum(r["success"] for r in records) / max(n, 1), **{f"{k}_failures": v for k, v in kinds.items()},
            "canonical": sum(r["metadata"].get("canonical", True) for r in records) / max(n, 1)}


# ----------------------------------------------------------------------------------------------------------------
# Loading and evaluating (what recipes/toy_*.py and `progadv demo` build on)


# The demo's models by name -> their directory under out_dir ("mid": the mid-training checkpoint, DemoConfig.mid_fraction).
MODEL_DIRS = {"reference": "reference", "mid": "policy_mid", "policy": "policy"}


def model_names(cfg: DemoConfig) -> tuple[str, ...]:
    """The models a run has: reference, mid (when its checkpoint was saved) and policy."""
    return tuple(n for n in MODEL_DIRS if n != "mid" or (cfg.path(MODEL_DIRS["mid"]) / "config.json").exists())


def load_models(cfg: DemoConfig, names=("reference", "policy")):
    """(tokenizer, {name: model in eval mode}) from out_dir (names: keys of MODEL_DIRS)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _setup(cfg)
    path = lambda n: cfg.path(MODEL_DIRS.get(n, n))  # noqa: E731
    tok = AutoTokenizer.from_pretrained(path(names[0]))
    return tok, {n: AutoModelForCausalLM.from_pretrained(path(n), attn_implementation=ATTN).eval() for n in names}


def heldout_records(cfg: DemoConfig, model=None, tokenizer=None, n_per_task: int | None = None) -> list[dict]:
    """Labelled rollouts of the reference on the held-out split: a fixed set for a training callback to score."""
    if model is None:
        tokenizer, models = load_models(cfg, ("reference",))
        model = models["reference"]
    return sample_rollouts(model, tokenizer, cfg.tasks("heldout"), n_per_task or cfg.heldout_per_task, cfg.temperature, seed=cfg.seed,
                           world=cfg.world, max_new_tokens=cfg.max_new_tokens, tag="heldout-reference")


def evaluate(cfg: DemoConfig, write_rollouts: bool = True) -> dict:
    """Success rates of each model (reference, mid when saved, policy) on the eval split (greedy: 1 episode a task;
    sampled: 2 a task), and the fresh test rollouts (n_per_task a task, each model) written to
    out_dir/rollouts_{name}.jsonl."""
    tok, models = load_models(cfg, model_names(cfg))
    t0 = time.time()
    ev = cfg.tasks("eval")
    success = {}
    for name, m in models.items():
        kw = dict(seed=cfg.seed, world=cfg.world, max_new_tokens=cfg.max_new_tokens)
        success[name] = {
            "greedy": summarize(sample_rollouts(m, tok, ev, 1, greedy=True, tag=f"eval-greedy-{name}", **kw)),
            "sampled": summarize(sample_rollouts(m, tok, ev, 2, cfg.temperature, tag=f"eval-sampled-{name}", **kw)),
        }
    eval_s = time.time() - t0
    t0 = time.time()
    rollouts = {}
    if write_rollouts:
        test = cfg.tasks("test")
        for name, m in models.items():
            recs = sample_rollouts(m, tok, test, cfg.n_per_task, cfg.temperature, seed=cfg.seed, world=cfg.world,
                                   max_new_tokens=cfg.max_new_tokens, tag=f"test-{name}")
            path = cfg.path(f"rollouts_{name}.jsonl")
            write_jsonl(path, recs)
            rollouts[name] = {"path": str(path), **summarize(recs)}
    return {
        **{f"{name}_success": success[name]["greedy"]["success"] for name in models},
        "success": success,
        "n_eval_episodes": {"greedy": len(ev), "sampled": 2 * len(ev)},
        "rollouts": rollouts,
        "timings": {"eval_s": eval_s, "sampling_s": time.time() - t0},
    }


def _write_json(path, obj) -> None:
    write_json(path, obj, default=str)


