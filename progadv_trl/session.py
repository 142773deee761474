"""The critic in the agent loop: score K candidate next turns at one state, over a cached conversation.

    critic = ProgressCritic.from_pretrained("runs/demo/bundle")
    session = critic.session(messages, tools=tools)      # renders the conversation; nothing runs yet
    results = session.score(candidates)                  # one CandidateScore per candidate, in order
    k = session.choose(candidates)                       # the index the critic ranks highest (pick_best's tie rule)
    session.append(candidates[k]); session.append(tool_result)   # render and record: they run with the next score

Why one state: among candidates a_1..a_K at the same state s, beta * log pi_theta(a|s)/pi_ref(a|s) ranks them by
Q*(s,a) - V*(s), and V*(s), the on-policy offset KL(pi_theta||pi_ref)(s) and the luck still to come are shared by all
of them; ranking whole trajectories pays for all three (docs/steering.md has the measurements).

Exactness: a candidate's figures are those `critic.score` gives its step when the candidate is appended to the
conversation and the whole is scored (the same chat-template rendering, spans and `scoring` functions; tests check
1e-5). How: the cache holds a prefix of the tokens of the conversation as the template writes it now
(`rendering.chat_text`, tokenized incrementally by `incremental.tokenize` at each append); each candidate is rendered
as generated (`rendering.render_step`: its generation prompt, then the turn), its common prefix with the state's ids
is the state, the rest is the candidate's own, run starting one token before the candidate's span, so the state that
predicts the span's first token is computed in the same pass (no hidden state has to be stored). Where a template
rewrites earlier text (drops the reasoning of earlier turns), the state follows the history as the template rewrites
it, the common prefix is shorter and more is recomputed; a candidate, the latest turn, is read in its generation
prompt's context as the model read it, so its figures are those of its step scored as generated
(`rendering.render_as_generated`).

Cost: one forward call per model per `score`, whatever was appended since. `append` only renders and records (the
new text is tokenized from the last special token it shares with the old: `rendering.tokenize`); the tokens the cache
does not hold yet ("pending") run at the head of the next `score`'s ONE packed row, the K candidates after them: a
4D attention mask lets the pending tokens see the cache and each other causally, and each candidate the cache, the
pending tokens and its own earlier tokens only, with position ids restarting at the state's end for every
candidate. The states of the span's first tokens are computed in that pass (none is stored), the pending tokens'
keys and values join the cache, the candidates' are cut off. So the cache is read once and copied once per model
per score, not K times (a batch of K rows over an expanded cache materialises K copies in every layer's
concatenation: benchmarks/README.md measures both), and a 5-turn episode costs 5 calls per model, not 2 per append
and 2 per score. `flush()` runs the pending tokens alone, and so does a score whose pending context is over
`PENDING_ALONE` tokens (a long conversation's first score): the dense mask would cost more than the call. Models whose attention cannot take a custom 4D mask, or
whose cache a continuation cannot extend (sliding-window, linear attention), take the engine's path: `scorer.score`
on the K whole conversations (exact, slower).

Truncation: when a conversation outgrows `max_length` (the bundle's) or the model's `max_position_embeddings`, no
cache can hold it; those candidates are scored by the engine with that limit (`rendering.truncate`: start and most
recent context kept) and carry `truncated=True` and the `truncation` record. Never silent.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch

from .engine import _device, _eval_mode, _plain_model, _states_fn
from .prefix import _common_prefix, full_attention
from .incremental import Tokens, tokenize
from .rendering import chat_text, render_step
from .scores import plausibility
from .scoring import TokenStats, TrajectoryScore, score_from_token_stats, token_logprob_stats
from .trajectories import Trajectory, validate_messages

# Attention implementations that take a custom 4D float mask as given (transformers' masking_utils returns a 4D
# mask unchanged; eager adds it, SDPA passes it on). Others (flash attention, flex) take the engine's path.
PACKED_ATTENTION = ("eager", "sdpa")
# Above this many pending tokens, they run in their own causal pass before the candidates' (two calls per model for
# that score): the packed row's mask is dense, so the pending tokens would attend over twice the pairs a causal pass
# computes, and a call more is nothing next to such a pass. Measured on the decoder shape (CPU), a 1.2k-token state
# and 4 candidates: 0.52 CPU s in one call, 0.42 in two. Below it (an agent's turn and a tool result), one call.
PENDING_ALONE = 1024


@dataclass
class CandidateScore:
    """One candidate next turn at a session's state.

    advantage: the step's progress advantage as `critic.score` computes it (beta * log_ratio with the default sum
        token reduction); log_ratio: sum over the candidate's tokens of log pi_theta - log pi_ref; policy_logprob,
        reference_logprob: the sums of each model's log-probs (log_ratio = their difference); tokens: how many.
    baselines: each baseline's value for this step, as `TrajectoryScore.step_baselines` holds it (policy_logprob /
        reference_logprob: the MEAN token log-prob, as the methods are defined everywhere else; self_certainty; the
        DeepConf pair: the step's mean token confidence, since tail and bottom-10% windows are trajectory notions).
    variants: the progress-advantage variants' values for this step: progress_advantage_plausible always (the
        advantage if plausible, else -(IMPLAUSIBLE_OFFSET + shortfall): implausible candidates rank below every
        plausible one, the smallest shortfall first), the others when the scorer computes support statistics.
    plausible: every token has policy probability >= plausibility_alpha x the policy's top choice there (None when
        not computed); shortfall: nats by which the worst token falls below that bound (0 when plausible); gap: nats
        by which it falls below the policy's top choice (alpha-free).
    """

    advantage: float
    log_ratio: float
    policy_logprob: float
    reference_logprob: float
    tokens: int
    baselines: dict[str, float] = field(default_factory=dict)
    variants: dict[str, float] = field(default_factory=dict)
    plausible: bool | None = None
    shortfall: float | None = None
    gap: float | None = None
    truncated: bool = False
    truncation: dict | None = None
    error: str | None = None  # non-finite logits (see scoring.numeric_fault): every figure NaN

    def method_score(self, method: str) -> float:
        """The candidate's value under a method (higher = better): progress_advantage, a variant or a baseline."""
        if method == "progress_advantage":
            return self.advantage
        if method in self.variants:
            return self.variants[method]
        if method in self.baselines:
            return self.baselines[method]
        known = ["progress_advantage", *self.variants, *self.baselines]
        raise KeyError(f"method {method!r} is not scored here; known: {known}")

    def to_dict(self) -> dict:
        from .utils import json_safe

        return json_safe({k: getattr(self, k) for k in self.__dataclass_fields__})


def from_step(ts: TrajectoryScore, step: int) -> CandidateScore:
    """The CandidateScore of step `step` of a scored trajectory (the engine path; also how tests compare)."""
    st = ts.steps[step]
    n = st.tokens
    pol = ts.step_baselines.get("policy_logprob", [np.nan] * (step + 1))[step] * n
    ref = ts.step_baselines.get("reference_logprob", [np.nan] * (step + 1))[step] * n
    return CandidateScore(
        advantage=st.advantage, log_ratio=pol - ref, policy_logprob=pol, reference_logprob=ref, tokens=n,
        baselines={k: float(v[step]) for k, v in ts.step_baselines.items()},
        variants={k: float(v[step]) for k, v in ts.step_variants.items()}, truncated=bool(ts.truncation),
        truncation=ts.truncation, error=ts.error, gap=st.gap, **plausibility(st.gap, ts.plausibility_alpha),
    )  # fmt: skip


class CriticSession:
    """A conversation both models have read, ready to score candidate next assistant turns. Build it with
    `ProgressCritic.session(messages, tools=None)` (or `CriticSession(scorer, messages, tools)`).

    Lazy: the conversation and each `append` are rendered and recorded; their tokens run with the next `score`, in
    the same packed row as the candidates (pending context first, the K candidates over it), or at `flush()`. So
    one `score` after any number of appends is one forward call per model: on a small or fast model (and on a GPU,
    where small steps are launch-bound) the calls, not the tokens, were the cost.

    Counters for benchmarks: `tokens_read` (tokens fed to forward passes, per model: the pending context once and
    each candidate's own tokens), `forward_calls`.
    """

    def __init__(self, scorer, messages: list[dict], tools: list[dict] | None = None):
        self.scorer = scorer
        self.tools = tools or None
        self.messages = validate_messages(messages, "session")
        if not self.messages:
            raise ValueError("a session needs the conversation so far (at least one message)")
        policy = scorer.policy
        self._ref_model = scorer.reference.model_for(policy)
        cfgs = [_plain_model(m).config for m in (policy, self._ref_model)]
        self.limit = _position_limit(scorer.max_length, cfgs)
        self.cached = all(full_attention(c) for c in cfgs) and all(
            getattr(c, "_attn_implementation", None) in PACKED_ATTENTION for c in cfgs
        )
        self._state: Tokens | None = None  # the conversation's text and tokens (rendered at each append)
        self._kv_ids: list[int] = []  # the tokens whose keys and values the caches hold: a prefix of the state's
        self._kv: dict[str, list | None] = {"policy": None, "reference": None}
        self.tokens_read = 0
        self.forward_calls = 0
        self.overflow = False  # the conversation outgrew `limit`: every candidate goes through the engine, truncated
        self._render()

    # -- the state -----------------------------------------------------------------------------------------------
    @property
    def _ids(self) -> list[int]:
        """The conversation's token ids (what the caches will hold once every pending token has run)."""
        return self._state.ids if self._state is not None else []

    @property
    def pending(self) -> int:
        """Tokens of the conversation the caches do not hold yet (they run with the next `score` or `flush`)."""
        return len(self._ids) - _common_prefix([self._ids, self._kv_ids]) if self._state is not None else 0

    def append(self, message: dict | list[dict]) -> None:
        """Extend the state by one message (or several): a user turn, a tool result, the chosen assistant turn.
        Renders and records only: the new tokens (from where the new rendering first differs from the old) run with
        the next `score` or `flush`."""
        new = message if isinstance(message, list) else [message]
        self.messages = self.messages + validate_messages(new, "session.append", start=len(self.messages))
        self._render()

    def _render(self) -> None:
        if not self.cached or self.overflow:
            return
        # The history as the template writes it now (a template that rewrites earlier turns, e.g. drops their
        # reasoning, rewrites the state from there: what the model reads next). chat_text: reasoning under the
        # template's key, dict arguments as JSON strings where the template needs them.
        text = chat_text(self.scorer.tokenizer, self.messages, self.tools)
        # only the new text is tokenized (from the last special token the two renderings share)
        self._state = tokenize(self.scorer.tokenizer, text, self._state, "session")
        if self.limit is not None and len(self._state.ids) >= self.limit:
            # no room left for a candidate in the model's positions: the engine truncates from here on
            self.overflow, self._state, self._kv_ids, self._kv = True, None, [], {"policy": None, "reference": None}

    @torch.no_grad()
    def flush(self) -> None:
        """Run the pending tokens now (one forward call per model), so that the next `score` reads only candidates."""
        if not self.pending:
            return
        ids, keep = self._ids, _common_prefix([self._ids, self._kv_ids])
        flat, pos = ids[keep:], list(range(keep, len(ids)))
        for who in ("policy", "reference"):
            model = self.scorer.policy if who == "policy" else self._ref_model
            self._forward(who, model, keep, flat, pos, mask=None, keep_after=len(ids))
        self._kv_ids = list(ids)

    def _forward(self, who, model, keep: int, flat: list[int], pos: list[int], mask, keep_after: int) -> torch.Tensor:
        """One pass of `model` over `flat` on top of the cache cut at `keep` (a 4D float `mask`, or None: causal);
        the cache then holds the first `keep_after` positions. Returns the final states ([N, H], or logits for a
        full-forward model)."""
        from transformers import DynamicCache

        states, _ = _states_fn(model)
        dev = _device(model)
        cfg = _plain_model(model).config
        cache = DynamicCache(config=cfg)
        if keep:  # views of the session's tensors: the forward's concatenation is the one copy
            for layer, (k, v) in zip(cache.layers, self._kv[who]):
                layer.lazy_initialization(k, v)
                layer.keys, layer.values = k[:, :, :keep], v[:, :, :keep]
        ids = torch.tensor([flat], device=dev)
        position_ids = torch.tensor([pos], device=dev)
        if mask is None:
            mask = torch.ones((1, keep + len(flat)), dtype=torch.long, device=dev)
        with _eval_mode(model), self._active(who):
            h = states(ids, mask, position_ids, past_key_values=cache)
        if cache.get_seq_length() != keep + len(flat):
            raise RuntimeError("this model did not fill the KV cache it was given; sessions cannot cache it")
        # the candidates' keys are cut off; what is kept is the state's (a view, the session's own from now on)
        self._kv[who] = [(layer.keys[:, :, :keep_after], layer.values[:, :, :keep_after]) for layer in cache.layers]
        self.tokens_read += len(flat)
        self.forward_calls += 1
        return h[0]

    def _active(self, who: str):
        import contextlib

        return self.scorer.reference.active(self.scorer.policy) if who == "reference" else contextlib.nullcontext()

    # -- candidates ----------------------------------------------------------------------------------------------
    def _trajectory(self, candidate: dict, i: int) -> Trajectory:
        (msg,) = validate_messages([candidate], f"candidate {i}", start=len(self.messages))
        if msg["role"] != "assistant":
            from .trajectories import RecordError, TrajectoryError

            raise TrajectoryError([RecordError(f"candidate {i}", f"messages[{len(self.messages)}].role",
                                               f"a candidate is the next assistant turn, got role {msg['role']!r}")])
        return Trajectory(id=f"candidate-{i}", messages=self.messages + [msg], tools=self.tools)

    @torch.no_grad()
    def score(self, candidates: list[dict]) -> list[CandidateScore]:
        """One CandidateScore per candidate next assistant message ({"content", "tool_calls"?}; "role" may be
        omitted), in their order. The pending context runs in the same pass; the candidates never enter the
        cache: scoring again gives the same numbers."""
        cands = [{"role": "assistant", **c} if isinstance(c, dict) and "role" not in c else c for c in candidates]
        trajs = [self._trajectory(c, i) for i, c in enumerate(cands)]
        if not trajs:
            return []
        out: list[CandidateScore | None] = [None] * len(trajs)
        packed, engine = [], []
        for i, t in enumerate(trajs):
            if self.cached and not self.overflow:
                # as generated: its generation prompt, then the turn (a template that rewrites history is read as
                # the model read it; on a prefix-preserving one, the same ids as the whole conversation)
                ids, span = render_step(t, self.scorer.tokenizer, len(self.messages))
                if self.limit is None or len(ids) <= self.limit:
                    packed.append((i, ids, span))
                    continue
            engine.append(i)
        if packed:
            if self.pending > PENDING_ALONE:
                self.flush()
            for (i, _, _), res in zip(packed, self._score_packed(packed)):
                out[i] = res
        if engine:
            scorer = self.scorer
            if self.limit is not None and scorer.max_length != self.limit:
                scorer = copy.copy(scorer)  # shares the models; only the cut differs
                scorer.max_length = self.limit
            for i, ts in zip(engine, scorer.score([trajs[i] for i in engine])):
                out[i] = from_step(ts, ts.steps[-1].index)
        return out  # type: ignore[return-value]

    def _score_packed(self, items) -> list[CandidateScore]:
        cfg = self.scorer.config
        state = self._ids
        # The row: the state's pending tokens [c, d) first (they enter the cache), then each candidate from d, where
        # the candidates' renderings leave the state's. c: what the cache holds, and at most one token before every
        # span, so the state that predicts a span's first token is computed in this pass (none is stored).
        d = min(_common_prefix([ids, state]) for _, ids, _ in items)
        c = min(_common_prefix([state, self._kv_ids]), d, *(max(s, 1) - 1 for _, _, (s, e) in items))
        seqs = [ids[d:] for _, ids, _ in items]
        offs = np.cumsum([d - c] + [len(s) for s in seqs])
        flat = state[c:d] + [t for s in seqs for t in s]
        pos = list(range(c, d)) + [d + j for s in seqs for j in range(len(s))]
        seg = np.repeat(np.arange(len(offs)), np.diff(np.concatenate([[0], offs])))  # 0: the state, k + 1: candidate k
        # rows of the packed sequence that predict an action token, and the tokens they predict
        rows, targets, lens = [], [], []
        for k, (_, ids, (s, e)) in enumerate(items):
            s = max(s, 1)
            rows.extend(p - 1 - c if p - 1 < d else int(offs[k]) + p - 1 - d for p in range(s, e))
            targets.extend(ids[s:e])
            lens.append(e - s)
        kw = dict(temperature=cfg.temperature, chunk_size=self.scorer.chunk_size)
        support = cfg.wants_support
        res, masks = {}, {}
        for who in ("policy", "reference"):
            model = self.scorer.policy if who == "policy" else self._ref_model
            states, head = _states_fn(model)
            dev = _device(model)
            dtype = _mask_dtype(model)
            if (dev, dtype) not in masks:
                masks[dev, dtype] = _packed_mask(seg, c, dev, dtype)
            h = self._forward(who, model, c, flat, pos, masks[dev, dtype], keep_after=d)
            idx = torch.tensor(rows, dtype=torch.long, device=dev)
            tgt = torch.tensor(targets, dtype=torch.long, device=dev)
            with self._active(who):
                if who == "policy":
                    res[who] = token_logprob_stats(h[idx], head, tgt, topk=cfg.topk, keep_logprobs=support, with_top1=True,
                                                   with_vocab_stats=self.scorer.compute_baselines, **kw)
                else:
                    res[who] = token_logprob_stats(h[idx], head, tgt, other_logprobs=res["policy"].pop("logprobs", None), **kw)
        self._kv_ids = state[:d]
        pol, ref = res["policy"], res["reference"]
        vocab = _plain_model(self.scorer.policy).get_output_embeddings().weight.shape[0] if self.scorer.compute_baselines else None
        arrays = {"policy_logp": pol["logp"], "reference_logp": ref["logp"], "policy_top1_logp": pol["top1_logp"]}
        if self.scorer.compute_baselines:
            arrays["policy_mean_logp"], arrays["policy_topk_logp"] = pol["mean_logp"], pol["topk_logp"]
        if support:
            arrays["kl_policy_ref"], arrays["kl_ref_policy"] = ref["kl_other_self"], ref["kl_self_other"]
        arrays = {k: v.double().cpu().numpy() for k, v in arrays.items()}
        out, a = [], 0
        for n in lens:
            out.append(_candidate(arrays, a, n, vocab, cfg))
            a += n
        return out

    def choose(self, candidates: list[dict], method: str | None = None, *, seed: int = 0) -> int:
        """Index of the candidate `method` ranks highest (default: the critic's variant; any baseline too), by the
        library's one selection rule (`evaluation.pick_best`: NaN ranks last, ties broken by a seeded draw)."""
        from .evaluation.selection import pick_best

        method = method or self.scorer.config.variant
        results = self.score(candidates)
        return pick_best([r.method_score(method) for r in results], "session", seed)

    def __repr__(self) -> str:
        return (f"CriticSession(messages={len(self.messages)}, cached_tokens={len(self._kv_ids)}, pending={self.pending}, "
                f"cached={self.cached}, overflow={self.overflow})")


def _candidate(arrays: dict[str, np.ndarray], a: int, n: int, vocab: int | None, cfg) -> CandidateScore:
    """One candidate's figures from its tokens [a, a + n) of the packed pass's per-token arrays."""
    st = TokenStats(step=np.zeros(n, dtype=np.int64), vocab_size=vocab, **{k: v[a : a + n] for k, v in arrays.items()})
    ts = score_from_token_stats(st, 1, cfg)
    res = from_step(ts, 0)
    # the sums straight from the token log-probs (from_step's mean * n would round twice)
    res.policy_logprob, res.reference_logprob = float(st.policy_logp.sum()), float(st.reference_logp.sum())
    res.log_ratio = float(st.log_ratio.sum())
    if ts.error:
        res.policy_logprob = res.reference_logprob = res.log_ratio = float("nan")
    return res


def _mask_dtype(model) -> torch.dtype:
    dtype = next(model.parameters()).dtype
    return dtype if dtype.is_floating_point else torch.float32


def _packed_mask(seg: np.ndarray, keep: int, dev, dtype) -> torch.Tensor:
    """[1, 1, N, keep + N] additive mask of a packed row: every token sees the cache (`keep` positions) and earlier
    tokens of its own segment and of the state's (segment 0); nothing of the other candidates."""
    seg = torch.as_tensor(seg, device=dev)
    N = seg.numel()
    own = ((seg[:, None] == seg[None, :]) | (seg[None, :] == 0)) & torch.ones((N, N), dtype=torch.bool, device=dev).tril()
    mask = torch.zeros((1, 1, N, keep + N), dtype=dtype, device=dev)
    mask[0, 0, :, keep:].masked_fill_(~own, torch.finfo(dtype).min)
    return mask


def _position_limit(max_length: int | None, configs) -> int | None:
    """The longest conversation scored without a cut: the scorer's max_length and each model's positions."""
    limits = [max_length] + [getattr(c, "max_position_embeddings", None) for c in configs]
    limits = [x for x in limits if isinstance(x, int) and x > 0]
    return min(limits) if limits else None
