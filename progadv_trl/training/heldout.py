"""A fixed set of trajectories scored while training runs: the current policy against the trainer's reference.

Distributed contract (the callback's docstring states it for users): every rank calls `score`, renders the same
set, runs the same number of forward passes over its shard (padded with repeats, dropped after the gather) and
joins every gather, whatever failed locally; only the main process gets figures back. ZeRO-3 and FSDP shard the
weights, so a rank that skipped a forward pass or a gather would hang the others.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable

from .. import trl_hooks
from ..scoring import ScoringConfig, TrajectoryScore
from . import sharded
from .figures import label_figures, step_figures

PREFIX = "eval_progadv/heldout/"  # "eval_": trackers file it with the trainer's own evaluation figures


def load_heldout(heldout, *, strict: bool):
    """Trajectories in the core format; bad records are skipped with one warning naming them (raised if strict)."""
    from ..trajectories import load_trajectories

    res = load_trajectories(heldout, on_error="raise" if strict else "skip")
    if res.errors:
        shown = "; ".join(str(e) for e in res.errors[:5])
        more = f" (and {len(res.errors) - 5} more)" if len(res.errors) > 5 else ""
        warnings.warn(f"held-out set: {len(res.errors)} bad record(s) skipped: {shown}{more}", stacklevel=3)
    if not res.trajectories:
        raise ValueError("held-out set: no valid trajectory to score")
    return res.trajectories


class HeldoutSet:
    """The held-out trajectories, their renderings and the scorer that scores them.

    Args:
        trajectories: `Trajectory` objects (see `load_heldout`).
        trainer: the trainer (its accelerator, tokenizer, state and device).
        make_scorer: () -> `engine.ProgressScorer` over the trainer's policy and reference; called once, lazily.
        config: the ScoringConfig the scores are finished with.
        gather: list -> list of every rank's items (the callback's collective).
        on_error: (where, exception) -> None; counts and warns, or re-raises when strict.
    """

    def __init__(
        self,
        trajectories,
        trainer,
        *,
        make_scorer: Callable,
        config: ScoringConfig,
        gather: Callable[[list], list],
        on_error: Callable[[str, BaseException], None],
        max_length: int | None = None,
        batch_size: int = 8,
        strict: bool = False,
        max_logged_steps: int = 8,
        figure_kwargs: dict | None = None,
    ):
        self.trajectories = list(trajectories)
        self.trainer = trainer
        self.make_scorer, self.config = make_scorer, config
        self.gather, self.on_error = gather, on_error
        self.max_length, self.batch_size, self.strict = max_length, batch_size, strict
        self.max_logged_steps = max_logged_steps
        self.figure_kwargs = figure_kwargs or {}
        self.scorer = None
        self.rendered = None
        self.last_scores: list[TrajectoryScore] = []  # main process

    def __len__(self) -> int:
        return len(self.trajectories)

    def render(self):
        """Render every trajectory once (chat template + action spans); those that cannot be rendered are dropped
        with one warning naming them."""
        if self.rendered is not None:
            return self.rendered
        from ..rendering import position_limit, render

        tok = trl_hooks.tokenizer(self.trainer)
        limit, _ = position_limit(self.max_length, trl_hooks.unwrap(self.trainer))  # never past the positions
        keep, rendered, bad = [], [], []
        for traj in self.trajectories:
            try:
                # as the scorer renders: as generated where the template rewrites earlier turns (config.rendering)
                rendered.append(render(traj, tok, limit, rendering=self.config.rendering, strict=self.config.strict))
                keep.append(traj)
            except ValueError as e:  # ChatTemplateError: names the trajectory
                if self.strict:
                    raise
                bad.append(str(e))
        if bad:
            warnings.warn(f"held-out set: {len(bad)} trajectory(ies) skipped: " + "; ".join(bad[:3]), stacklevel=2)
        from ..generated import rendering_notices

        for _, msg in rendering_notices(tok, keep, rendered, self.config.rendering):
            warnings.warn(f"held-out set: {msg}", stacklevel=2)
        if not keep:
            raise ValueError("held-out set: no trajectory could be rendered with the trainer's chat template")
        self.trajectories, self.rendered = keep, rendered
        return rendered

    def score(self) -> dict:
        """Score the set now (every rank must call it); figures on the main process, {} elsewhere or on failure."""
        t0 = time.perf_counter()
        acc = self.trainer.accelerator
        world, rank = acc.num_processes, acc.process_index
        try:
            self.render()  # the same on every rank: a trajectory the template cannot render is dropped everywhere
            rendered_ok = True
        except Exception as e:  # noqa: BLE001
            self.on_error("held-out rendering", e)
            rendered_ok = False
        # Every rank learns whether every rank rendered, before any forward pass: a rank that failed alone must not
        # leave the others waiting in a forward pass or a gather it never joins.
        if not all(self.gather([rendered_ok])):
            return {}
        n = len(self.trajectories)
        per_rank = math.ceil(n / world)
        n_chunks = math.ceil(per_rank / self.batch_size)
        mine = list(range(rank, n, world))
        # Pad with repeats of a real item so every rank runs n_chunks full forward passes (dropped after gather)
        pad = per_rank - len(mine)
        idx = mine + [mine[-1] if mine else 0] * pad
        real = [True] * len(mine) + [False] * pad
        payload = {"ok": True, "scores": []}
        try:
            from ..engine import finish_score

            if self.scorer is None:
                self.scorer = self.make_scorer()
            device = next(trl_hooks.unwrap(self.trainer).parameters()).device
            # sharded weights (FSDP / ZeRO-3): the engine's direct decoder and head calls need the root's weights
            with trl_hooks.rng_guard(device), sharded.scoring_context(*sharded.trainer_models(self.trainer, self.scorer.reference).values()):
                for c in range(n_chunks):
                    part = idx[c * self.batch_size : (c + 1) * self.batch_size]
                    keep = real[c * self.batch_size : (c + 1) * self.batch_size]
                    stats = self.scorer.token_stats([self.rendered[i] for i in part])
                    for i, st, k in zip(part, stats, keep):
                        if k:
                            ts = finish_score(self.trajectories[i], self.rendered[i], st, self.config)
                            payload["scores"].append((i, ts))
        except Exception as e:  # noqa: BLE001 - a rank that failed still joins the gather below
            self.on_error("held-out scoring", e)
            payload = {"ok": False}
        gathered = self.gather([payload])
        if not acc.is_main_process or not all(p["ok"] for p in gathered):
            return {}
        scores = [s for _, s in sorted((pair for p in gathered for pair in p["scores"]), key=lambda x: x[0])]
        step = self.trainer.state.global_step
        try:
            # the configured variant's step figures (support statistics are computed when it needs them), and
            # PREFIX + "out_of_support" when they are (the issue's `progadv/heldout/out_of_support`, under our prefix)
            figs = step_figures(scores, PREFIX, self.max_logged_steps, by="step", method=self.config.variant)
            figs.update(label_figures(scores, PREFIX, **self.figure_kwargs))
        except Exception as e:  # noqa: BLE001
            self.on_error("held-out figures", e)
            return {}
        figs[f"{PREFIX}global_step"] = step
        figs[f"{PREFIX}seconds"] = time.perf_counter() - t0
        self.last_scores = scores
        return figs
