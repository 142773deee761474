"""Tables: metrics.json as a fixed-width text table and as metrics.md, plus the cell and table helpers the demo
uses for its own summaries (`format_cell`, `text_table`, `markdown_table`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..config import ATTRIBUTION_RULES


def format_cell(v, ci=None, n=None, digits: int = 2) -> str:
    """`value [low, high] n=...`; "-" for a missing value, the interval and n only when given."""
    if v is None:
        cell = "-"
    else:
        cell = f"{v:.{digits}f}"
        if ci is not None:
            cell += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    if n is not None:
        cell += f" n={n}"
    return cell


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Fixed-width columns, a dashed rule under the header."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table; "|" inside cells is escaped."""
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def summary_rows(metrics: Mapping) -> tuple[list[str], list[list[str]]]:
    """Method rows x metric columns; reference rows (random pick, pass@N, mean@N, chance) beside them."""
    header = ["method", "best-of-N success", "AUROC", "Spearman"] + [f"attr exact/±1 ({r})" for r in ATTRIBUTION_RULES]
    rows = []
    for m, e in metrics.get("methods", {}).items():
        b, sp, fa = e["best_of_n"], e["success_prediction"], e["failure_attribution"]
        row = [
            m,
            format_cell(b["success"], b["success_ci"], b["n_groups"]),
            format_cell(sp["auroc"], sp["auroc_ci"], sp["n"]),
            format_cell(sp["spearman"], sp["spearman_ci"], sp["n"]),
        ]
        for r in ATTRIBUTION_RULES:
            a = fa[r]
            row.append(("-" if a["exact"] is None else f"{a['exact']:.2f}/{a['within1']:.2f}") + f" n={a['n']}")
        rows.append(row)
    ref = metrics.get("best_of_n_reference") or {}
    ch = metrics.get("attribution_chance") or {}
    blank = ["", ""]
    if ref:
        ng = ref.get("n_groups")
        rows.append(["(random pick)", format_cell(ref["random_pick"], ref["random_pick_ci"], ng), *blank, "", "", ""])
        rows.append(["(oracle pass@N)", format_cell(ref["pass_at_n"], ref["pass_at_n_ci"], ng), *blank, "", "", ""])
        rows.append(["(mean@N)", format_cell(ref["mean_at_n"], ref["mean_at_n_ci"], ref.get("n_trajectories")), *blank,
                     "", "", ""])  # fmt: skip
    if ch and ch.get("n"):
        cell = f"{ch['exact']:.2f}/{ch['within1']:.2f} n={ch['n']}"
        rows.append(["(random step)", "", *blank, cell, cell, cell])
    return header, rows


FAIR_TITLES = {"auroc": "AUROC", "best_of_n": "best-of-N success", "attribution": "mistake step found (exact)"}


def fair_rows(metrics: Mapping) -> tuple[list[str], list[list[str]]]:
    """The fair comparison: per application and method, the out-of-fold figure with the rule CV gave it, and
    each member of the progress-advantage family (progress advantage and its variants) minus the best baseline,
    with its paired 95 % interval and verdict, on that member's row."""
    header = ["application", "method (rule chosen by CV)", "out-of-fold", "n", "PA - best baseline [95% CI]", "verdict"]
    rows = []
    sections = [("", metrics.get("fair") or {})]
    sections += [(f" (successes + {kd} failures)", f) for kd, f in (metrics.get("fair_by_failure_kind") or {}).items()]
    for suffix, fair in sections:
        for app, title in FAIR_TITLES.items():
            e = fair.get(app)
            if not e:
                continue
            family = e.get("family") or {}
            first = True
            for m, r in e["methods"].items():
                tag = " *" if m == e.get("best_baseline") else ""
                c = family.get(m) or {}
                d, ci = c.get("difference"), c.get("difference_ci")
                cmp = "" if d is None else f"{d:+.3f}" + (" [{:+.3f}, {:+.3f}]".format(*ci) if ci else "")
                rows.append([title + suffix if first else "", f"{m}{tag} ({r['rule']})", format_cell(r["value"]),
                             str(r["n"]), cmp, c.get("verdict", "")])  # fmt: skip
                first = False
    return header, rows


def format_table(metrics: Mapping) -> str:
    """One fixed-width text table: methods x (best-of-N, AUROC, Spearman, attribution per rule), cells
    `value [95% CI] n=...`; best-of-N n counts groups, attribution cells are exact/within-1 accuracy."""
    out = [text_table(*summary_rows(metrics))]
    skipped = metrics.get("skipped_methods") or []
    if skipped:
        out.append(f"skipped (no finite scores): {', '.join(skipped)}")
    if metrics.get("fair"):
        out += ["", "Fair comparison (every method's rule chosen by k-fold CV; * = best baseline):", text_table(*fair_rows(metrics))]
    if metrics.get("whowhen_attribution"):
        from ..formats.whowhen import format_whowhen

        out += ["", format_whowhen(metrics["whowhen_attribution"])]
    return "\n".join(out)


def _thresholds(ts) -> str:
    return "[" + ", ".join(f"{t:.3g}" for t in ts) + "]" if ts else ""


def _reduction_section(metrics: Mapping) -> list[str]:
    red = metrics.get("reduction") or {}
    md = ["", "## Reductions", "", ", ".join(f"{k}: {v}" for k, v in red.items()) or "not stated"]
    sel = metrics.get("reduction_selection")
    if sel:
        md += ["", f"Reduction choice ({sel.get('how')}): chosen **{sel.get('chosen')}**; "
               f"held-out {sel.get('metric')} = {format_cell(sel.get('out_of_fold', sel.get('held_out')))} "
               f"(n={sel.get('n')}); the in-sample figures below are optimistic for the chosen one."]  # fmt: skip
        if sel.get("per_fold"):
            md += ["", markdown_table(["fold", "chosen", "held-out", "n held out"],
                                      [[str(f["fold"]), str(f["chosen"]), format_cell(f["held_out"]), str(f["n_held_out"])]
                                       for f in sel["per_fold"]])]  # fmt: skip
        if sel.get("in_sample"):
            md += ["", markdown_table(["candidate", "in-sample (optimistic)"],
                                      [[k, format_cell(v)] for k, v in sel["in_sample"].items()])]  # fmt: skip
    var = metrics.get("variant_selection")
    if var:
        md += ["", f"Variant choice ({var.get('how')}): chosen **{var.get('chosen')}**; held-out {var.get('metric')} = "
               f"{format_cell(var.get('out_of_fold', var.get('held_out')))} (n={var.get('n')}); per fold: "
               + ", ".join(f"{f['chosen']} {format_cell(f['held_out'])}" for f in var.get("per_fold") or [])]  # fmt: skip
    imp = metrics.get("implausible")
    if imp and imp.get("share") is not None:
        md += ["", f"Steps the policy itself finds implausible (a token below {imp['alpha']:g} x its top choice there): "
               f"{format_cell(imp['share'])} of {imp['n_steps']}."]  # fmt: skip
    oos = metrics.get("out_of_support")
    if oos:
        md += ["", f"Steps out of the reference's support (a token with reference log-prob < {oos['threshold']:.3g}): "
               f"{format_cell(oos['share'])} of {oos['n_steps']}."]  # fmt: skip
    return md


def _method_sections(metrics: Mapping) -> list[str]:
    meths = metrics.get("methods", {})
    if not meths:
        return []
    md = ["", "## Failure attribution", ""]
    rows_fa = []
    for m, e in meths.items():
        for r, a in e["failure_attribution"].items():
            thr = a.get("threshold")
            note = "" if r != "threshold" else (f"cv {_thresholds(a.get('thresholds'))}" if thr == "cv" else f"{thr}")
            rows_fa.append([m, r, note, format_cell(a["exact"]), format_cell(a["within1"]), format_cell(a["mae"]),
                            str(a["n"])])  # fmt: skip
    ch = metrics.get("attribution_chance") or {}
    if ch.get("n"):
        rows_fa.append(["(random step)", "", "", format_cell(ch["exact"]), format_cell(ch["within1"]),
                        format_cell(ch["mae"]), str(ch["n"])])  # fmt: skip
    md.append(markdown_table(["method", "rule", "threshold", "exact", "within ±1", "MAE (steps)", "n"], rows_fa))
    md += ["", "## Calibration (P(success), held-out half)", ""]
    rows_c = []
    for m, e in meths.items():
        c = e["calibration"]
        if "brier" in c:
            rows_c.append([m, c["kind"], format_cell(c["brier"], digits=3), format_cell(c["brier_base_rate"], digits=3),
                           format_cell(c["ece"], digits=3), str(c["n_fit"]), str(c["n_eval"])])  # fmt: skip
        else:
            rows_c.append([m, c["kind"], "-", "-", "-", "-", c.get("skipped", "not evaluated")])
    md.append(markdown_table(["method", "kind", "Brier", "Brier (base rate)", "ECE", "n fit", "n eval"], rows_c))
    kinds_rows = []
    for m, e in meths.items():
        for kd, sp in (e.get("success_prediction_by_failure_kind") or {}).items():
            kinds_rows.append([m, f"successes + {kd} failures", format_cell(sp["auroc"], sp["auroc_ci"]),
                               format_cell(sp["spearman"], sp["spearman_ci"]), str(sp["n"]), str(sp["n_pos"])])  # fmt: skip
    if kinds_rows:
        md += ["", "## Success prediction by failure kind", "",
               "Progress advantage grades decisions, not luck: read the decision rows for what it can see.", "",
               markdown_table(["method", "subset", "AUROC", "Spearman", "n", "n successes"], kinds_rows)]  # fmt: skip
    return md


def format_markdown(metrics: Mapping, title: str = "progadv evaluate") -> str:
    """metrics.md: the summary table plus attribution detail, calibration, failure kinds and how reductions
    were chosen."""
    header, rows = summary_rows(metrics)
    md = [f"# {title}", ""]
    md.append(
        f"{metrics.get('n_trajectories')} trajectories, {metrics.get('n_labelled')} labelled, "
        f"{metrics.get('n_success')} successes. Intervals: {metrics.get('interval') or 'none (n_boot=0)'}; "
        f"seed {metrics.get('seed')}."
    )
    md += ["", "## Summary", "", markdown_table(header, rows), ""]
    md.append("Best-of-N n counts groups; attribution cells are exact / within-1-step accuracy over labelled failures.")
    if metrics.get("fair"):
        md += ["", "## Fair comparison", "",
               "Every method gets its best rule (trajectory score: its own or a reduction of its step values; "
               "attribution: min_step, min_cumsum or a threshold), chosen by k-fold cross-validation, so each figure "
               "is out-of-fold. PA - best baseline: paired bootstrap over the same items; \"beats\"/\"loses\" only "
               "when the 95 % interval excludes zero. * marks the best baseline.", "",
               markdown_table(*fair_rows(metrics))]  # fmt: skip
    md += _reduction_section(metrics)
    md += _method_sections(metrics)
    if metrics.get("skipped_methods"):
        md += ["", f"Skipped (no finite scores): {', '.join(metrics['skipped_methods'])}."]
    ww = metrics.get("whowhen_attribution")
    if ww:
        rows = [[m, rule, format_cell(a["step_accuracy"]), format_cell(a["agent_accuracy"]), str(a["n"])]
                for m, by in ww["methods"].items() for rule, a in by.items()]  # fmt: skip
        rows += [[name, "", format_cell(ww[key]["step_accuracy"]), format_cell(ww[key]["agent_accuracy"]), str(ww[key]["n"])]
                 for name, key in (("(random step)", "random_step"), ("(first step)", "first_step"))]  # fmt: skip
        md += ["", "## Who&When attribution", "",
               "Step accuracy: the predicted step is the labelled mistake; agent accuracy: its agent is the labelled agent.",
               "", markdown_table(["method", "rule", "step accuracy", "agent accuracy", "n"], rows)]  # fmt: skip
    return "\n".join(md) + "\n"
