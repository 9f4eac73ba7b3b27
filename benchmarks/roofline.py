"""Roofline plot of a side-by-side result: achieved FLOP/s against arithmetic intensity.

    python -m benchmarks.roofline benchmarks/results/kernels_cpu.json [out.png]

Ceilings are the float32 peak and memory bandwidth measured in the same run. Each
point is one record, at its nominal flops / bytes (the models are in the JSON).
"""
from __future__ import annotations

import json
import sys
from typing import Dict

MARKERS = {"build": "o", "stream": "s", "stats": "^"}


def plot_roofline(result: Dict, path: str) -> None:
    """Write a log-log roofline PNG of ``result`` (the JSON of side_by_side.py) to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    peaks = result["peaks"]
    peak = peaks["fp32_peak_tflops"] * 1e3          # GFLOP/s
    bw = peaks["mem_bandwidth_gbs"]                 # GB/s
    recs = [r for r in result["records"] if "tflops" in r and r["bytes_per_block"] > 0]
    fig, ax = plt.subplots(figsize=(9, 6))
    ai = np.logspace(-2, 4, 200)
    ax.plot(ai, np.minimum(peak, ai * bw), "k-", lw=2, label=f"roofline: {peak:.4g} GFLOP/s, {bw:.4g} GB/s")
    methods = sorted({r["method"] for r in recs})
    colors = dict(zip(methods, plt.cm.tab10(np.linspace(0, 1, max(len(methods), 1)))))
    seen = set()
    for r in recs:
        x = r["flops_per_block"] / r["bytes_per_block"]
        y = r["tflops"] * 1e3
        key = (r["section"], r["method"])
        ax.scatter([x], [y], marker=MARKERS[r["section"]], color=colors[r["method"]], s=40,
                   label=f"{r['section']}: {r['method']}" if key not in seen else None,
                   edgecolors="k", linewidths=0.4)
        seen.add(key)
        tag = f"c{r['c']}" + (f" m{r['m']}" if "m" in r and r["section"] == "build" else "") + \
              (f" k{r['k']}" if "k" in r else "")
        ax.annotate(tag, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (nominal flops / nominal bytes)")
    ax.set_ylabel("achieved GFLOP/s (float32)")
    info = result["device"]
    ax.set_title(f"{info['device_name']} ({info['device_type']}), mode {result['config']['mode']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    with open(sys.argv[1]) as f:
        res = json.load(f)
    plot_roofline(res, sys.argv[2] if len(sys.argv) > 2 else sys.argv[1].replace(".json", ".png"))
