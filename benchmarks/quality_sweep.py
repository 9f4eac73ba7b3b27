"""Quality beyond the paper: the package's defaults vs the paper's settings vs the best multi-step setting.

Two stages, both resumable (every run appends one CSV row at once; rows already in the
file are skipped, so a killed run loses at most the run in progress):

``--search``: on a held-out split of the TRAIN set (never the test set), a small search at
80% for the best multi-step setting with the paper's gradient count (m = 1000 in total),
plus the defaults with each changed default reverted one at a time (which measures every
default). The Fisher samples come from the rest of the train set.
Rows: ``quality_search_<model>.csv``; the chosen setting: ``quality_best_<model>.json``.

``--sweep``: the full test set, seeds 0 1 2, sparsities 70-95%: global magnitude, the
paper's setting (whole-layer blocks, m = 1000, damp 1e-5, one step: one curvature per seed
serves every sparsity), the defaults (``prune_one_shot(model, loader, sparsity=s)`` with
only the model's pruned weights and loss given), and the chosen multi-step setting.
Rows: ``quality_<model>.csv``; ``--report`` (``quality_report.py``) writes ``quality_<model>.png``
and ``quality_<model>.md`` (the commands, mean +- std over seeds, the goals met or missed).
``--sparsities``, ``--seeds`` and ``--settings`` run a part of the sweep, in the order given.

    OMP_NUM_THREADS=1 python -m benchmarks.quality_sweep --model resnet20 --search
    OMP_NUM_THREADS=1 python -m benchmarks.quality_sweep --model resnet20 --sweep
    OMP_NUM_THREADS=1 python -m benchmarks.quality_sweep --model resnet20 --sweep --sparsities 0.8 --settings defaults
    python -m benchmarks.quality_sweep --model resnet20 --report
    python -m benchmarks.quality_sweep --quick     # tiny smoke run (MLPNet, m = 32, 500 test images)
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import platform
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch
from torch.utils.data import Subset

from benchmarks._common import append_row, git_commit
from benchmarks.oneshot_sweep import SETUP
from benchmarks.quality_report import report
from woodfisher import estimate_curvature, prune_one_shot, prune_with
from woodfisher.checkpoint import load_checkpoint
from woodfisher.data import evaluate, make_loader, subset
from woodfisher.models import MODEL_SPECS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ["model", "setting", "sparsity", "seed", "accuracy", "dense_accuracy", "eval", "eval_samples",
          "sparsity_actual", "magnitude_overlap", "steps", "seconds", "options", "device", "commit"]
HELDOUT = 5000          # train images held out for the search (fixed split, seed 0)
PAPER_M = 1000
#: the paper's one-shot settings (appendix S1): whole-layer blocks, damp 1e-5, one step
PAPER = {"resnet20": dict(block_size=None, num_grads=PAPER_M, fisher_batch_size=1, damp=1e-5, num_steps=1),
         "mlpnet": dict(block_size=None, num_grads=PAPER_M, fisher_batch_size=50, damp=1e-5, num_steps=1)}
SWEEP_SPARSITIES = [0.7, 0.8, 0.9, 0.95]


def default_data_root() -> str:
    candidates = [os.environ.get("WOODFISHER_DATA", ""), os.path.join(ROOT, "..", "shared", "data"),
                  os.path.join(ROOT, "..", "..", "shared", "data")]
    return next((c for c in candidates if c and os.path.isdir(c)), candidates[1])


def device_name() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other jobs, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def load(model_name: str, root: str, test_samples: Optional[int]):
    """(dense model, Fisher pool (train minus held-out), held-out train split, test set)."""
    setup, spec = SETUP[model_name], MODEL_SPECS[model_name]
    dense = load_checkpoint(spec.factory(), os.path.join(root, "checkpoints", setup["ckpt"]),
                            trust_pickle=setup["trust_pickle"]).eval()
    train = setup["loader"](root, "train")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    heldout, pool = Subset(train, perm[:HELDOUT]), Subset(train, perm[HELDOUT:])
    test = subset(setup["loader"](root, "test"), test_samples, seed=0)
    return dense, pool, heldout, test


class Runner:
    """Prunes copies of the dense model and appends one CSV row per (setting, sparsity, seed)."""

    def __init__(self, args, csv_path: str, eval_set, eval_name: str):
        self.args, self.csv_path, self.eval_set, self.eval_name = args, csv_path, eval_set, eval_name
        self.dense, self.pool = args.dense, args.pool
        self.setup, self.spec = SETUP[args.model], MODEL_SPECS[args.model]
        self.done = set()
        if os.path.exists(csv_path):
            with open(csv_path) as f:
                self.done = {(r["setting"], float(r["sparsity"]), int(r["seed"])) for r in csv.DictReader(f)}
        self.dense_acc = None
        self.commit = git_commit()

    def common(self, seed: int) -> dict:
        return dict(modules=list(self.setup["modules"]), loss_fn=self.spec.loss_fn, seed=seed, progress=False)

    def loader(self, seed: int, fbs: int = 1):
        return make_loader(self.pool, max(fbs, 250 // fbs * fbs), shuffle=True, seed=seed)

    def record(self, setting: str, s: float, seed: int, model, result, seconds: float, options: dict) -> None:
        if self.dense_acc is None:
            self.dense_acc = evaluate(self.dense, self.eval_set)
        acc = evaluate(model, self.eval_set)
        row = dict(model=self.args.model, setting=setting, sparsity=s, seed=seed, accuracy=round(acc, 6),
                   dense_accuracy=round(self.dense_acc, 6), eval=self.eval_name, eval_samples=len(self.eval_set),
                   sparsity_actual=round(result.sparsity, 6),
                   magnitude_overlap="" if result.magnitude_overlap is None else round(result.magnitude_overlap, 6),
                   steps=len(result.config.get("steps") or [1]), seconds=round(seconds, 2),
                   options=json.dumps(options, sort_keys=True), device=device_name(), commit=self.commit)
        append_row(self.csv_path, FIELDS, row)
        self.done.add((setting, s, seed))
        print(f"  {setting:28s} s={s:.2f} seed={seed} acc={100 * acc:6.2f}% overlap={row['magnitude_overlap']} "
              f"steps={row['steps']} {seconds:.0f}s", flush=True)

    def one_shot(self, setting: str, options: dict, sparsities: List[float], seeds: List[int]) -> None:
        for seed in seeds:
            for s in sparsities:
                if (setting, s, seed) in self.done:
                    continue
                model = copy.deepcopy(self.dense)
                loader = None if options.get("method") == "global_magnitude" else \
                    self.loader(seed, options.get("fisher_batch_size", 1))
                t0 = time.perf_counter()
                res = prune_one_shot(model, loader, sparsity=s, **self.common(seed), **options)
                self.record(setting, s, seed, model, res, time.perf_counter() - t0, options)

    def reused(self, setting: str, options: dict, sparsities: List[float], seeds: List[int]) -> None:
        """One-step settings: one curvature per seed, pruned to every sparsity (same as prune_one_shot)."""
        for seed in seeds:
            todo = [s for s in sparsities if (setting, s, seed) not in self.done]
            if not todo:
                continue
            t0 = time.perf_counter()
            curv = estimate_curvature(self.dense, self.loader(seed, options.get("fisher_batch_size", 1)),
                                      **self.common(seed), **options)
            secs = time.perf_counter() - t0
            for s in todo:
                model = copy.deepcopy(self.dense)
                t0 = time.perf_counter()
                res = prune_with(model, curv, s)
                self.record(setting, s, seed, model, res, secs + time.perf_counter() - t0, options)


def search_candidates(model_name: str, best_steps: Optional[int]) -> Dict[str, dict]:
    """Stage 1: the step count (c = m per step, damp auto, geometric); stage 2: variations at the best
    count (block sizes pinned, so a setting means the same whatever the package's defaults); and
    the package's defaults with each default reverted to its previous value one at a time."""
    fbs = PAPER[model_name]["fisher_batch_size"]
    base = dict(num_grads=PAPER_M, fisher_batch_size=fbs)
    out = {"paper": dict(PAPER[model_name])}
    for n in (2, 4, 8, 16):
        out[f"m1000 steps{n}"] = dict(base, num_steps=n, block_size=-(-PAPER_M // n))
    if best_steps is not None:
        n = best_steps
        c = -(-PAPER_M // n)
        out[f"m1000 steps{n} linear"] = dict(base, num_steps=n, block_size=c, step_schedule="linear")
        out[f"m1000 steps{n} whole-layer"] = dict(base, num_steps=n, block_size=None)
        for r in (2, 4, 8, 16, 32):
            out[f"m1000 steps{n} c={r}m"] = dict(base, num_steps=n, block_size=r * (PAPER_M // n))
        out[f"m1000 steps{n} damp1e-5"] = dict(base, num_steps=n, block_size=c, damp=1e-5)
        out[f"m1000 steps{2 * n}"] = dict(base, num_steps=2 * n, block_size=-(-PAPER_M // (2 * n)))
    out["defaults"] = {}
    out["defaults, damp 1e-5"] = dict(damp=1e-5)
    out["defaults, whole-layer blocks"] = dict(block_size=None)
    out["defaults, 1 step"] = dict(num_steps=1)
    out["defaults, linear schedule"] = dict(step_schedule="linear")
    out["defaults, m=128"] = dict(num_grads=128)
    out["old defaults"] = dict(block_size=None, num_grads=128, damp=1e-5, num_steps=1)
    return out


def best_multistep(csv_path: str, s: float) -> Optional[str]:
    """The multi-step setting (m = 1000 in total) with the best mean held-out accuracy at ``s``."""
    if not os.path.exists(csv_path):
        return None
    acc: Dict[str, List[float]] = {}
    with open(csv_path) as f:
        for r in csv.DictReader(f):
            if r["setting"].startswith("m1000") and float(r["sparsity"]) == s:
                acc.setdefault(r["setting"], []).append(float(r["accuracy"]))
    return max(acc, key=lambda k: sum(acc[k]) / len(acc[k])) if acc else None


def _extra(item: str):
    """'NAME={json options}' -> (NAME, options), e.g. 'm=512, 8 steps={"num_grads": 512, "num_steps": 8}'."""
    name, sep, options = item.partition("={")
    if not sep:
        raise ValueError(f"--extra takes NAME={{json options}}, got {item!r}")
    return name, json.loads("{" + options)


def run_search(args) -> None:
    path = os.path.join(args.out, f"quality_search_{args.model}.csv")
    runner = Runner(args, path, args.heldout, f"held-out train split ({HELDOUT} images)")
    s = args.search_sparsity
    if args.only_extra:
        for item in args.extra:
            name, options = _extra(item)
            runner.one_shot(name, options, [s], args.search_seeds)
        return
    stage1 = search_candidates(args.model, None)
    for name in [k for k in stage1 if k.startswith("m1000")]:
        runner.one_shot(name, stage1[name], [s], args.search_seeds)
    best = best_multistep(path, s)
    steps = int(best.split("steps")[1].split()[0])
    cands = search_candidates(args.model, steps)
    for name, options in cands.items():
        if name == "paper":
            runner.reused(name, options, [s], args.search_seeds)
        elif name not in stage1 or not name.startswith("m1000"):
            runner.one_shot(name, options, [s], args.search_seeds)
    for item in args.extra:
        name, options = _extra(item)
        cands[name] = options
        runner.one_shot(name, options, [s], args.search_seeds)
    best = best_multistep(path, s)
    chosen = {"setting": best, "options": cands.get(best) or stage1[best], "chosen_at_sparsity": s,
              "chosen_on": runner.eval_name, "device": device_name()}
    with open(os.path.join(args.out, f"quality_best_{args.model}.json"), "w") as f:
        json.dump(chosen, f, indent=1)
    print(f"best multi-step setting: {best} {chosen['options']}")


def run_sweep(args) -> None:
    path = os.path.join(args.out, f"quality_{args.model}.csv")
    name = "test set" if args.test_samples is None else f"test subset ({len(args.test)})"
    runner = Runner(args, path, args.test, name)
    with open(os.path.join(args.out, f"quality_best_{args.model}.json")) as f:
        best = json.load(f)
    sp, seeds = args.sparsities, args.seeds
    runs = {"global magnitude": lambda: runner.one_shot("global magnitude", dict(method="global_magnitude"), sp, [0]),
            "defaults": lambda: runner.one_shot("defaults", {}, sp, seeds),
            "best multi-step": lambda: runner.one_shot("best multi-step", best["options"], sp, seeds),
            "paper (1 step)": lambda: runner.reused("paper (1 step)", PAPER[args.model], sp, seeds)}
    for setting in args.settings:      # in the order given (global magnitude is deterministic: seed 0 only)
        runs[setting]()


SWEEP_ORDER = ["global magnitude", "defaults", "best multi-step", "paper (1 step)"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["mlpnet", "resnet20"], default="resnet20")
    p.add_argument("--data-root", default=default_data_root(),
                   help="the shared data folder (default: $WOODFISHER_DATA, or ../shared/data or ../../shared/data)")
    p.add_argument("--out", default=None, help="default: benchmarks/results (a temporary folder with --quick)")
    p.add_argument("--search", action="store_true", help="held-out search for the best multi-step setting")
    p.add_argument("--sweep", action="store_true", help="test-set sweep of the four settings")
    p.add_argument("--report", action="store_true", help="table + plot from the sweep's CSV")
    p.add_argument("--search-sparsity", type=float, default=0.8)
    p.add_argument("--search-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--extra", nargs="*", default=[], metavar="NAME=JSON",
                   help="more search candidates: a name and prune_one_shot options as JSON")
    p.add_argument("--only-extra", action="store_true", help="run only the --extra candidates")
    p.add_argument("--sparsities", type=float, nargs="+", default=SWEEP_SPARSITIES)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", choices=SWEEP_ORDER, default=SWEEP_ORDER, metavar="SETTING",
                   help=f"--sweep: which settings, in this order (default: all: {SWEEP_ORDER})")
    p.add_argument("--test-samples", type=int, default=None, help="fixed test subset (default: the full test set)")
    p.add_argument("--quick", action="store_true", help="smoke run: mlpnet, m=32, one seed, 500 test images")
    args = p.parse_args(argv)
    if args.quick:
        global PAPER_M
        PAPER_M = 32
        PAPER["mlpnet"] = dict(PAPER["mlpnet"], num_grads=32, fisher_batch_size=4)
        args.model, args.test_samples, args.seeds, args.sparsities = "mlpnet", 500, [0], [0.8]
        args.search = args.sweep = args.report = True
    if args.out is None:
        args.out = os.path.join(tempfile.gettempdir(), "woodfisher_quality_quick") if args.quick else \
            os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(args.out, exist_ok=True)
    if args.search or args.sweep:
        args.dense, args.pool, args.heldout, args.test = load(args.model, args.data_root, args.test_samples)
        if args.quick:
            args.heldout = subset(args.heldout, 500, seed=0)
        print(f"{args.model}: {device_name()}", flush=True)
    if args.search:
        run_search(args)
    if args.sweep:
        run_sweep(args)
    if args.report:
        print(report(args.out, args.model, ["python -m benchmarks.quality_sweep --quick"] if args.quick else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
