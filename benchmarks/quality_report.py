"""Tables, plot and goal check of ``quality_sweep.py`` (reads its CSVs; runs nothing).

``quality_<model>.md``: how the rows were made (the commands), mean +- std over seeds per
(setting, sparsity), the differences the issue's goals name, and whether each goal is met;
``quality_<model>.png``: accuracy vs sparsity; ``quality_search_<model>.md``: the held-out search.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Dict, List, Optional

from benchmarks.oneshot_sweep import _mean_std
from woodfisher.reports import plot_accuracy_vs_sparsity

LABEL_ORDER = ["global magnitude", "paper (1 step)", "defaults", "best multi-step"]
#: (better setting, reference setting, sparsity, points): the issue's goals
GOALS = [("defaults", "global magnitude", 0.8, 10.0), ("best multi-step", "paper (1 step)", 0.8, 10.0)]
REPORTED = [0.9, 0.95]      # the best multi-step vs paper difference is also reported here

Curves = Dict[str, Dict[float, List[float]]]


def read_rows(path: str) -> List[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def curves_of(rows: List[dict]) -> Curves:
    """``curves[setting][sparsity] = [accuracy % per seed]`` (sparsity as a fraction)."""
    curves: Curves = {}
    for r in rows:
        curves.setdefault(r["setting"], {}).setdefault(float(r["sparsity"]), []).append(100 * float(r["accuracy"]))
    return curves


def mean(values: List[float]) -> float:
    return _mean_std(values)[0]


def gap(curves: Curves, better: str, ref: str, s: float) -> Optional[float]:
    """Mean accuracy of ``better`` minus that of ``ref`` at sparsity ``s`` (points), None when either is missing."""
    if s not in curves.get(better, {}) or s not in curves.get(ref, {}):
        return None
    return mean(curves[better][s]) - mean(curves[ref][s])


def commands(model: str, best: Optional[dict]) -> List[str]:
    at = best.get("chosen_at_sparsity", 0.8) if best else 0.8
    return ["```",
            f"OMP_NUM_THREADS=1 python -m benchmarks.quality_sweep --model {model} --search "
            f"--search-sparsity {at:g} --out benchmarks/results",
            f"OMP_NUM_THREADS=1 python -m benchmarks.quality_sweep --model {model} --sweep --out benchmarks/results",
            f"python -m benchmarks.quality_sweep --model {model} --report --out benchmarks/results",
            "```"]


def ordered(curves: Curves) -> List[str]:
    return [k for k in LABEL_ORDER if k in curves] + [k for k in curves if k not in LABEL_ORDER]


def table(curves: Curves) -> List[str]:
    labels = ordered(curves)
    sparsities = sorted({s for c in curves.values() for s in c})
    lines = ["| sparsity % | " + " | ".join(labels) + " |", "|---:|" + "---:|" * len(labels)]
    for s in sparsities:
        cells = []
        for k in labels:
            a = curves[k].get(s)
            if not a:
                cells.append("")
                continue
            m, sd = _mean_std(a)
            cells.append(f"{m:.2f} ± {sd:.2f} (n={len(a)})" if len(a) > 1 else f"{m:.2f} (n=1)")
        lines.append(f"| {100 * s:g} | " + " | ".join(cells) + " |")
    return lines


def goal_lines(curves: Curves, dense: float) -> List[str]:
    sparsities = sorted({s for c in curves.values() for s in c})
    pairs = [(b, r) for b, r, _, _ in GOALS]
    lines = ["Differences of the means (points):", "",
             "| sparsity % | " + " | ".join(f"{b} − {r}" for b, r in pairs) + " |", "|---:|" + "---:|" * len(pairs)]
    for s in sparsities:
        cells = [gap(curves, b, r, s) for b, r in pairs]
        lines.append(f"| {100 * s:g} | " + " | ".join("" if c is None else f"{c:+.2f}" for c in cells) + " |")
    lines.append("")
    for better, ref, s, points in GOALS:
        g = gap(curves, better, ref, s)
        if g is None:
            lines.append(f"- goal {better} >= {ref} + {points:g} points at {100 * s:g}%: not measured")
            continue
        headroom = dense - mean(curves[ref][s])
        verdict = "**met**" if g >= points else "**missed**" if headroom >= points else \
            f"**missed, out of reach here** ({ref} is only {headroom:.2f} points below the dense model)"
        lines.append(f"- goal {better} >= {ref} + {points:g} points at {100 * s:g}%: {g:+.2f} points, {verdict}")
    floor = [(s, gap(curves, "defaults", "global magnitude", s)) for s in sparsities]
    floor = [(s, g) for s, g in floor if g is not None]
    if floor:
        s, g = min(floor, key=lambda sg: sg[1])
        lines.append(f"- goal defaults >= global magnitude at every sparsity measured: the least difference is "
                     f"{g:+.2f} points (at {100 * s:g}%), " + ("**met**" if g >= 0 else "**missed**"))
    for s in REPORTED:
        g = gap(curves, "best multi-step", "paper (1 step)", s)
        if g is not None:
            lines.append(f"- best multi-step − paper (1 step) at {100 * s:g}%: {g:+.2f} points")
    return lines


def _cell(a: List[float]) -> str:
    """One seed: the accuracy; several: mean ± std (n = seeds)."""
    if len(a) == 1:
        return f"{a[0]:.2f}"
    m, sd = _mean_std(a)
    return f"{m:.2f} ± {sd:.2f} (n={len(a)})"


def search_report(out: str, model: str) -> None:
    """``quality_search_<model>.md``: the held-out accuracy of every searched setting (CSV order; mean ± std
    over seeds where a setting ran with several)."""
    path = os.path.join(out, f"quality_search_{model}.csv")
    if not os.path.exists(path):
        return
    rows = read_rows(path)
    table_ = curves_of(rows)
    sparsities = sorted({s for v in table_.values() for s in v})
    lines = [f"Held-out accuracy % ({rows[0]['eval']}; seeds: {sorted({r['seed'] for r in rows})}; one seed (0) "
             "unless a cell says n)", "",
             damp_note(rows), "",
             "| setting | options | " + " | ".join(f"{100 * s:g}%" for s in sparsities) + " |",
             "|---|---|" + "---:|" * len(sparsities)]
    options = {r["setting"]: r["options"] for r in rows}
    for name, by_s in table_.items():
        cells = [_cell(by_s[s]) if s in by_s else "" for s in sparsities]
        lines.append(f"| {name} | `{options[name]}` | " + " | ".join(cells) + " |")
    with open(os.path.join(out, f"quality_search_{model}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def ran_at(rows: List[dict]) -> str:
    """" Package commit: X." naming the commits of the rows (the CSV's ``commit`` column); "" when none has one."""
    commits = sorted({r.get("commit") or "" for r in rows} - {""})
    return f" Package commit: {', '.join(commits)}." if commits else ""


def damp_note(rows: List[dict]) -> str:
    """Which ``damp="auto"`` the rows without a ``damp`` option ran with: the commits of the CSV's ``commit``
    column, or (rows written before that column existed) the rule of the time they ran."""
    commits = sorted({r.get("commit") or "" for r in rows})
    if "" not in commits:
        return (f"Every row ran at commit {', '.join(commits)}; rows whose options have no `damp` ran with that "
                "version's `damp=\"auto\"` (README, \"Defaults, recomputation and quality\"; `damp_live.md` "
                "measures the rule).")
    return ("Rows whose options have no `damp` ran with the package's `damp=\"auto\"` of their time: 1e-2 x the mean "
            "Fisher diagonal before commit e8e2eda (every row of the first search), 0.1 x after it (rows named "
            "'alpha 0.1'); `benchmarks/results/damp_alpha_<model>.md` measures the factor.")


def report(out: str, model: str, made_by: Optional[List[str]] = None) -> str:
    """Writes ``quality_<model>.md`` and ``.png`` from ``quality_<model>.csv``; returns the Markdown.
    ``made_by``: the command lines shown (default: the search, sweep and report of ``model``)."""
    search_report(out, model)
    rows = read_rows(os.path.join(out, f"quality_{model}.csv"))
    curves = curves_of(rows)
    dense = 100 * float(rows[0]["dense_accuracy"])
    best_path = os.path.join(out, f"quality_best_{model}.json")
    best = json.load(open(best_path)) if os.path.exists(best_path) else None
    seeds = sorted({int(r["seed"]) for r in rows})
    lines = [f"# Quality, {model}: defaults vs the paper's setting vs the best multi-step setting", "",
             f"Top-1 accuracy % on the {rows[0]['eval']} ({rows[0]['eval_samples']} images), one-shot pruning "
             f"without fine-tuning, mean ± std over seeds {seeds} (n = runs per cell; global magnitude is "
             f"deterministic: one run). Dense: {dense:.2f}%. Device: {rows[0]['device']} (shared machine)."
             + ran_at(rows), "",
             "- global magnitude: `method='global_magnitude'`.",
             "- paper (1 step): `" + rows_options(rows, "paper (1 step)") + "` (one curvature per seed, pruned to "
             "every sparsity).",
             "- defaults: `prune_one_shot(model, loader, sparsity=s)`, only the pruned weights and the loss given.",
             "- best multi-step: " + (f"`{json.dumps(best['options'], sort_keys=True)}` (\"{best['setting']}\", "
                                      f"chosen at {100 * best['chosen_at_sparsity']:g}% on the {best['chosen_on']}, "
                                      f"see `quality_search_{model}.md`)" if best else "not chosen"),
             "", "Made by (the sweep is resumable; `--sparsities` / `--seeds` / `--settings` run a part of it):", ""]
    lines += ["```"] + made_by + ["```"] if made_by else commands(model, best)
    lines += [""] + table(curves) + [""] + goal_lines(curves, dense) + ["", seconds(rows)]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, f"quality_{model}.md"), "w") as f:
        f.write(text)
    pts = {k: [(100 * s, *_mean_std(a)) for s, a in sorted(curves[k].items())] for k in ordered(curves)}
    plot_accuracy_vs_sparsity(pts, os.path.join(out, f"quality_{model}.png"),
                              title=f"One-shot pruning, {model} ({rows[0]['eval_samples']} test images)",
                              dense_accuracy=dense)
    return text


def seconds(rows: List[dict]) -> str:
    """Mean seconds of one pruning call per setting (the paper's: its curvature + one prune_with; no evaluation)."""
    by: Dict[str, List[float]] = {}
    for r in rows:
        by.setdefault(r["setting"], []).append(float(r["seconds"]))
    return "Seconds per pruning call, mean over the rows (shared machine, evaluation excluded): " + ", ".join(
        f"{k} {mean(by[k]):.1f}" for k in ordered({k: {} for k in by})) + "."


def rows_options(rows: List[dict], setting: str) -> str:
    return next((r["options"] for r in rows if r["setting"] == setting), "")
