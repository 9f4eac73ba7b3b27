"""The joint OBS update (``joint_update=True``) against the paper's summed update, on real models.

For MLPNet / MNIST and ResNet-20 / CIFAR-10 (``benchmarks.quality_sweep``'s data, checkpoints, modules,
Fisher pool and test set), at each sparsity and seed:

* "defaults" vs "defaults + joint": ``prune_one_shot(model, loader, sparsity=s)`` (multi-step), with and
  without ``joint_update=True`` (from the first step on the weights differ, so later masks may too);
* "paper (1 step)" vs "paper (1 step) + joint": one curvature per seed (whole-layer blocks, m = 1000,
  damp 1e-5, :data:`benchmarks.quality_sweep.PAPER`), pruned to every sparsity both ways with
  :func:`woodfisher.prune_with` (same masks: the selection does not depend on the update);
* "paper (1 step), damp auto": the same with the package's relative damp (``--settings`` picks).

Rows (top-1 accuracy, the update phase's seconds = ``PruneResult.timings["update"]``, the whole call's) are
appended to ``joint_update.csv`` at once and skipped when present (resumable); ``--report`` writes
``joint_update.md``.

    OMP_NUM_THREADS=1 python -m benchmarks.joint_update --model mlpnet --seeds 0 1 2
    OMP_NUM_THREADS=1 python -m benchmarks.joint_update --model resnet20 --seeds 0 --settings defaults
    python -m benchmarks.joint_update --report
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import sys
import time
from typing import Dict, List

from benchmarks._common import append_row
from benchmarks.oneshot_sweep import SETUP
from benchmarks.quality_sweep import PAPER, default_data_root, device_name, load
from woodfisher import estimate_curvature, prune_one_shot, prune_with
from woodfisher.data import evaluate, make_loader
from woodfisher.models import MODEL_SPECS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ["model", "setting", "joint_update", "sparsity", "seed", "accuracy", "dense_accuracy", "eval_samples",
          "sparsity_actual", "update_seconds", "call_seconds", "steps", "device"]
SETTINGS = ("defaults", "paper (1 step)", "paper (1 step), damp auto")
#: one-step settings: one curvature per seed, pruned to every sparsity both ways (same masks)
ONE_STEP = {"paper (1 step)": lambda model: PAPER[model],
            "paper (1 step), damp auto": lambda model: dict(PAPER[model], damp="auto")}


def _done(path: str) -> set:
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return {(r["model"], r["setting"], r["joint_update"] == "True", float(r["sparsity"]), int(r["seed"]))
                for r in csv.DictReader(f)}


def _write(path: str, row: Dict) -> None:
    append_row(path, FIELDS, row)
    print(f"  {row['model']} {row['setting']:15s} joint={row['joint_update']!s:5s} s={row['sparsity']:.2f} "
          f"seed={row['seed']} acc={100 * row['accuracy']:6.2f}% update {row['update_seconds']:.2f}s "
          f"call {row['call_seconds']:.1f}s", flush=True)


def run(args) -> None:
    path = os.path.join(args.out, "joint_update.csv")
    done = _done(path)
    dense, pool, _, test = load(args.model, args.data_root, args.test_samples)
    setup, spec = SETUP[args.model], MODEL_SPECS[args.model]
    dense_acc = evaluate(dense, test)

    def common(seed):
        return dict(modules=list(setup["modules"]), loss_fn=spec.loss_fn, seed=seed, progress=False)

    def loader(seed, fbs=1):  # as quality_sweep.Runner.loader
        return make_loader(pool, max(fbs, 250 // fbs * fbs), shuffle=True, seed=seed)

    def record(setting, joint, s, seed, model, res, call_seconds):
        _write(path, dict(model=args.model, setting=setting, joint_update=joint, sparsity=s, seed=seed,
                          accuracy=round(evaluate(model, test), 6), dense_accuracy=round(dense_acc, 6),
                          eval_samples=len(test), sparsity_actual=round(res.sparsity, 6),
                          update_seconds=round(res.timings["update"], 3), call_seconds=round(call_seconds, 2),
                          steps=len(res.config.get("steps") or [1]), device=device_name()))
        done.add((args.model, setting, joint, s, seed))

    for seed in args.seeds:
        for setting in args.settings:
            todo = [(s, j) for s in args.sparsities for j in (False, True)
                    if (args.model, setting, j, s, seed) not in done]
            if not todo:
                continue
            if setting == "defaults":
                for s, joint in todo:
                    model = copy.deepcopy(dense)
                    t0 = time.perf_counter()
                    res = prune_one_shot(model, loader(seed), sparsity=s, joint_update=joint, **common(seed))
                    record(setting, joint, s, seed, model, res, time.perf_counter() - t0)
                continue
            opts = ONE_STEP[setting](args.model)
            t0 = time.perf_counter()
            curv = estimate_curvature(dense, loader(seed, opts["fisher_batch_size"]), **common(seed), **opts)
            secs = time.perf_counter() - t0
            for s, joint in todo:
                model = copy.deepcopy(dense)
                t0 = time.perf_counter()
                res = prune_with(model, curv, s, joint_update=joint)
                record(setting, joint, s, seed, model, res, secs + time.perf_counter() - t0)


def _mean(values: List[float]) -> str:
    return f"{sum(values) / len(values):.2f}" if values else "-"


def report(out: str) -> str:
    with open(os.path.join(out, "joint_update.csv")) as f:
        rows = list(csv.DictReader(f))
    cells: Dict[tuple, List[dict]] = {}
    for r in rows:
        cells.setdefault((r["model"], r["setting"], float(r["sparsity"]), r["joint_update"] == "True"), []).append(r)
    lines = ["# Joint OBS update (`joint_update=True`) vs the paper's summed update", "",
             f"Device: {rows[0]['device']} (2-core CPU shared with other engineers' jobs: seconds are indicative). "
             "One-shot pruning, no fine-tuning; top-1 accuracy % on the full test set "
             f"({', '.join(sorted({r['model'] + ': ' + r['eval_samples'] for r in rows}))} images), "
             "mean over the seeds listed (n). \"defaults\": `prune_one_shot(model, loader, sparsity=s)` (multi-step); "
             "\"paper (1 step)\": whole-layer blocks, m = 1000, damp 1e-5, one curvature per seed pruned both "
             "ways (identical masks); \"paper (1 step), damp auto\": the same with `damp='auto'` (the package's "
             "relative damp). Update seconds: `PruneResult.timings['update']` (all steps).", "",
             "Made by:", "", "```",
             "OMP_NUM_THREADS=1 python -m benchmarks.joint_update --model mlpnet --seeds 0 1 2 "
             "--settings defaults 'paper (1 step)'",
             "OMP_NUM_THREADS=1 python -m benchmarks.joint_update --model resnet20 --seeds 0 1 2 "
             "--settings defaults 'paper (1 step)'",
             "OMP_NUM_THREADS=1 python -m benchmarks.joint_update --model mlpnet --seeds 0 1 2 "
             "--settings 'paper (1 step), damp auto'",
             "OMP_NUM_THREADS=1 python -m benchmarks.joint_update --model resnet20 --seeds 0 1 "
             "--settings 'paper (1 step), damp auto'",
             "python -m benchmarks.joint_update --report", "```", "",
             "| model | setting | sparsity % | summed acc % | joint acc % | joint − summed (points) | "
             "per-seed range | n | update s summed | update s joint | call s summed | call s joint |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model in ("mlpnet", "resnet20"):
        for setting in SETTINGS:
            for s in sorted({k[2] for k in cells if k[0] == model and k[1] == setting}):
                summed, joint = cells.get((model, setting, s, False), []), cells.get((model, setting, s, True), [])
                by_seed = [{r["seed"]: r for r in rs} for rs in (summed, joint)]
                seeds = sorted(set(by_seed[0]) & set(by_seed[1]))   # paired by seed
                a, b = ([100 * float(rs[i]["accuracy"]) for i in seeds] for rs in by_seed)
                diff = [y - x for x, y in zip(a, b)]
                col = [[float(rs[i][k]) for i in seeds] for k in ("update_seconds", "call_seconds") for rs in by_seed]
                lines.append(f"| {model} | {setting} | {100 * s:g} | {_mean(a)} | {_mean(b)} | "
                             f"{'-' if not diff else f'{sum(diff) / len(diff):+.2f}'} | "
                             f"{'-' if not diff else f'{min(diff):+.2f} to {max(diff):+.2f}'} | {len(seeds)} | "
                             f"{_mean(col[0])} | {_mean(col[1])} | {_mean(col[2])} | {_mean(col[3])} |")
    lines += ["", "Notes:", "",
              "- n = seeds per cell, paired (the same seed, loader and curvature code both ways): compare joint "
              "with summed within this file. The summed rows are made as `quality_<model>.md`'s \"defaults\" "
              "and \"paper (1 step)\" columns (same seeds, loaders and options), but the package may have "
              "changed since that sweep, so they need not repeat its numbers.",
              "- \"paper (1 step)\": the masks are identical both ways (one curvature, the selection does not "
              "depend on the update); \"defaults\": the first step's masks are identical, later steps prune "
              "weights that differ, so their masks may differ.",
              "- The joint update solves one float64 system per Fisher block: q x q (q = entries the block "
              "prunes) or, for a low-rank inverse with q > m, m x m by Woodbury (`woodfisher.structured."
              "joint_update`); update seconds grow with q, i.e. with the sparsity and the block size.",
              "- Runs overlapped (two at a time on the 2 shared cores, besides other engineers' jobs): compare "
              "seconds within a row, not across rows.",
              "- Not measured here: the local quadratic model's loss itself (the tests check joint <= summed "
              "against a float64 dense reference), other damps and block sizes, fine-tuning after pruning."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "joint_update.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["mlpnet", "resnet20"], default="mlpnet")
    p.add_argument("--data-root", default=default_data_root())
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    p.add_argument("--test-samples", type=int, default=None, help="test subset (default: the full test set)")
    p.add_argument("--report", action="store_true", help="only write joint_update.md from the CSV")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if not args.report:
        print(f"{args.model}: {device_name()}", flush=True)
        run(args)
    print(report(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
