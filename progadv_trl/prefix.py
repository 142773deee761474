"""Shared prompts computed once: the rollouts of a group (GRPO groups, best-of-N candidates, retries of a task) read
the same system prompt, tool schemas and task. Each model runs once over that prefix with a KV cache; the
continuations then run in batches on top of a copy of the cache.

Grouping rule: trajectories whose tokens before their first scored action token are identical form a group, and the
group's shared prefix is the longest common prefix of all its members (at least that prompt; longer when the
rollouts also begin alike). Exact equality of the prompt is cheap to hash, never groups unrelated tasks, and covers
every case above; trajectories of different tasks that share only a system prompt are not grouped (a tree of
prefixes would save more and cost much more code). Truncated trajectories: `truncate` keeps the start, so the key
ends at the cut when that comes first, and a truncated rollout shares its prompt with its group. The key only
decides who is grouped; what is shared is the members' actual common prefix, so no grouping can change a number.

Positions: a continuation token at absolute position P + j gets position id P + j and attends to the P cached keys
and its own row's earlier tokens (attention mask [1] * P + the suffix's right-padded mask). The action token at
position p is predicted by the hidden state at p - 1, which is in the prefix run for p <= P (including the boundary
p = P) and in the suffix run otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .scoring import token_logprob_stats
from .rendering import Rendered

# Below this many shared tokens the extra forward call and the cache copy cost about what they save.
MIN_SHARED_TOKENS = 32


@dataclass
class SharedGroup:
    prefix_len: int
    batches: list[list[int]]  # indices into the rendered list, in continuation batches (longest suffix first)

    @property
    def members(self) -> list[int]:
        return [i for b in self.batches for i in b]


def _prompt_end(r: Rendered) -> int:
    """Where the grouping key ends: the first scored action token, or the truncation cut if that comes first (a
    rollout whose first steps were cut still keeps its prompt, and is grouped with its untruncated siblings)."""
    end = min((max(s, 1) for s, e in r.spans if e > max(s, 1)), default=len(r.input_ids))
    return min(end, r.truncation["dropped_range"][0]) if r.truncation else end


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    first = np.asarray(seqs[0][:n])
    for s in seqs[1:]:
        diff = np.flatnonzero(first[:n] != np.asarray(s[:n]))
        n = int(diff[0]) if diff.size else n
    return n


def plan(rendered: list[Rendered], batch_tokens: int) -> tuple[list[SharedGroup], list[int]]:
    """(groups scored over a shared prefix, indices left for the plain path)."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(rendered):
        by_prompt.setdefault(tuple(r.input_ids[: _prompt_end(r)]), []).append(i)
    groups, rest = [], []
    for members in by_prompt.values():
        seqs = [rendered[i].input_ids for i in members]
        # every member keeps at least one token of its own, so no continuation row is empty
        P = min(_common_prefix(seqs), min(len(s) for s in seqs) - 1) if len(members) > 1 else 0
        if P < MIN_SHARED_TOKENS:
            rest.extend(members)
            continue
        # Budget as the plain path's padded tokens, counting the cached prefix in every row: each row holds its own
        # copy of the prefix's keys and values and attends over P + suffix positions.
        members = sorted(members, key=lambda i: -len(rendered[i].input_ids))
        batches, cur = [], []
        for i in members:
            if cur and (len(cur) + 1) * len(rendered[cur[0]].input_ids) > batch_tokens:
                batches.append(cur)
                cur = []
            cur.append(i)
        groups.append(SharedGroup(P, batches + [cur]))
    return groups, sorted(rest)


def full_attention(config) -> bool:
    """Whether every layer's cache is a plain full-attention `DynamicLayer`, which a continuation can extend exactly
    (sliding-window, chunked and linear-attention layers keep a partial state: those models take the plain path)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        layers = DynamicCache(config=config).layers
    except (AttributeError, TypeError, ValueError, KeyError):
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def shared_token_stats(
    states,
    head,
    config,
    device: torch.device,
    rendered: list[Rendered],
    group: SharedGroup,
    index: tuple[torch.Tensor, torch.Tensor],
    pad_id: int = 0,
    other_logprobs: torch.Tensor | None = None,
    **kw,
) -> dict[str, torch.Tensor]:
    """`taken_token_stats` for one group: `states(ids, mask, position_ids, past_key_values)` runs the model (hidden
    states or logits, `head` turns them into logits). `index` = (row in `group.members`, position), rows ascending.
    `other_logprobs` (support diagnostics: the other model's rows, in `index` order) is sliced per batch."""
    from transformers import DynamicCache

    P = group.prefix_len
    rows, pos = index
    first = rendered[group.batches[0][0]].input_ids
    cache = DynamicCache(config=config)
    prefix = torch.tensor([first[:P]], device=device)
    pre = states(prefix, torch.ones_like(prefix), torch.arange(P, device=device)[None], past_key_values=cache)[0]
    if cache.get_seq_length() != P:
        raise RuntimeError("this model did not fill the KV cache it was given; score with share_prefix=False")
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    del cache
    out, row0 = [], 0
    for batch in group.batches:
        S = max(len(rendered[i].input_ids) for i in batch) - P
        ids = torch.full((len(batch), S), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), P + S), dtype=torch.long)
        mask[:, :P] = 1
        for r, i in enumerate(batch):
            suffix = rendered[i].input_ids[P:]
            ids[r, : len(suffix)] = torch.tensor(suffix)
            mask[r, P : P + len(suffix)] = 1
        ids, mask = ids.to(device), mask.to(device)
        position_ids = P + (mask[:, P:].cumsum(-1) - 1).clamp(min=0)
        # a fresh cache per batch: the forward appends the suffix's keys to it (the prefix itself is not recomputed).
        # Its layers hold broadcast views of the prefix's keys: the forward's append is the one copy per row
        # (DynamicCache(pairs) would first copy them into every row, then copy again when appending).
        past = DynamicCache(config=config)
        for layer, (k, v) in zip(past.layers, kv):
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k.expand(len(batch), -1, -1, -1), v.expand(len(batch), -1, -1, -1)
        suf = states(ids, mask, position_ids, past_key_values=past)
        del past
        sel = (rows >= row0) & (rows < row0 + len(batch))
        r, p = rows[sel] - row0, pos[sel]
        tokens = [rendered[batch[a]].input_ids[b] for a, b in zip(r.tolist(), p.tolist())]
        targets = torch.tensor(tokens, dtype=torch.long)  # (long even when empty: a batch of fully cut steps)
        # the state at q = p - 1: the prefix run's for q < P (the boundary p = P included), else row r's at q - P
        q, r = (p - 1).to(device), r.to(device)
        h = suf.new_empty((q.numel(), suf.shape[-1]))
        in_pre = q < P
        h[in_pre], h[~in_pre] = pre[q[in_pre]], suf[r[~in_pre], q[~in_pre] - P]
        # per batch, as the plain path does: with a full-forward model these states are logits
        other = None if other_logprobs is None else other_logprobs[sel.to(other_logprobs.device)]
        out.append(token_logprob_stats(h, head, targets.to(device), other_logprobs=other, **kw))
        row0 += len(batch)
    return {k: torch.cat([o[k] for o in out]) for k in out[0]}


# ----------------------------------------------------------------------------------------------------------------
# Rows of one trajectory scored as generated (rendering.render_as_generated): step t's row is its own context + its
# tokens, and row t + 1 begins like row t up to where the template rewrote history. The rows run in order over one
# KV cache per model, cropped back to the common prefix with the previous row before each: every token that rows
# share is computed once, so the cost is the distinct tokens (`generated.distinct_tokens`), not steps x length.


@dataclass
class Chain:
    index: int  # into the rendered list; that Rendered has `rows`
    share: bool = True  # False: models whose cache a continuation cannot extend run each row whole
    cost: int = 0  # tokens through each model (for dealing units to ranks)

    @property
    def members(self) -> list[int]:
        return [self.index]


def chain_token_stats(
    states,
    head,
    config,
    device: torch.device,
    rows: list[Rendered],
    index: tuple[torch.Tensor, torch.Tensor],
    share: bool = True,
    other_logprobs: torch.Tensor | None = None,
    **kw,
) -> dict[str, torch.Tensor]:
    """`taken_token_stats` for one chain: `index` = (row, position) of every scored token, rows ascending."""
    from transformers import DynamicCache

    which, pos = index
    hidden, targets, cache, prev = [], [], None, []
    for t, row in enumerate(rows):
        p = pos[which == t]
        if not p.numel():
            continue
        ids = row.input_ids
        # the state at p - 1 predicts p: keep at most the shared tokens before the row's first scored position
        keep = min(_common_prefix([ids, prev]), int(p.min()) - 1) if share and cache is not None else 0
        if keep > 0:
            if cache.get_seq_length() > keep:
                cache.crop(keep - cache.get_seq_length())  # transformers 5: a negative count of tokens to remove
        else:
            cache = DynamicCache(config=config) if share else None
        new = torch.tensor([ids[keep:]], device=device)
        mask = torch.ones((1, len(ids)), dtype=torch.long, device=device)
        out = states(new, mask, torch.arange(keep, len(ids), device=device)[None], past_key_values=cache)[0]
        if share and cache.get_seq_length() != len(ids):
            raise RuntimeError("this model did not fill the KV cache it was given; score with share_prefix=False")
        hidden.append(out[(p - 1 - keep).to(device)])
        targets.append(torch.tensor([ids[q] for q in p.tolist()], dtype=torch.long))
        prev = ids
    h = torch.cat(hidden) if hidden else torch.empty((0, 1), device=device)
    return token_logprob_stats(h, head, torch.cat(targets).to(device) if targets else torch.empty(0, dtype=torch.long, device=device),
                               other_logprobs=other_logprobs, **kw)  # fmt: skip
