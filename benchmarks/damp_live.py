"""damp="auto" over the live coordinates (the package's rule) vs over all coordinates (the rule before it).

``woodfisher.damping.auto_damp`` sets lambda = AUTO_ALPHA x the mean Fisher diagonal. Before, the mean ran
over every entry of the pruned weights, including the ones pruned in earlier steps of the call (their masked
gradients are zero), so lambda shrank relative to the live weights' curvature as a multi-step run went on.
Now it runs over the live entries. This measures what that does to the package's defaults
(``prune_one_shot(model, loader, sparsity=s)`` with only the pruned weights, the loss and the seed given, as
``quality_sweep``'s "defaults" row) on the FULL test set; the old rule is the package's code with
``woodfisher.damping.live_coordinates`` patched to count every entry, with its alpha of then (0.1,
:data:`OLD_ALPHA`); the new rule runs with the package's ``AUTO_ALPHA``. ``--alphas`` runs the live rule with
``AUTO_ALPHA`` patched (a sweep when the live rule loses), which is chosen with ``--eval heldout``: the
held-out split of the TRAIN set that ``quality_sweep --search`` and ``damp_alpha`` use (never the test set),
in ``damp_live_heldout.csv`` / ``.md``. One CSV row per (rule, alpha, model, sparsity, seed), resumable (rows
already in the file are skipped); every run rewrites the Markdown table.

    OMP_NUM_THREADS=1 python -m benchmarks.damp_live --model mlpnet --sparsities 0.9 0.95 --seeds 0 1 2 3 4 5 6 7 8 9
    OMP_NUM_THREADS=1 python -m benchmarks.damp_live --model mlpnet --sparsities 0.9 0.95 --seeds 0 1 2 3 4 5 6 7 8 9 \
        --alphas 0.03 0.1
    OMP_NUM_THREADS=1 python -m benchmarks.damp_live --model resnet20 --sparsities 0.8 0.9 --alphas 0.1
    OMP_NUM_THREADS=1 python -m benchmarks.damp_live --model mlpnet --eval heldout --sparsities 0.7 0.8 0.9 0.95 \
        --seeds 0 1 2 3 4 5 6 7 8 9 --alphas 0.003 0.03 0.1 0.3
    OMP_NUM_THREADS=1 python -m benchmarks.damp_live --model resnet20 --eval heldout --sparsities 0.7 0.8 0.9 \
        --seeds 0 1 2 3 4 --alphas 0.03 0.1       # 0.03: 80 and 90% seeds 0-2 only; 70%: seeds 0-2
    OMP_NUM_THREADS=1 python -m benchmarks.damp_live --model mlpnet --eval heldout --num-steps 1 \
        --seeds 0 1 2 3 4 5 6 7 8 9 --alphas 0.1
    OMP_NUM_THREADS=1 python -m benchmarks.damp_live --model resnet20 --eval heldout --num-steps 1 \
        --sparsities 0.8 0.9 --alphas 0.1
    python -m benchmarks.damp_live --report

(The committed tables ran subsets of these grids: the n of each row says which seeds.)
"""
from __future__ import annotations

import contextlib
import copy
import os
import statistics
import sys
import time
import warnings
from typing import Dict, List
from unittest import mock

from benchmarks._common import append_row, sweep_parser
from benchmarks.quality_report import _cell, read_rows
from benchmarks.quality_sweep import HELDOUT, SETUP, default_data_root, device_name, load
from woodfisher import damping, prune_one_shot
from woodfisher.data import evaluate, make_loader
from woodfisher.models import MODEL_SPECS

EVALS = {"test": "damp_live", "heldout": "damp_live_heldout"}   # evaluation set -> file name (no extension)
FIELDS = ["model", "rule", "alpha", "sparsity", "seed", "accuracy", "dense_accuracy", "eval_samples", "damp_last_step",
          "steps", "seconds", "device"]
OLD, NEW = "all coordinates (old)", "live coordinates (new)"
#: the package's AUTO_ALPHA while the old rule was its rule (the old rule always runs with it)
OLD_ALPHA = 0.1


def _all_coordinates(keep) -> int:
    """The old rule's count: every entry of the pruned weights, pruned or not."""
    return sum(mask.numel() for mask in keep.values())


def run(args) -> None:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, EVALS[args.eval] + ".csv")
    done = {(r["model"], r["rule"], r["alpha"], float(r["sparsity"]), int(r["seed"]))
            for r in (read_rows(path) if os.path.exists(path) else [])}
    dense, pool, heldout, test = load(args.model, args.data_root, None)
    test = heldout if args.eval == "heldout" else test
    dense_acc = evaluate(dense, test)
    setup, spec = SETUP[args.model], MODEL_SPECS[args.model]
    suffix, options = ("", {}) if args.num_steps is None else \
        (f", num_steps={args.num_steps}", {"num_steps": args.num_steps})
    runs = [(OLD + suffix, OLD_ALPHA), (NEW + suffix, damping.AUTO_ALPHA)] if not args.alphas else \
        [(NEW + suffix, a) for a in args.alphas]
    for s in args.sparsities:
        for seed in args.seeds:
            for rule, alpha in runs:
                if (args.model, rule, f"{alpha:g}", s, seed) in done:
                    continue
                model = copy.deepcopy(dense)
                loader = make_loader(pool, 250, shuffle=True, seed=seed)   # quality_sweep's loader for fbs 1
                patch = mock.patch.object(damping, "live_coordinates", _all_coordinates) if rule.startswith(OLD) \
                    else contextlib.nullcontext()
                t0 = time.perf_counter()
                with patch, mock.patch.object(damping, "AUTO_ALPHA", alpha), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = prune_one_shot(model, loader, sparsity=s, modules=list(setup["modules"]),
                                         loss_fn=spec.loss_fn, seed=seed, progress=False, **options)
                secs = time.perf_counter() - t0
                acc = evaluate(model, test)
                append_row(path, FIELDS, dict(model=args.model, rule=rule, alpha=f"{alpha:g}", sparsity=s, seed=seed,
                                              accuracy=round(acc, 6), dense_accuracy=round(dense_acc, 6),
                                              eval_samples=len(test), damp_last_step=res.damp,
                                              steps=len(res.config.get("steps") or [1]), seconds=round(secs, 2),
                                              device=device_name()))
                print(f"  {args.model} {rule:24s} alpha={alpha:g} s={s:.2f} seed={seed} acc={100 * acc:6.2f}% "
                      f"damp={res.damp:.3g} {secs:.0f}s", flush=True)


def _split(rule: str):
    """(the options suffix, False for the old rule): a rule's baseline is the old rule with the same suffix."""
    base = OLD if rule.startswith(OLD) else NEW
    return rule[len(base):], base != OLD


def report(out: str, evaluation: str = "test") -> str:
    """``damp_live.md`` (``damp_live_heldout.md``): test (held-out) accuracy per rule (mean ± std over seeds),
    the paired difference new - old per seed, and the ratio of the last step's lambda (new / old)."""
    rows = read_rows(os.path.join(out, EVALS[evaluation] + ".csv"))
    by: Dict[tuple, Dict[int, dict]] = {}
    for r in rows:
        by.setdefault((r["model"], float(r["sparsity"]), r["rule"], r["alpha"]), {})[int(r["seed"])] = r
    where = "full test sets" if evaluation == "test" else f"the {HELDOUT} held-out TRAIN images (not the test set)"
    lines = [f"Accuracy % of the package's defaults with damp='auto' averaged over all coordinates of the "
             f"pruned weights (old) or over the live ones (new); {where}, mean ± std over seeds. Made by "
             f"`python -m benchmarks.damp_live` (commands in its docstring). Device: {rows[0]['device']} (2-core "
             "shared CPU host, other jobs running).", "",
             "| model | sparsity % | rule | alpha | steps | accuracy % | new − old, paired (points) | "
             "lambda new / old, last step |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for (model, s, rule, alpha), seeds in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1], _split(kv[0][2]),
                                                                            float(kv[0][3]))):
        accs = [100 * float(r["accuracy"]) for r in seeds.values()]
        diff = ratio = "-"
        suffix, is_new = _split(rule)
        old = next((v for k, v in by.items() if k[:3] == (model, s, OLD + suffix)), {})
        paired = sorted(set(seeds) & set(old))
        if is_new and paired:
            d: List[float] = [100 * (float(seeds[i]["accuracy"]) - float(old[i]["accuracy"])) for i in paired]
            diff = f"{statistics.mean(d):+.2f}" + (f" ± {statistics.stdev(d):.2f}" if len(d) > 1 else "") + \
                f" (n={len(d)})"
            q = [float(seeds[i]["damp_last_step"]) / float(old[i]["damp_last_step"]) for i in paired]
            ratio = f"{statistics.mean(q):.2f}"
        steps = "/".join(sorted({r["steps"] for r in seeds.values()}))
        lines.append(f"| {model} | {100 * s:g} | {rule} | {alpha} | {steps} | {_cell(accs)} | {diff} | {ratio} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, EVALS[evaluation] + ".md"), "w") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    p = sweep_parser(__doc__, SETUP, default_data_root(), [0.9, 0.95], [0, 1, 2])
    p.add_argument("--alphas", type=float, nargs="*", default=[], help="live rule only, AUTO_ALPHA patched")
    p.add_argument("--num-steps", type=int, default=None, help="num_steps (default: the package's)")
    p.add_argument("--eval", choices=sorted(EVALS), default="test", help="evaluation set (heldout: choose alpha)")
    args = p.parse_args(argv)
    if not args.report:
        run(args)
    print(report(args.out, args.eval))
    return 0


if __name__ == "__main__":
    sys.exit(main())
