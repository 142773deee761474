"""Tiny local tokenizers and models: the demo builds its model here, and so do the tests, the benchmarks and the
smoke-tested recipes (the demo owns it: it is the one that ships to users).

Nothing is downloaded: a byte-level BPE is trained with `tokenizers` on a small corpus, wrapped with TRL's own
Qwen2.5 chat template (the one with tool calls), saved with `save_pretrained` and reloaded through `AutoTokenizer`
so callers get the class a real user gets (`Qwen2Tokenizer`, whose pre-tokenizer splits digits one per token).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]


def chat_template(name: str = "qwen2_5") -> str:
    """One of TRL's bundled chat templates (trl/chat_templates/NAME.jinja)."""
    import trl

    path = Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja"
    return path.read_text()


def default_corpus() -> list[str]:
    words = (
        "the a an to of and is are was you your i we it this that for with on in at by from please thanks hello "
        "reservation booking flight refund cancel cancelled insured insurance policy order status check weather "
        "city user assistant tool system answer result error not found done ok yes no name id number date time "
        "get_weather lookup search calculator sum add get_reservation cancel_reservation issue_refund transfer "
        "function arguments type object properties required string integer description parameters tools"
    ).split()
    lines = []
    for i in range(400):
        w = [words[(i * 7 + j * 13) % len(words)] for j in range(12)]
        lines.append(" ".join(w) + f" {i} {i * 37 % 1000}.")
        lines.append('{"name": "%s", "arguments": {"city": "%s", "n": %d}}' % (w[0], w[1], i))
    lines.append("0123456789 !?.,:;'\"()[]{}<>/\\|-_+=*&^%$#@~`\n\t")
    return lines


def build_tokenizer(
    out_dir: str | os.PathLike,
    corpus: list[str] | None = None,
    vocab_size: int = 400,
    template: str = "qwen2_5",
    extra_special_tokens: list[str] | None = None,
):
    """Train a byte-level BPE with Qwen2's pre-tokenizer, save it as a qwen2 tokenizer, reload with AutoTokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    out_dir = Path(out_dir)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = QWEN_SPECIALS + list(extra_special_tokens or [])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or default_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    fast.chat_template = chat_template(template)
    fast.save_pretrained(out_dir)
    # Make the directory look like a real Qwen2 checkpoint's tokenizer, so AutoTokenizer picks Qwen2Tokenizer.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return AutoTokenizer.from_pretrained(out_dir)


def build_model(
    tokenizer,
    out_dir: str | os.PathLike | None = None,
    arch: str = "qwen2",
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 64,
    max_position_embeddings: int = 2048,
    seed: int = 0,
):
    """A randomly initialised tiny causal LM (Qwen2 or Llama config) sized to the tokenizer; saved and reloaded."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    config = cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init is nearly uniform; widen the output layer so the tiny model has opinions to score.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    if out_dir is None:
        return model
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return AutoModelForCausalLM.from_pretrained(out_dir)


def perturbed_copy(model, out_dir: str | os.PathLike | None = None, scale: float = 0.3, seed: int = 1):
    """A 'fine-tuned' policy for tests: the same architecture with noise added to every weight."""
    import copy

    g = torch.Generator().manual_seed(seed)
    new = copy.deepcopy(model)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.std() if p.numel() > 1 else 1.0))
    if out_dir is not None:
        new.save_pretrained(out_dir)
    return new


# ----------------------------------------------------------------------------------------------------------------
# A tool-calling trajectory in the core format (tests and benchmarks/run.py build their corpora from it)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def make_trajectory(i: int, n_turns: int = 2, success=True, failure_step=None, group=None) -> dict:
    """A multi-turn tool-calling trajectory in the core format."""
    msgs = [{"role": "system", "content": "You are a helpful agent."}, {"role": "user", "content": f"Weather in city {i}?"}]
    for t in range(n_turns):
        msgs.append(
            {
                "role": "assistant",
                "content": f"Let me check {t}." if t % 2 else "",
                "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": f"c{i}{t}"}}}],
            }
        )
        msgs.append({"role": "tool", "content": f"sunny {i + t}"})
    msgs.append({"role": "assistant", "content": f"It is sunny in city {i}."})
    rec = {"id": f"t{i}", "messages": msgs, "tools": [WEATHER_TOOL], "success": success}
    if failure_step is not None:
        rec["failure_step"] = failure_step
    if group is not None:
        rec["group"] = group
    return rec


# ----------------------------------------------------------------------------------------------------------------
# A few GRPO steps on a tiny random model (the callback tests and benchmarks/run.py)


def prompts(n: int, offset: int = 0):
    """A prompt dataset for GRPO on a tiny random model."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"Weather in city {i}?"}]} for i in range(offset, offset + n)])


def parity_reward(completions, **kwargs):
    """A reward both outcomes get on a random tiny model: success = odd completion length."""
    return [float(len(c[0]["content"]) % 2) for c in completions]


def grpo_args(out_dir, **overrides):
    """A GRPOConfig that runs in seconds on a CPU (beta > 0: a reference to read)."""
    from trl import GRPOConfig

    kw = dict(
        output_dir=str(out_dir),
        use_cpu=True,
        bf16=False,
        beta=0.04,
        learning_rate=1e-2,  # large, so the policy moves away from the reference within two steps
        gradient_checkpointing=False,
        num_generations=4,
        max_completion_length=10,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=4,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    kw.update(overrides)
    return GRPOConfig(**kw)
