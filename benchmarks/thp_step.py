"""A default pruning step on the CPU with and without torch's huge-page allocation (THP_MEM_ALLOC_ENABLE=1).

A step allocates its gradients and inverses afresh (tens to hundreds of MiB per step); on Linux each
4 KiB page of fresh memory is mapped by a page fault on its first write, which a virtual machine
makes slow. torch's CPU allocator asks the kernel for transparent huge pages on buffers of 2 MiB or
more when the environment variable ``THP_MEM_ALLOC_ENABLE=1`` is set before the process starts (it is
read once, when torch loads; the package cannot set it for a process already running).

Each repeat runs ``prune_one_shot(model, loader, sparsity=0.8)`` with the package defaults (N = 512
random samples, loader batch 64) in a fresh worker process, once with the variable and once without,
alternated; a warm-up call precedes the timed ones. Recorded: wall seconds by phase, user and system
CPU seconds, minor page faults. Models: ResNet-20 and the MobileNet-like net of :mod:`benchmarks.step_cpu`.

    OMP_NUM_THREADS=1 python -m benchmarks.thp_step --out benchmarks/results
Writes ``thp_step.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIABLE = "THP_MEM_ALLOC_ENABLE"
SETTINGS = {"4 KiB pages (default)": None, f"{VARIABLE}=1": "1"}


def worker(model_name: str, num_samples: int, calls: int) -> dict:
    """Timed default steps in this process: medians of ``calls`` calls after one warm-up."""
    import torch

    import woodfisher as wf
    from benchmarks.step_cpu import build
    model, x, y, modules = build(model_name, num_samples, torch.device("cpu"))
    loader = [(x[i:i + 64], y[i:i + 64]) for i in range(0, num_samples, 64)]
    rows = []
    for call in range(calls + 1):
        fresh = build(model_name, 1, torch.device("cpu"))[0]
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        res = wf.prune_one_shot(fresh, loader, sparsity=0.8, modules=modules, progress=False, num_grads=num_samples)
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        if call:   # the first call is the warm-up
            rows.append(dict(res.timings, wall=wall, user=r1.ru_utime - r0.ru_utime, system=r1.ru_stime - r0.ru_stime,
                             minor_faults=r1.ru_minflt - r0.ru_minflt))
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def run_worker(model: str, value, args) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    env.pop(VARIABLE, None)
    if value is not None:
        env[VARIABLE] = value
    cmd = [sys.executable, "-m", "benchmarks.thp_step", "--worker", model, "--num-samples", str(args.num_samples),
           "--calls", str(args.calls)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {model} ({VARIABLE}={value}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(report: dict) -> str:
    lines = ["# A default pruning step with and without huge-page allocation (CPU)", "",
             f"Device: {report['device']['host_cpu']}, torch {report['device']['torch']}, "
             f"OMP_NUM_THREADS={report['omp_num_threads']}; THP mode: {report['thp_mode']}. {report['note']}", "",
             f"`prune_one_shot(model, loader, sparsity=0.8, num_grads={report['num_samples']})`, package defaults, "
             "loader batch 64, random inputs; each repeat a fresh process per setting (alternated), medians of "
             f"{report['calls']} calls after a warm-up, then the median over {report['repeats']} repeats. "
             "Seconds (wall by phase; user / system: CPU time of the process).", "",
             "| model | allocation | gradients | inverse | select | update | total (wall) | user | system | "
             "minor page faults |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model, settings in report["models"].items():
        for label, r in settings.items():
            lines.append(f"| {model} | {label} | {r['gradients']:.2f} | {r['inverse']:.2f} | {r['select']:.2f} | "
                         f"{r['update']:.2f} | {r['wall']:.2f} | {r['user']:.2f} | {r['system']:.2f} | "
                         f"{r['minor_faults']:,.0f} |")
    lines.append("")
    for model, settings in report["models"].items():
        base, thp = settings.values()
        lines.append(f"- {model}: {base['wall'] / thp['wall']:.2f}x faster with {VARIABLE}=1 "
                     f"(system time {base['system']:.2f} -> {thp['system']:.2f} s).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "mobilenet"])
    p.add_argument("--num-samples", type=int, default=512)
    p.add_argument("--calls", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--note", default="")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.num_samples, args.calls)))
        return {}
    import torch

    from benchmarks import _common as cm
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read().strip()
    except OSError:
        mode = "unknown (no /sys/kernel/mm/transparent_hugepage)"
    report = {"device": cm.device_info(torch.device("cpu")), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "thp_mode": mode, "num_samples": args.num_samples, "calls": args.calls, "repeats": args.repeats,
              "note": args.note, "models": {}}
    for model in args.models:
        runs = {label: [] for label in SETTINGS}
        for rep in range(args.repeats):
            for label, value in SETTINGS.items():
                runs[label].append(run_worker(model, value, args))
                print(f"{model} {label} repeat {rep + 1}: {runs[label][-1]}", flush=True)
        report["models"][model] = {label: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                                   for label, rs in runs.items()}
    text = markdown(report)
    print(text)
    if args.out:
        cm.write_results(args.out, "thp_step", report, text)
    return report


if __name__ == "__main__":
    main()
