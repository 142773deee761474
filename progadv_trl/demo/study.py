"""`progadv study`: the demo over several seeds, one table across them.

    progadv study --seeds 0 1 2 3 4 --out runs/study             # 5 x the demo (~5 min each on 2 CPU cores)
    progadv study --seeds 0 1 2 3 4 --out runs/study_noisy --noisy   # the free-form world (WorldConfig.free_form)

Each seed is a whole demo run (a new world draw, SFT, GRPO, test rollouts, evaluation) in DIR/seed_N/. A seed whose
summary.json exists and was made with the same configuration is not run again, so an interrupted study resumes; one
made with another configuration stops the study (use another --out, or delete that seed's directory).

DIR/study.json and DIR/study.md aggregate every seed's summary.json with `aggregate`, a pure function that reads the
summaries' evaluation figures generically (every numeric leaf of every method), so figures added to the demo's
evaluation flow into the table without changing this module.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

# Config keys that do not change a run's results: a seed made with other values of these is still resumed.
IGNORED_KEYS = ("out_dir", "progress")
# Evaluation sets of the demo summary -> the regime they measure.
REGIMES = {"policy": "on-policy", "reference": "off-policy"}
# Figures where lower is better (matched as a substring of the figure's name); every other figure: higher is better.
LOWER_IS_BETTER = ("brier", "ece", "log_loss", "error", "rank")
MIN_GAIN_POINTS = 25.0  # the demo's bar: the RL policy's greedy success at least this far above its reference's


def _say(msg: str) -> None:
    print(f"[progadv study] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Aggregation (pure)


def _is_count(key: str) -> bool:
    return key == "n" or key.startswith("n_")


def _leaves(d, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict as {"a/b/c": value}; counts (n, n_*), booleans, lists and None are skipped."""
    out = {}
    if not isinstance(d, dict):
        return out
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_leaves(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and not _is_count(str(k)):
            if not (isinstance(v, float) and math.isnan(v)):
                out[key] = float(v)
    return out


def _stats(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n_seeds": n}


def higher_is_better(figure: str) -> bool:
    name = figure.rsplit("/", 1)[-1].lower()
    return not any(p in name for p in LOWER_IS_BETTER)


def _seed(summary: dict, i: int):
    return (summary.get("config") or {}).get("seed", i)


def _common_config(summaries: list[dict]) -> tuple[dict, dict]:
    """(keys with one value in every summary, {key: [value per summary]} for the others); seed and IGNORED_KEYS out."""
    cfgs = [s.get("config") or {} for s in summaries]
    keys = sorted({k for c in cfgs for k in c} - {"seed", *IGNORED_KEYS})
    common, varying = {}, {}
    for k in keys:
        vals = [c.get(k) for c in cfgs]
        if all(v == vals[0] for v in vals):
            common[k] = vals[0]
        else:
            varying[k] = vals
    return common, varying


def aggregate(summaries: list[dict]) -> dict:
    """Aggregate per-seed demo summaries (summary.json) into one study table.

    Returns {"seeds", "config", "config_varying", "success", "table", "regimes"}:
    - success: per seed the reference's and the policy's greedy held-out success (and sampled, where present), the
      gain in points, the run's wall and process CPU seconds; then the min/mean gain and whether every seed cleared MIN_GAIN_POINTS;
    - table[regime][method][figure] = {mean, std, min, max, n_seeds, wins}: every numeric leaf of every method's row
      in summary["evaluation"][set]["methods"] (nested dicts flattened to "a/b"); `wins` counts the seeds where the
      method was best in that cell among the methods that have it that seed (ties count for each tied method; lower
      is better for figures named like LOWER_IS_BETTER). table[regime]["(set)"] holds the set's other numeric
      figures (random pick, pass@N, chance, ...), with no wins.
    """
    if not summaries:
        raise ValueError("aggregate: no summaries")
    seeds = [_seed(s, i) for i, s in enumerate(summaries)]
    common, varying = _common_config(summaries)

    per_seed = []
    for seed, s in zip(seeds, summaries):
        ref, pol = s.get("reference_success"), s.get("policy_success")
        row = {"seed": seed, "reference": ref, "policy": pol,
               "gain_points": None if ref is None or pol is None else round(100 * (pol - ref), 1)}  # fmt: skip
        for k in ("reference_success_sampled", "policy_success_sampled"):
            if k in s:
                row[k.replace("_success", "")] = s[k]
        if isinstance(s.get("timings"), dict) and "total_s" in s["timings"]:
            row["total_s"] = s["timings"]["total_s"]
        if isinstance(s.get("cpu_timings"), dict) and "total_s" in s["cpu_timings"]:
            row["cpu_s"] = s["cpu_timings"]["total_s"]
        per_seed.append(row)
    gains = [r["gain_points"] for r in per_seed if r["gain_points"] is not None]
    success = {
        "per_seed": per_seed,
        "min_gain_points": min(gains) if gains else None,
        "mean_gain_points": round(sum(gains) / len(gains), 1) if gains else None,
        "bar_points": MIN_GAIN_POINTS,
        "all_seeds_clear_bar": bool(gains) and len(gains) == len(summaries) and min(gains) >= MIN_GAIN_POINTS,
    }

    table: dict[str, dict] = {}
    for s in summaries:
        for set_name, ev in (s.get("evaluation") or {}).items():
            regime = REGIMES.get(set_name, set_name)
            t = table.setdefault(regime, {})
            cells = {m: _leaves(row) for m, row in (ev.get("methods") or {}).items()}
            for m, figs in cells.items():
                for f, v in figs.items():
                    t.setdefault(m, {}).setdefault(f, {"values": [], "wins": 0})["values"].append(v)
            # wins: per figure, the best method(s) of this seed
            for f in {f for figs in cells.values() for f in figs}:
                vals = {m: figs[f] for m, figs in cells.items() if f in figs}
                if len(vals) < 2:
                    continue
                best = (max if higher_is_better(f) else min)(vals.values())
                for m, v in vals.items():
                    if v == best:
                        t[m][f]["wins"] += 1
            other = _leaves({k: v for k, v in ev.items() if k != "methods"})
            for f, v in other.items():
                t.setdefault("(set)", {}).setdefault(f, {"values": [], "wins": None})["values"].append(v)
    for t in table.values():
        for m, figs in t.items():
            for f, cell in figs.items():
                figs[f] = {**_stats(cell["values"]), "wins": cell["wins"]}

    return {"seeds": seeds, "config": common, "config_varying": varying, "success": success, "table": table,
            "regimes": {v: k for k, v in REGIMES.items()}}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Markdown


def _f(x, nd: int = 3) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def study_markdown(study: dict, command: str | None = None) -> str:
    s = study["success"]
    n = len(study["seeds"])
    md = ["# progadv study", ""]
    if command:
        md += [f"`{command}`", ""]
    cfg = study["config"]
    world = "free-form (noisy)" if cfg.get("free_form") else "plain"
    md += [f"Seeds {', '.join(map(str, study['seeds']))}; world: {world}; GRPO {cfg.get('grpo_steps')} steps, "
           f"beta {cfg.get('beta')}.", ""]  # fmt: skip
    if study.get("config_varying"):
        md += [f"Config differs between seeds in: {', '.join(study['config_varying'])}.", ""]
    md += ["## Held-out greedy success, reference -> RL policy", "",
           "| seed | reference | policy | gain (points) | sampled ref -> policy | wall / CPU (s) |", "|---|---|---|---|---|---|"]
    for r in s["per_seed"]:
        samp = f"{_f(r.get('reference_sampled'))} -> {_f(r.get('policy_sampled'))}" if "policy_sampled" in r else "–"
        md.append(f"| {r['seed']} | {_f(r['reference'])} | {_f(r['policy'])} | {_f(r['gain_points'], 1)} | {samp} | "
                  f"{_f(r.get('total_s'), 0)} / {_f(r.get('cpu_s'), 0)} |")
    md += ["", f"Min gain {_f(s['min_gain_points'], 1)} points, mean {_f(s['mean_gain_points'], 1)} (bar: "
               f"{s['bar_points']:.0f} on every seed: {'cleared' if s['all_seeds_clear_bar'] else 'NOT cleared'}).", ""]
    for regime, t in study["table"].items():
        md += [f"## {regime} ({study['regimes'].get(regime, regime)} rollouts)", "",
               f"Mean ± std across seeds [min, max]; wins: seeds (of {n}) where the method was best in the cell.", ""]
        methods = [m for m in t if m != "(set)"]
        figures = sorted({f for m in methods for f in t[m]})
        md += ["| method | " + " | ".join(figures) + " |", "|---" * (len(figures) + 1) + "|"]
        for m in methods:
            cells = []
            for f in figures:
                c = t[m].get(f)
                cells.append("–" if c is None else
                             f"{_f(c['mean'])} ± {_f(c['std'])} [{_f(c['min'], 2)}, {_f(c['max'], 2)}] w{c['wins']}")
            md.append(f"| {m} | " + " | ".join(cells) + " |")
        if "(set)" in t:
            md += ["", "Reference lines: " + "; ".join(f"{f} {_f(c['mean'])} ± {_f(c['std'])}"
                                                      for f, c in sorted(t["(set)"].items()))]
        md.append("")
    return "\n".join(md)


# ----------------------------------------------------------------------------------------------------------------
# Running


def _comparable(cfg: dict) -> dict:
    return {k: v for k, v in json.loads(json.dumps(cfg, default=str)).items() if k not in IGNORED_KEYS}


def config_diff(old: dict, new: dict) -> list[str]:
    """Keys whose values differ between two run configs (IGNORED_KEYS aside)."""
    a, b = _comparable(old), _comparable(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<missing>") != b.get(k, "<missing>"))


def run_study(seeds: list[int], out_dir, make_config, runner=None, command: str | None = None,
              reevaluate: bool = False) -> dict:  # fmt: skip
    """Run (or resume) the demo for each seed into out_dir/seed_N, then aggregate into out_dir/study.{json,md}.

    `make_config(seed, out_dir) -> DemoConfig`; `runner(cfg) -> summary` (default: `run_demo`). A seed whose
    summary.json exists with the same config is read, not run; one with another config raises ValueError before any
    seed runs. `reevaluate`: a finished seed's evaluation (stage 6: scoring its saved test rollouts with its saved
    bundle) is run again with this version's evaluation code; its models and rollouts are kept."""
    from dataclasses import asdict

    from ..utils import atomic_write_text

    if runner is None:
        from .main import run_demo as runner
    out = Path(out_dir)
    cfgs = {s: make_config(s, str(out / f"seed_{s}")) for s in dict.fromkeys(seeds)}
    done = {}
    for s, cfg in cfgs.items():  # check every finished seed first: a mismatch must not cost a run
        path = Path(cfg.out_dir) / "summary.json"
        if path.exists():
            old = json.loads(path.read_text())
            diff = config_diff(old.get("config") or {}, asdict(cfg))
            if diff:
                raise ValueError(f"{path} was made with another configuration (differs in: {', '.join(diff)}); "
                                 f"use another --out, or delete {cfg.out_dir}")
            done[s] = old
    summaries, timings = [], {}
    for s, cfg in cfgs.items():
        if s in done:
            if reevaluate:
                from .main import reevaluate as redo

                _say(f"seed {s}: {cfg.out_dir} finished earlier; evaluating its saved rollouts again")
                summaries.append(redo(cfg.out_dir))
                continue
            _say(f"seed {s}: {cfg.out_dir}/summary.json exists with this configuration: not run again")
            summaries.append(done[s])
            continue
        _say(f"seed {s}: running the demo into {cfg.out_dir}")
        t0 = time.perf_counter()
        summaries.append(runner(cfg))
        timings[s] = round(time.perf_counter() - t0, 1)
    study = aggregate(summaries)
    study["command"] = command
    study["run_s"] = timings  # seeds run by this invocation
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "study.json", json.dumps(study, indent=2, default=str) + "\n")
    atomic_write_text(out / "study.md", study_markdown(study, command) + "\n")
    _say(f"wrote {out / 'study.json'} and {out / 'study.md'}")
    return study


def main(args) -> int:
    """`progadv study` (args: a `cli.StudyArguments`)."""
    import warnings

    from ..cli import DemoArguments, demo_config

    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)

    def make_config(seed: int, out_dir: str):
        return demo_config(DemoArguments(out=out_dir, config=args.config, seed=seed, fast=args.fast,
                                         no_progress=args.no_progress, noisy=args.noisy))  # fmt: skip

    command = "progadv study --seeds " + " ".join(map(str, args.seeds)) + f" --out {args.out}"
    command += "".join(f" {f}" for f, on in ((f"--config {args.config}", args.config), ("--noisy", args.noisy),
                                              ("--fast", args.fast)) if on)  # fmt: skip
    try:
        study = run_study(args.seeds, args.out, make_config, command=command, reevaluate=args.reevaluate)
    except ValueError as e:
        raise SystemExit(f"progadv: error: {e}")
    print(study_markdown(study, command))
    return 0
