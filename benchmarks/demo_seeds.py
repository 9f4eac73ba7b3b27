"""The digits demo (``woodfisher demo``) over several seeds: accuracy of each method at each sparsity.

Each seed reruns :func:`woodfisher.demo.run_demo` (its own data split, training and Fisher sampling, the
demo's methods and settings); recorded: every seed's test accuracies, their means, and in how many
(seed, sparsity) cells the defaults beat the diagonal Fisher at 85 / 90 / 95%. About 15 s per seed on one
CPU thread.

    OMP_NUM_THREADS=1 python -m benchmarks.demo_seeds --out benchmarks/results
Writes ``demo_seeds.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from typing import Dict, List, Sequence

import torch

from benchmarks._common import device_info, git_commit, write_results

DEFAULTS, DIAGONAL = "WoodFisher (defaults)", "Diagonal Fisher (joint)"


def summarise(runs: Sequence[dict], compare_from: float = 0.85) -> dict:
    """Means over seeds and the (seed, sparsity) cells from ``compare_from`` on where the defaults beat the
    diagonal Fisher. ``runs``: results dicts of :func:`woodfisher.demo.run_demo` with the same sparsities."""
    sparsities = runs[0]["sparsities"]
    if any(r["sparsities"] != sparsities for r in runs):
        raise ValueError("runs: every run must use the same sparsities")
    labels = list(runs[0]["accuracy"])
    means = {label: [statistics.fmean(r["accuracy"][label][i] for r in runs) for i in range(len(sparsities))]
             for label in labels}
    margins = [r["accuracy"][DEFAULTS][i] - r["accuracy"][DIAGONAL][i]
               for r in runs for i, s in enumerate(sparsities) if s >= compare_from - 1e-9]
    return {"sparsities": sparsities, "seeds": [r["seed"] for r in runs], "mean_accuracy": means,
            "dense_accuracy": statistics.fmean(r["dense_accuracy"] for r in runs),
            "compare_from": compare_from, "cells": len(margins), "defaults_beat_diagonal": sum(m > 0 for m in margins),
            "margin_min": min(margins), "margin_max": max(margins)}


def markdown(summary: dict, runs: Sequence[dict], info: dict, commit: str) -> str:
    pct = [f"{100 * s:.0f}%" for s in summary["sparsities"]]
    lines = ["# The digits demo over seeds", "",
             f"`woodfisher demo` (`woodfisher.demo.run_demo`) with seeds {summary['seeds']}, package commit {commit}; "
             f"{info['host_cpu']}, torch {info['torch']}, {info['cpu_threads']} thread(s) (a shared 2-core CPU host). "
             f"Test accuracy % on the digits test split of each seed; dense mean "
             f"{100 * summary['dense_accuracy']:.2f}%.", "",
             "## Mean over seeds", "", "| method | " + " | ".join(pct) + " |",
             "|---|" + "---:|" * len(pct)]
    for label, values in summary["mean_accuracy"].items():
        lines.append(f"| {label} | " + " | ".join(f"{100 * v:.1f}" for v in values) + " |")
    lines += ["", f"The defaults beat the diagonal Fisher in {summary['defaults_beat_diagonal']} of "
              f"{summary['cells']} (seed, sparsity) cells at {100 * summary['compare_from']:.0f}% and above, by "
              f"{100 * summary['margin_min']:.1f} to {100 * summary['margin_max']:.1f} points.", "",
              "## Every seed", "", "| seed | method | " + " | ".join(pct) + " |", "|---:|---|" + "---:|" * len(pct)]
    for r in runs:
        for label, values in r["accuracy"].items():
            lines.append(f"| {r['seed']} | {label} | " + " | ".join(f"{100 * v:.2f}" for v in values) + " |")
    return "\n".join(lines) + "\n"


def main(argv: List[str] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[80, 85, 90, 95], help="percent")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    from woodfisher.demo import run_demo
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            result = run_demo(tmp, [s / 100 for s in args.sparsities], seed=seed)
            runs.append({k: result[k] for k in ("seed", "sparsities", "accuracy", "dense_accuracy", "seconds")})
    summary = summarise(runs)
    info, commit = device_info(torch.device("cpu")), git_commit()
    write_results(args.out, "demo_seeds", {"device": info, "commit": commit, "summary": summary, "runs": runs},
                  markdown(summary, runs, info, commit))
    return summary


if __name__ == "__main__":
    main()
