"""The batched scoring engine: render, batch, run the policy and the reference, hand token statistics to `scoring`.

Memory: only the hidden states of positions that predict action tokens go through the output layer, in chunks
(`scoring.token_logprob_stats`), so no [batch, seq, vocab] tensor is ever built. With a PEFT policy and no explicit
reference, the reference is the same weights under `disable_adapter()`: one copy of the base model in memory.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import numpy as np
import torch

from .scoring import ScoringConfig, TokenStats, TrajectoryScore, score_from_token_stats
from .trajectories import Rendered, Trajectory, as_trajectories, check_same_tokenizer, render_all

# Models whose logits are not plain `lm_head(hidden)`: run the full forward for them.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def is_adapter_dir(path) -> bool:
    return Path(path, "adapter_config.json").is_file()


def _plain_model(model):
    """The transformers model under any PEFT wrapper (its LoRA layers stay in place and obey disable_adapter)."""
    return model.get_base_model() if is_peft_model(model) else model


def _hidden_fn(model):
    """(hidden_states(input_ids, attention_mask, position_ids) -> [B, T, H], head) or None for a full forward."""
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

    def hidden(input_ids, attention_mask, position_ids):
        return decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state

    return hidden, head


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
) -> dict[str, torch.Tensor]:
    """Token statistics for the tokens at (batch_idx, pos_idx) of a right-padded batch, predicted from pos - 1."""
    from .scoring import token_logprob_stats

    dev = _device(model)
    input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    b_idx, p_idx = targets_index[0].to(dev), targets_index[1].to(dev)
    targets = input_ids[b_idx, p_idx]
    fn = _hidden_fn(model)
    if fn is not None:
        hidden_fn, head = fn
        h = hidden_fn(input_ids, attention_mask, position_ids)[b_idx, p_idx - 1]
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
        h, head = logits[b_idx, p_idx - 1], (lambda x: x)
    return token_logprob_stats(
        h, head, targets, temperature=temperature, topk=topk, chunk_size=chunk_size, with_vocab_stats=with_vocab_stats
    )


class ProgressScorer:
    """Progress advantage of every agent step, for a policy against its reference.

    Args:
        policy: a causal LM, or a `peft.PeftModel` (then `reference=None` means: the same model, adapter disabled).
        tokenizer: the tokenizer both models read (its chat template renders the trajectories).
        reference: a separate reference model, or None (PEFT policy, or `reference_context`).
        config: `ScoringConfig` (beta, reductions, temperature, baseline knobs).
        max_length: truncate longer trajectories (start kept, most recent context kept; see `trajectories.truncate`).
        reference_context: a callable returning a context manager under which `policy` acts as the reference
            (e.g. switching to TRL's frozen "ref" adapter).
        reference_tokenizer: when given, checked against `tokenizer` (vocabulary and chat template).
        batch_tokens: padded tokens per forward pass; lower it to save memory.
        compute_baselines: also compute self-certainty and DeepConf (full-vocabulary statistics of the policy).
    """

    def __init__(
        self,
        policy,
        tokenizer,
        reference=None,
        *,
        config: ScoringConfig | None = None,
        max_length: int | None = None,
        reference_context=None,
        reference_tokenizer=None,
        batch_tokens: int = 16384,
        chunk_size: int = 1024,
        compute_baselines: bool = True,
    ):
        if reference is None and reference_context is None and not is_peft_model(policy):
            raise ValueError(
                "no reference: pass `reference=` (a model), a PEFT policy (its adapter is disabled for the "
                "reference), or `reference_context=`"
            )
        if reference_tokenizer is not None:
            check_same_tokenizer(tokenizer, reference_tokenizer)
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.policy, self.reference, self.tokenizer = policy, reference, tokenizer
        self.config = config or ScoringConfig()
        self.max_length = max_length
        self.reference_context = reference_context
        self.batch_tokens, self.chunk_size = batch_tokens, chunk_size
        self.compute_baselines = compute_baselines
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
        """Validate and render. With `skipped` (a list), trajectories the chat template cannot render are left out
        and their RecordErrors appended to it; without, the first one raises ChatTemplateError."""
        trajs = as_trajectories(trajectories)
        trajs, rendered, errors = render_all(trajs, self.tokenizer, self.max_length, on_error="raise" if skipped is None else "skip")
        if skipped is not None:
            skipped.extend(errors)
        return trajs, rendered

    def _reference_ctx(self):
        if self.reference is not None:
            return contextlib.nullcontext()
        if self.reference_context is not None:
            return self.reference_context()
        return self.policy.disable_adapter()

    def _batches(self, rendered: list[Rendered]) -> list[list[int]]:
        """Indices grouped into padded batches of at most `batch_tokens`, longest first (less padding)."""
        order = sorted(range(len(rendered)), key=lambda i: -len(rendered[i].input_ids))
        batches, cur, cur_max = [], [], 0
        for i in order:
            L = len(rendered[i].input_ids)
            if cur and max(cur_max, L) * (len(cur) + 1) > self.batch_tokens:
                batches.append(cur)
                cur, cur_max = [], 0
            cur.append(i)
            cur_max = max(cur_max, L)
        if cur:
            batches.append(cur)
        return batches

    @torch.no_grad()
    def token_stats(self, rendered: list[Rendered], progress: bool = False) -> list[TokenStats]:
        """Run both models over the rendered trajectories; per trajectory, per action token statistics."""
        cfg = self.config
        out: list[TokenStats | None] = [None] * len(rendered)
        batches = self._batches(rendered)
        it = batches
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(batches, desc="scoring", unit="batch", disable=None)
        ref_model = self.reference if self.reference is not None else self.policy
        with _eval_mode(self.policy), _eval_mode(ref_model):
            for batch in it:
                T = max(len(rendered[i].input_ids) for i in batch)
                ids = torch.full((len(batch), T), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), T), dtype=torch.long)
                b_idx, p_idx, step_of, owner = [], [], [], []
                for row, i in enumerate(batch):
                    r = rendered[i]
                    ids[row, : len(r.input_ids)] = torch.tensor(r.input_ids)
                    mask[row, : len(r.input_ids)] = 1
                    for step, (s, e) in enumerate(r.spans):
                        s = max(s, 1)  # position 0 has no prediction; no template starts a turn there
                        b_idx.extend([row] * (e - s))
                        p_idx.extend(range(s, e))
                        step_of.extend([step] * (e - s))
                        owner.extend([i] * (e - s))
                index = (torch.tensor(b_idx, dtype=torch.long), torch.tensor(p_idx, dtype=torch.long))
                kw = dict(temperature=cfg.temperature, chunk_size=self.chunk_size)
                pol = taken_token_stats(
                    self.policy, ids, mask, index, topk=cfg.topk, with_vocab_stats=self.compute_baselines, **kw
                )
                with self._reference_ctx():
                    ref = taken_token_stats(ref_model, ids, mask, index, **kw)
                owner_t, step_t = np.array(owner, dtype=np.int64), np.array(step_of, dtype=np.int64)
                arrays = {"policy_logp": pol["logp"], "reference_logp": ref["logp"]}
                if self.compute_baselines:
                    arrays["policy_mean_logp"], arrays["policy_topk_logp"] = pol["mean_logp"], pol["topk_logp"]
                arrays = {k: v.double().cpu().numpy() for k, v in arrays.items()}
                vocab = _plain_model(self.policy).get_output_embeddings().weight.shape[0] if self.compute_baselines else None
                for i in batch:
                    sel = owner_t == i
                    out[i] = TokenStats(step=step_t[sel], vocab_size=vocab, **{k: v[sel] for k, v in arrays.items()})
        return out  # type: ignore[return-value]

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

        Used to choose reductions by cross-validation. Configs must share the temperature of `self.config`: it
        changes the log-probs themselves, not just how they are reduced.
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


def reduction_grid(base: ScoringConfig | None = None) -> dict[str, ScoringConfig]:
    """Every token x step reduction, named "token/step" (e.g. "sum/sum", "paper_min/last")."""
    import dataclasses

    from .scoring import PAPER_TOKEN_REDUCTIONS, STEP_REDUCTIONS, TOKEN_REDUCTIONS

    base = base or ScoringConfig()
    return {
        f"{t}/{s}": dataclasses.replace(base, token_reduction=t, step_reduction=s)
        for t in TOKEN_REDUCTIONS + PAPER_TOKEN_REDUCTIONS
        for s in STEP_REDUCTIONS
    }


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
    return res


# ----------------------------------------------------------------------------------------------------------------
# Loading checkpoint pairs


def _resolve_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return "auto"
    return getattr(torch, str(dtype))


def load_pair(policy_path, reference_path=None, *, dtype=None, device=None, trust_remote_code=False):
    """(policy, reference or None, tokenizer). A LoRA policy comes back as a PeftModel with reference None."""
    from transformers import AutoModelForCausalLM

    kw = dict(trust_remote_code=trust_remote_code)
    if dtype is not None:
        kw["dtype"] = _resolve_dtype(dtype)
    policy_path = str(policy_path)
    if is_adapter_dir(policy_path):
        from peft import PeftConfig, PeftModel

        base_path = reference_path or PeftConfig.from_pretrained(policy_path).base_model_name_or_path
        if not base_path:
            raise ValueError(f"{policy_path} is a LoRA adapter with no base model recorded: pass the reference path")
        base = AutoModelForCausalLM.from_pretrained(base_path, **kw)
        policy = PeftModel.from_pretrained(base, policy_path)
        reference = None
        tokenizer = pick_tokenizer(policy_path, str(base_path), adapter=True, trust_remote_code=trust_remote_code)
    else:
        if reference_path is None:
            raise ValueError("a full-weight policy needs a reference: pass reference_path")
        policy = AutoModelForCausalLM.from_pretrained(policy_path, **kw)
        reference = AutoModelForCausalLM.from_pretrained(str(reference_path), **kw)
        tokenizer = pick_tokenizer(policy_path, str(reference_path), adapter=False, trust_remote_code=trust_remote_code)
    if device is not None:
        policy.to(device)
        if reference is not None:
            reference.to(device)
    return policy.eval(), (reference.eval() if reference is not None else None), tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def pick_tokenizer(policy_path: str, other_path: str, *, adapter: bool, trust_remote_code: bool = False):
    """The one tokenizer both models read: the policy directory's when it has one, else the reference's (an
    adapter's base). When both have one they must agree on vocabulary, chat template and the ids of a probe
    conversation (`check_same_tokenizer`); the refusal says which directory's tokenizer to use.

    The probe matters for adapters: an adapter directory has no config.json, so transformers 5 loads its tokenizer
    by the class its tokenizer_config.json names (TokenizersBackend: tokenizer.json as written), while the base
    directory's config.json (model_type qwen2, say) selects Qwen2Tokenizer, which builds its own normalizer and
    pre-tokenizer. The same files can then give different ids for the same conversation.
    """
    from transformers import AutoTokenizer

    def load(path):
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)

    if not _has_tokenizer(policy_path):
        return load(other_path)
    tokenizer = load(policy_path)
    other = None
    if other_path != policy_path:
        if _has_tokenizer(other_path):
            other = load(other_path)
        elif not Path(other_path).exists():  # a hub id: its tokenizer is in the cache if the model was fetched with it
            try:
                other = load(other_path)
            except (OSError, ValueError):
                warnings.warn(f"could not load {other_path}'s tokenizer to compare it with {policy_path}'s", stacklevel=3)
    if other is None:
        return tokenizer
    if adapter:
        names = (f"adapter's ({policy_path})", f"base model's ({other_path})")
        hint = (
            f"Use the base model's tokenizer: the reference is that model, and a trainer started from it loads this one. "
            f"Delete the tokenizer files in {policy_path} ({', '.join(f for f in TOKENIZER_FILES if Path(policy_path, f).is_file())}) "
            f"or copy {other_path}'s over them. (If the adapter was really trained with its own tokenizer, save that one "
            f"into a copy of {other_path} instead and pass it as the reference.)"
        )
    else:
        names = (f"policy's ({policy_path})", f"reference's ({other_path})")
        hint = (
            f"Use the policy's tokenizer ({policy_path}): it is the one the policy was trained with. If the reference "
            f"was trained with it too, copy {policy_path}'s tokenizer files into {other_path}; otherwise these two "
            "checkpoints do not belong together."
        )
    check_same_tokenizer(tokenizer, other, names, hint)
    if adapter and type(tokenizer) is not type(other):
        warnings.warn(
            f"the adapter {policy_path} carries its own tokenizer, which loads as {type(tokenizer).__name__} while its "
            f"base {other_path} loads as {type(other).__name__}. They agree on vocabulary, chat template and the ids of "
            "a probe conversation with tool calls, non-ASCII text and digits, so the adapter's is used: it is the one "
            "saved with the adapter.",
            stacklevel=3,
        )
    return tokenizer


def _has_tokenizer(path) -> bool:
    p = Path(path)
    return (p / "tokenizer_config.json").is_file() or (p / "tokenizer.json").is_file()
