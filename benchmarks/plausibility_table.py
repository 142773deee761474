"""The plausibility study's tables from a finished `progadv study` directory: per regime and application, the
out-of-fold figure of plain progress advantage, its plausibility-gated variant, the best baseline and each trained
reward model (mean ± std over seeds), and the paired verdicts per seed (beats / ties / loses): the variant against the
best baseline, against plain progress advantage and against each reward model; then step selection the same way.

    python benchmarks/plausibility_table.py runs/study_v3 --json benchmarks/results/plausibility_study.json \\
        --md benchmarks/results/plausibility_study.md

Reads each seed's report/{set}/metrics.json (the full fair comparison) and summary.json (step selection).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from progadv_trl.utils import write_json  # noqa: E402

PA, PL = "progress_advantage", "progress_advantage_plausible"
REGIMES = {"reference": "off-policy", "mid": "mid-training", "policy": "on-policy"}
RMS = ("orm", "prm")
APPS = {"auroc": "AUROC, all rollouts", "auroc_decision": "AUROC, successes + decision failures",
        "best_of_n": "best-of-8 success", "attribution": "mistake step, exact"}


def _count(verdicts):
    return {k: sum(v == k for v in verdicts) for k in ("beats", "ties", "loses")}


def _stats(xs):
    xs = [x for x in xs if x is not None]
    return {"mean": float(np.mean(xs)), "std": float(np.std(xs)), "n": len(xs)} if xs else None


def _untrained(member: dict) -> str | None:
    """The member's verdict against the best baseline that needs no training (the reward models aside)."""
    return (member.get("vs_best_untrained") or {}).get("verdict") or member.get("verdict")


def _pairs(comparison: dict, with_pa_rms: bool) -> dict:
    """{pair: this seed's verdict} from one fair comparison entry (an application's, or step selection's)."""
    fam = comparison.get("family") or {}
    pl, pa = fam.get(PL) or {}, fam.get(PA) or {}
    pairs = {"PL - best": _untrained(pl), "PA - best": _untrained(pa),
             "PL - PA": (pl.get("vs_progress_advantage") or {}).get("verdict")}
    for rm in RMS:
        pairs[f"PL - {rm}"] = ((pl.get("versus") or {}).get(rm) or {}).get("verdict")
        if with_pa_rms:
            pairs[f"PA - {rm}"] = ((comparison.get("versus") or {}).get(rm) or {}).get("verdict")
    return pairs


def _fair(metrics: dict, app: str) -> dict | None:
    if app == "auroc_decision":
        return ((metrics.get("fair_by_failure_kind") or {}).get("decision") or {}).get("auroc")
    return (metrics.get("fair") or {}).get(app)


def trajectory_tables(seeds: list[Path]) -> dict:
    out = {}
    for set_name, regime in REGIMES.items():
        for app in APPS:
            cells = {"values": {}, "best_baseline": [], "verdicts": {}}
            for sd in seeds:
                p = sd / "report" / set_name / "metrics.json"
                if not p.exists():
                    continue
                f = _fair(json.loads(p.read_text()), app)
                if not f or "methods" not in f:
                    continue
                meths = f["methods"]
                for m in (PA, PL, *RMS, "policy_logprob", "reference_logprob"):
                    if m in meths:
                        cells["values"].setdefault(m, []).append(meths[m]["value"])
                best = f.get("best_untrained_baseline") or f.get("best_baseline")
                cells["best_baseline"].append(best)
                if best in meths:
                    cells["values"].setdefault("(best baseline)", []).append(meths[best]["value"])
                for k, v in _pairs(f, with_pa_rms=True).items():
                    if v is not None:
                        cells["verdicts"].setdefault(k, []).append(v)
            out.setdefault(regime, {})[app] = {
                "values": {m: _stats(v) for m, v in cells["values"].items()},
                "best_baseline": {b: cells["best_baseline"].count(b) for b in set(cells["best_baseline"]) if b},
                "verdicts": {k: _count(v) for k, v in cells["verdicts"].items()},
            }
    return out


def step_tables(seeds: list[Path]) -> dict:
    out = {}
    for sd in seeds:
        s = json.loads((sd / "summary.json").read_text())
        for agent, e in ((s.get("step_selection") or {}).get("agents") or {}).items():
            for k in ("k4", "k8"):
                r = e.get(k)
                if not r:
                    continue
                c = out.setdefault(REGIMES.get(agent, agent), {}).setdefault(k, {"values": {}, "verdicts": {},
                                                                                   "ranking": {}, "wrong_picks": {}})
                for m, v in r["step"].items():
                    c["values"].setdefault(m, []).append(v)
                c["values"].setdefault("(agent alone, sampled)", []).append(r["sampled"])
                c["values"].setdefault("(agent alone, greedy)", []).append(e["greedy"])
                comp = r["step_comparison"]
                best = comp.get("best_untrained_baseline") or comp.get("best_baseline")
                if best in r["step"]:
                    c["values"].setdefault("(best baseline)", []).append(r["step"][best])
                for kk, v in _pairs(comp, with_pa_rms=False).items():
                    if v is not None:
                        c["verdicts"].setdefault(kk, []).append(v)
                rk = r.get("candidate_ranking") or {}
                for m, v in (rk.get("methods") or {}).items():
                    if v is not None:
                        c["ranking"].setdefault(m, []).append(v)
                for m in (PA, PL, "policy_logprob", "reference_logprob"):
                    for what, n in ((rk.get("wrong_picks") or {}).get(m) or {}).items():
                        w = c["wrong_picks"].setdefault(m, {})
                        w[_kind(what)] = w.get(_kind(what), 0) + n
    for regime in out.values():
        for c in regime.values():
            c["values"] = {m: _stats(v) for m, v in c["values"].items()}
            c["ranking"] = {m: _stats(v) for m, v in c["ranking"].items()}
            c["verdicts"] = {k: _count(v) for k, v in c["verdicts"].items()}
            c["wrong_picks"] = {m: dict(sorted(w.items(), key=lambda x: -x[1])[:4]) for m, w in c["wrong_picks"].items()}
    return out


def _kind(pick: str) -> str:
    """"cancel_reservation(R5214) -> get_reservation(R5214)" -> "cancel_reservation -> get_reservation"; an id taken
    other than the expected one reads "(id copied wrong)"."""
    exp, _, took = pick.partition(" -> ")
    e, t = re.search(r"R\d+", exp), re.search(r"R\d+", took)
    took_kind = re.sub(r"\(R\d+\)", "", took) + (" (id copied wrong)" if e and t and e.group() != t.group() else "")
    return f"{re.sub(r'[(]R[0-9]+[)]', '', exp)} -> {took_kind}"


def _cell(s):
    return "–" if not s else f"{s['mean']:.3f} ± {s['std']:.3f}"


def _btl(d):
    return "–" if not d else f"{d['beats']}/{d['ties']}/{d['loses']}"


def markdown(res: dict) -> str:
    n = len(res["seeds"])
    md = [f"# Plausibility-gated progress advantage: {n} seeds ({', '.join(map(str, res['seeds']))})", "",
          f"`{res['command']}`", "",
          "Out-of-fold figures (each method's rule chosen by 5-fold CV; the variant's alpha is part of its rule), mean ± "
          "std over seeds; verdicts b/t/l: seeds where the paired 95 % interval says beats / ties / loses. PL: "
          "progress_advantage_plausible, PA: progress_advantage; best baseline: the best of the baselines that need "
          "no training (log-probs, self-certainty, DeepConf), per seed; ORM / PRM: the trained reward models.", ""]
    head = ["regime", "application", "PA", "PL", "best baseline", "ORM", "PRM", "PL − best", "PL − PA", "PA − best",
            "PL − ORM", "PL − PRM", "best baseline (seeds)"]
    md += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for regime, apps in res["trajectory"].items():
        for app, c in apps.items():
            v, vd = c["values"], c["verdicts"]
            md.append("| " + " | ".join([regime, APPS[app], _cell(v.get(PA)), _cell(v.get(PL)),
                                         _cell(v.get("(best baseline)")), _cell(v.get("orm")), _cell(v.get("prm")),
                                         _btl(vd.get("PL - best")), _btl(vd.get("PL - PA")), _btl(vd.get("PA - best")),
                                         _btl(vd.get("PL - orm")), _btl(vd.get("PL - prm")),
                                         ", ".join(f"{b} ({k})" for b, k in sorted(c["best_baseline"].items()))]) + " |")
    md += ["", "## Step selection (held-out success when each step is chosen among K sampled candidates)", ""]
    head = ["agent", "K", "PA", "PL", "best baseline", "ORM", "PRM", "alone, sampled", "PL − best", "PL − PA",
            "PA − best", "PL − ORM", "PL − PRM", "within-state ranking PA / PL / policy lp / reference lp"]
    md += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for regime, ks in res["steps"].items():
        for k, c in ks.items():
            v, vd, rk = c["values"], c["verdicts"], c["ranking"]
            rank = " / ".join("–" if not rk.get(m) else f"{rk[m]['mean']:.2f}" for m in (PA, PL, "policy_logprob", "reference_logprob"))
            md.append("| " + " | ".join([regime, k[1:], _cell(v.get(PA)), _cell(v.get(PL)), _cell(v.get("(best baseline)")),
                                         _cell(v.get("orm")), _cell(v.get("prm")), _cell(v.get("(agent alone, sampled)")),
                                         _btl(vd.get("PL - best")), _btl(vd.get("PL - PA")), _btl(vd.get("PA - best")),
                                         _btl(vd.get("PL - orm")), _btl(vd.get("PL - prm")), rank]) + " |")
    md += ["", "Wrong top picks at states with a choice (expected -> taken: count, all seeds), K = 8:", ""]
    for regime, ks in res["steps"].items():
        c = ks.get("k8") or {}
        for m, w in (c.get("wrong_picks") or {}).items():
            md.append(f"- {regime}, {m}: " + "; ".join(f"{a}: {n}" for a, n in w.items()))
    return "\n".join(md) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", help="a progadv study directory (seed_N/ inside)")
    p.add_argument("--json")
    p.add_argument("--md")
    a = p.parse_args()
    seeds = sorted(Path(a.study).glob("seed_*"), key=lambda x: int(x.name.split("_")[1]))
    seeds = [s for s in seeds if (s / "summary.json").exists()]
    res = {"command": "python benchmarks/plausibility_table.py " + " ".join(sys.argv[1:]),
           "seeds": [int(s.name.split("_")[1]) for s in seeds],
           "trajectory": trajectory_tables(seeds), "steps": step_tables(seeds)}
    md = markdown(res)
    if a.json:
        write_json(a.json, res)
    if a.md:
        Path(a.md).write_text(md)
    print(md)


if __name__ == "__main__":
    main()
