"""`progadv demo`: the whole loop on a CPU, from nothing to an evaluated critic bundle.

    progadv demo --out runs/demo                 # ~10 minutes on 2 CPU cores
    progadv demo --out /tmp/d --fast             # seconds: the plumbing only (tests)

1. tokenizer + tiny Qwen2 model, built here (no hub)      -> DIR/base
2. reference: SFT on flawed demonstrations                -> DIR/reference
3. labelled reference rollouts on held-out tasks; GRPO (beta > 0) with ProgressAdvantageCallback scoring them every
   `heldout_eval_steps` steps                             -> DIR/policy, DIR/grpo_run/progadv/ (per-step tables)
4. the callback exports the critic bundle at the end      -> DIR/bundle
5. success of reference and policy on held-out tasks (greedy and sampled); fresh test rollouts, N per task, from
   the policy (on-policy) and from the reference (off-policy, as the paper scores another model's runs)
6. both sets scored with the bundle and evaluated against the baselines -> DIR/report/{policy,reference}/, the
   training curves DIR/report/training.png, DIR/report/README.md and DIR/summary.json
5b. with `reward_models`: an ORM and a PRM of the reference's size trained on train-split rollouts of both models
   (demo/reward_models.py), evaluated and steering beside the critic as baselines `orm`, `prm` -> DIR/{orm,prm},
   summary["reward_models"] (each one's cost; the critic's is zero)
7. step-level selection (`steer_tasks` > 0): each agent samples K candidate turns at every step of held-out episodes
   and keeps the one each method ranks highest through a critic session (demo/steering.py) -> summary["step_selection"]

Everything the figures come from is written next to them (rollouts as JSONL), so any number can be recomputed with
`progadv evaluate --bundle DIR/bundle DIR/rollouts_policy.jsonl -o ...`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from ..arguments import DemoArguments
from ..evaluation import format_cell, markdown_table, text_table
from ..utils import atomic_write_text, write_json
from .pipeline import (
    DemoConfig,
    build_assets,
    evaluate,
    heldout_records,
    mid_step,
    train_policy,
    train_reference,
    write_jsonl,
)
from .ranges import EVAL_ONLY_KEYS, compare_with_study, reference_ranges

N_STAGES = 7
SETS = {
    "policy": "rollouts of the RL policy (on-policy: the regime the theory describes, at a policy far from optimal)",
    "mid": "rollouts of the GRPO checkpoint a third of the way in, graded by its own critic (it against the "
           "reference): mid-training, a policy that is not yet good, as a user watching a run sees it",
    "reference": "rollouts of the SFT reference (off-policy: another model's runs, as in the paper)",
}
# The critic that grades each set: the final bundle, except the mid-training set's own (DIR/bundle_mid).
SET_BUNDLE = {"policy": "bundle", "mid": "bundle_mid", "reference": "bundle"}
# The merged references stage 6 scores against (each a variant): pi_alpha = pi_ref + alpha (pi_theta - pi_ref).
MERGE_ALPHAS = (0.25, 0.5, 0.75)
MERGES_EVALUATED = ("linear", "ties", "dare_linear")
MERGE_DENSITY = 0.2  # ties / dare: the share of the task vector kept (TIES' usual top 20 %)
HEADLINE_METHODS = ("progress_advantage", "policy_logprob", "reference_logprob", "self_certainty", "deepconf_tail",
                    "deepconf_bottom10")  # fmt: skip


def demo_config(args: DemoArguments) -> DemoConfig:
    """The DemoConfig of a `progadv demo` call: --config read by TRL's `TrlParser`, as the recipes read their YAML
    (unknown keys are an error), then --out / --seed / --no-progress on top; --fast starts from `DemoConfig.fast`."""
    from trl import TrlParser

    given: dict = {}
    if args.config:
        import yaml

        try:
            with open(args.config, encoding="utf-8") as f:
                given = yaml.safe_load(f) or {}
            if not isinstance(given, dict):
                raise ValueError("it must be a mapping of DemoConfig fields")
            (cfg,) = TrlParser(DemoConfig).parse_args_and_config(["--config", args.config])
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise SystemExit(f"progadv: error: --config {args.config}: {e}")
        given = {k: getattr(cfg, k) for k in given}
    given.update(out_dir=args.out, progress=not args.no_progress)
    if args.seed is not None:
        given["seed"] = args.seed
    if args.noisy:
        given["free_form"] = True
    if getattr(args, "reward_models", False):
        given["reward_models"] = True
    return DemoConfig.fast(**given) if args.fast else DemoConfig(**given)


def _say(msg: str) -> None:
    print(f"[progadv demo] {msg}", file=sys.stderr, flush=True)


@contextmanager
def _stage(i: int, what: str, timings: dict, key: str, cpu: dict | None = None, others: dict | None = None):
    """One line when the stage starts, one when it ends with its key figures: the body fills the yielded dict
    ({"what": "figure text"}), so a person reads what the stage produced, not the trainers' log dicts."""
    _say(f"{i}/{N_STAGES} {what}")
    if others is not None:  # runnable tasks beside ours now: the wait policy was fixed at start-up (cpu.py)
        others[key] = _competition(others)
    t0, c0 = time.perf_counter(), time.process_time()
    figures: dict[str, str] = {}
    yield figures
    timings[key] = round(time.perf_counter() - t0, 1)
    if cpu is not None:  # process CPU seconds (all threads): comparable across runs on a shared machine, wall is not
        cpu[key] = round(time.process_time() - c0, 1)
    shown = "; ".join(f"{k} {v}" for k, v in figures.items())
    _say(f"{i}/{N_STAGES} done in {timings[key]:.0f} s" + (f": {shown}" if shown else ""))


@contextmanager
def _quiet(log_dir: Path):
    """The trainers' and libraries' chatter (Python warnings, transformers / datasets logging and bars) goes to
    log_dir/warnings.log, not the console: the console holds stage lines and stage bars only."""
    import logging
    import warnings

    import datasets
    from transformers.utils import logging as hf_logging

    log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_dir / "warnings.log", encoding="utf-8")
    loggers = [logging.getLogger(n) for n in ("py.warnings", "transformers", "trl", "datasets", "accelerate", "peft")]
    saved = [(lg, lg.handlers[:], lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [handler], False
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per checkpoint load drowns the stage bars
    datasets.disable_progress_bars()  # SFT's "Building labels" bar
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            yield
    finally:
        logging.captureWarnings(False)
        for lg, handlers, propagate in saved:
            lg.handlers, lg.propagate = handlers, propagate
        handler.close()


def _reward_line(log_history: list[dict]) -> str:
    r = [e["reward"] for e in log_history if "reward" in e and "eval_reward" not in e]
    return f"{r[0]:.2f} -> {r[-1]:.2f}" if r else "-"


def _competition(seen: dict) -> float | None:
    """Other runnable tasks now (`cpu.other_runnable`); says once when they compete with spinning threads."""
    from ..cpu import choose, cores, other_runnable, spinning

    n, competes = other_runnable(), lambda x: x is not None and choose(x, cores(), cores()) is not None
    if spinning() and competes(n) and not any(competes(x) for x in seen.values()):
        _say(f"{n:.1f} other runnable tasks compete for {cores()} cores while OpenMP threads spin (chosen when the demo "
             "started on an idle machine): stages may run several times slower; OMP_WAIT_POLICY=PASSIVE avoids it")
    return None if n is None else round(n, 2)


def run_demo(cfg: DemoConfig) -> dict:
    """Run the stages; return (and write to out_dir/summary.json) the summary."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _quiet(out / "logs"):
        summary, evaluations = _run_stages(cfg, out)
    atomic_write_text(out / "report" / "README.md", report_markdown(summary, evaluations))
    write_json(out / "summary.json", summary, default=str)
    print(format_summary(summary))
    return summary


def _run_stages(cfg: DemoConfig, out: Path) -> tuple[dict, dict]:
    from ..callback import ProgressAdvantageCallback

    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    others: dict[str, float | None] = {}
    t_all, c_all = time.perf_counter(), time.process_time()

    with _stage(1, "tokenizer + tiny Qwen2 model (built here, no hub), pretrained on domain snippets", timings, "assets_s", cpu, others) as fig:
        assets = build_assets(cfg.out_dir, cfg.seed, cfg)
        if assets["pretrain_losses"]:
            fig["pretraining loss"] = f"{assets['pretrain_losses'][0]:.2f} -> {assets['pretrain_losses'][-1]:.2f}"
    with _stage(2, f"reference: SFT on {cfg.n_demos} flawed demonstrations", timings, "sft_s", cpu, others) as fig:
        train_reference(cfg)
        losses = [e["loss"] for e in json.loads((out / "reference" / "demo_log.json").read_text()) if "loss" in e]
        if losses:
            fig["SFT loss"] = f"{losses[0]:.2f} -> {losses[-1]:.2f}"

    holder = {}

    def callback(trainer):
        holder["cb"] = ProgressAdvantageCallback(
            trainer, heldout=holder["heldout"], eval_steps=cfg.heldout_eval_steps, export="end",
            export_dir=out / "bundle", seed=cfg.seed,
        )  # fmt: skip
        return holder["cb"]

    what = f"GRPO, {cfg.grpo_steps} steps, beta={cfg.beta}, with ProgressAdvantageCallback"
    if cfg.val_steps:
        what += f"; the best of its checkpoints on {cfg.n_val_tasks} validation tasks kept"
    with _stage(3, what, timings, "grpo_s", cpu, others) as fig:
        holder["heldout"] = heldout_records(cfg)
        write_jsonl(out / "heldout_reference.jsonl", holder["heldout"])
        trainer, _ = train_policy(cfg, callbacks=[callback])
        fig["reward"] = _reward_line(trainer.state.log_history)
        if trainer.state.best_model_checkpoint:
            best = trainer.state.best_model_checkpoint.rsplit("-", 1)[-1]
            fig["kept"] = f"step {best} (validation success {trainer.state.best_metric:.3f})"
        heldout = [h for h in holder["cb"].history if h["kind"] == "heldout"]
        if heldout:
            from ..config import BASELINES

            last, pre = heldout[-1]["figures"], "eval_progadv/heldout/auroc/"
            pa = last.get(f"{pre}progress_advantage")
            base = {b: last[f"{pre}{b}"] for b in BASELINES if isinstance(last.get(f"{pre}{b}"), float)}
            if pa is not None and base:
                best = max(base, key=base.get)
                fig["held-out AUROC"] = f"PA {pa:.3f}, best baseline {best} {base[best]:.3f}"
    cb = holder["cb"]
    if not (out / "bundle" / "manifest.json").exists():
        raise RuntimeError(f"the callback did not export the critic bundle ({cb.errors} errors; see {out / 'logs'})")
    mid = mid_step(cfg) and (out / "policy_mid" / "config.json").exists()
    if mid:  # the mid-training critic: that checkpoint against the reference (the callback exported the final one)
        from ..bundle import export_from_paths
        from ..config import ScoringConfig

        export_from_paths(out / "policy_mid", out / "reference", out / "bundle_mid", overwrite=True,
                          scoring_config=ScoringConfig(beta=cfg.beta), training={"beta": cfg.beta, "seed": cfg.seed,
                          "global_step": mid_step(cfg), "trainer_class": "GRPOTrainer"})  # fmt: skip
    _say(f"4/{N_STAGES} critic bundle written by the callback: {out / 'bundle'}"
         + (f"; mid-training (step {mid_step(cfg)}): {out / 'bundle_mid'}" if mid else ""))

    with _stage(5, "success on held-out tasks (greedy and sampled) + test rollouts of each model", timings, "rollouts_s", cpu, others) as fig:
        ev = evaluate(cfg)
        fig["greedy success"] = ", ".join(f"{n} {ev[f'{n}_success']:.3f}" for n in SETS if f"{n}_success" in ev)

    rms, rm_block = None, None
    if cfg.reward_models:
        with _stage("5b", f"reward models for the comparison: ORM and PRM on {cfg.rm_rollouts} train-split rollouts "
                    "of each model", timings, "reward_models_s", cpu, others) as fig:  # fmt: skip
            rms, rm_block = run_reward_models(cfg)
            for name in rms:
                c = rm_block[name]
                fig[name] = f"{c['cpu_s']:.0f} CPU s, {c['rollouts']} rollouts, {c['continuations']} continuations"

    with _stage(6, "scoring the test rollouts with the bundles; evaluation against the baselines", timings, "evaluate_s", cpu, others) as fig:
        critics = _critics(out, ev["rollouts"])
        evaluations = {name: evaluate_set(critics[name], ev["rollouts"][name]["path"], out / "report" / name, cfg, rms)
                       for name in SETS if name in ev["rollouts"]}  # fmt: skip
        curves = training_curves(cb.history, trainer.state.log_history, out / "report" / "training.png")
        for name, m in evaluations.items():
            c = (headline(m).get("comparison") or {}).get("auroc") or {}
            if c.get("difference") is not None:
                fig[f"{name} AUROC PA - {c['best_baseline']}"] = f"{c['difference']:+.3f} ({c['verdict']})"

    steering = None
    if cfg.steer_tasks:
        with _stage(7, f"step-level selection: {cfg.steer_tasks} held-out tasks, K = 4 and 8, every method, each agent",
                    timings, "steer_s", cpu) as fig:  # fmt: skip
            steering = run_step_selection(critics, cfg, rms)
            for name, e in steering["agents"].items():
                r = e["k4"]
                fig[f"{name} K=4"] = f"PA {r['step']['progress_advantage']:.3f}, alone {r['sampled']:.3f}"

    timings["total_s"] = round(time.perf_counter() - t_all, 1)
    cpu["total_s"] = round(time.process_time() - c_all, 1)
    s = ev["success"]
    summary = {
        "reference_success": ev["reference_success"],
        "policy_success": ev["policy_success"],
        "reference_success_sampled": s["reference"]["sampled"]["success"],
        "policy_success_sampled": s["policy"]["sampled"]["success"],
        "greedy_gain_points": round(100 * (ev["policy_success"] - ev["reference_success"]), 1),
        "n_eval_episodes": ev["n_eval_episodes"],
        "success_detail": s,
        "test_rollouts": ev["rollouts"],
        "evaluation": {name: headline(m) for name, m in evaluations.items()},
        "training_curves": curves,
        "grpo_steps": trainer.state.global_step,
        "grpo_checkpoint": {"kept": trainer.state.best_model_checkpoint, "validation_success": trainer.state.best_metric,
                            "validation": _validation_curve(trainer.state.log_history)},  # fmt: skip
        "callback_errors": cb.errors,
        "timings": {**timings, "eval_sampling_s": round(ev["timings"]["eval_s"], 1),
                    "test_sampling_s": round(ev["timings"]["sampling_s"], 1)},  # fmt: skip
        "cpu_timings": cpu,
        "openmp": {"wait_policy": os.environ.get("OMP_WAIT_POLICY", "spin (OpenMP's default)"),
                   "other_runnable_at_stage_start": others},  # fmt: skip
        "paths": {"bundle": str(out / "bundle"), "report": str(out / "report" / "README.md"),
                  "policy": str(out / "policy"), "reference": str(out / "reference"), "logs": str(out / "logs")},  # fmt: skip
        "config": asdict(cfg),
    }
    if mid:
        summary.update(mid_success=ev["mid_success"], mid_success_sampled=s["mid"]["sampled"]["success"],
                       mid_step=mid_step(cfg))
        summary["paths"].update(bundle_mid=str(out / "bundle_mid"), policy_mid=str(out / "policy_mid"))
    if steering is not None:
        summary["step_selection"] = steering
    if rm_block is not None:
        summary["reward_models"] = rm_block
    ranges = reference_ranges(cfg.free_form)
    if ranges is not None:
        summary["study_comparison"] = compare_with_study(summary, ranges)
    return summary, evaluations


def _validation_curve(log_history: list[dict]) -> list[dict]:
    """GRPO's evaluations on the validation split: [{"step", "success"}] (eval_reward is the greedy success)."""
    return [{"step": e["step"], "success": e["eval_reward"]} for e in log_history if "eval_reward" in e]


def _critics(out: Path, sets) -> dict:
    """{set: the critic that grades it} (SET_BUNDLE), each bundle verified and loaded once."""
    from ..critic import ProgressCritic

    loaded: dict[str, object] = {}
    for name in sets:
        b = SET_BUNDLE.get(name, "bundle")
        if b not in loaded:
            loaded[b] = ProgressCritic.from_pretrained(out / b)
    return {name: loaded[SET_BUNDLE.get(name, "bundle")] for name in sets}


def reevaluate(out_dir, **eval_overrides) -> dict:
    """Stage 6 again on a finished run: score its saved test rollouts with its saved bundle using this version's
    evaluation code, and rewrite the report and summary.json (models, rollouts and success rates are kept).
    `eval_overrides`: evaluation-only config fields (EVAL_ONLY_KEYS, e.g. variants=True) to apply this time."""
    out = Path(out_dir)
    summary = json.loads((out / "summary.json").read_text())
    bad = set(eval_overrides) - set(EVAL_ONLY_KEYS)
    if bad:
        raise ValueError(f"reevaluate: {sorted(bad)} change training or rollouts; only {EVAL_ONLY_KEYS} can change")
    summary["config"] = {**summary["config"], **eval_overrides}
    cfg = DemoConfig(**summary["config"])
    with _quiet(out / "logs"):  # as the demo: the libraries' chatter to the run's log, not the console
        critics = _critics(out, summary["test_rollouts"])
        rms = None
        if cfg.reward_models:  # trained from the run's saved models: nothing else of the run changes
            rms, summary["reward_models"] = run_reward_models(cfg)
        evaluations = {name: evaluate_set(critics[name], summary["test_rollouts"][name]["path"], out / "report" / name,
                                          cfg, rms) for name in SETS if name in summary["test_rollouts"]}  # fmt: skip
        summary["evaluation"] = {name: headline(m) for name, m in evaluations.items()}
        if cfg.steer_tasks:
            summary["step_selection"] = run_step_selection(critics, cfg, rms)
    ranges = reference_ranges(cfg.free_form)
    if ranges is not None:
        summary["study_comparison"] = compare_with_study(summary, ranges)
    atomic_write_text(out / "report" / "README.md", report_markdown(summary, evaluations))
    write_json(out / "summary.json", summary, default=str)
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Evaluation of one rollout set


def run_step_selection(critics: dict, cfg: DemoConfig, reward_models: dict | None = None) -> dict:
    """Stage 7: the critic in the agent loop (demo/steering.py), each agent steered by the critic of its set
    (`critics`: {agent: critic}; the mid-training checkpoint by its own), on the first `steer_tasks` eval tasks; the
    reward models (if any) choose among the same candidates as methods of their own."""
    from .pipeline import load_models
    from .steering import step_selection

    tok, models = load_models(cfg, tuple(n for n in SETS if n in critics)[::-1])
    return step_selection(critics, models, tok, cfg, reward_models=reward_models)


def run_reward_models(cfg: DemoConfig) -> tuple[dict, dict]:
    """Stage 5b (`cfg.reward_models`): the ORM and the PRM trained on train-split rollouts of the reference and the
    policy (demo/reward_models.py), saved under DIR/orm and DIR/prm. Returns (models, summary["reward_models"]: each
    one's cost beside the critic's, which is zero)."""
    from .pipeline import load_models
    from .reward_models import train_reward_models

    tok, models = load_models(cfg)
    return train_reward_models(cfg, models, tok, out_dir=cfg.out_dir)


def evaluate_set(critic, rollouts: str, out_dir: Path, cfg: DemoConfig, reward_models: dict | None = None) -> dict:
    """Score `rollouts` with the critic (every reduction from one forward pass), choose a reduction by 5-fold CV on
    AUROC for the record, evaluate the bundle's default (the theory's beta * sum / sum) and write the report. With
    `cfg.variants`, also every variant (support statistics and merged references, computed here in evaluation only:
    training and rollouts never see them) and a variant chosen by 5-fold CV. `reward_models` ({name: RewardModel},
    demo/reward_models.py): each scores the same rollouts and is evaluated as one more baseline."""
    from ..evaluation import run_evaluation
    from ..trajectories import load_trajectories

    loaded = load_trajectories(rollouts, on_error="skip")  # the world writes valid records; never lose a run to one
    if loaded.errors:
        _say(f"{rollouts}: {loaded.summary()}")
    c = critic.config
    # choose_variant turns the support statistics on for this evaluation only (a copy of the critic's scorer)
    extra = dict(choose_variant="auroc", merge_alphas=MERGE_ALPHAS, merge=MERGES_EVALUATED,
                 merge_density=MERGE_DENSITY) if cfg.variants else {}  # fmt: skip
    return run_evaluation(
        critic.scorer, loaded.trajectories, out_dir, choose_reduction="auroc", k=5, n_boot=cfg.n_boot, seed=cfg.seed,
        reduction_info={"beta": c.beta, "token_reduction": c.token_reduction, "step_reduction": c.step_reduction,
                        "chosen_by": "the theory's default (beta * sum over tokens, sum over steps), not tuned; the "
                                     "CV choice below is reported for comparison"},
        title=f"progadv demo: {SETS.get(out_dir.name, out_dir.name)}", progress=True, **extra,
        on_scored=None if not reward_models else _add_reward_models(loaded.trajectories, reward_models),
    )  # fmt: skip


def _add_reward_models(trajectories, reward_models: dict):
    from .reward_models import add_reward_model_scores

    return lambda scores: add_reward_model_scores(scores, trajectories, reward_models)


# `vs_best_untrained`: PA against the best baseline that needs no training, present when a trained reward model is
# the best baseline; a demo run without reward models is set beside the study through it (demo/ranges.py).
COMPARISON_KEYS = ("best_baseline", "difference", "difference_ci", "verdict", "versus", "best_untrained_baseline",
                   "vs_best_untrained")


def headline(metrics: dict) -> dict:
    """Per method: AUROC (all rollouts; successes + decision failures only), best-of-N, attribution by the
    min-cumsum rule (`attribution_min_cumsum_*`), and the fair figures (each method's rule chosen by 5-fold CV, out-of-fold: `fair_*`); `comparison`: progress
    advantage minus the best baseline per application, with its paired 95 % interval and verdict."""
    fair = metrics.get("fair") or {}
    fair_dec = ((metrics.get("fair_by_failure_kind") or {}).get("decision") or {}).get("auroc") or {}
    fair_luck = ((metrics.get("fair_by_failure_kind") or {}).get("luck") or {}).get("auroc") or {}
    apps = {"auroc": fair.get("auroc"), "auroc_decision_failures": fair_dec, "auroc_luck_failures": fair_luck,
            "best_of_n": fair.get("best_of_n"), "attribution": fair.get("attribution")}  # fmt: skip
    rows = {}
    for m, e in metrics["methods"].items():
        sp, b = e["success_prediction"], e["best_of_n"]
        dec = (e.get("success_prediction_by_failure_kind") or {}).get("decision") or {}
        fa = e["failure_attribution"]["min_cumsum"]
        rows[m] = {
            "auroc": sp["auroc"], "auroc_ci": sp["auroc_ci"], "n": sp["n"], "n_success": sp["n_pos"],
            "auroc_decision_failures": dec.get("auroc"), "auroc_decision_failures_ci": dec.get("auroc_ci"),
            "n_decision": dec.get("n"),
            "best_of_n": b["success"], "best_of_n_ci": b["success_ci"], "n_groups": b["n_groups"],
            # named by its rule: min_cumsum always names a log-prob's last step (a log-prob is <= 0 at every step),
            # so it is no fair figure for the baselines; `fair_attribution` (each method's rule by CV) is
            "attribution_min_cumsum_exact": fa["exact"], "attribution_min_cumsum_within1": fa["within1"],
            "n_attributed": fa["n"],
        }  # fmt: skip
        for app, f in apps.items():
            r = ((f or {}).get("methods") or {}).get(m)
            if r:
                rows[m][f"fair_{app}"], rows[m][f"fair_{app}_rule"] = r["value"], r["rule"]
            d = ((f or {}).get("family") or {}).get(m)
            if d:  # a progress-advantage family member minus the best baseline: one study row per variant
                rows[m][f"fair_{app}_minus_best_baseline"] = d["difference"]
                rows[m][f"fair_{app}_minus_best_baseline_ci"] = d["difference_ci"]
                vs = d.get("vs_progress_advantage")
                if vs:  # and minus plain progress advantage, paired the same way
                    rows[m][f"fair_{app}_minus_progress_advantage"] = vs["difference"]
                    rows[m][f"fair_{app}_minus_progress_advantage_ci"] = vs["difference_ci"]
            v = ((f or {}).get("versus") or {}).get(m)
            if v:  # progress advantage minus this baseline head to head (a trained reward model), paired
                rows[m][f"fair_{app}_progress_advantage_minus_this"] = v["difference"]
                rows[m][f"fair_{app}_progress_advantage_minus_this_ci"] = v["difference_ci"]
    ref = metrics.get("best_of_n_reference") or {}
    sel = metrics.get("reduction_selection") or {}
    vsel = metrics.get("variant_selection") or {}
    return {
        "out_of_support": (metrics.get("out_of_support") or {}).get("share"),
        "cv_variant": {"chosen": vsel.get("chosen"), "out_of_fold_auroc": vsel.get("out_of_fold")},
        "methods": rows,
        "random_pick": ref.get("random_pick"),
        "pass_at_n": ref.get("pass_at_n"),
        "attribution_chance": (metrics.get("attribution_chance") or {}).get("exact"),
        "cv_reduction": {"chosen": sel.get("chosen"), "out_of_fold_auroc": sel.get("out_of_fold")},
        "comparison": {app: {k: f.get(k) for k in COMPARISON_KEYS if k in f} for app, f in apps.items()
                       if f and "verdict" in f},
    }


# ----------------------------------------------------------------------------------------------------------------
# Training curves (from the callback's history and the trainer's log)


def training_curves(history: list[dict], log_history: list[dict], path: Path) -> dict:
    """Held-out AUROC per method and mean step advantage against the training step; reward and the training-rollout
    advantage from the trainer's log. Writes a PNG; returns the plotted series."""
    from ..evaluation.plots import new_figure, save_png

    held = [h for h in history if h["kind"] == "heldout"]
    steps = [h["step"] for h in held]
    pre = "eval_progadv/heldout/"
    auroc = {m: [h["figures"].get(f"{pre}auroc/{m}") for h in held] for m in HEADLINE_METHODS}
    auroc = {m: v for m, v in auroc.items() if any(x is not None for x in v)}
    adv = [h["figures"].get(f"{pre}step_advantage_mean") for h in held]
    logs = [e for e in log_history if "reward" in e and "step" in e]
    train_steps = [e["step"] for e in logs]
    reward = [e.get("reward") for e in logs]
    train_adv = [e.get("progadv/train/step_advantage_mean") for e in logs]
    kl = [e.get("kl") for e in logs]

    nan = lambda xs: [float("nan") if x is None else x for x in xs]  # noqa: E731 - matplotlib skips NaN, not None
    fig = new_figure(figsize=(12, 3.6))
    a1, a2, a3 = fig.subplots(1, 3)
    for m, v in auroc.items():
        a1.plot(steps, nan(v), marker="o", ms=3,
                lw=2 if m == "progress_advantage" else 1, label=m)  # fmt: skip
    a1.axhline(0.5, color="grey", ls=":", lw=1)
    a1.set(xlabel="GRPO step", ylabel="AUROC", title="held-out success prediction", ylim=(0, 1.02))
    if auroc:
        a1.legend(fontsize=6)
    a2.plot(steps, nan(adv), marker="o", ms=3, label="held-out (reference rollouts)")
    if any(x is not None for x in train_adv):
        a2.plot(train_steps, nan(train_adv), ms=3, label="training rollouts")
    a2.axhline(0, color="grey", lw=0.5)
    a2.set(xlabel="GRPO step", ylabel="mean step advantage (beta * nats)", title="progress advantage per step")
    a2.legend(fontsize=7)
    a3.plot(train_steps, reward, label="reward (success)")
    a3.set(xlabel="GRPO step", ylabel="mean reward", title="training", ylim=(0, 1.02))
    if any(x is not None for x in kl):
        ax = a3.twinx()
        ax.plot(train_steps, nan(kl), color="tab:red", lw=1, label="kl")
        ax.set_ylabel("kl", color="tab:red")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, path)
    return {"heldout_steps": steps, "heldout_auroc": auroc, "heldout_step_advantage_mean": adv,
            "train_steps": train_steps, "reward": reward, "train_step_advantage_mean": train_adv, "kl": kl}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Text


def headline_rows(h: dict) -> tuple[list[str], list[list[str]]]:
    header = ["method", "AUROC (all)", "AUROC (decision fails)", "best-of-N", "mistake step, exact (rule by CV)"]
    rows = []
    for m, r in h["methods"].items():
        fa = r.get("fair_attribution")
        rows.append([m, f"{format_cell(r['auroc'], r['auroc_ci'])} n={r['n']}",
                     f"{format_cell(r['auroc_decision_failures'], r['auroc_decision_failures_ci'])} n={r['n_decision']}",
                     f"{format_cell(r['best_of_n'], r['best_of_n_ci'])} g={r['n_groups']}",
                     "-" if fa is None else f"{format_cell(fa)} ({r['fair_attribution_rule']})"])  # fmt: skip
    rows.append(["(random pick / pass@N)", "", "", f"{format_cell(h['random_pick'])} / {format_cell(h['pass_at_n'])}", ""])
    rows.append(["(random step)", "", "", "", format_cell(h["attribution_chance"])])
    for app, c in (h.get("comparison") or {}).items():
        ci = c.get("difference_ci")
        rows.append([f"(PA - {c['best_baseline']}, {app}, CV rules)", "", "", "",
                     f"{c['difference']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "") + f" {c['verdict']}"])  # fmt: skip
        for b, v in (c.get("versus") or {}).items():  # head to head with each trained reward model
            if b == c["best_baseline"]:
                continue  # the row above
            ci = v.get("difference_ci")
            rows.append([f"(PA - {b}, {app}, CV rules)", "", "", "",
                         f"{v['difference']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "") + f" {v['verdict']}"])  # fmt: skip
    return header, rows


def reward_model_costs(block: dict) -> str:
    """One line: what each trained reward model cost beside the critic (zero)."""
    parts = [f"{name.upper()} {c['cpu_s']:.0f} CPU s ({c['rollouts']} rollouts, {c['continuations']} continuations, "
             f"{c['training_steps']} steps)" for name, c in block.items() if name in ("orm", "prm")]  # fmt: skip
    return "reward models trained for the comparison: " + "; ".join(parts) + "; the critic 0 (the RL run's own models)"


def format_summary(summary: dict) -> str:
    lines = [
        "",
        f"success on held-out tasks, greedy ({summary['n_eval_episodes']['greedy']} episodes): "
        f"reference {summary['reference_success']:.3f} -> policy {summary['policy_success']:.3f} "
        f"({summary['greedy_gain_points']:+.1f} points)",
        f"sampled at T=1 ({summary['n_eval_episodes']['sampled']} episodes): "
        f"reference {summary['reference_success_sampled']:.3f} -> policy {summary['policy_success_sampled']:.3f}",
    ]
    for name, h in summary["evaluation"].items():
        lines += ["", f"{name} test rollouts: {SETS[name]}", text_table(*headline_rows(h))]
        cv = h["cv_reduction"]
        if cv.get("chosen"):
            lines.append(f"(5-fold CV would pick the reduction {cv['chosen']}: out-of-fold AUROC {format_cell(cv['out_of_fold_auroc'])})")
        cvv = h.get("cv_variant") or {}
        if cvv.get("chosen"):
            lines.append(f"(5-fold CV would pick the variant {cvv['chosen']}: out-of-fold AUROC "
                         f"{format_cell(cvv['out_of_fold_auroc'])}; steps out of the reference's support: "
                         f"{format_cell(h.get('out_of_support'))})")  # fmt: skip
    if summary.get("reward_models"):
        lines += ["", reward_model_costs(summary["reward_models"])]
    if summary.get("step_selection"):
        from .steering import format_step_selection

        lines += [""] + format_step_selection(summary["step_selection"])
    if summary.get("study_comparison"):
        lines += [""] + summary["study_comparison"]
    t = summary["timings"]
    lines += ["", "timings (s): " + ", ".join(f"{k[:-2]} {v:.0f}" for k, v in t.items() if k.endswith("_s")), "",
              f"report: {summary['paths']['report']}", f"critic bundle: {summary['paths']['bundle']}  "
              f"(load it: ProgressCritic.from_pretrained(...); check it: progadv inspect ...)"]  # fmt: skip
    return "\n".join(lines)


def report_markdown(summary: dict, evaluations: dict) -> str:
    md = ["# progadv demo", "",
          f"Held-out success, greedy (n={summary['n_eval_episodes']['greedy']}): reference "
          f"**{summary['reference_success']:.3f}** -> policy **{summary['policy_success']:.3f}** "
          f"({summary['greedy_gain_points']:+.1f} points). Sampled at T=1 (n={summary['n_eval_episodes']['sampled']}): "
          f"{summary['reference_success_sampled']:.3f} -> {summary['policy_success_sampled']:.3f}.", "",
          "![training curves](training.png)", "",
          "Progress advantage is exact only for an optimal KL-regularised policy. The two test sets below show both "
          "regimes: the reference's runs (off-policy, with many decision failures) and the RL policy's own runs "
          "(on-policy, few failures, which visit states where the reference is diffuse and the policy sharp, so every "
          "turn of a failure can carry a large positive log-ratio). Read the rows, including where a baseline wins."]  # fmt: skip
    for name, h in summary["evaluation"].items():
        header, rows = headline_rows(h)
        md += ["", f"## {name} rollouts", "", SETS[name], "", markdown_table(header, rows), "",
               f"Details, intervals, calibration and plots: [{name}/metrics.md]({name}/metrics.md), "
               f"![ROC]({name}/roc.png) ![best-of-N]({name}/best_of_n.png) ![traces]({name}/traces.png)"]  # fmt: skip
    if summary.get("reward_models"):
        md += ["", reward_model_costs(summary["reward_models"]) + " (docs/reward_models.md)."]
    if summary.get("step_selection"):
        from .steering import step_selection_markdown

        md += ["", "## Step-level selection (the critic in the agent loop)", ""] + step_selection_markdown(summary["step_selection"])
    md += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in summary["timings"].items())]
    return "\n".join(md) + "\n"
