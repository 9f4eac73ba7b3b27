"""Operators the per-sample gradients dispatch, against the model's own batched forward+backward.

Device-independent and exact (no timing): on a GPU whose host thread is the bottleneck (small models:
launch-bound), gradient collection time follows the number of kernels launched, so this count is what a
launch-bound GPU pays for, measured on any machine. For the models of :mod:`benchmarks.step_cpu` (MLPNet,
ResNet-20, a MobileNet-like net) and N samples (loader batch 64):

- batched: one forward+backward over the N samples (the yardstick);
- vmap: :class:`woodfisher.GradientCollector` with the default chunk budget on this device (the CPU: ResNet-20's
  256 samples in two ``vmap`` calls, 251 + 5);
- vmap, one call: all N samples in one ``vmap`` call (what the default gives off the CPU, where a small last
  chunk is spread over the others: :func:`woodfisher.chunking.spread_total`);
- expanded: ``per_sample_grads="expanded"`` (torch's expanded weights).

Kernels = aten operators that launch one on a GPU; views and bare allocations are counted apart.
``--before REV`` counts with the ``woodfisher`` package of git revision REV too (fresh worker processes).

    python -m benchmarks.step_ops --before 0ae0638 --out benchmarks/results
Writes ``step_ops.json`` and ``step_ops.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchmarks.step_cpu import MODELS, ROOT, build, extract, operator_counts

PATHS = ("batched", "vmap", "vmap_one_call", "expanded")


def worker(model_name: str, num_grads: int) -> dict:
    """{path: {"kernels": n, "views": n}} for one model with the importable ``woodfisher``."""
    import torch
    import torch.nn.functional as F

    import woodfisher as wf
    from woodfisher.targets import resolve_targets

    model, x, y, modules = build(model_name, num_grads, torch.device("cpu"))
    targets = resolve_targets(model, modules)
    loader = [(x[i:i + 64], y[i:i + 64]) for i in range(0, num_grads, 64)]
    numel = sum(t.numel for t in targets)

    def batched():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def collect(**kw):
        return wf.GradientCollector(model, loader, targets, num_grads=num_grads, progress=False, **kw).collect()

    fns = {"batched": batched, "vmap": collect, "vmap_one_call": lambda: collect(chunk_bytes=num_grads * numel * 4),
           "expanded": lambda: collect(per_sample="expanded")}
    out = {}
    for path, fn in fns.items():
        fn()  # warm-up: first-call work (tracing, caches) is not what a step repeats
        out[path] = operator_counts(fn)
    return out


def run_worker(model: str, num_grads: int, pythonpath: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pythonpath, ROOT) if p))
    cmd = [sys.executable, "-m", "benchmarks.step_ops", "--worker", model, "--num-grads", str(num_grads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {model} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(report: dict) -> str:
    lines = [f"# Operators dispatched for {report['num_grads']} per-sample gradients", "",
             f"Commit {report['commit']}; torch {report['torch']}. Counted with a `TorchDispatchMode` below autograd "
             "and vmap (what runs); kernels = operators that launch one on a GPU, views and bare allocations apart. "
             "Exact and device-independent: `python -m benchmarks.step_ops`.", "",
             "| model | code | batched fwd+bwd | vmap, default chunks (CPU) | vmap, one call | expanded | "
             "one call / batched | views: batched / one call |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for model, by_code in report["models"].items():
        for code, r in by_code.items():
            k = {p: r[p]["kernels"] for p in PATHS}
            lines.append(f"| {model} | {code} | {k['batched']} | {k['vmap']} | {k['vmap_one_call']} | "
                         f"{k['expanded']} | {k['vmap_one_call'] / k['batched']:.2f} | "
                         f"{r['batched']['views']} / {r['vmap_one_call']['views']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--num-grads", type=int, default=256)
    p.add_argument("--before", default=None, help="git revision to count as 'before' too")
    p.add_argument("--out", default=None, help="write step_ops.json/.md here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.num_grads)))
        return 0
    import torch

    from benchmarks import _common as cm
    codes = {"after": ""}
    if args.before:
        codes = {f"before ({args.before})": extract(args.before), "after": ""}
    report = {"num_grads": args.num_grads, "commit": cm.git_commit(ROOT), "torch": torch.__version__, "models": {
        model: {code: run_worker(model, args.num_grads, path) for code, path in codes.items()}
        for model in args.models}}
    text = markdown(report)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "step_ops.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.out, "step_ops.md"), "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
