"""What the callback writes: per-step parquet tables (also sent to wandb / trackio as tables) and the critic bundle.

Only the main process writes; errors are handed to `on_error` (counted, never raised unless strict).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

from .. import trl_hooks
from ..config import PLAUSIBLE
from .figures import steps_table

TABLE_DIR = "progadv"
BUNDLE_DIR = "progadv_bundle"


class Outputs:
    """Tables under `output_dir/progadv/{kind}/step_XXXXXX.parquet` and the end-of-training critic bundle."""

    def __init__(self, trainer, *, on_error: Callable[[str, BaseException], None], write_tables: bool = True):
        self.trainer, self.on_error, self.write_tables = trainer, on_error, write_tables

    # -- tables ---------------------------------------------------------------------------------------------------
    def table(self, kind: str, scores, step: int) -> None:
        if not self.write_tables:
            return
        try:
            df = steps_table(scores, step)
            folder = Path(self.trainer.args.output_dir) / TABLE_DIR / kind
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"step_{step:06d}.parquet"
            k = 1
            while path.exists():  # e.g. a second evaluation at the same step
                path = folder / f"step_{step:06d}_{k}.parquet"
                k += 1
            df.to_parquet(path)
            self.send_table(f"progadv/{kind}_steps", df)
        except Exception as e:  # noqa: BLE001
            self.on_error(f"{kind} table", e)

    def send_table(self, name: str, df) -> None:
        """To wandb and trackio when they are in `report_to` (TensorBoard has no tables: the parquet files are it)."""
        report_to = self.trainer.args.report_to or []
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                wandb = None
            if wandb is not None and getattr(wandb, "run", None) is not None:
                wandb.log({name: wandb.Table(dataframe=df)})
        if "trackio" in report_to:
            try:
                import trackio
            except ImportError:
                trackio = None
            if trackio is not None:
                trackio.log({name: trackio.Table(dataframe=df)})

    # -- the critic bundle ------------------------------------------------------------------------------------------
    def export_bundle(
        self,
        out_dir: str | os.PathLike,
        reference,
        *,
        config,
        max_length,
        heldout=None,
        heldout_figures: dict | None = None,
        success_threshold=None,
        policy=None,
    ) -> Path:
        """Write the critic bundle: policy, `reference` (a `reference.Reference`), tokenizer, scoring config,
        held-out figures and a Platt calibration fitted on the last held-out scores. `policy`: a full-weight copy
        of the trainer's model (sharded runs: `training/sharded.py`); default the trainer's model itself."""
        from ..bundle import export_bundle, fingerprint_trajectories

        t = self.trainer
        return export_bundle(
            out_dir,
            trl_hooks.unwrap(t) if policy is None else policy,
            reference,
            trl_hooks.tokenizer(t),
            scoring_config=config,
            max_length=max_length,
            training={
                "beta": trl_hooks.beta(t),
                "temperature": trl_hooks.temperature(t),
                "trainer_class": type(t).__name__,
                "global_step": int(t.state.global_step),
                "seed": int(t.args.seed),
            },
            heldout_metrics=heldout_figures,
            heldout_fingerprint=fingerprint_trajectories(heldout.trajectories) if heldout is not None else None,
            calibration=calibration(heldout.last_scores if heldout is not None else [], config, success_threshold,
                                    step=int(t.state.global_step)),  # fmt: skip
            overwrite=True,
        )


def calibration(scores, config, success_threshold, *, step: int) -> dict | None:
    """Platt (isotonic for the plausible variant) calibration of P(success) on held-out scores, for ProgressCritic.predict_success. None without labels
    of both kinds. It is only as good as the held-out set is like the rollouts scored later (on- or off-policy):
    the manifest says what it was fitted on."""
    from ..evaluation import Calibrator, is_success

    pairs = [(s.method_score(config.variant), is_success(s, success_threshold)) for s in scores]  # the critic's variant
    pairs = [(x, y) for x, y in pairs if y is not None and math.isfinite(x)]
    ys = [y for _, y in pairs]
    if not ys or all(ys) or not any(ys):
        return None
    # The plausible variant's scores are lexicographic (-1e6 per implausible step): a logistic fit on them would see
    # two levels only, so it gets the monotone, scale-free isotonic fit instead.
    kind = "isotonic" if config.variant == PLAUSIBLE else "platt"
    cal = Calibrator(kind).fit([x for x, _ in pairs], ys).to_dict()
    cal.update(
        method=config.variant,
        scoring={"beta": config.beta, "token_reduction": config.token_reduction, "step_reduction": config.step_reduction},
        fitted_on=f"the callback's held-out set at step {step} (n={len(pairs)})",
    )
    return cal
