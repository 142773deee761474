"""The critic in the agent loop: score K candidate next turns at one state, over a cached conversation.

    critic = ProgressCritic.from_pretrained("runs/demo/bundle")
    session = critic.session(messages, tools=tools)      # both models read the conversation once (KV caches)
    results = session.score(candidates)                  # one CandidateScore per candidate, in order
    k = session.choose(candidates)                       # the index the critic ranks highest (pick_best's tie rule)
    session.append(candidates[k]); session.append(tool_result)   # extends the caches by the new tokens only

Why one state: among candidates a_1..a_K at the same state s, beta * log pi_theta(a|s)/pi_ref(a|s) ranks them by
Q*(s,a) - V*(s), and V*(s), the on-policy offset KL(pi_theta||pi_ref)(s) and the luck still to come are shared by all
of them; ranking whole trajectories pays for all three (docs/steering.md has the measurements).

Exactness: a candidate's figures are those `critic.score` gives its step when the candidate is appended to the
conversation and the whole is scored (the same chat-template rendering, spans and `scoring` functions; tests check
1e-5). How: the cache holds the tokens of `apply_chat_template(messages)`; each candidate's conversation is rendered
as generated (`rendering.render_step`: its generation prompt, then the turn), its common prefix with the cached ids
is kept, and the rest runs on top of the cache starting one token before the candidate's span, so the state that
predicts the span's first token is computed in the same pass (no hidden state has to be stored). Where a template
rewrites earlier text (drops the reasoning of earlier turns), the cache follows the history as the template rewrites
it, the common prefix is shorter and more is recomputed; a candidate, the latest turn, is read in its generation
prompt's context as the model read it, so its figures are those of its step scored as generated
(`rendering.render_as_generated`).

Cost: K candidates share one read-only cache. They run as ONE packed row (a 4D attention mask lets each candidate
see the cache and its own earlier tokens only, with position ids restarting at the state's end), so the cache is
read once and copied once per model, not K times (a batch of K rows over an expanded cache materialises K copies in
every layer's concatenation: benchmarks/README.md measures both). Models whose attention cannot take a custom 4D
mask, or whose cache a continuation cannot extend (sliding-window, linear attention), take the engine's path:
`scorer.score` on the K whole conversations (exact, slower).

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
from .rendering import chat_text, render_step
from .scoring import TokenStats, TrajectoryScore, score_from_token_stats, shortfalls, token_logprob_stats
from .trajectories import Trajectory, validate_messages

# Attention implementations that take a custom 4D float mask as given (transformers' masking_utils returns a 4D
# mask unchanged; eager adds it, SDPA passes it on). Others (flash attention, flex) take the engine's path.
PACKED_ATTENTION = ("eager", "sdpa")


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
        truncation=ts.truncation, error=ts.error, **_plausibility(st.gap, ts.plausibility_alpha),
    )  # fmt: skip


def _plausibility(gap: float | None, alpha: float | None) -> dict:
    """CandidateScore's plausible / shortfall / gap for a step's gap at alpha (None where not computed)."""
    if gap is None or alpha is None or not np.isfinite(gap):
        return {"gap": gap}
    short = float(shortfalls(np.array([gap]), alpha)[0])
    return {"plausible": short == 0.0, "shortfall": short, "gap": float(gap)}


class CriticSession:
    """A conversation both models have read, ready to score candidate next assistant turns. Build it with
    `ProgressCritic.session(messages, tools=None)` (or `CriticSession(scorer, messages, tools)`).

    Counters for benchmarks: `tokens_read` (tokens fed to forward passes, per model, so `append` costs the new tokens
    and `score` the candidates' tokens plus one), `forward_calls`.
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
        self._ids: list[int] = []
        self._kv: dict[str, list | None] = {"policy": None, "reference": None}
        self.tokens_read = 0
        self.forward_calls = 0
        self.overflow = False  # the conversation outgrew `limit`: every candidate goes through the engine, truncated
        self._sync()

    # -- the state -----------------------------------------------------------------------------------------------
    def _state_ids(self) -> list[int]:
        # The history as the template writes it now (a template that rewrites earlier turns, e.g. drops their
        # reasoning, rewrites the cache from there: what the model reads next). chat_text: reasoning under the
        # template's key, dict arguments as JSON strings where the template needs them.
        text = chat_text(self.scorer.tokenizer, self.messages, self.tools)
        return list(self.scorer.tokenizer(text, add_special_tokens=False)["input_ids"])

    def append(self, message: dict | list[dict]) -> None:
        """Extend the state by one message (or several): a user turn, a tool result, the chosen assistant turn. The
        caches grow by the new tokens only (from where the new rendering first differs from the cached one)."""
        new = message if isinstance(message, list) else [message]
        self.messages = self.messages + validate_messages(new, "session.append", start=len(self.messages))
        self._sync()

    def _sync(self) -> None:
        if not self.cached or self.overflow:
            return
        ids = self._state_ids()
        if self.limit is not None and len(ids) >= self.limit:
            # no room left for a candidate in the model's positions: the engine truncates from here on
            self.overflow, self._ids, self._kv = True, [], {"policy": None, "reference": None}
            return
        c = _common_prefix([ids, self._ids])
        if c == len(ids) == len(self._ids):
            return
        for who in ("policy", "reference"):
            self._kv[who] = self._extend(who, self._kv[who], c, ids)
        self._ids = ids

    @torch.no_grad()
    def _extend(self, who: str, kv, keep: int, ids: list[int]):
        from transformers import DynamicCache

        model = self.scorer.policy if who == "policy" else self._ref_model
        states, _ = _states_fn(model)
        dev = _device(model)
        cfg = _plain_model(model).config
        cache = DynamicCache(config=cfg) if not keep or kv is None else DynamicCache([(k[:, :, :keep], v[:, :, :keep]) for k, v in kv])
        keep = cache.get_seq_length()
        new = torch.tensor([ids[keep:]], device=dev)
        mask = torch.ones((1, len(ids)), dtype=torch.long, device=dev)
        pos = torch.arange(keep, len(ids), device=dev)[None]
        with _eval_mode(model), self._active(who):
            states(new, mask, pos, past_key_values=cache)
        if cache.get_seq_length() != len(ids):
            raise RuntimeError("this model did not fill the KV cache it was given; sessions cannot cache it")
        self.tokens_read += new.shape[1]
        self.forward_calls += 1
        return [(layer.keys, layer.values) for layer in cache.layers]

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
        omitted), in their order. The cache is read, never changed: scoring again gives the same numbers."""
        cands = [{"role": "assistant", **c} if isinstance(c, dict) and "role" not in c else c for c in candidates]
        trajs = [self._trajectory(c, i) for i, c in enumerate(cands)]
        if not trajs:
            return []
        out: list[CandidateScore | None] = [None] * len(trajs)
        packed, engine = [], []
        for i, t in enumerate(trajs):
            ids, span = render_step(t, self.scorer.tokenizer, len(self.messages))
            if self.cached and not self.overflow and (self.limit is None or len(ids) <= self.limit):
                packed.append((i, ids, span))
            else:
                engine.append(i)
        if packed:
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
        # Each candidate runs from one token before its span (or where its rendering leaves the cached ids, if
        # earlier): that token's state predicts the span's first token.
        q = min(min(_common_prefix([ids, self._ids]), s) - 1 for _, ids, (s, e) in items)
        q = max(q, 0)
        seqs = [ids[q:] for _, ids, _ in items]
        offs = np.cumsum([0] + [len(s) for s in seqs])
        N = int(offs[-1])
        flat = [t for s in seqs for t in s]
        pos = [q + j for s in seqs for j in range(len(s))]
        # rows of the packed sequence that predict an action token, and the tokens they predict
        rows, targets, lens = [], [], []
        for k, (_, ids, (s, e)) in enumerate(items):
            s = max(s, 1)
            rows.extend(int(offs[k]) + p - 1 - q for p in range(s, e))
            targets.extend(ids[s:e])
            lens.append(e - s)
        kw = dict(temperature=cfg.temperature, chunk_size=self.scorer.chunk_size)
        support = cfg.wants_support
        res = {}
        for who in ("policy", "reference"):
            model = self.scorer.policy if who == "policy" else self._ref_model
            states, head = _states_fn(model)
            dev = _device(model)
            h = self._run_packed(who, model, states, dev, q, flat, pos, offs)
            idx = torch.tensor(rows, dtype=torch.long, device=dev)
            tgt = torch.tensor(targets, dtype=torch.long, device=dev)
            with self._active(who):
                if who == "policy":
                    res[who] = token_logprob_stats(h[idx], head, tgt, topk=cfg.topk, keep_logprobs=support, with_top1=True,
                                                   with_vocab_stats=self.scorer.compute_baselines, **kw)
                else:
                    res[who] = token_logprob_stats(h[idx], head, tgt, other_logprobs=res["policy"].pop("logprobs", None), **kw)
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
            st = TokenStats(step=np.zeros(n, dtype=np.int64), vocab_size=vocab, **{k: v[a : a + n] for k, v in arrays.items()})
            a += n
            ts = score_from_token_stats(st, 1, cfg)
            res_k = from_step(ts, 0)
            # the sums straight from the token log-probs (from_step's mean * n would round twice)
            res_k.policy_logprob, res_k.reference_logprob = float(st.policy_logp.sum()), float(st.reference_logp.sum())
            res_k.log_ratio = float(st.log_ratio.sum())
            if ts.error:
                res_k.policy_logprob = res_k.reference_logprob = res_k.log_ratio = float("nan")
            out.append(res_k)
        return out

    def _run_packed(self, who, model, states, dev, q, flat, pos, offs) -> torch.Tensor:
        """Final states of the packed candidates ([N, H], or logits for a full-forward model) over the cache cut at q."""
        from transformers import DynamicCache

        N = len(flat)
        kv = self._kv[who]
        cache = DynamicCache([(k[:, :, :q], v[:, :, :q]) for k, v in kv]) if q else DynamicCache(config=_plain_model(model).config)
        dtype = next(model.parameters()).dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        # a token sees the whole cache and its own candidate's earlier tokens; nothing of the other candidates
        seg = torch.as_tensor(np.repeat(np.arange(len(offs) - 1), np.diff(offs)), device=dev)
        own = (seg[:, None] == seg[None, :]) & torch.ones((N, N), dtype=torch.bool, device=dev).tril()
        allowed = torch.cat([torch.ones((N, q), dtype=torch.bool, device=dev), own], dim=1)
        mask = torch.zeros((1, 1, N, q + N), dtype=dtype, device=dev)
        mask.masked_fill_(~allowed[None, None], torch.finfo(dtype).min)
        ids = torch.tensor([flat], device=dev)
        position_ids = torch.tensor([pos], device=dev)
        with _eval_mode(model), self._active(who):
            h = states(ids, mask, position_ids, past_key_values=cache)
        del cache  # the concatenated copy; the session's own tensors are untouched
        self.tokens_read += N
        self.forward_calls += 1
        return h[0]

    def choose(self, candidates: list[dict], method: str | None = None, *, seed: int = 0) -> int:
        """Index of the candidate `method` ranks highest (default: the critic's variant; any baseline too), by the
        library's one selection rule (`evaluation.pick_best`: NaN ranks last, ties broken by a seeded draw)."""
        from .evaluation.selection import pick_best

        method = method or self.scorer.config.variant
        results = self.score(candidates)
        return pick_best([r.method_score(method) for r in results], "session", seed)

    def __repr__(self) -> str:
        return (f"CriticSession(messages={len(self.messages)}, cached_tokens={len(self._ids)}, cached={self.cached}, "
                f"overflow={self.overflow})")


def _position_limit(max_length: int | None, configs) -> int | None:
    """The longest conversation scored without a cut: the scorer's max_length and each model's positions."""
    limits = [max_length] + [getattr(c, "max_position_embeddings", None) for c in configs]
    limits = [x for x in limits if isinstance(x, int) and x > 0]
    return min(limits) if limits else None
