"""2:4 on ResNet-20 / CIFAR-10: N:M runs along the input channels (the sparse tensor core layout) vs the old runs.

Prunes the shared ResNet-20 checkpoint's 18 residual 3x3 convs (the paper's setup; the stem conv has 3 input
channels and cannot take 2:4 along them) to 2:4 with WoodFisher (group OBS, exact statistic and joint update)
and with magnitude N:M, and measures top-1 accuracy on the full CIFAR-10 test set. Every row also counts the
runs of 4 consecutive input channels at a fixed (out, kh, kw) that hold more than 2 non-zeros (0: deployable as
2:4 on sparse tensor cores; written here, independent of the package's own checker).

The grouping measured is that of the ``woodfisher`` package imported: run once with this branch ("channels")
and once with the code before the change on ``PYTHONPATH`` ("row-major": runs of 4 consecutive entries of the
(out, in, kh, kw) flattening, mostly along kw)::

    OMP_NUM_THREADS=1 python -m benchmarks.nm_conv --data-root ../shared/data
    git archive <old commit> python woodfisher_kernels | tar -x -C /tmp/old
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/old/python:/tmp/old python -m benchmarks.nm_conv --data-root ../shared/data

Rows are appended to ``<out>/nm_conv.csv``; ``--report`` writes ``<out>/nm_conv.md`` from it.
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import platform
import time
from typing import List

import torch

import woodfisher
from woodfisher import prune_one_shot
from woodfisher.checkpoint import load_checkpoint
from woodfisher.data import evaluate, load_cifar10, make_loader
from woodfisher.models import RESNET20_PRUNABLE, resnet20

from ._common import append_row

FIELDS = ["grouping", "method", "seed", "accuracy", "dense_accuracy", "sparsity", "channel_violations",
          "channel_runs", "num_grads", "damp", "block_size", "seconds", "host", "torch"]


def grouping() -> str:
    """Which N:M grouping the imported package applies to convs."""
    return "channels" if hasattr(woodfisher.PruneConfig, "channels_last") else "row-major"


def channel_violations(model, names, n: int = 2, m: int = 4):
    """(runs of m consecutive input channels at a fixed (out, *kernel) with more than n non-zeros, runs)."""
    params = dict(model.named_parameters())
    bad = total = 0
    for name in names:
        w = params[name].detach()
        for kh in range(w.shape[2]):
            for kw in range(w.shape[3]):
                runs = (w[:, :, kh, kw] != 0).reshape(w.shape[0], -1, m).sum(-1)
                bad, total = bad + int((runs > n).sum()), total + runs.numel()
    return bad, total


def run(args) -> List[dict]:
    dense = load_checkpoint(resnet20(), os.path.join(args.data_root, "checkpoints", "resnet20_cifar10.pth.tar"))
    dense.eval()
    train, test = load_cifar10(args.data_root, "train"), load_cifar10(args.data_root, "test")
    dense_acc = evaluate(dense, test)
    print(f"dense accuracy {100 * dense_acc:.2f}% on {len(test)} test images; grouping {grouping()}", flush=True)
    rows = []
    for seed in args.seeds:
        for method in args.methods:
            if method == "magnitude" and seed != args.seeds[0]:
                continue  # deterministic: one row
            model = copy.deepcopy(dense)
            options = dict(method=method, modules=list(RESNET20_PRUNABLE), pattern="2:4", progress=False)
            if method == "woodfisher":
                options.update(num_grads=args.num_grads, fisher_batch_size=1, damp=args.damp, seed=seed,
                               block_size=args.block_size or None)
            loader = make_loader(train, 250, shuffle=True, seed=seed) if method == "woodfisher" else None
            start = time.perf_counter()
            result = prune_one_shot(model, loader, **options)
            seconds = time.perf_counter() - start
            bad, total = channel_violations(model, RESNET20_PRUNABLE)
            rows.append(dict(grouping=grouping(), method=method, seed=seed, accuracy=round(evaluate(model, test), 6),
                             dense_accuracy=round(dense_acc, 6), sparsity=round(result.sparsity, 6),
                             channel_violations=bad, channel_runs=total,
                             num_grads=args.num_grads if method == "woodfisher" else "",
                             damp=args.damp if method == "woodfisher" else "",
                             block_size=(args.block_size or "layer") if method == "woodfisher" else "",
                             seconds=round(seconds, 1), host=platform.processor() or platform.machine(),
                             torch=torch.__version__))
            print(rows[-1], flush=True)
    for row in rows:
        append_row(os.path.join(args.out, "nm_conv.csv"), FIELDS, row)
    return rows


def report(args) -> str:
    """Markdown table of ``nm_conv.csv``: accuracy (%) and channel-run violations per grouping and method."""
    with open(os.path.join(args.out, "nm_conv.csv")) as f:
        rows = list(csv.DictReader(f))
    lines = ["| N:M runs of a conv | method | seed | test accuracy % | dense % | runs of 4 input channels with > 2 "
             "non-zeros | Fisher (m, damp, block) | seconds |", "|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        fisher = f"{r['num_grads']}, {r['damp']}, {r['block_size']}" if r["num_grads"] else "-"
        lines.append(f"| {r['grouping']} | {r['method']} | {r['seed']} | {100 * float(r['accuracy']):.2f} | "
                     f"{100 * float(r['dense_accuracy']):.2f} | {r['channel_violations']} of {r['channel_runs']} | "
                     f"{fisher} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.path.join("..", "shared", "data"),
                        help="folder with checkpoints/ and cifar-10-batches-py/")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    parser.add_argument("--methods", nargs="+", default=["magnitude", "woodfisher"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--num-grads", type=int, default=1000)
    parser.add_argument("--damp", type=float, default=1e-5)
    parser.add_argument("--block-size", type=int, default=128, help="Fisher block size (0: whole layers)")
    parser.add_argument("--report", action="store_true", help="print the Markdown table of nm_conv.csv")
    args = parser.parse_args(argv)
    if args.report:
        print(report(args), end="")
    else:
        run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
