"""Why the defaults lost to global magnitude on MLPNet at 95%: the damp="auto" factor, per layer.

On the held-out split of the TRAIN set (the split of ``quality_sweep --search``; never the test
set), ``prune_one_shot`` with the package's defaults except ``woodfisher.damping.AUTO_ALPHA``
(patched for the call: lambda = alpha x the mean Fisher diagonal) and, for comparison, other
single-option variations. One CSV row per (setting, sparsity, seed) with the held-out accuracy,
each pruned weight's density, the collapsed layers and the overlap with global magnitude
(resumable: rows already in the file are skipped). The committed damp_alpha_*.csv / .md were made when
damp="auto" averaged the Fisher diagonal over ALL coordinates of the pruned weights; the package now
averages over the live ones (``benchmarks.damp_live`` compares the two rules and sweeps alpha for the new one).

    OMP_NUM_THREADS=1 python -m benchmarks.damp_alpha --model mlpnet --sparsities 0.95 --seeds 0 1 2 3 4
    OMP_NUM_THREADS=1 python -m benchmarks.damp_alpha --model resnet20 --sparsities 0.8 --alphas 0.01 0.1
    OMP_NUM_THREADS=1 python -m benchmarks.damp_alpha --model resnet20 --alphas --per-layer-alphas 0.01
    python -m benchmarks.damp_alpha --model mlpnet --report      # the table only (every run writes it)
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import time
import warnings
from typing import Dict, List
from unittest import mock

from benchmarks._common import append_row, sweep_parser
from benchmarks.quality_report import _cell, read_rows
from benchmarks.quality_sweep import HELDOUT, SETUP, default_data_root, device_name, load
from woodfisher import curvature, damping, prune_one_shot
from woodfisher.data import evaluate, make_loader
from woodfisher.models import MODEL_SPECS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: a candidate rule not in the package: lambda = alpha x the mean over the pruned weights of each weight's
#: own mean Fisher diagonal (every layer counts once, so a large layer of small gradients, such as MNIST's
#: fc1, does not set the damp of the small layers). Applied by patching the kept-gradients path of
#: woodfisher.curvature (the one the defaults take on these models); "alpha" is this rule's alpha.
PER_LAYER = "defaults, per-layer-mean rule"
FIELDS = ["model", "setting", "alpha", "sparsity", "seed", "accuracy", "densities", "collapsed", "magnitude_overlap",
          "damp_last_step", "steps", "seconds", "options", "device"]
#: other single-option variations of the defaults (alpha as in the package), for the mechanism
VARIATIONS = {"global magnitude": dict(method="global_magnitude"), "whole-layer blocks": dict(block_size=None),
              "1 step": dict(num_steps=1), "num_grads 1024": dict(num_grads=1024),
              "fisher_batch_size 50": dict(fisher_batch_size=50), "no OBS update": dict(obs_update=False)}


def _per_layer(alpha: float):
    """curvature.blockwise_from_grads with the damp of :data:`PER_LAYER` from the kept (B, m, c) gradients."""
    inner = curvature.blockwise_from_grads

    def patched(grads, layouts, damp, count, config):
        means = [float(g.double().square().sum()) / (count * g.shape[0] * g.shape[2]) for g in grads.values()]
        return inner(grads, layouts, alpha * sum(means) / len(means), count, config)
    return patched


def run(args) -> None:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"damp_alpha_{args.model}.csv")
    done = set()
    if os.path.exists(path):
        done = {(r["setting"], r["alpha"], float(r["sparsity"]), int(r["seed"])) for r in read_rows(path)}
    dense, pool, heldout, _ = load(args.model, args.data_root, 1)
    setup, spec = SETUP[args.model], MODEL_SPECS[args.model]
    runs = [(f"defaults, alpha {a:g}", a, {}) for a in args.alphas]
    runs += [(name, damping.AUTO_ALPHA, VARIATIONS[name]) for name in args.variations]
    runs += [(PER_LAYER, a, {}) for a in args.per_layer_alphas]
    for name, alpha, options in runs:
        for s in args.sparsities:
            for seed in args.seeds:
                if (name, f"{alpha:g}", s, seed) in done:
                    continue
                model = copy.deepcopy(dense)
                fbs = options.get("fisher_batch_size", 1)
                loader = None if options.get("method") == "global_magnitude" else \
                    make_loader(pool, max(fbs, 250 // fbs * fbs), shuffle=True, seed=seed)
                t0 = time.perf_counter()
                patch = mock.patch.object(curvature, "blockwise_from_grads", _per_layer(alpha)) \
                    if name == PER_LAYER else contextlib.nullcontext()
                with mock.patch.object(damping, "AUTO_ALPHA", alpha), patch, warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = prune_one_shot(model, loader, sparsity=s, modules=list(setup["modules"]),
                                         loss_fn=spec.loss_fn, seed=seed, progress=False, **options)
                secs = time.perf_counter() - t0
                acc = evaluate(model, heldout)
                row = dict(model=args.model, setting=name, alpha=f"{alpha:g}", sparsity=s, seed=seed,
                           accuracy=round(acc, 6),
                           densities=json.dumps({r["name"]: round(1 - r["sparsity"], 4) for r in res.layers}),
                           collapsed=json.dumps(res.collapsed), magnitude_overlap=res.magnitude_overlap,
                           damp_last_step=res.damp, steps=len(res.config.get("steps") or [1]),
                           seconds=round(secs, 2), options=json.dumps(options, sort_keys=True), device=device_name())
                append_row(path, FIELDS, row)
                print(f"  {name:26s} s={s:.2f} seed={seed} acc={100 * acc:6.2f}% collapsed={res.collapsed} "
                      f"{secs:.0f}s", flush=True)


def report(out: str, model: str) -> str:
    """``damp_alpha_<model>.md``: held-out accuracy (mean ± std over seeds) and mean density per pruned weight."""
    rows = read_rows(os.path.join(out, f"damp_alpha_{model}.csv"))
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["setting"], float(r["sparsity"])), []).append(r)
    names = list(json.loads(rows[0]["densities"]))
    lines = [f"Held-out accuracy % of {model} ({HELDOUT} held-out train images; mean ± std over seeds, n = seeds) "
             "and the mean kept fraction of each pruned weight. Made by `python -m benchmarks.damp_alpha` "
             f"(commands in its docstring). Device: {rows[0]['device']} (shared machine).", "",
             "| setting | alpha | sparsity % | accuracy % | min over seeds | " + " | ".join(names) + " | collapsed |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(names) + "---|"]
    for (name, s), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        accs = [100 * float(r["accuracy"]) for r in rs]
        dens = [json.loads(r["densities"]) for r in rs]
        cols = [f"{sum(d[n] for d in dens) / len(dens):.3f}" for n in names]
        coll = sorted({c for r in rs for c in json.loads(r["collapsed"])})
        alpha = "-" if name == "global magnitude" else rs[0]["alpha"]
        lines.append(f"| {name} | {alpha} | {100 * s:g} | {_cell(accs)} | {min(accs):.2f} | " + " | ".join(cols) +
                     f" | {', '.join(coll) or '-'} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, f"damp_alpha_{model}.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    p = sweep_parser(__doc__, SETUP, default_data_root(), [0.95], [0, 1, 2, 3, 4])
    p.add_argument("--alphas", type=float, nargs="*", default=[1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0])
    p.add_argument("--variations", nargs="*", default=[], choices=sorted(VARIATIONS))
    p.add_argument("--per-layer-alphas", type=float, nargs="*", default=[], help=f"alphas of {PER_LAYER!r}")
    args = p.parse_args(argv)
    if not args.report:
        run(args)
    print(report(args.out, args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
