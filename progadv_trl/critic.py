"""`ProgressCritic`: a critic bundle, loaded and verified, with its defaults.

    critic = ProgressCritic.from_pretrained("runs/grpo/critic")
    scores = critic.score(trajectories)           # list[TrajectoryScore], the bundle's beta / reductions / max_length
    picks = critic.best_of_n(trajectories)        # {group: the TrajectoryScore kept}
    p = critic.predict_success(trajectories)      # calibrated P(success), when the bundle holds a calibration
    step = critic.attribute_failure(trajectory)   # the assistant turn (0-based) most likely to have broken the run
    session = critic.session(messages, tools)     # the agent loop: score / choose K candidate next turns (session.py)

The bundle's variant (`critic.variant`, from the manifest's `scoring.variant`; plain progress_advantage for bundles
from before variants) is what best_of_n, predict_success and attribute_failure use; `critic.score` returns the whole
TrajectoryScore, whose `method_score(critic.variant)` / `method_steps(critic.variant)` are that variant's figures.

Scoring goes through `engine.ProgressScorer`, the same code `progadv score` and the training callback use.
"""

from __future__ import annotations

import copy
import dataclasses
import os

from .bundle import BundleError, load_bundle, scoring_config_from_manifest
from .engine import ProgressScorer
from .scoring import TrajectoryScore

DEFAULT_ATTRIBUTION = {"rule": "min_cumsum", "threshold": 0.0}
_UNSET = object()


class ProgressCritic:
    """Step-level critic from a policy and its reference. Build it with `from_pretrained(bundle_dir)`.

    Attributes: `scorer` (the `ProgressScorer`, with the bundle's ScoringConfig and max_length), `manifest` (the
    bundle's manifest dict, or {} when built from models directly), `path`.
    """

    def __init__(self, scorer: ProgressScorer, manifest: dict | None = None, path: str | os.PathLike | None = None):
        self.scorer = scorer
        self.manifest = manifest or {}
        self.path = path

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        trust_remote_code: bool = False,
        reference_path: str | os.PathLike | None = None,
        device: str | None = None,
        dtype=None,
        **scorer_kwargs,
    ) -> "ProgressCritic":
        """Verify and load a bundle (see `bundle.load_bundle` for what is checked and refused).

        reference_path: where to read a reference recorded by identity (default: the local Hugging Face cache).
        scorer_kwargs: `ProgressScorer` options such as batch_tokens, chunk_size, compute_baselines.
        """
        policy, tokenizer, reference, manifest = load_bundle(
            path, trust_remote_code=trust_remote_code, reference_path=reference_path, device=device, dtype=dtype
        )
        scorer = ProgressScorer(
            policy,
            tokenizer,
            reference,
            config=scoring_config_from_manifest(manifest),
            max_length=manifest.get("max_length"),
            **scorer_kwargs,
        )
        return cls(scorer, manifest, path)

    # -- defaults -----------------------------------------------------------------------------------------------
    @property
    def config(self):
        return self.scorer.config

    @property
    def tokenizer(self):
        return self.scorer.tokenizer

    @property
    def variant(self) -> str:
        """The member of the progress-advantage family this critic uses (ScoringConfig.variant)."""
        return self.config.variant

    def _check_variant(self, scores: list[TrajectoryScore], variant: str) -> None:
        if variant != "progress_advantage" and scores and not any(variant in ts.variants for ts in scores):
            raise BundleError(
                f"the bundle's variant {variant!r} is not among the variants this version computes "
                f"({sorted(scores[0].variants) or 'none'}); score with variant='progress_advantage' or a known one"
            )

    @property
    def calibration(self) -> dict | None:
        return self.manifest.get("calibration") or None

    def _scorer_with(self, overrides: dict, max_length=_UNSET) -> ProgressScorer:
        if not overrides and max_length is _UNSET:
            return self.scorer
        # A shallow copy shares the models; only the config / max_length differ for this call.
        s = copy.copy(self.scorer)
        if overrides:
            known = {f.name for f in dataclasses.fields(s.config)}
            bad = sorted(set(overrides) - known)
            if bad:
                raise TypeError(f"unknown scoring option(s) {bad}; known: {sorted(known)} and max_length")
            s.config = dataclasses.replace(s.config, **overrides)
        if max_length is not _UNSET:
            s.max_length = max_length
        return s

    # -- uses ---------------------------------------------------------------------------------------------------
    def score(
        self,
        trajectories,
        *,
        with_token_ratios: bool = False,
        progress: bool = False,
        max_length=_UNSET,
        **overrides,
    ) -> list[TrajectoryScore]:
        """Score trajectories (paths, dicts, a datasets.Dataset, Trajectory objects) with the bundle's defaults.

        overrides: any ScoringConfig field for this call (beta=..., step_reduction=...); max_length=... too.
        """
        scorer = self._scorer_with(overrides, max_length)
        scores = scorer.score(trajectories, with_token_ratios=with_token_ratios, progress=progress)
        self._check_variant(scores, getattr(getattr(scorer, "config", None), "variant", "progress_advantage"))
        return scores

    def best_of_n(
        self, trajectories, *, method: str | None = None, seed: int = 0, **overrides
    ) -> dict[str, TrajectoryScore]:
        """{group: the highest-scoring trajectory of the group}. Trajectories without a `group` form one group, "".

        The selection rule is `evaluation.pick_best`, the one metrics.json's `selected` uses: a NaN score (every
        step cut by truncation) ranks below every number; ties are broken at random, seeded by (`seed`, group
        name), so a group's pick does not depend on the other groups. `method`: default the bundle's variant; any
        of METHODS (a baseline, for comparison) or a variant.
        """
        from .evaluation import check_method, select_best

        method = method or overrides.get("variant") or self.variant
        check_method(method)
        return select_best(self.score(trajectories, **overrides), method, seed)

    def predict_success(self, trajectories) -> list[float]:
        """Calibrated P(success) per trajectory (NaN where the score is NaN).

        Needs the calibration stored at export (fitted on held-out labels); scores are computed with the bundle's
        exact defaults, since the calibration is only valid for them.
        """
        cal = self.calibration
        if not cal:
            raise BundleError(
                f"this bundle{'' if self.path is None else ' (' + str(self.path) + ')'} holds no success calibration, so "
                "scores cannot be read as probabilities. Rank with critic.score(...) instead, or fit one on labelled "
                "held-out trajectories (evaluation.Calibrator().fit(scores, labels)) and re-export with "
                "calibration=calibrator.to_dict()"
            )
        from .evaluation import Calibrator

        method = cal.get("method", self.variant)
        cfg = cal.get("scoring")  # optional: the ScoringConfig the calibration was fitted under
        if cfg and any(getattr(self.config, k, v) != v for k, v in cfg.items()):
            raise BundleError(
                "the bundle's calibration was fitted under a different scoring config than the critic now uses "
                f"({cfg}); reload the critic without overriding its config"
            )
        scores = self.score(trajectories)
        return [float(p) for p in Calibrator.from_dict(cal).predict([ts.method_score(method) for ts in scores])]

    def attribute_failure(self, trajectory, *, rule: str | None = None, threshold: float | None = None) -> int:
        """The assistant turn (0-based, what `failure_step` indexes) most likely to have broken a failed run.

        Default rule and threshold: the bundle's (`scoring.attribution` in the manifest), else min_cumsum. The steps
        are the bundle's variant's.
        """
        from .evaluation import attribute_failure

        default = {**DEFAULT_ATTRIBUTION, **((self.manifest.get("scoring") or {}).get("attribution") or {})}
        rule = rule or default["rule"]
        threshold = default["threshold"] if threshold is None else threshold
        items = trajectory if isinstance(trajectory, list) else [trajectory]
        if len(items) != 1:
            raise ValueError("attribute_failure takes one trajectory; call it once per trajectory")
        (ts,) = self.score(items)
        return attribute_failure(ts.method_steps(self.variant), rule, threshold)

    def session(self, messages: list[dict], tools: list[dict] | None = None, **overrides):
        """A `session.CriticSession` over the conversation so far: `append(message)`, `score(candidates)`,
        `choose(candidates, method=...)`. Both models' KV caches hold the conversation; K candidates share them.
        overrides: ScoringConfig fields for this session (e.g. support=True for every variant's figures)."""
        from .session import CriticSession

        return CriticSession(self._scorer_with(overrides), messages, tools)

    def __repr__(self) -> str:
        pol = (self.manifest.get("policy") or {}).get("kind", "?")
        return f"ProgressCritic(path={self.path!r}, policy={pol}, config={self.config}, max_length={self.scorer.max_length})"
