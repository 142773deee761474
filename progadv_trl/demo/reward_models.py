"""Reward models trained for the job, beside the critic RL left behind: an outcome reward model (ORM) and a process
reward model (PRM, Math-Shepherd style), each the reference's size and architecture with a scalar head.

    rms = train_reward_models(cfg, models, tokenizer)     # {"orm": RewardModel, "prm": RewardModel}
    rms["prm"].score_records(records)                     # [{"score": float, "steps": [float per assistant turn]}]
    rms["prm"].score_candidates(messages, candidates)     # [float per candidate next turn]
    add_reward_model_scores(scores, records, rms)         # TrajectoryScore.baselines["orm"] / step_baselines["orm"]

Both are `AutoModelForSequenceClassification` (Qwen2's scalar `score` head on the reference checkpoint: the same
weights and size as the critic's two models) and are trained on labelled rollouts of every model given (the reference
and the RL policy; any dict of named models) on the TRAIN task split only, never on the tasks they are evaluated on.

- ORM: one label per rollout (success 1 / failure 0), binary cross-entropy on the scalar at the conversation's last
  token. Its trajectory score is that scalar on the whole conversation; its per-step values are the scalar after each
  assistant turn (so the evaluation's rules by cross-validation apply to it as to every baseline).
- PRM: one label per assistant turn, the success rate of `rm_continuations` continuations from that turn: the world
  is replayed to the state before the turn (same seed, same dice), re-seeded, the turn is taken (the world answers
  with fresh dice) and the model that made the rollout plays on. A turn at or after the rollout's first mistake is
  labelled 0 without playing (in this world every continuation of it fails), and a turn that ends the episode by the
  world's verdict; both are counted apart from the continuations played. Soft labels, binary cross-entropy on the
  scalar at the end of each turn's tokens (one forward pass reads every prefix: the model is causal). Its trajectory
  score is the minimum over steps (`RewardModel.reduction`); the evaluation's CV rules offer the other reductions.

The score of a step is the sigmoid of the scalar: the model's estimate of P(success), outcome or from that step on.
Costs (process CPU seconds, wall seconds, rollouts, continuations, optimizer steps) are returned with each model;
the critic's are zero: it is the RL run's own pair of models.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .rollout import episode_tokens, play
from .world import Episode, episode_seed, replay

KINDS = ("orm", "prm")


# ----------------------------------------------------------------------------------------------------------------
# Scoring: one interface for both


def _get(rec, key, default=None):
    return rec.get(key, default) if isinstance(rec, dict) else getattr(rec, key, default)


def _tokens(tokenizer, messages: list[dict], tools=None) -> tuple[list[int], list[int]]:
    """(token ids of the conversation, the position of each assistant turn's last token, its end-of-turn). Tokenized
    as the rollouts were (`episode_tokens`: each turn as the template writes it), which for the demo's records is the
    whole rendered conversation tokenized once."""
    prompt, comp, mask = episode_tokens(tokenizer, messages, tools=tools)
    ends = [len(prompt) + i for i in range(len(mask)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
    return prompt + comp, ends


def _forward(model, rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """The scalar head at every position ([B, L] logits) of right-padded rows: a causal model's value at a position
    reads only the tokens up to it, so one pass gives every prefix's value."""
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        attn[i, : len(r)] = 1
    device = next(model.parameters()).device
    hidden = getattr(model, model.base_model_prefix)(input_ids=ids.to(device), attention_mask=attn.to(device)).last_hidden_state
    return model.score(hidden).squeeze(-1).float()


class RewardModel:
    """A trained reward model (kind "orm" or "prm") behind the interface the evaluation and step selection use.

    score_records(records) -> [{"score", "steps"}]: per record (dicts or `Trajectory`s, in order) the trajectory score
        and one value per assistant turn (the sigmoid of the scalar at the end of that turn). ORM: score = the scalar
        at the conversation's last token (the whole conversation, as it was trained). PRM: score = `reduction` of
        the step values ("min": the weakest step, Math-Shepherd's usual choice; or "last", "mean", "prod").
    score_candidates(messages, candidates) -> [float]: each candidate next assistant turn's value, the last step
        value of messages + [candidate] (equal to `score_records` on that conversation).
    `cost`: what training it took (see `train_reward_models`)."""

    def __init__(self, model, tokenizer, kind: str, *, reduction: str = "min", batch_size: int = 32,
                 cost: dict | None = None):  # fmt: skip
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if reduction not in ("min", "last", "mean", "prod"):
            raise ValueError(f"reduction must be min, last, mean or prod, got {reduction!r}")
        self.model, self.tokenizer, self.kind = model.eval(), tokenizer, kind
        self.reduction, self.batch_size, self.cost = reduction, batch_size, cost or {}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @classmethod
    def from_pretrained(cls, path, kind: str, **kw) -> "RewardModel":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from .pipeline import ATTN

        model = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation=ATTN)
        return cls(model, AutoTokenizer.from_pretrained(path), kind, **kw)

    def save_pretrained(self, path) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    @torch.no_grad()
    def _values(self, conversations: list[tuple[list[dict], list | None]]) -> list[tuple[list[float], float]]:
        """Per conversation: (the sigmoid at each assistant turn's end, the sigmoid at the last token)."""
        toks = [_tokens(self.tokenizer, msgs, tools) for msgs, tools in conversations]
        out: list = [None] * len(toks)
        order = sorted(range(len(toks)), key=lambda i: len(toks[i][0]))  # similar lengths together: less padding
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            v = torch.sigmoid(_forward(self.model, [toks[i][0] for i in idx], self.pad_id))
            for row, i in enumerate(idx):
                ids, ends = toks[i]
                out[i] = (v[row, ends].tolist(), float(v[row, len(ids) - 1]))
        return out

    def _reduce(self, steps: list[float], last_token: float) -> float:
        if self.kind == "orm":
            return last_token
        if not steps:
            return float("nan")
        a = np.asarray(steps, dtype=np.float64)
        return float({"min": a.min, "last": lambda: a[-1], "mean": a.mean, "prod": a.prod}[self.reduction]())

    def score_records(self, records) -> list[dict]:
        vals = self._values([(_get(r, "messages"), _get(r, "tools")) for r in records])
        return [{"score": self._reduce(steps, last), "steps": steps} for steps, last in vals]

    def score_candidates(self, messages: list[dict], candidates: list[dict], tools=None) -> list[float]:
        convs = [(list(messages) + [{"role": "assistant", **c}], tools) for c in candidates]
        return [steps[-1] for steps, _ in self._values(convs)]


def add_reward_model_scores(scores, records, reward_models: dict) -> None:
    """Fill `TrajectoryScore.baselines[name]` and `step_baselines[name]` of each score from each reward model
    ({name: RewardModel}); scores and records are matched by id (a score without its record is left as it is, so
    the method is NaN there, as any baseline not computed). Reward models are baselines: never in the
    progress-advantage family, so the fair comparison's best baseline may be one of them."""
    by_id = {str(_get(r, "id")): r for r in records}
    todo = [ts for ts in scores if ts.id in by_id and getattr(ts, "error", None) is None]
    recs = [by_id[ts.id] for ts in todo]
    for name, rm in reward_models.items():
        for ts, r in zip(todo, rm.score_records(recs)):
            steps = r["steps"]
            if len(steps) != len(ts.steps):  # both count the assistant turns; a truncated score may hold fewer
                steps = (steps + [float("nan")] * len(ts.steps))[: len(ts.steps)]
            ts.baselines[name], ts.step_baselines[name] = r["score"], steps


# ----------------------------------------------------------------------------------------------------------------
# Labels


def prm_labels(records: list[dict], tasks, finish, *, k: int, seed: int, world=None) -> tuple[list[list[float]], dict]:
    """Math-Shepherd labels: per record, per assistant turn t, the success rate of `k` continuations from (s_t, a_t).

    Each continuation replays the record's episode through turn t-1 with its own seed (the same states), draws fresh
    dice from then on (`episode_seed(seed, "prm", id, t, j)`), takes turn t, and is played to the end by
    `finish(episodes)` (the rollout's model; it plays the unfinished episodes given, in place). A turn at or after the
    record's first mistake gets 0 unplayed: every continuation of it fails in this world.

    `tasks`: the tasks the records were played on (by id). Returns (labels, {"continuations": played by the model,
    "resolved_by_world": decided without playing (after a mistake, or the episode ended with the turn),
    "episodes": {(record index, t): [k continuation Episodes]}})."""
    by_id = {t.id: t for t in tasks}
    labels, conts, pending = [], {}, []
    resolved = 0
    for i, rec in enumerate(records):
        task, ep_seed = by_id[rec["group"]], rec["metadata"]["seed"]
        turns = [m for m in rec["messages"] if m["role"] == "assistant"]
        fs = rec["failure_step"]  # None for a success and for a luck failure: then every turn was right
        row = []
        for t in range(len(turns)):
            if fs is not None and t >= fs:
                row.append(0.0)
                resolved += k
                continue
            eps = []
            for j in range(k):
                ep = replay(task, ep_seed, turns[:t], world)
                if j == 0 and ep.messages != rec["messages"][: len(ep.messages)]:
                    raise RuntimeError(f"{rec['id']}: replaying it did not rebuild its state before turn {t}")
                ep.rng = random.Random(episode_seed(seed, "prm", rec["id"], t, j))  # fresh dice from turn t on
                ep.step(dict(turns[t]))
                eps.append(ep)
            conts[i, t] = eps
            live = [ep for ep in eps if not ep.done]
            resolved += k - len(live)
            pending += live
            row.append(float("nan"))  # filled once the continuations are played
        labels.append(row)
    if pending:
        finish(pending)
    for (i, t), eps in conts.items():
        labels[i][t] = float(np.mean([ep.success for ep in eps]))
    return labels, {"continuations": len(pending), "resolved_by_world": resolved, "episodes": conts}


# ----------------------------------------------------------------------------------------------------------------
# Training


@dataclass
class RewardModelCost:
    """What one reward model took. `cpu_s`/`wall_s`: everything (sampling its rollouts, labelling, training)."""

    cpu_s: float = 0.0
    wall_s: float = 0.0
    sampling_cpu_s: float = 0.0
    labelling_cpu_s: float = 0.0
    training_cpu_s: float = 0.0
    rollouts: int = 0
    continuations: int = 0
    resolved_by_world: int = 0
    examples: int = 0
    labelled_positions: int = 0
    training_steps: int = 0
    by_model: dict = field(default_factory=dict)


def critic_cost() -> dict:
    """The critic's cost beside the reward models': none beyond the RL run (its two models are the policy and the
    reference the KL term already anchored it to)."""
    return {"cpu_s": 0.0, "wall_s": 0.0, "rollouts": 0, "continuations": 0, "training_steps": 0,
            "note": "the RL run's own policy and reference: no training, no rollouts of its own"}  # fmt: skip


def _clock():
    return time.process_time(), time.perf_counter()


def sample_training_rollouts(cfg, models: dict, tokenizer) -> tuple[dict[str, list[dict]], dict]:
    """Labelled rollouts of each model on the first `rm_rollouts` tasks of the TRAIN split (one each), with fresh
    dice. Returns ({model name: records}, {model name: CPU seconds})."""
    from .pipeline import sample_rollouts

    tasks = cfg.tasks("train")[: cfg.rm_rollouts]
    out, cpu = {}, {}
    for name, m in models.items():
        c0 = time.process_time()
        out[name] = sample_rollouts(m, tokenizer, tasks, 1, cfg.temperature, seed=episode_seed(cfg.seed, "rm"),
                                    world=cfg.world, max_new_tokens=cfg.max_new_tokens, tag=f"rm-{name}")  # fmt: skip
        cpu[name] = time.process_time() - c0
    check_train_split(cfg, [r for recs in out.values() for r in recs])
    return out, cpu


def check_train_split(cfg, records) -> None:
    """Reward models learn from the train split only: every record's task must be one of its tasks."""
    train = {t.id for t in cfg.tasks("train")}
    bad = sorted({r["group"] for r in records} - train)
    if bad:
        raise ValueError(f"reward-model training data must come from the train split; tasks {bad[:3]} are not in it")


def train_head(cfg, tokenizer, examples: list[tuple[list[int], list[int], list[float]]], seed: int):
    """A scalar head on the reference checkpoint (`AutoModelForSequenceClassification`, num_labels=1), trained by
    binary cross-entropy of the scalar at the given positions against soft targets. `examples`: (token ids,
    positions, targets). A plain loop, as the demo's pretraining: a few hundred short rows, no Trainer needed.
    Returns (model in eval mode, optimizer steps)."""
    from transformers import AutoModelForSequenceClassification

    from .pipeline import ATTN

    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report would list the new head as missing: it is new by design
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(cfg.path("reference")), num_labels=1,
                                                                   attn_implementation=ATTN)  # fmt: skip
    finally:
        hf_logging.set_verbosity(level)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.config.pad_token_id = pad
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.rm_lr, weight_decay=0.0)
    bs = cfg.rm_batch_size
    steps = max(1, math.ceil(cfg.rm_epochs * math.ceil(len(examples) / bs)))
    rng = random.Random(seed)
    order: list[int] = []
    model.train()
    for step in range(steps):
        if len(order) < bs:
            perm = list(range(len(examples)))
            rng.shuffle(perm)
            order += perm
        batch, order = [examples[i] for i in order[:bs]], order[bs:]
        for g in opt.param_groups:  # short warm-up, then linear decay to 0: the new head starts random
            g["lr"] = cfg.rm_lr * min(1.0, (step + 1) / max(1, steps // 10)) * (1 - step / steps)
        v = _forward(model, [x[0] for x in batch], pad)
        rows = torch.tensor([b for b, x in enumerate(batch) for _ in x[1]])
        cols = torch.tensor([p for x in batch for p in x[1]])
        y = torch.tensor([t for x in batch for t in x[2]], dtype=torch.float32)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(v[rows, cols], y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return model.eval(), steps


def train_orm(cfg, tokenizer, rollouts: dict[str, list[dict]]) -> tuple[RewardModel, dict]:
    """The ORM on every rollout given ({model name: labelled records of the train split}): success at the last token."""
    c0, w0 = _clock()
    recs = [r for rs in rollouts.values() for r in rs]
    check_train_split(cfg, recs)
    examples = []
    for r in recs:
        ids, _ = _tokens(tokenizer, r["messages"], r.get("tools"))
        examples.append((ids, [len(ids) - 1], [float(bool(r["success"]))]))
    model, steps = train_head(cfg, tokenizer, examples, episode_seed(cfg.seed, "orm"))
    c1, w1 = _clock()
    cost = RewardModelCost(cpu_s=c1 - c0, wall_s=w1 - w0, training_cpu_s=c1 - c0, rollouts=len(recs),
                           examples=len(examples), labelled_positions=len(examples), training_steps=steps)  # fmt: skip
    return RewardModel(model, tokenizer, "orm"), cost.__dict__


def train_prm(cfg, models: dict, tokenizer, rollouts: dict[str, list[dict]]) -> tuple[RewardModel, dict]:
    """The PRM on the first `rm_prm_rollouts` rollouts of each model, labelled by `prm_labels` with continuations
    played by that model: the success rate at the end of every assistant turn."""
    c0, w0 = _clock()
    examples, cost = [], RewardModelCost()
    for name, recs in rollouts.items():
        recs = recs[: cfg.rm_prm_rollouts]
        check_train_split(cfg, recs)
        gen = torch.Generator().manual_seed(episode_seed(cfg.seed, "prm-sample", name))
        model = models[name]

        def finish(eps: list[Episode], model=model, gen=gen) -> None:
            play(model, tokenizer, eps, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, generator=gen)

        l0 = time.process_time()
        labels, stats = prm_labels(recs, cfg.tasks("train"), finish, k=cfg.rm_continuations, seed=cfg.seed,
                                   world=cfg.world)  # fmt: skip
        cost.labelling_cpu_s += time.process_time() - l0
        cost.rollouts += len(recs)
        cost.continuations += stats["continuations"]
        cost.resolved_by_world += stats["resolved_by_world"]
        cost.by_model[name] = {"rollouts": len(recs), "continuations": stats["continuations"],
                               "mean_label": float(np.mean([x for row in labels for x in row])) if recs else None}
        for r, row in zip(recs, labels):
            ids, ends = _tokens(tokenizer, r["messages"], r.get("tools"))
            examples.append((ids, ends, row))
    t0 = time.process_time()
    model, steps = train_head(cfg, tokenizer, examples, episode_seed(cfg.seed, "prm"))
    c1, w1 = _clock()
    cost.training_cpu_s = c1 - t0
    cost.cpu_s, cost.wall_s = c1 - c0, w1 - w0
    cost.examples, cost.labelled_positions, cost.training_steps = len(examples), sum(len(x[1]) for x in examples), steps
    return RewardModel(model, tokenizer, "prm"), cost.__dict__


def train_reward_models(cfg, models: dict, tokenizer, out_dir=None) -> tuple[dict[str, RewardModel], dict]:
    """Both reward models from one set of train-split rollouts of each model in `models` ({name: causal LM}; the
    demo passes the reference and the policy). Each model's cost includes the sampling of the rollouts it read (the
    PRM's share: its rollouts' fraction of each model's sampling time). With `out_dir`, each is saved under
    out_dir/{orm,prm}. Returns ({"orm", "prm"}: RewardModel, {"orm": cost, "prm": cost, "critic": cost, "config"})."""
    from .pipeline import _setup

    _setup(cfg)
    c0, w0 = _clock()
    rollouts, sample_cpu = sample_training_rollouts(cfg, models, tokenizer)
    sample_wall = time.perf_counter() - w0
    orm, orm_cost = train_orm(cfg, tokenizer, rollouts)
    prm, prm_cost = train_prm(cfg, models, tokenizer, rollouts)
    share = {n: min(1.0, cfg.rm_prm_rollouts / max(1, len(r))) for n, r in rollouts.items()}
    orm_cost["sampling_cpu_s"] = sum(sample_cpu.values())
    prm_cost["sampling_cpu_s"] = sum(sample_cpu[n] * share[n] for n in rollouts)
    for c, frac in ((orm_cost, 1.0), (prm_cost, np.mean(list(share.values())))):
        c["cpu_s"] += c["sampling_cpu_s"]
        c["wall_s"] += sample_wall * float(frac)
    for c in (orm_cost, prm_cost):
        for key in [k for k, v in c.items() if isinstance(v, float)]:
            c[key] = round(c[key], 1)
    rms = {"orm": orm, "prm": prm}
    rms["orm"].cost, rms["prm"].cost = orm_cost, prm_cost
    if out_dir is not None:
        for name, rm in rms.items():
            rm.save_pretrained(f"{out_dir}/{name}")
    c1, w1 = _clock()
    keys = ("rm_rollouts", "rm_prm_rollouts", "rm_continuations", "rm_epochs", "rm_lr", "rm_batch_size")
    return rms, {"orm": orm_cost, "prm": prm_cost, "critic": critic_cost(),
                 "total": {"cpu_s": round(c1 - c0, 1), "wall_s": round(w1 - w0, 1)},
                 "models": list(models), "config": {k: getattr(cfg, k) for k in keys}}  # fmt: skip
