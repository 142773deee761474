"""The committed study's ranges, and a demo run set beside them: what `progadv demo` reads of the study.

Its own module so the import runs one way: `demo/main.py` (the demo) imports this, `demo/study.py` (which runs the
demo per seed) imports this and `main`; nothing here imports either.
"""

from __future__ import annotations

import json
from pathlib import Path

# demo/reward_models.py: the ORM and PRM are trained after GRPO from the saved models and change only the evaluation
REWARD_MODEL_KEYS = ("reward_models", "rm_rollouts", "rm_prm_rollouts", "rm_continuations", "rm_epochs", "rm_lr",
                     "rm_batch_size")  # fmt: skip
# Config keys that do not change a run's results: a seed made with other values of these is still resumed.
IGNORED_KEYS = ("out_dir", "progress", "variants", "steer_tasks", *REWARD_MODEL_KEYS)
# Config keys added after runs were made, with the value those runs had in effect: a summary without the key compares
# as if it held that value (a seed made before the curriculum existed trained with the world's timeouts; its
# demonstrations gave up at every timeout alike).
ADDED_KEYS = {"grpo_p_timeout": None, "p_give_up_after_retry": None, "steer_tasks": 0, "n_val_tasks": 0,
              "val_steps": 0, "mid_fraction": 0.0}
# Config keys that change only stage 6 (the evaluation of saved rollouts): `--reevaluate` applies the study's values.
EVAL_ONLY_KEYS = ("variants", "steer_tasks", *REWARD_MODEL_KEYS)
# Evaluation sets of the demo summary -> the regime they measure.
# "mid": the GRPO checkpoint at DemoConfig.mid_fraction of the steps, graded and steered by its own critic.
REGIMES = {"policy": "on-policy", "mid": "mid-training", "reference": "off-policy"}
APPLICATIONS = {  # the fair comparison's applications (summary["evaluation"][set]["comparison"]) -> what they measure
    "auroc": "success prediction, AUROC over all rollouts",
    "auroc_decision_failures": "success prediction, AUROC over successes + decision failures",
    "auroc_luck_failures": "success prediction, AUROC over successes + luck failures",
    "best_of_n": "best-of-N success",
    "attribution": "mistake step named exactly (failed runs)",
}


def _comparable(cfg: dict) -> dict:
    cfg = {**ADDED_KEYS, **json.loads(json.dumps(cfg, default=str))}
    return {k: v for k, v in cfg.items() if k not in IGNORED_KEYS}


def config_diff(old: dict, new: dict) -> list[str]:
    """Keys whose values differ between two run configs (IGNORED_KEYS aside)."""
    a, b = _comparable(old), _comparable(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<missing>") != b.get(k, "<missing>"))


def study_ranges(study: dict) -> dict:
    """The compact across-seed figures a single demo run is set beside (`progadv demo` prints them; the committed
    copy is progadv_trl/demo/study_reference.json): the greedy gain, and per regime and application progress
    advantage's fair figure and its difference from the best baseline, as min / mean / max."""
    gains = [r["gain_points"] for r in study["success"]["per_seed"] if r["gain_points"] is not None]
    rng = lambda c: {k: c[k] for k in ("min", "mean", "max")}  # noqa: E731
    regimes = {}
    for regime, t in study["table"].items():
        pa = t.get("progress_advantage") or {}
        apps = {}
        for app in APPLICATIONS:
            v = (study.get("verdicts") or {}).get(regime, {}).get(app)
            cell = pa.get(f"fair_{app}")
            if v is None and cell is None:
                continue
            u = (v or {}).get("untrained")
            apps[app] = {"progress_advantage": rng(cell) if cell else None,
                         "difference": rng(v) if v else None,
                         "verdicts": {k: v[k] for k in ("beats", "ties", "loses")} if v else None,
                         # against the best untrained baseline: what a run without reward models is set beside
                         "difference_untrained": rng(u) if u else None,
                         "verdicts_untrained": {k: u[k] for k in ("beats", "ties", "loses")} if u else None}  # fmt: skip
        regimes[regime] = apps
    return {"command": study.get("command"), "seeds": study["seeds"], "config": study["config"],
            "world": "noisy" if study["config"].get("free_form") else "plain",
            "gain_points": {"min": min(gains), "mean": sum(gains) / len(gains), "max": max(gains)} if gains else None,
            "regimes": regimes}  # fmt: skip


STUDY_REFERENCE = Path(__file__).with_name("study_reference.json")  # {"plain": study_ranges, "noisy": ...}


def reference_ranges(free_form: bool) -> dict | None:
    """The committed study's ranges for the plain or the free-form world, or None before a study was committed."""
    if not STUDY_REFERENCE.exists():
        return None
    return json.loads(STUDY_REFERENCE.read_text()).get("noisy" if free_form else "plain")


def compare_with_study(summary: dict, ranges: dict) -> list[str]:
    """Lines setting one demo run's figures beside the study's across-seed range, saying plainly which fall outside."""
    def where(x, r):
        if x is None or r is None:
            return ""
        if r["min"] <= x <= r["max"]:
            return "inside"
        return "OUTSIDE (below)" if x < r["min"] else "OUTSIDE (above)"

    def fmt(r, nd=3):
        return f"{r['min']:+.{nd}f} .. {r['max']:+.{nd}f} (mean {r['mean']:+.{nd}f})"

    n = len(ranges["seeds"])
    lines = [f"this run beside the study ({n} seeds, {ranges['world']} world; `{ranges['command']}`):"]
    held = _comparable(ranges.get("config") or {})  # keys the study held fixed (not seed, not paths), added keys too
    diff = [k for k in config_diff(ranges.get("config") or {}, summary.get("config") or {}) if k in held]
    if diff:
        shown = ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
        return lines + [f"  not comparable: this run's configuration differs from the study's in {shown}"]
    g, gr = summary.get("greedy_gain_points"), ranges.get("gain_points")
    if g is not None and gr:
        lines.append(f"  greedy gain {g:+.1f} points; study {fmt(gr, 1)}: {where(g, gr)}")
    outside = 0
    for set_name, ev in (summary.get("evaluation") or {}).items():
        regime = REGIMES.get(set_name, set_name)
        for app, r in (ranges["regimes"].get(regime) or {}).items():
            c = (ev.get("comparison") or {}).get(app) or {}
            d, dr, vs, what = c.get("difference"), r.get("difference"), r.get("verdicts") or {}, "best baseline"
            if not summary.get("reward_models") and r.get("difference_untrained"):
                # like with like: this run's baselines need no training, so its best is set beside the study's best
                # untrained baseline, not beside a reward model the study trained
                dr, vs, what = r["difference_untrained"], r.get("verdicts_untrained") or {}, "best untrained baseline"
            if d is None or dr is None:
                continue
            w = where(d, dr)
            outside += w.startswith("OUTSIDE")
            lines.append(f"  {regime}, {app}: PA - best baseline {d:+.3f} ({c.get('verdict')}); study, PA - {what} "
                         f"{fmt(dr)}, beats/ties/loses on {vs.get('beats', 0)}/{vs.get('ties', 0)}/{vs.get('loses', 0)} "
                         f"seeds: {w}")  # fmt: skip
    if outside or (g is not None and gr and where(g, gr).startswith("OUTSIDE")):
        lines.append("  Figures marked OUTSIDE fall outside every seed of the study: this run is another draw (another "
                     "CPU rounds differently and the RL run diverges); judge the method from the study, not one run.")  # fmt: skip
    return lines
