"""Turning episodes into tokens and back: the model-driven, batched episode runner and TRL's `rollout_func`.

Token layout of one episode (what GRPO trains on and what the scorer re-renders):

    prompt_ids      = template(system, user, add_generation_prompt=True)        -> ends "<|im_start|>assistant\\n"
    completion_ids  = action_0 + env_0 + action_1 + env_1 + ...                  (env_mask 1 on actions, 0 on env)
        action_k    = the tokens the model generated for turn k, through its "<|im_end|>"
        env_k       = "\\n" + what the template writes for the tool result / customer reply + "<|im_start|>assistant\\n"

Every boundary sits next to a special token ("<|im_end|>", "<tool_call>") or a newline, which the Qwen2
pre-tokenizer never merges across, so tokenizing the pieces equals tokenizing the whole rendered conversation as long
as the model wrote each turn the way the template renders it (`canonical` in the record's metadata says whether it
did). That is what lets the lead's scorer, which renders the record with `apply_chat_template(messages)` and tokenizes
once, score exactly the tokens the model generated.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field

import torch

from .world import Episode, Task, WorldConfig, episode_seed

# Decoding batches up to this many rows run on one intra-op thread. One token a step over a small batch is little
# work to share: on 2 CPU cores a GRPO step's 32 episodes cost 0.55-0.8x the CPU seconds on one thread, at the same
# to 1.2x the wall time (the second thread mostly spins between the ops); at 200 rows two threads were 1.3x faster
# (benchmarks/demo_cpu.py, "decode_threads"; benchmarks/results/demo_cpu.json).
ONE_THREAD_ROWS = 64

_CALL_RE = re.compile(r"^(?:(.*)\n)?<tool_call>\n(.*)\n</tool_call>$", re.DOTALL)


def render(tokenizer, messages, add_generation_prompt=False, tools=None) -> str:
    # The tiny demo passes no `tools`: its system prompt names them and the records carry no schema. A real instruct
    # model (recipes/grpo_lora_qwen.py) gets the schema block (world.TOOL_SCHEMAS) and its records carry `tools`.
    return tokenizer.apply_chat_template(
        messages, tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


EOT = "<|im_end|>"  # ChatML's end of turn: the Qwen2/2.5 family, TRL's qwen2_5 template


def end_of_turn(tokenizer) -> int:
    eot = tokenizer.convert_tokens_to_ids(EOT)
    if eot is None or eot == tokenizer.unk_token_id:
        raise ValueError(f"the demo world needs a ChatML chat template (turns end with {EOT}, e.g. Qwen2.5)")
    return eot


def parse_turn(text: str) -> dict:
    """Decoded assistant turn (without "<|im_end|>") -> assistant message. Unreadable tool calls stay as content."""
    m = _CALL_RE.match(text)
    if m:
        try:
            call = json.loads(m.group(2))
            # An empty name is no tool call (and no valid record): it stays as the text the model wrote.
            if isinstance(call, dict) and isinstance(call.get("name"), str) and call["name"] and isinstance(call.get("arguments"), dict):
                fn = {"name": call["name"], "arguments": call["arguments"]}
                return {"role": "assistant", "content": m.group(1) or "", "tool_calls": [{"type": "function", "function": fn}]}
        except json.JSONDecodeError:
            pass
    return {"role": "assistant", "content": text}


def env_text(tokenizer, upto_assistant: list[dict], after: list[dict], done: bool, tools=None) -> str:
    """What the template writes between the end of an assistant turn ("<|im_end|>") and the next turn's start."""
    a = render(tokenizer, upto_assistant, tools=tools)
    return env_segment(a, render(tokenizer, after, add_generation_prompt=not done, tools=tools), done)


def env_segment(a: str, b: str, done: bool) -> str:
    """`env_text` from the two renderings: `a` through the assistant turn, `b` through what follows it (with the
    generation prompt unless `done`). Callers that already hold them skip two template renders."""
    if not a.endswith(EOT + "\n") or not b.startswith(a):
        raise ValueError("the chat template is not prefix-stable for this conversation; use TRL's qwen2_5 template")
    seg = "\n" + b[len(a):]
    return seg.rstrip("\n") if done else seg


def episode_tokens(tokenizer, messages: list[dict], tools=None) -> tuple[list[int], list[int], list[int]]:
    """A finished conversation -> (prompt_ids, completion_ids, env_mask), each assistant turn tokenized canonically.
    Used for the SFT demonstrations and to check that a record reproduces the generated tokens."""
    idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    texts: dict[tuple[int, bool], str] = {}

    def text(n: int, gen: bool) -> str:  # each prefix rendered once: a turn's "after" is the next turn's "before"
        if (n, gen) not in texts:
            texts[n, gen] = render(tokenizer, messages[:n], add_generation_prompt=gen, tools=tools)
        return texts[n, gen]

    prompt = encode(tokenizer, text(idx[0], True))
    comp, mask = [], []
    for k, mi in enumerate(idx):
        before = text(mi, True)
        upto = text(mi + 1, False)
        act = encode(tokenizer, upto[len(before):].rstrip("\n"))
        comp += act
        mask += [1] * len(act)
        nxt = idx[k + 1] if k + 1 < len(idx) else len(messages)
        if nxt > mi + 1 or k + 1 < len(idx):
            done = k + 1 == len(idx)
            env = encode(tokenizer, env_segment(upto, text(nxt, not done), done))
            comp += env
            mask += [0] * len(env)
    return prompt, comp, mask


@dataclass
class TokenEpisode:
    episode: Episode
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    env_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    canonical: list[bool] = field(default_factory=list)  # per turn: generated text == the template's rendering
    tools: list[dict] | None = None
    # the template's rendering of the conversation so far with the generation prompt (what the next turn continues):
    # kept so each turn renders the template twice, not four times
    text: str | None = field(default=None, repr=False)

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    def record(self, id: str | None = None, **metadata) -> dict:
        """The core trajectory record; metadata["canonical"] is True when re-rendering it gives exactly the tokens
        the model generated (every turn ended with its end-of-turn token and was written as the template writes it)."""
        rec = self.episode.record(id, canonical=all(self.canonical), **metadata)
        if self.tools:
            rec["tools"] = self.tools
        return rec


def _left_pad(rows: list[list[int]], pad_id: int, starts: list[int] | None = None):
    """(ids, attention mask, position ids) of token lists left-padded to the longest; row i's positions continue
    from starts[i] (0: a fresh context)."""
    B, L = len(rows), max(len(r) for r in rows)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    pos = torch.zeros((B, L), dtype=torch.long)
    for i, r in enumerate(rows):
        s = starts[i] if starts else 0
        ids[i, L - len(r):] = torch.tensor(r, dtype=torch.long)
        attn[i, L - len(r):] = 1
        pos[i, L - len(r):] = torch.arange(s, s + len(r))
    return ids, attn, pos


def _sample(model, logits, past, attn, next_pos, *, eos_id, pad_id, max_new_tokens, temperature, greedy, generator):
    """The decoding loop after a forward that left `past` (the KV cache) and `logits` (each row's next-token logits,
    [B, V]): one token a step over the cache until every row wrote `eos_id` or `max_new_tokens` were written. A
    row's tokens after its eos are pads, masked out of the cache (`play`'s next turn reads it again).

    Returns (token lists including the eos when reached, their log-probs under the sampling distribution, the cache,
    its attention mask, how many tokens were fed into the cache: every sampled token but the last step's)."""
    device = attn.device
    B = attn.shape[0]
    logits = logits.float()
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    toks, lps = [], []
    threads = torch.get_num_threads()
    if device.type == "cpu" and B <= ONE_THREAD_ROWS:
        torch.set_num_threads(1)
    try:
        for t in range(max_new_tokens):
            logp = torch.log_softmax(logits / (1.0 if greedy else temperature), dim=-1)
            if greedy:
                nxt = logp.argmax(-1)
            else:
                nxt = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
            nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
            toks.append(nxt)
            lps.append(logp.gather(-1, nxt[:, None]).squeeze(-1))
            live = ~finished  # rows for which `nxt` is a real token
            finished = finished | (nxt == eos_id)
            if bool(finished.all()) or t + 1 == max_new_tokens:
                break
            attn = torch.cat([attn, live[:, None].long()], dim=1)
            out = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=next_pos, past_key_values=past,
                        use_cache=True)  # fmt: skip
            past = out.past_key_values
            logits = out.logits[:, -1, :].float()
            next_pos = next_pos + 1
    finally:
        torch.set_num_threads(threads)
    fed = len(toks) - 1
    res_t, res_l = [], []
    for seq, lp in zip(torch.stack(toks, 1).tolist(), torch.stack(lps, 1).tolist()):
        if eos_id in seq:
            n = seq.index(eos_id) + 1
            seq, lp = seq[:n], lp[:n]
        res_t.append(seq)
        res_l.append(lp)
    return res_t, res_l, past, attn, fed


@torch.no_grad()
def generate_turns(model, contexts: list[list[int]], *, eos_id: int, pad_id: int, max_new_tokens: int,
                   temperature: float = 1.0, greedy: bool = False, generator: torch.Generator | None = None,
                   repeat: int = 1):
    """One assistant turn for each context (`repeat` turns each, rows in context order): left-padded batch, KV
    cache, stop at `eos_id`. A context is run once however many turns it gets; its cache is then copied per turn.

    Returns (token lists including the eos when reached, per-token log-probs under the sampling distribution). Samples
    from the full softmax at `temperature` (no top-k/top-p): that is the distribution GRPO's loss assumes."""
    device = next(model.parameters()).device
    ids, attn, pos = (x.to(device) for x in _left_pad(contexts, pad_id))
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
    past, logits, next_pos = out.past_key_values, out.logits[:, -1, :], pos[:, -1:] + 1
    if repeat > 1:
        past.batch_repeat_interleave(repeat)
        logits, attn, next_pos = (x.repeat_interleave(repeat, dim=0) for x in (logits, attn, next_pos))
    toks, lps, *_ = _sample(model, logits, past, attn, next_pos, eos_id=eos_id, pad_id=pad_id,
                            max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy, generator=generator)
    return toks, lps


def play(model, tokenizer, episodes: list[Episode], *, temperature: float = 1.0, greedy: bool = False,
         max_new_tokens: int = 40, generator: torch.Generator | None = None, batch_size: int = 256,
         tools: list[dict] | None = None) -> list[TokenEpisode]:
    """Run episodes to the end with `model` as the agent, all in lockstep (one batched generation per turn).

    Each batch of up to `batch_size` episodes keeps one KV cache for the whole episode: a turn runs only the tokens
    added since the last (the previous turn's last token and the environment's reply), not the conversation again.
    Re-running the whole context every turn cost as much as all the decoding steps together."""
    eos = end_of_turn(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    was_training = model.training
    model.eval()  # no dropout, and gradient checkpointing (which disables the KV cache) stays off
    try:
        tes = []
        for ep in episodes:
            text = render(tokenizer, ep.messages, True, tools)
            tes.append(TokenEpisode(ep, encode(tokenizer, text), tools=tools, text=text))
        for s in range(0, len(tes), batch_size):
            _play_batch(model, tokenizer, tes[s : s + batch_size], eos=eos, pad=pad, temperature=temperature,
                        greedy=greedy, max_new_tokens=max_new_tokens, generator=generator)  # fmt: skip
    finally:
        model.train(was_training)
    return tes


@torch.no_grad()
def _play_batch(model, tokenizer, tes: list[TokenEpisode], *, eos, pad, **sampling) -> None:
    device = next(model.parameters()).device
    rows = [te for te in tes if not te.episode.done]
    cached = [0] * len(rows)  # tokens of each row's episode already in the cache
    past, mask = None, None
    while rows:
        new = [te.ids[c:] for te, c in zip(rows, cached)]
        ids, attn, pos = (x.to(device) for x in _left_pad(new, pad, cached))
        attn = attn if mask is None else torch.cat([mask, attn], dim=1)
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=past, use_cache=True)
        next_pos = torch.tensor([[c + len(x)] for c, x in zip(cached, new)], device=device)
        gens, lps, past, mask, fed = _sample(model, out.logits[:, -1, :], out.past_key_values, attn, next_pos,
                                             eos_id=eos, pad_id=pad, **sampling)
        keep = []
        for r, (te, g, lp) in enumerate(zip(rows, gens, lps)):
            cached[r] += len(new[r]) + min(len(g), fed)
            _advance(tokenizer, te, g, lp, eos)
            if not te.episode.done:
                keep.append(r)
        if len(keep) < len(rows):
            if keep:
                idx = torch.tensor(keep, device=device)
                past.batch_select_indices(idx)
                mask = mask[idx]
            rows, cached = [rows[r] for r in keep], [cached[r] for r in keep]


def decode_turn(tokenizer, gen: list[int], eos: int) -> tuple[dict, bool, str]:
    """A generated turn -> (assistant message, whether it ended with `eos`, its text without the end-of-turn token).
    A turn cut off by max_new_tokens is no action, whatever it says so far: the world counts it a mistake."""
    text = tokenizer.decode(gen, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    ended = bool(gen) and gen[-1] == eos
    if ended:
        text = text[: -len(EOT)]
    return (parse_turn(text) if ended else {"role": "assistant", "content": text}), ended, text


def _advance(tokenizer, te: TokenEpisode, gen: list[int], lp: list[float], eos: int) -> None:
    ep = te.episode
    msg, ended, text = decode_turn(tokenizer, gen, eos)
    before, tools = ep.messages, te.tools
    head = te.text if te.text is not None else render(tokenizer, before, True, tools)
    upto = ep.messages + [{"role": "assistant", **msg}]
    upto_text = render(tokenizer, upto, tools=tools)  # = render(before + [msg]): msg is an assistant message
    canon = upto_text[len(head):]
    te.canonical.append(ended and canon.rstrip("\n") == text + EOT)
    te.completion_ids += gen
    te.env_mask += [1] * len(gen)
    te.logprobs += lp
    ep.step(msg, unfinished=not ended)
    te.text = None
    if len(ep.messages) > len(upto) or not ep.done:
        after = render(tokenizer, ep.messages, add_generation_prompt=not ep.done, tools=tools)
        env = encode(tokenizer, env_segment(upto_text, after, ep.done))
        te.completion_ids += env
        te.env_mask += [0] * len(env)
        te.logprobs += [0.0] * len(env)
        te.text = None if ep.done else after


def make_rollout_func(tasks: list[Task], *, seed: int = 0, world: WorldConfig | None = None, max_new_tokens: int = 40,
                      tools: list[dict] | None = None, eval_tasks: list[Task] = (), eval_world: WorldConfig | None = None):
    """TRL `rollout_func` playing multi-turn episodes of the demo world with the model being trained.

    `prompts` arrive repeated `num_generations` times (GRPO's sampler). The task is found from the prompt's user text;
    each episode's world seed comes from (seed, call number, process, position), so a run is reproducible and a group's
    episodes see different dice. The episode's success is returned as the extra field `success`, which TRL passes to
    reward functions as a keyword argument (see `success_reward`).

    Evaluation (TRL calls the same function with the model in eval mode, as its own `mode` test does): the
    `eval_tasks` in `eval_world`, played greedily, each task's episode with the same dice at every evaluation (so
    checkpoints are compared on one draw of the world), and a call counter of its own, so evaluating leaves the
    training episodes' dice as they were."""
    by_text = {t.user_text: t for t in tasks}
    eval_by_text = {t.user_text: t for t in eval_tasks}
    calls = itertools.count()

    def rollout_func(prompts, trainer):
        training = trainer.model.training
        call = next(calls) if training else None
        rank = trainer.accelerator.process_index
        eps = []
        for i, p in enumerate(prompts):
            text = p[-1]["content"] if isinstance(p, list) else p
            if training and text in by_text:
                eps.append(Episode(by_text[text], episode_seed(seed, "train", call, rank, i), world))
            elif not training and text in eval_by_text:
                task = eval_by_text[text]
                eps.append(Episode(task, episode_seed(seed, "val", task.id), eval_world or world))
            else:
                raise KeyError(f"rollout_func: prompt {text!r} is not one of the demo world's "
                               f"{'training' if training else 'evaluation'} tasks")  # fmt: skip
        model = trainer.accelerator.unwrap_model(trainer.model)
        device = next(model.parameters()).device
        gen = None if not training else torch.Generator(device=device).manual_seed(episode_seed(seed, "sample", call, rank))
        tes = play(model, trainer.processing_class, eps, temperature=trainer.temperature, max_new_tokens=max_new_tokens,
                   generator=gen, tools=tools, greedy=not training)
        return {
            "prompt_ids": [te.prompt_ids for te in tes],
            "completion_ids": [te.completion_ids for te in tes],
            "logprobs": [te.logprobs for te in tes],
            "env_mask": [te.env_mask for te in tes],
            "success": [float(te.episode.success) for te in tes],
            "failure_kind": [te.episode.failure_kind or "none" for te in tes],
        }

    return rollout_func


def success_reward(completions, success=None, **kwargs) -> list[float]:
    """GRPO reward: 1 if the episode succeeded (from `rollout_func`'s extra field `success`), else 0."""
    if success is None:
        raise ValueError("success_reward needs the `success` field that make_rollout_func returns")
    return [float(s) for s in success]
