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

from ..config import BASELINES
from .ranges import (  # noqa: F401 - re-exported: they used to live here
    ADDED_KEYS,
    APPLICATIONS,
    EVAL_ONLY_KEYS,
    IGNORED_KEYS,
    REGIMES,
    _comparable,
    STUDY_REFERENCE,
    compare_with_study,
    config_diff,
    reference_ranges,
    study_ranges,
)

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
            "verdicts": verdicts(summaries), "family_verdicts": family_verdicts(summaries),
            "versus_verdicts": versus_verdicts(summaries), "reward_model_costs": reward_model_costs(summaries),
            "reductions_chosen": reductions_chosen(summaries),
            "step_selection": step_selection_across_seeds(summaries),
            "regimes": {v: k for k, v in REGIMES.items()}}  # fmt: skip


def step_selection_across_seeds(summaries: list[dict]) -> dict | None:
    """The demo's step_selection blocks across seeds: per agent and budget ("reference/k4"), per method the step-level
    and trajectory-level success (mean, spread), the agent alone, and per family member its difference from each
    seed's best baseline with beats/ties/losses counted from each seed's paired interval. None without the blocks."""
    blocks = [(_seed(s, i), s["step_selection"]) for i, s in enumerate(summaries) if s.get("step_selection")]
    if not blocks:
        return None
    out = {"seeds": [sd for sd, _ in blocks], "tasks": sorted({b["tasks"] for _, b in blocks}), "cells": {}}
    for agent in blocks[0][1]["agents"]:
        for k in blocks[0][1]["budgets"]:
            rows = [(sd, b["agents"][agent], b["agents"][agent][f"k{k}"]) for sd, b in blocks
                    if agent in b["agents"] and f"k{k}" in b["agents"][agent]]  # fmt: skip
            cell = {"greedy": _stats([e["greedy"] for _, e, _ in rows]), "sampled": _stats([r["sampled"] for _, _, r in rows])}
            ranks = [r["candidate_ranking"] for _, _, r in rows if (r.get("candidate_ranking") or {}).get("pairs")]
            if ranks:  # within-state ordering of (correct, mistake) candidates, per method
                cell["candidate_ranking"] = {m: _stats([x["methods"][m] for x in ranks if x["methods"].get(m) is not None])
                                             for m in ranks[0]["methods"]}  # fmt: skip
                cell["candidate_ranking_pairs"] = [x["pairs"] for x in ranks]
            for level in ("step", "trajectory"):
                methods = list(dict.fromkeys(m for _, _, r in rows for m in r[level]))
                cell[level] = {m: _stats([r[level][m] for _, _, r in rows if m in r[level]]) for m in methods}
                fam: dict[str, dict] = {}
                for sd, _, r in rows:
                    c = r[f"{level}_comparison"]
                    for m, d in (c.get("family") or {}).items():
                        f = fam.setdefault(m, {"differences": [], "best_baselines": [], "beats": 0, "ties": 0, "losses": 0})
                        f["differences"].append(d["difference"])
                        f["best_baselines"].append(c.get("best_baseline"))
                        key = {"beats": "beats", "loses": "losses"}.get(d["verdict"], "ties")
                        f[key] += 1
                        vs = d.get("vs_progress_advantage")
                        if vs:  # a variant against plain progress advantage, paired over the same tasks
                            g = f.setdefault("vs_progress_advantage", {"differences": [], "beats": 0, "ties": 0, "losses": 0})
                            g["differences"].append(vs["difference"])
                            g[{"beats": "beats", "loses": "losses"}.get(vs["verdict"], "ties")] += 1
                for f in fam.values():
                    f["difference"] = _stats(f.pop("differences"))
                    if "vs_progress_advantage" in f:
                        f["vs_progress_advantage"]["difference"] = _stats(f["vs_progress_advantage"].pop("differences"))
                cell[f"{level}_verdicts"] = fam
                vs: dict[str, dict] = {}  # progress advantage minus each trained reward model, per seed's interval
                for _, _, r in rows:
                    for b, d in (r[f"{level}_comparison"].get("versus") or {}).items():
                        f = vs.setdefault(b, {"differences": [], "beats": 0, "ties": 0, "losses": 0})
                        f["differences"].append(d["difference"])
                        f[{"beats": "beats", "loses": "losses"}.get(d["verdict"], "ties")] += 1
                for f in vs.values():
                    f["difference"] = _stats(f.pop("differences"))
                if vs:
                    cell[f"{level}_versus"] = vs
            out["cells"][f"{agent}/k{k}"] = cell
    return out


def step_selection_markdown(study: dict) -> list[str]:
    """The study's step-selection table: per agent and K, success of PA, each variant and each baseline (mean over
    seeds), then PA minus the best baseline with beats/ties/losses."""
    st = study.get("step_selection")
    if not st:
        return []
    md = ["## Step-level selection: the critic in the agent loop", "",
          f"Seeds {', '.join(map(str, st['seeds']))}; {', '.join(map(str, st['tasks']))} held-out tasks per seed, one "
          "episode per task and method with the same world seed. At every step the agent samples K candidate turns and "
          "keeps the one the method ranks highest. Cells: mean held-out success across seeds ± std. Verdicts: per seed "
          "a paired bootstrap over tasks of the method minus that seed's best baseline (chosen on the same tasks, which "
          "favours the baseline); beats/ties/losses count the seeds whose 95 % interval excludes zero.", ""]  # fmt: skip
    cells = st["cells"]
    methods = list(dict.fromkeys(m for c in cells.values() for m in c["step"]))
    header = "| method | " + " | ".join(f"{name} step" for name in cells) + " |"
    md += [header, "|---" * (len(cells) + 1) + "|"]
    for m in methods:
        md.append(f"| {m} | " + " | ".join(
            "–" if m not in c["step"] else f"{_f(c['step'][m]['mean'])} ± {_f(c['step'][m]['std'], 3)}" for c in cells.values()) + " |")
    md.append("| (agent alone, greedy) | " + " | ".join(f"{_f(c['greedy']['mean'])}" for c in cells.values()) + " |")
    md.append("| (agent alone, sampled) | " + " | ".join(f"{_f(c['sampled']['mean'])}" for c in cells.values()) + " |")
    md.append("| (trajectory best-of-K, PA) | " + " | ".join(
        f"{_f(c['trajectory']['progress_advantage']['mean'])}" if "progress_advantage" in c["trajectory"] else "–"
        for c in cells.values()) + " |")
    md += ["", "Family member minus the best baseline (rows \"− progress_advantage\": minus plain progress advantage; mean "
           "difference across seeds; beats/ties/losses):", "",
           "| member | " + " | ".join(f"{name} step" for name in cells) + " | " + " | ".join(f"{name} trajectory" for name in cells) + " |",
           "|---" * (2 * len(cells) + 1) + "|"]  # fmt: skip
    family = list(dict.fromkeys(m for c in cells.values() for m in c["step_verdicts"]))
    for m in family:
        for against in ("best", "vs_progress_advantage"):
            row = []
            for level in ("step", "trajectory"):
                for c in cells.values():
                    v = c[f"{level}_verdicts"].get(m)
                    v = v if against == "best" or v is None else v.get(against)
                    row.append("–" if v is None else f"{v['difference']['mean']:+.3f} ({v['beats']}/{v['ties']}/{v['losses']})")
            if against == "best" or any(x != "–" for x in row):
                md.append(f"| {m}{'' if against == 'best' else ' − progress_advantage'} | " + " | ".join(row) + " |")
    if any("candidate_ranking" in c for c in cells.values()):
        md += ["", "Within-state ranking: over the states whose K candidates hold both the correct action and a mistake, "
               "the share of (correct, mistake) pairs each method orders correctly (0.5: chance; mean across seeds):", "",
               "| method | " + " | ".join(cells) + " |", "|---" * (len(cells) + 1) + "|"]  # fmt: skip
        for m in list(dict.fromkeys(m for c in cells.values() for m in c.get("candidate_ranking", {}))):
            md.append(f"| {m} | " + " | ".join(
                f"{_f(c['candidate_ranking'][m]['mean'])} ± {_f(c['candidate_ranking'][m]['std'], 3)}"
                if m in c.get("candidate_ranking", {}) else "–" for c in cells.values()) + " |")
    best = {name: sorted({b for b in (c["step_verdicts"].get("progress_advantage") or {}).get("best_baselines", []) if b})
            for name, c in cells.items()}  # fmt: skip
    md += ["", "Best baseline per seed (step level): " + "; ".join(f"{n}: {', '.join(b) or '–'}" for n, b in best.items()), ""]
    return md


def reductions_chosen(summaries: list[dict]) -> dict:
    """Per regime: the token/step reduction 5-fold CV chose on each seed (is one stable across seeds?), with its
    out-of-fold AUROC."""
    out: dict[str, list] = {}
    for i, s in enumerate(summaries):
        for set_name, ev in (s.get("evaluation") or {}).items():
            cv = ev.get("cv_reduction") or {}
            if cv.get("chosen"):
                out.setdefault(REGIMES.get(set_name, set_name), []).append(
                    {"seed": _seed(s, i), "chosen": cv["chosen"], "out_of_fold_auroc": cv.get("out_of_fold_auroc")})
    return out


def verdicts(summaries: list[dict]) -> dict:
    """Per regime and application, across seeds: how often progress advantage beat / tied / lost to the best
    baseline (each method with its rule chosen by CV; "beats"/"loses" only where the seed's paired 95 % interval
    excludes zero), the differences per seed and which baseline was best how often. `untrained`: the same against
    the best baseline that needs no training (the one a run without reward models is compared with); it equals the
    above on seeds where no reward model was best, and is left out where a seed whose best was a reward model has
    no such figure (summaries from before it was kept)."""
    out: dict[str, dict] = {}
    for s in summaries:
        for set_name, ev in (s.get("evaluation") or {}).items():
            regime = REGIMES.get(set_name, set_name)
            for app, c in (ev.get("comparison") or {}).items():
                if not isinstance(c, dict) or c.get("difference") is None:
                    continue
                v = out.setdefault(regime, {}).setdefault(app, {"beats": 0, "ties": 0, "loses": 0, "differences": [],
                                                                 "best_baseline": {}})  # fmt: skip
                _count(v, c)
                b = c.get("best_baseline") or "?"
                v["best_baseline"][b] = v["best_baseline"].get(b, 0) + 1
                trained_best = b not in BASELINES  # a reward model
                if trained_best and not c.get("vs_best_untrained"):
                    continue  # no paired figure against the untrained ones on this seed (an older summary)
                u = v.setdefault("untrained", {"beats": 0, "ties": 0, "loses": 0, "differences": []})
                _count(u, c["vs_best_untrained"] if trained_best else c)
    for apps in out.values():
        for v in apps.values():
            for w in (v, v.get("untrained")):
                if w:
                    w.update({k: x for k, x in _stats(w["differences"]).items() if k != "n_seeds"})
            if v.get("untrained") and len(v["untrained"]["differences"]) != len(v["differences"]):
                del v["untrained"]  # some seeds lack it: no across-seed figure
    return out


def _count(v: dict, c: dict) -> None:
    v[c.get("verdict", "ties")] = v.get(c.get("verdict", "ties"), 0) + 1
    v["differences"].append(float(c["difference"]))


def _verdict(ci) -> str:
    """beats / loses where the paired 95 % interval of (member - best baseline) excludes zero, else ties."""
    return "beats" if ci[0] > 0 else "loses" if ci[1] < 0 else "ties"


def _tally(summaries: list[dict], figures) -> dict:
    """Per regime, method and key: beats / ties / loses from each seed's paired 95 % interval, and the differences'
    mean, min, max. `figures(app)`: the (key, row figure) pairs to count, the interval being `row[figure + "_ci"]`."""
    out: dict[str, dict] = {}
    for s in summaries:
        for set_name, ev in (s.get("evaluation") or {}).items():
            regime = REGIMES.get(set_name, set_name)
            for m, row in (ev.get("methods") or {}).items():
                for app in APPLICATIONS:
                    for key, fig in figures(app):
                        d, ci = row.get(fig), row.get(f"{fig}_ci")
                        if d is None or not ci or None in ci:
                            continue
                        v = out.setdefault(regime, {}).setdefault(m, {}).setdefault(
                            key, {"beats": 0, "ties": 0, "loses": 0, "differences": []})
                        v[_verdict(ci)] += 1
                        v["differences"].append(float(d))
    for members in out.values():
        for apps in members.values():
            for v in apps.values():
                v.update({k: x for k, x in _stats(v["differences"]).items() if k != "n_seeds"})
    return out


def family_verdicts(summaries: list[dict]) -> dict:
    """Per regime, per member of the progress-advantage family (progress_advantage and every variant the evaluation
    carried: centred, clipped, in-support, merged references) and per application: its difference from the best
    baseline across seeds (mean, min, max) and how often it beat / tied / lost (from each seed's paired interval)."""
    # against the best baseline; a variant also against plain progress advantage ("app vs PA")
    return _tally(summaries, lambda app: ((app, f"fair_{app}_minus_best_baseline"),
                                          (f"{app} vs PA", f"fair_{app}_minus_progress_advantage")))


def versus_verdicts(summaries: list[dict]) -> dict:
    """Per regime, per baseline compared head to head with progress advantage (the trained reward models: the
    evaluation's `versus`) and per application: progress advantage minus that baseline across seeds (mean, min, max)
    and how often it beat / tied / lost (from each seed's paired 95 % interval)."""
    return _tally(summaries, lambda app: ((app, f"fair_{app}_progress_advantage_minus_this"),))


REWARD_MODEL_COST_KEYS = ("cpu_s", "wall_s", "rollouts", "continuations", "resolved_by_world", "training_steps")


def reward_model_costs(summaries: list[dict]) -> dict | None:
    """Per trained reward model (summary["reward_models"]): its cost across seeds (mean, spread) in CPU seconds, wall
    seconds, rollouts, continuations and optimizer steps; the critic's is zero. None without reward models."""
    blocks = [s["reward_models"] for s in summaries if s.get("reward_models")]
    if not blocks:
        return None
    out = {}
    for name in ("orm", "prm"):
        costs = [b[name] for b in blocks if name in b]
        out[name] = {k: _stats([float(c[k]) for c in costs]) for k in REWARD_MODEL_COST_KEYS if all(k in c for c in costs)}
    out["critic"] = {k: 0.0 for k in ("cpu_s", "wall_s", "rollouts", "continuations", "training_steps")}
    out["config"] = blocks[0].get("config")
    return out


def reward_models_markdown(study: dict) -> list[str]:
    """Progress advantage against each trained reward model: per regime and application (AUROC, best-of-N, the
    mistake step), at step selection, and what each signal cost."""
    vs, costs = study.get("versus_verdicts") or {}, study.get("reward_model_costs")
    steps = [(name, c) for name, c in ((study.get("step_selection") or {}).get("cells") or {}).items()
             if c.get("step_versus")]  # fmt: skip
    if not vs and not costs:
        return []
    n = len(study["seeds"])
    md = ["## Progress advantage against reward models trained for the job", "",
          "An outcome (ORM) and a process reward model (PRM, Math-Shepherd labels from continuations) of the reference's "
          "size, trained on train-split rollouts of the reference and the policy (docs/reward_models.md). Per cell: "
          "progress advantage minus the reward model (each with its rule chosen by 5-fold CV, out of fold), mean over "
          f"seeds [min, max]; then beats / ties / loses over the {n} seeds (each seed's paired 95 % interval).", ""]  # fmt: skip
    for regime, models in vs.items():
        apps = [a for a in APPLICATIONS if any(a in v for v in models.values())]
        md += [f"### {regime}", "", "| PA minus | " + " | ".join(apps) + " |", "|---" * (len(apps) + 1) + "|"]
        for m, v in models.items():
            md.append(f"| {m} | " + " | ".join("–" if a not in v else f"{v[a]['mean']:+.3f} [{v[a]['min']:+.3f}, "
                      f"{v[a]['max']:+.3f}] {v[a]['beats']}/{v[a]['ties']}/{v[a]['loses']}" for a in apps) + " |")  # fmt: skip
        md.append("")
    if steps:
        md += ["Step selection (success; beats/ties/losses):", "", "| PA minus | " + " | ".join(name for name, _ in steps)
               + " |", "|---" * (len(steps) + 1) + "|"]  # fmt: skip
        for b in list(dict.fromkeys(b for _, c in steps for b in c["step_versus"])):
            md.append(f"| {b} | " + " | ".join(
                "–" if b not in c["step_versus"] else f"{c['step_versus'][b]['difference']['mean']:+.3f} "
                f"({c['step_versus'][b]['beats']}/{c['step_versus'][b]['ties']}/{c['step_versus'][b]['losses']})"
                for _, c in steps) + " |")  # fmt: skip
        md.append("")
    if costs:
        md += ["What each signal cost (mean ± std across seeds; the critic is the RL run's own policy and reference):", "",
               "| signal | CPU s | wall s | rollouts | continuations played | optimizer steps |", "|---|---|---|---|---|---|"]
        for name in ("orm", "prm"):
            c = costs.get(name) or {}
            cell = lambda k: "–" if k not in c else f"{c[k]['mean']:.0f} ± {c[k]['std']:.0f}"  # noqa: E731
            md.append(f"| {name} | {cell('cpu_s')} | {cell('wall_s')} | {cell('rollouts')} | {cell('continuations')} | "
                      f"{cell('training_steps')} |")
        md += ["| critic (progress advantage) | 0 | 0 | 0 | 0 | 0 |", ""]
    return md


def family_markdown(study: dict) -> list[str]:
    """The variants table: per regime, each family member's difference from the best baseline per application."""
    fam = study.get("family_verdicts") or {}
    if not fam:
        return []
    n = len(study["seeds"])
    md = ["## Progress-advantage variants against the best baseline", "",
          f"Per cell: the member's out-of-fold figure minus the best baseline's (columns \"... vs PA\": minus plain "
          f"progress advantage's), mean over seeds [min, max]; then beats/ties/loses over the {n} seeds (each seed's "
          f"paired 95 % interval).", ""]  # fmt: skip
    for regime, members in fam.items():
        apps = [a for a in APPLICATIONS if any(a in v for v in members.values())]
        apps += [f"{a} vs PA" for a in APPLICATIONS if any(f"{a} vs PA" in v for v in members.values())]
        md += [f"### {regime}", "", "| member | " + " | ".join(apps) + " |", "|---" * (len(apps) + 1) + "|"]
        for m, v in members.items():
            cells = ["–" if a not in v else f"{v[a]['mean']:+.3f} [{v[a]['min']:+.3f}, {v[a]['max']:+.3f}] "
                     f"{v[a]['beats']}/{v[a]['ties']}/{v[a]['loses']}" for a in apps]  # fmt: skip
            md.append(f"| {m} | " + " | ".join(cells) + " |")
        md.append("")
    return md


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
    timeouts = cfg.get("grpo_p_timeout", ADDED_KEYS["grpo_p_timeout"])
    rl_world = f", lookups time out at {timeouts} in the RL rollouts" if timeouts is not None else ""
    md += [f"Seeds {', '.join(map(str, study['seeds']))}; world: {world}; GRPO {cfg.get('grpo_steps')} steps, "
           f"beta {cfg.get('beta')}{rl_world}.", ""]  # fmt: skip
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
    md += verdict_markdown(study)
    md += family_markdown(study)
    md += reward_models_markdown(study)
    md += step_selection_markdown(study)
    if study.get("reductions_chosen"):
        md += ["## The reduction 5-fold CV chose (per seed)", ""]
        for regime, picks in study["reductions_chosen"].items():
            md.append(f"- {regime}: " + "; ".join(f"seed {p['seed']}: {p['chosen']}" + (
                "" if not isinstance(p.get("out_of_fold_auroc"), (int, float)) else f" ({p['out_of_fold_auroc']:.3f})")
                for p in picks))  # fmt: skip
        md.append("")
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


def verdict_markdown(study: dict) -> list[str]:
    """The headline: per regime and application, progress advantage against the best baseline across seeds."""
    n = len(study["seeds"])
    md = ["## Progress advantage against the best baseline", "",
          "Every method with its own attribution rule / reduction chosen by 5-fold cross-validation and reported out of "
          "fold; per seed a paired bootstrap (the same rollouts resampled for both) of progress advantage minus the "
          "best baseline; \"beats\"/\"loses\" only where that seed's 95 % interval excludes zero.", "",
          "| regime | application | progress advantage, mean ± std | PA − best baseline: mean [min, max] | "
          f"beats / ties / loses (of {n} seeds) | best baseline (seeds) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for regime, apps in (study.get("verdicts") or {}).items():
        pa = (study["table"].get(regime) or {}).get("progress_advantage") or {}
        for app, v in apps.items():
            c = pa.get(f"fair_{app}")
            best = ", ".join(f"{b} ({k})" for b, k in sorted(v["best_baseline"].items(), key=lambda x: -x[1]))
            pa_cell = "–" if c is None else f"{_f(c['mean'])} ± {_f(c['std'])}"
            md.append(f"| {regime} | {APPLICATIONS.get(app, app)} | {pa_cell} | "
                      f"{v['mean']:+.3f} [{v['min']:+.3f}, {v['max']:+.3f}] | {v['beats']} / {v['ties']} / {v['loses']} | "
                      f"{best} |")  # fmt: skip
    return md + [""]


# ----------------------------------------------------------------------------------------------------------------
# Running


def run_study(seeds: list[int], out_dir, make_config, runner=None, command: str | None = None,
              reevaluate: bool = False) -> dict:  # fmt: skip
    """Run (or resume) the demo for each seed into out_dir/seed_N, then aggregate into out_dir/study.{json,md}.

    `make_config(seed, out_dir) -> DemoConfig`; `runner(cfg) -> summary` (default: `run_demo`). A seed whose
    summary.json exists with the same config is read, not run; one with another config raises ValueError before any
    seed runs. `reevaluate`: a finished seed's evaluation (stage 6: scoring its saved test rollouts with its saved
    bundle) is run again with this version's evaluation code; its models and rollouts are kept."""
    from dataclasses import asdict

    from ..utils import atomic_write_text, write_json

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
                summaries.append(redo(cfg.out_dir, **{k: getattr(cfg, k) for k in EVAL_ONLY_KEYS if hasattr(cfg, k)}))
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
    write_json(out / "study.json", study, default=str)
    atomic_write_text(out / "study.md", study_markdown(study, command) + "\n")
    write_json(out / "study_ranges.json", study_ranges(study))
    _say(f"wrote {out / 'study.json'} and {out / 'study.md'}")
    return study


def main(args) -> int:
    """`progadv study` (args: an `arguments.StudyArguments`)."""
    import warnings

    from ..arguments import DemoArguments
    from .main import demo_config

    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)

    def make_config(seed: int, out_dir: str):
        cfg = demo_config(DemoArguments(out=out_dir, config=args.config, seed=seed, fast=args.fast,
                                        no_progress=args.no_progress, noisy=args.noisy))  # fmt: skip
        cfg.variants = not args.no_variants  # the study's table covers every variant unless told otherwise
        cfg.reward_models = not args.no_reward_models  # and the trained reward models (the paper's other claim)
        return cfg

    command = "progadv study --seeds " + " ".join(map(str, args.seeds)) + f" --out {args.out}"
    command += "".join(f" {f}" for f, on in ((f"--config {args.config}", args.config), ("--noisy", args.noisy),
                                              ("--fast", args.fast), ("--no-variants", args.no_variants),
                                              ("--no-reward-models", args.no_reward_models),
                                              ("--reevaluate", args.reevaluate)) if on)  # fmt: skip
    try:
        study = run_study(args.seeds, args.out, make_config, command=command, reevaluate=args.reevaluate)
    except ValueError as e:
        raise SystemExit(f"progadv: error: {e}")
    print(study_markdown(study, command))
    return 0
