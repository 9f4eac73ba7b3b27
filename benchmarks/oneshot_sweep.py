"""One-shot pruning sweeps on the paper's real models (MLPNet/MNIST, ResNet-20/CIFAR-10).

Methods: WoodFisher joint (global) and independent (layerwise), global magnitude,
magnitude (layerwise), diagonal Fisher (joint), K-FAC (joint). Paper settings, passed
explicitly (the package's defaults differ, see ``quality_sweep.py``): damp 1e-5,
whole-layer Fisher blocks (the low-rank form is chosen automatically since m < c), one
step; MLPNet prunes fc1-fc3, ResNet-20 the 18 residual 3x3 convs.

Reuse of the statistics: with one pruning step the Fisher gradients and blockwise
inverses depend only on the dense model, the data order (seed) and the Fisher
settings, not on the target sparsity or the joint/independent mode. The sweep
therefore estimates them ONCE per (seed, Fisher setting, method) with
``woodfisher.estimate_curvature`` and prunes a fresh copy of the dense model at every
sparsity with ``woodfisher.prune_with`` (the same code path as ``prune_one_shot``).
K-FAC and the magnitude baselines call ``prune_one_shot`` directly.

Usage (from the repo root):
    OMP_NUM_THREADS=1 python -m benchmarks.oneshot_sweep --model mlpnet
    OMP_NUM_THREADS=1 python -m benchmarks.oneshot_sweep --model resnet20 --eval-samples 2000 \
        --seeds 0 --fisher-batch-sizes 1 50
    python -m benchmarks.oneshot_sweep --quick          # tiny subset, < 30 s (CI)
Writes ``<out>/oneshot_<model>.csv``, ``.png``, ``_summary.md`` (mean +- std table) and ``.log``.
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import platform
import sys
import time
from typing import Dict, List

import torch

from woodfisher import estimate_curvature, prune_one_shot, prune_with
from woodfisher.checkpoint import load_checkpoint
from woodfisher.data import evaluate, load_cifar10, load_mnist, make_loader, subset
from woodfisher.models import MLPNET_PRUNABLE, MODEL_SPECS, RESNET20_PRUNABLE
from woodfisher.reports import plot_accuracy_vs_sparsity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SPARSITIES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98]
FIELDS = ["model", "method", "mode", "sparsity_target", "sparsity_actual", "seed", "accuracy",
          "dense_accuracy", "eval_samples", "num_grads", "fisher_batch_size", "damp", "block_size",
          "seconds_stats", "note"]
SETUP = {
    "mlpnet": dict(ckpt="mlpnet_mnist.ckpt", trust_pickle=True, loader=load_mnist, modules=MLPNET_PRUNABLE),
    "resnet20": dict(ckpt="resnet20_cifar10.pth.tar", trust_pickle=False, loader=load_cifar10,
                     modules=RESNET20_PRUNABLE),
}


def overall_sparsity(model, modules) -> float:
    params = dict(model.named_parameters())
    total = sum(params[n].numel() for n in modules)
    return 1.0 - sum(int(torch.count_nonzero(params[n])) for n in modules) / total


def run(args) -> List[dict]:
    model_name = args.model
    setup, spec = SETUP[model_name], MODEL_SPECS[model_name]
    log_lines: List[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    dense = load_checkpoint(spec.factory(), os.path.join(args.data_root, "checkpoints", setup["ckpt"]),
                            trust_pickle=setup["trust_pickle"]).eval()
    train = setup["loader"](args.data_root, "train")
    full_test = setup["loader"](args.data_root, "test")
    test = subset(full_test, args.eval_samples, seed=0)
    note = (f"fixed random test subset: {len(test)} of {len(full_test)} (seed 0)"
            if len(test) < len(full_test) else "")
    modules, loss_fn = setup["modules"], spec.loss_fn
    dense_acc = evaluate(dense, test)
    log(f"{model_name}: dense accuracy {100 * dense_acc:.2f}% on {len(test)} test samples "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)")
    rows: List[dict] = []
    deadline = time.monotonic() + args.time_budget if args.time_budget else None

    def record(method, mode, s, seed, model, fbs="", secs=0.0):
        acc = evaluate(model, test)
        rows.append(dict(model=model_name, method=method, mode=mode, sparsity_target=s,
                         sparsity_actual=round(overall_sparsity(model, modules), 6), seed=seed,
                         accuracy=round(acc, 6), dense_accuracy=round(dense_acc, 6), eval_samples=len(test),
                         num_grads=args.num_grads if fbs != "" else "", fisher_batch_size=fbs,
                         damp=args.damp if fbs != "" else "", block_size="layer" if fbs != "" else "",
                         seconds_stats=round(secs, 2), note=note))
        log(f"  {method:18s} {mode:9s} s={s:.2f} seed={seed} fbs={fbs!s:>2} acc={100 * acc:6.2f}%")

    for s in (args.sparsities if args.baselines else []):  # deterministic baselines: one seed
        for method in ("global_magnitude", "magnitude"):
            m = copy.deepcopy(dense)
            prune_one_shot(m, None, sparsity=s, method=method, modules=modules, progress=False)
            record(method, "global" if method == "global_magnitude" else "layerwise", s, 0, m)
    for fbs in args.fisher_batch_sizes:
        for seed in args.seeds:
            if deadline and time.monotonic() > deadline:
                log(f"time budget reached: skipping fbs={fbs} seed={seed} and later")
                break
            loader_fn = lambda: make_loader(train, max(fbs, 250 // fbs * fbs), shuffle=True, seed=seed)  # noqa: E731
            curvatures = {}
            for method in (("woodfisher", "diag_fisher") if args.woodfisher else ()):
                t0 = time.perf_counter()
                curvatures[method] = estimate_curvature(dense, loader_fn(), method=method, loss_fn=loss_fn,
                                                        num_grads=args.num_grads, fisher_batch_size=fbs,
                                                        damp=args.damp, modules=modules, seed=seed,
                                                        block_size=None)  # the paper's whole-layer blocks
                secs = time.perf_counter() - t0
                log(f" Fisher statistics ({method}, m={args.num_grads}, fbs={fbs}, seed={seed}): {secs:.1f} s")
            for s in (args.sparsities if args.woodfisher else []):
                for label, mode in (("woodfisher", "global"), ("woodfisher", "layerwise"), ("diag_fisher", "global")):
                    m = copy.deepcopy(dense)
                    prune_with(m, curvatures[label], s, mode=mode)
                    record(label, mode, s, seed, m, fbs, secs=curvatures[label].timings["gradients"])
            if "kfac" in args.methods:
                for s in args.sparsities:
                    m = copy.deepcopy(dense)
                    t0 = time.perf_counter()
                    prune_one_shot(m, loader_fn(), sparsity=s, method="kfac", mode="global", loss_fn=loss_fn,
                                   num_grads=args.num_grads, fisher_batch_size=fbs, damp=args.damp,
                                   modules=modules, seed=seed, progress=False, num_steps=1)
                    record("kfac", "global", s, seed, m, fbs, secs=time.perf_counter() - t0)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"oneshot_{model_name}.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(args.out, f"oneshot_{model_name}.log"), "w") as f:
        f.write("\n".join(log_lines) + "\n")
    plot(rows, dense_acc, model_name, len(test), os.path.join(args.out, f"oneshot_{model_name}.png"))
    with open(os.path.join(args.out, f"oneshot_{model_name}_summary.md"), "w") as f:
        f.write(summary_markdown(rows))
    log(f"wrote {path}")
    return rows


LABELS = {("woodfisher", "global"): "WoodFisher joint", ("woodfisher", "layerwise"): "WoodFisher independent",
          ("diag_fisher", "global"): "diagonal Fisher", ("kfac", "global"): "K-FAC",
          ("global_magnitude", "global"): "global magnitude", ("magnitude", "layerwise"): "magnitude"}
ZOOM = {"mlpnet": (60, 96, 75, 95), "resnet20": (40, 90, 40, 93)}


def curves_of(rows) -> Dict[str, Dict[float, List[float]]]:
    """{label: {sparsity %: [accuracy % per seed]}} (label includes the Fisher mini-batch)."""
    curves: Dict[str, Dict[float, List[float]]] = {}
    for r in rows:
        fbs = f", fbs={r['fisher_batch_size']}" if str(r["fisher_batch_size"]) != "" else ""
        label = LABELS[(r["method"], r["mode"])] + fbs
        curves.setdefault(label, {}).setdefault(100 * float(r["sparsity_target"]), []).append(
            100 * float(r["accuracy"]))
    return curves


def _mean_std(a: List[float]):
    t = torch.tensor(a, dtype=torch.float64)
    return float(t.mean()), (float(t.std()) if len(a) > 1 else 0.0)


def summary_markdown(rows) -> str:
    """Markdown table: one row per sparsity, one column per method, mean +- std over seeds."""
    curves = curves_of(rows)
    sparsities = sorted({s for c in curves.values() for s in c})
    lines = ["| sparsity % | " + " | ".join(curves) + " |", "|---:|" + "---:|" * len(curves)]
    for s in sparsities:
        cells = []
        for c in curves.values():
            if s not in c:
                cells.append("")
                continue
            m, sd = _mean_std(c[s])
            cells.append(f"{m:.2f} ± {sd:.2f} (n={len(c[s])})" if len(c[s]) > 1 else f"{m:.2f}")
        lines.append(f"| {s:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, dense_acc, model_name, n_test, path) -> None:
    pts = {k: [(s, *_mean_std(a)) for s, a in v.items()] for k, v in curves_of(rows).items()}
    plot_accuracy_vs_sparsity(pts, path, title=f"One-shot pruning, {model_name} ({n_test} test samples)",
                              dense_accuracy=100 * dense_acc, zoom=ZOOM.get(model_name))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["mlpnet", "resnet20", "all"], default="all")
    p.add_argument("--data-root", default=os.path.join(ROOT, "..", "shared", "data"))
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--sparsities", type=float, nargs="+", default=SPARSITIES)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--num-grads", type=int, default=1000)
    p.add_argument("--fisher-batch-sizes", type=int, nargs="+", default=None,
                   help="default: 50 for mlpnet, 1 and 50 for resnet20")
    p.add_argument("--damp", type=float, default=1e-5)
    p.add_argument("--eval-samples", type=int, default=None, help="fixed test subset (default: all)")
    p.add_argument("--methods", nargs="+", default=["kfac"], help="extra methods: kfac (or none)")
    p.add_argument("--no-woodfisher", dest="woodfisher", action="store_false",
                   help="skip WoodFisher / diagonal Fisher (e.g. to add K-FAC rows to an earlier run)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; stop starting new seeds after")
    p.add_argument("--no-baselines", dest="baselines", action="store_false",
                   help="skip the magnitude baselines (e.g. when adding a Fisher setting to an earlier run)")
    p.add_argument("--replot", action="store_true", help="only redo the PNG and summary from the CSV in --out")
    p.add_argument("--quick", action="store_true", help="tiny CI run: mlpnet, 2 sparsities, m=32, 500 test samples")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.sparsities, args.seeds, args.num_grads = "mlpnet", [0.5, 0.9], [0], 32
        args.fisher_batch_sizes, args.eval_samples = args.fisher_batch_sizes or [4], args.eval_samples or 500
    models = ["mlpnet", "resnet20"] if args.model == "all" else [args.model]
    if args.replot:
        for name in models:
            with open(os.path.join(args.out, f"oneshot_{name}.csv")) as f:
                rows = list(csv.DictReader(f))
            plot(rows, float(rows[0]["dense_accuracy"]), name, int(rows[0]["eval_samples"]),
                 os.path.join(args.out, f"oneshot_{name}.png"))
            with open(os.path.join(args.out, f"oneshot_{name}_summary.md"), "w") as f:
                f.write(summary_markdown(rows))
        return 0
    fbs_default = args.fisher_batch_sizes
    for name in models:
        args.model = name
        args.fisher_batch_sizes = fbs_default or ([50] if name == "mlpnet" else [1, 50])
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
