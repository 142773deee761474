"""The batched scoring engine: render, batch, run the policy and the reference, hand token statistics to `scoring`.

Memory: only the hidden states of positions that predict action tokens go through the output layer, in chunks
(`scoring.token_logprob_stats`), so no [batch, seq, vocab] tensor is ever built. With a PEFT policy and no explicit
reference, the reference is the same weights under `disable_adapter()`: one copy of the base model in memory.

Compute: trajectories that share their prompt (a GRPO group, best-of-N) run it once per model and reuse its KV cache
for their continuations (`prefix.py`); the rest go through plain right-padded batches.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch

from .prefix import Chain, SharedGroup, chain_token_stats, full_attention, plan, shared_token_stats
from .reference import Reference, is_peft_model, load_pair, resolve
from .scoring import ScoringConfig, TokenStats, TrajectoryScore, score_from_token_stats
from .trajectories import Trajectory, as_trajectories
from .generated import distinct_tokens, rendering_notices
from .rendering import Rendered, check_same_tokenizer, position_limit, render_all

# Padded tokens per forward pass when batch_tokens is None. An accelerator needs big batches to be busy. On a CPU one
# long sequence already keeps the cores busy and padding a batch to its longest member is extra work (1.7x the
# floor's FLOPs on a realistic group of 8, benchmarks/README.md), while many tiny forward passes pay Python's
# per-call overhead: 2048 puts a 1-2k-token agent rollout alone in its pass and batches short ones.
GPU_BATCH_TOKENS = 16384
CPU_BATCH_TOKENS = 2048
# Models whose logits are not plain `lm_head(hidden)`: run the full forward for them.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _plain_model(model):
    """The transformers model under any PEFT wrapper (its LoRA layers stay in place and obey disable_adapter)."""
    return model.get_base_model() if is_peft_model(model) else model


def _hidden_fn(model):
    """(hidden_states(input_ids, attention_mask, position_ids, past_key_values=None) -> [B, T, H], head) or None for a
    full forward. With `past_key_values` (a cache) the decoder reads and extends it."""
    base = _plain_model(model)
    cfg = getattr(base, "config", None)
    if cfg is not None and any(getattr(cfg, a, None) not in (None, 1, 1.0) for a in _LOGIT_POSTPROCESSING):
        return None
    try:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is base:
        return None

    def hidden(input_ids, attention_mask, position_ids, past_key_values=None):
        return _forward(decoder, input_ids, attention_mask, position_ids, past_key_values).last_hidden_state

    return hidden, head


def _forward(module, input_ids, attention_mask, position_ids, past_key_values=None):
    """One forward pass; the KV cache is filled only when a cache is passed (the shared-prefix path, prefix.py)."""
    return module(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        use_cache=past_key_values is not None,
    )


def _states_fn(model):
    """Like `_hidden_fn`, and for models that need the full forward: (logits function, identity head)."""
    fn = _hidden_fn(model)
    if fn is not None:
        return fn

    def logits(input_ids, attention_mask, position_ids, past_key_values=None):
        return _forward(model, input_ids, attention_mask, position_ids, past_key_values).logits

    return logits, (lambda x: x)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def taken_token_stats(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    targets_index: tuple[torch.Tensor, torch.Tensor],
    *,
    temperature: float = 1.0,
    topk: int = 0,
    with_vocab_stats: bool = False,
    chunk_size: int = 1024,
    keep_logprobs: bool = False,
    other_logprobs: torch.Tensor | None = None,
    with_top1: bool = False,
) -> dict[str, torch.Tensor]:
    """Token statistics for the tokens at (batch_idx, pos_idx) of a right-padded batch, predicted from pos - 1
    (`keep_logprobs` / `other_logprobs`: the support diagnostics; `with_top1`: the top-1 log-prob per token; see
    `scoring.token_logprob_stats`)."""
    from .scoring import token_logprob_stats

    dev = _device(model)
    input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    b_idx, p_idx = targets_index[0].to(dev), targets_index[1].to(dev)
    targets = input_ids[b_idx, p_idx]
    states, head = _states_fn(model)
    h = states(input_ids, attention_mask, position_ids)[b_idx, p_idx - 1]
    return token_logprob_stats(
        h, head, targets, temperature=temperature, topk=topk, chunk_size=chunk_size, with_vocab_stats=with_vocab_stats,
        keep_logprobs=keep_logprobs, other_logprobs=other_logprobs, with_top1=with_top1,
    )  # fmt: skip


class ProgressScorer:
    """Progress advantage of every agent step, for a policy against its reference.

    Args:
        policy: a causal LM, or a `peft.PeftModel` (then `reference=None` means: the same model, adapter disabled, or
            TRL's "ref" adapter when it has one; see `reference.resolve`).
        tokenizer: the tokenizer both models read (its chat template renders the trajectories).
        reference: a `reference.Reference`, a separate reference model, or None (a PEFT policy).
        config: `ScoringConfig` (beta, reductions, temperature, baseline knobs). With `config.support` (or a
            variant that needs it) every action token also gets KL(pi||ref) and KL(ref||pi) over the whole
            vocabulary, and the scores get the variants and the support report. Cost: the policy's log-softmax rows
            at one unit's action tokens are kept for the reference pass (action tokens x vocabulary x 4 bytes, e.g.
            4096 tokens x 152k vocabulary = 2.5 GB; lower batch_tokens to bound it), and two more vocabulary-wide
            products per token.
        max_length: truncate longer trajectories (start kept, most recent context kept; see `rendering.truncate`).
            None: the models' `max_position_embeddings` (`rendering.position_limit`), never more.
        reference_tokenizer: when given, checked against `tokenizer` (vocabulary and chat template).
        batch_tokens: padded tokens per forward pass; lower it to save memory. None (the default): 2048 on a CPU,
            16384 elsewhere (see `batch_budget`).
        compute_baselines: also compute self-certainty and DeepConf (full-vocabulary statistics of the policy).
        share_prefix: run each model once over the prompt that a group of trajectories shares (GRPO groups, best-of-N,
            retries) and reuse its KV cache for their continuations (`prefix.py`); the same numbers as without.
    """

    def __init__(
        self,
        policy,
        tokenizer,
        reference=None,
        *,
        config: ScoringConfig | None = None,
        max_length: int | None = None,
        reference_tokenizer=None,
        batch_tokens: int | None = None,
        chunk_size: int = 1024,
        compute_baselines: bool = True,
        share_prefix: bool = True,
    ):
        self.reference: Reference = resolve(policy, reference)
        if reference_tokenizer is not None:
            check_same_tokenizer(tokenizer, reference_tokenizer)
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.policy, self.tokenizer = policy, tokenizer
        self.config = config or ScoringConfig()
        self.max_length = max_length
        self.batch_tokens, self.chunk_size = batch_tokens, chunk_size
        self.compute_baselines, self.share_prefix = compute_baselines, share_prefix
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # -- loading ------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        policy_path,
        reference_path=None,
        *,
        config: ScoringConfig | None = None,
        dtype: torch.dtype | str | None = None,
        device: str | None = None,
        trust_remote_code: bool = False,
        **kwargs,
    ) -> "ProgressScorer":
        """Load a checkpoint pair. `policy_path` may be a LoRA adapter directory: its base (or `reference_path`)
        is loaded once and the reference is the same model with the adapter disabled."""
        policy, reference, tokenizer = load_pair(
            policy_path, reference_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code
        )
        return cls(policy, tokenizer, reference, config=config, **kwargs)

    # -- scoring ------------------------------------------------------------------------------------------------
    def render(self, trajectories, skipped: list | None = None) -> tuple[list[Trajectory], list[Rendered]]:
        """Validate and render (whole or as generated, as `config.rendering` says; notices once per scorer). With
        `skipped` (a list), trajectories the chat template cannot render are left out and their RecordErrors appended
        to it; without, the first one raises ChatTemplateError."""
        trajs = as_trajectories(trajectories)
        # never past the models' positions: without max_length, a longer trajectory is cut there and flagged
        limit, why = position_limit(self.max_length, self.policy, self.reference.model)
        trajs, rendered, errors = render_all(trajs, self.tokenizer, limit, on_error="raise" if skipped is None else "skip",
                                             rendering=self.config.rendering, strict=self.config.strict)
        _notify(self, trajs, rendered)
        for r in rendered:
            if r.truncation is not None:
                r.truncation["limit"] = why
        if skipped is not None:
            skipped.extend(errors)
        return trajs, rendered

    def batch_budget(self) -> int:
        """Padded tokens per forward pass: `batch_tokens`, or by device when it is None (CPU_BATCH_TOKENS on a CPU,
        GPU_BATCH_TOKENS elsewhere; why: beside their definitions)."""
        if self.batch_tokens is not None:
            return self.batch_tokens
        return CPU_BATCH_TOKENS if _device(self.policy).type == "cpu" else GPU_BATCH_TOKENS

    def _batches(self, rendered: list[Rendered], indices=None) -> list[list[int]]:
        """Indices (all, or `indices`) grouped into padded batches of at most `batch_tokens`, longest first (less
        padding)."""
        order = sorted(range(len(rendered)) if indices is None else indices, key=lambda i: -len(rendered[i].input_ids))
        budget = self.batch_budget()
        batches, cur, cur_max = [], [], 0
        for i in order:
            L = len(rendered[i].input_ids)
            if cur and max(cur_max, L) * (len(cur) + 1) > budget:
                batches.append(cur)
                cur, cur_max = [], 0
            cur.append(i)
            cur_max = max(cur_max, L)
        if cur:
            batches.append(cur)
        return batches

    def units(self, rendered: list[Rendered]) -> list:
        """The work units the passes run over `rendered`: plain padded batches (lists of indices into `rendered`) and
        `prefix.SharedGroup`s (a shared prompt and its continuation batches). Models whose cache a continuation
        cannot extend get batches only. `run_unit` runs one; `token_stats` runs them all."""
        ref_model = self.reference.model_for(self.policy)
        share = self.share_prefix and all(full_attention(_plain_model(m).config) for m in (self.policy, ref_model))
        # trajectories scored as generated: one chain of rows each (prefix.Chain)
        chains = [Chain(i, share, distinct_tokens(r.rows) if share else sum(len(x.input_ids) for x in r.rows))
                  for i, r in enumerate(rendered) if r.rows is not None]  # fmt: skip
        whole = [i for i, r in enumerate(rendered) if r.rows is None]
        if share:
            groups, rest = plan([rendered[i] for i in whole], self.batch_budget())
            for g in groups:  # plan numbered the whole ones only
                g.batches = [[whole[i] for i in b] for b in g.batches]
            return groups + self._batches(rendered, [whole[i] for i in rest]) + chains
        return self._batches(rendered, whole) + chains

    @torch.no_grad()
    def token_stats(self, rendered: list[Rendered], progress: bool = False) -> list[TokenStats]:
        """Run both models over the rendered trajectories; per trajectory, per action token statistics."""
        out: list[TokenStats | None] = [None] * len(rendered)
        for i, st in self._each_unit(rendered, progress, self._unit_stats):
            out[i] = st
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def run_unit(self, rendered: list[Rendered], unit) -> list[tuple[int, TokenStats]]:
        """Both passes over one work unit of `units(rendered)` (or a piece of one: a `SharedGroup` with some of its
        batches): [(index into `rendered`, TokenStats)]. The same bits as `token_stats` gives those trajectories,
        because the unit is run as the whole plan runs it (`distributed.py` deals units to ranks with it)."""
        ref_model = self.reference.model_for(self.policy)
        with _eval_mode(self.policy), _eval_mode(ref_model):
            return self._unit_stats(rendered, unit, ref_model)

    @torch.no_grad()
    def reference_logp(self, rendered: list[Rendered], progress: bool = False) -> list[np.ndarray]:
        """The reference pass alone: per trajectory, the reference's log-prob of each action token (float64, in
        `TokenStats` order), the same bits as `token_stats(rendered)[i].reference_logp`. For a sweep over references
        (`merging.alpha_sweep`) that runs the policy's pass once. Support statistics need both passes: not here."""
        out: list[np.ndarray | None] = [None] * len(rendered)
        for i, logp in self._each_unit(rendered, progress, self._unit_reference):
            out[i] = logp
        return out  # type: ignore[return-value]

    def _each_unit(self, rendered, progress, fn):
        """fn(rendered, unit, ref_model) over every unit, in eval mode: yields its (index, value) pairs."""
        ref_model = self.reference.model_for(self.policy)
        units = it = self.units(rendered)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(units, desc="scoring", unit="batch", disable=None)
        with _eval_mode(self.policy), _eval_mode(ref_model):
            for unit in it:
                yield from fn(rendered, unit, ref_model)

    def _rows(self, rendered, members) -> tuple[tuple[torch.Tensor, torch.Tensor], np.ndarray, np.ndarray]:
        """The unit's action tokens: (row in `members`, position) index, and each one's owner and step."""
        b_idx, p_idx, step_of, owner = [], [], [], []
        for row, i in enumerate(members):
            for step, (s, e) in enumerate(rendered[i].spans):
                s = max(s, 1)  # position 0 has no prediction; no template starts a turn there
                b_idx.extend([step if rendered[i].rows is not None else row] * (e - s))  # a chain: its row
                p_idx.extend(range(s, e))
                step_of.extend([step] * (e - s))
                owner.extend([i] * (e - s))
        index = (torch.tensor(b_idx, dtype=torch.long), torch.tensor(p_idx, dtype=torch.long))
        return index, np.array(owner, dtype=np.int64), np.array(step_of, dtype=np.int64)

    def _pass(self, model, rendered, unit, index, padded, **extra) -> dict[str, torch.Tensor]:
        """One model's pass over one unit (`padded`: the plain batch's tensors, None for a SharedGroup)."""
        kw = dict(temperature=self.config.temperature, chunk_size=self.chunk_size)
        if padded is not None:
            return taken_token_stats(model, *padded, index, **kw, **extra)
        states, head = _states_fn(model)
        if isinstance(unit, Chain):
            return chain_token_stats(states, head, _plain_model(model).config, _device(model), rendered[unit.index].rows,
                                     index, share=unit.share, **kw, **extra)  # fmt: skip
        return shared_token_stats(
            states, head, _plain_model(model).config, _device(model), rendered, unit, index,
            pad_id=self.pad_id, **kw, **extra,
        )  # fmt: skip

    def _unit_stats(self, rendered, unit, ref_model) -> list[tuple[int, TokenStats]]:
        cfg = self.config
        members = unit.members if isinstance(unit, (SharedGroup, Chain)) else unit
        index, owner, step = self._rows(rendered, members)
        padded = None if isinstance(unit, (SharedGroup, Chain)) else self._pad(rendered, unit)
        support = cfg.wants_support
        pol = self._pass(self.policy, rendered, unit, index, padded, topk=cfg.topk, with_top1=True,
                         with_vocab_stats=self.compute_baselines, keep_logprobs=support)  # fmt: skip
        # support: the policy's rows wait for the reference pass, which computes both KLs chunk by chunk
        other = pol.pop("logprobs", None)
        with self.reference.active(self.policy):  # the prefix cache too: computed under the same adapters
            ref = self._pass(ref_model, rendered, unit, index, padded, other_logprobs=other)
        del other  # N_action x V float32: released before the next unit
        arrays = {"policy_logp": pol["logp"], "reference_logp": ref["logp"], "policy_top1_logp": pol["top1_logp"]}
        if self.compute_baselines:
            arrays["policy_mean_logp"], arrays["policy_topk_logp"] = pol["mean_logp"], pol["topk_logp"]
        if support:
            arrays["kl_policy_ref"], arrays["kl_ref_policy"] = ref["kl_other_self"], ref["kl_self_other"]
        arrays = {k: v.double().cpu().numpy() for k, v in arrays.items()}
        vocab = _plain_model(self.policy).get_output_embeddings().weight.shape[0] if self.compute_baselines else None
        out = []
        for i in members:
            sel = owner == i
            out.append((i, TokenStats(step=step[sel], vocab_size=vocab, **{k: v[sel] for k, v in arrays.items()})))
        return out

    def _unit_reference(self, rendered, unit, ref_model) -> list[tuple[int, np.ndarray]]:
        members = unit.members if isinstance(unit, (SharedGroup, Chain)) else unit
        index, owner, _ = self._rows(rendered, members)
        padded = None if isinstance(unit, (SharedGroup, Chain)) else self._pad(rendered, unit)
        with self.reference.active(self.policy):
            logp = self._pass(ref_model, rendered, unit, index, padded)["logp"].double().cpu().numpy()
        return [(i, logp[owner == i]) for i in members]

    def _pad(self, rendered: list[Rendered], batch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        T = max(len(rendered[i].input_ids) for i in batch)
        ids = torch.full((len(batch), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(rendered[i].input_ids)] = torch.tensor(rendered[i].input_ids)
            mask[row, : len(rendered[i].input_ids)] = 1
        return ids, mask

    def score(
        self, trajectories, *, with_token_ratios: bool = False, progress: bool = False, skipped: list | None = None
    ) -> list[TrajectoryScore]:
        """Score trajectories (paths, dicts, a datasets.Dataset or Trajectory objects); one result per input, or per
        renderable input when `skipped` collects the others (see `render`).

        A trajectory whose logits are not finite (a broken checkpoint, an overflow) gets score NaN and `error` set;
        a warning names them.
        """
        trajs, rendered = self.render(trajectories, skipped)
        stats = self.token_stats(rendered, progress=progress)
        scores = [
            finish_score(t, r, s, self.config, with_token_ratios=with_token_ratios)
            for t, r, s in zip(trajs, rendered, stats)
        ]
        _warn_faults(scores)
        return scores

    def score_many(
        self, trajectories, configs: dict[str, ScoringConfig], *, progress: bool = False, skipped: list | None = None
    ) -> dict[str, list[TrajectoryScore]]:
        """The same trajectories under several scoring configs (reductions, beta) from ONE set of forward passes.

        Used to choose reductions by cross-validation (with `evaluation.reduction_grid`). Configs must share the
        temperature of `self.config`: it changes the log-probs themselves, not just how they are reduced.
        """
        if any(c.temperature != self.config.temperature for c in configs.values()):
            raise ValueError("score_many: every config must use the scorer's temperature")
        trajs, rendered = self.render(trajectories, skipped)
        stats = self.token_stats(rendered, progress=progress)
        out = {name: [finish_score(t, r, s, c) for t, r, s in zip(trajs, rendered, stats)] for name, c in configs.items()}
        if out:
            _warn_faults(next(iter(out.values())))
        return out


def _warn_faults(scores: list[TrajectoryScore]) -> None:
    bad = [s for s in scores if s.error]
    if bad:
        ids = ", ".join(repr(s.id) for s in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        warnings.warn(
            f"{len(bad)} of {len(scores)} trajectories have no score because of a numeric fault ({bad[0].error}): {ids}. "
            "Their `error` field says which model; they are left out of every metric.",
            stacklevel=3,
        )


def finish_score(t: Trajectory, r: Rendered, stats: TokenStats, config: ScoringConfig, with_token_ratios=False):
    res = score_from_token_stats(
        stats,
        r.n_steps,
        config,
        id=t.id,
        message_indices=r.message_indices,
        truncated_steps=r.truncated_steps,
        with_token_ratios=with_token_ratios,
    )
    res.group, res.success, res.failure_step = t.group, t.success, t.failure_step
    res.truncation, res.metadata = r.truncation, t.metadata
    mark_rendering(res, r)
    return res


def mark_rendering(res: TrajectoryScore, r: Rendered) -> None:
    """How the trajectory was rendered, on its score: `rendering` "as_generated" when it was, and per step what the
    chat template rendered nowhere (`dropped`)."""
    res.rendering = "as_generated" if r.rows is not None else None
    for j, parts in r.dropped.items():
        res.steps[j].dropped = list(parts)


def _notify(scorer, trajs, rendered) -> None:
    """The run's rendering notices (`generated.rendering_notices`), each said once per scorer."""
    said = scorer.__dict__.setdefault("_said", set())
    for key, msg in rendering_notices(scorer.tokenizer, trajs, rendered, scorer.config.rendering):
        if key not in said:
            said.add(key)
            warnings.warn(msg, stacklevel=3)
