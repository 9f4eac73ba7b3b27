"""The whole pruning step by phase, with the model's own batched forward+backward as its yardstick.

For MLPNet (MNIST shapes), ResNet-20 (CIFAR shapes) and a MobileNet-like CIFAR net
(depthwise-separable convs), in one run:

- yardstick: one batched forward+backward over the same N samples (``N = num_grads``); it and
  the gradient collections below are the median of up to 5 calls (fewer past 2 s);
- per-sample gradients: :class:`woodfisher.GradientCollector` (``fisher_batch_size=1``,
  all N gradients kept) fed by a loader of batch 1 and one of batch 64 (and again with the
  ``per_sample="expanded"`` path, the config's ``per_sample_grads``); the ratio is
  yardstick time / collection time (1.0 = as fast as the batched pass; the goal is >= 0.5);
  "memory floor": writing the N gradients once into memory already mapped, the least any method that
  keeps them must spend;
- the whole step (``prune_one_shot``), by phase (gradients, inverse, statistics = saliency
  + mask selection, update): the previous defaults (whole-layer blocks, m = 128, damp 1e-5,
  one step; 80% sparsity) with both loaders, and the new defaults (block "auto", damp
  "auto", num_steps "auto") with the batch-64 loader.

``--before REV`` measures the same things with the ``woodfisher`` package of git revision
REV (extracted to a temporary folder, imported first via PYTHONPATH; the kernel library is
this checkout's) in the same session, alternating before/after runs so that the load of the
shared machine falls on both alike. Inputs are random (timings do not depend on them).
Every repeat runs in a fresh worker process; figures are medians over repeats.

    OMP_NUM_THREADS=1 python -m benchmarks.step_cpu --before 7637a2b --out benchmarks/results
    python -m benchmarks.step_cpu --device cuda --out benchmarks/results     # the GPU twin
    python -m benchmarks.step_cpu --quick                                   # smoke run (< 1 min)
    python -m benchmarks.step_cpu --markdown benchmarks/results/step_cpu.json  # only rewrite the .md
Writes ``step_<device>.json`` and ``step_<device>.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODELS = ("mlpnet", "resnet20", "mobilenet")
OLD_DEFAULTS = dict(block_size=None, num_grads=128, damp=1e-5, num_steps=1)
SPARSITY = 0.8


# ---------------------------------------------------------------------------- worker side
def mobilenet_like(num_classes: int = 10):
    """MobileNet-v1-like CIFAR net: 3x3 stem, six depthwise-separable blocks, average pool, fc."""
    from torch import nn

    def dws(cin, cout, stride):
        return [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(),
                nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    layers = [nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU()]
    for cin, cout, stride in ((32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1),
                              (256, 512, 2)):
        layers += dws(cin, cout, stride)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def operator_counts(fn) -> dict:
    """{"kernels": n, "views": n}: aten operators one call of ``fn`` dispatches (below autograd and vmap, so what
    runs), split into views / bare allocations (no kernel) and the rest (a kernel launch each on a GPU). Device-
    independent: on a GPU whose host thread is the bottleneck (small models), time follows these counts."""
    import collections

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    free = {torch.ops.aten._unsafe_view.default, torch.ops.aten.empty.memory_format, torch.ops.aten.new_empty.default,
            torch.ops.aten.empty_strided.default}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen["views" if func.is_view or func in free else "kernels"] += 1
            return func(*args, **(kwargs or {}))

    with Count() as count:
        fn()
    return {"kernels": count.seen["kernels"], "views": count.seen["views"]}


def build(name: str, n: int, device):
    """(model in eval mode, inputs (n, ...), labels (n,), pruned weight names or None)."""
    import torch

    from woodfisher.models import RESNET20_PRUNABLE, MLPNet, resnet20
    torch.manual_seed(0)
    if name == "mlpnet":
        model, shape, modules = MLPNet(), (1, 28, 28), None
    elif name == "resnet20":
        model, shape, modules = resnet20(), (3, 32, 32), list(RESNET20_PRUNABLE)
    else:
        model, shape, modules = mobilenet_like(), (3, 32, 32), None
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, *shape, generator=g).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)
    return model.to(device).eval(), x, y, modules


def worker(args) -> dict:
    """One repeat of every measurement for one model with the importable ``woodfisher``."""
    import torch
    import torch.nn.functional as F

    import woodfisher as wf
    from benchmarks import _common as cm
    from woodfisher.targets import resolve_targets

    device = torch.device(args.device)
    n = args.num_grads
    model, x, y, modules = build(args.model, n, device)
    targets = resolve_targets(model, modules)
    numel = sum(t.numel for t in targets)

    def timed(fn):
        cm.sync(device)
        t0 = time.perf_counter()
        out = fn()
        cm.sync(device)
        return time.perf_counter() - t0, out

    def batched():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def loader(bs):
        return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]

    def collect(bs, **kw):
        return wf.GradientCollector(model, loader(bs), targets, num_grads=n, progress=False, **kw).collect()

    def floor_s() -> float:
        buf = torch.empty(n, numel, device=device).fill_(0.0)   # mapped once: the floor is the write alone
        return median_of(lambda: buf.fill_(1.0))

    batched(), collect(64)  # warm-up: allocator, vmap tracing
    def median_of(fn, calls: int = 5, budget_s: float = 2.0) -> float:
        """Median wall time of up to ``calls`` calls, fewer once ``budget_s`` is spent (short calls are noisy)."""
        times = []
        while len(times) < calls and (not times or sum(times) < budget_s):
            times.append(timed(fn)[0])
        return statistics.median(times)

    out = {"numel": numel, "yardstick_s": median_of(batched), "floor_s": floor_s()}
    for bs in args.loader_batches:
        out[f"grads_bs{bs}_s"] = median_of(lambda: collect(bs))
    if args.impl == "after":  # the second per-sample path (woodfisher.gradients)
        collect(64, per_sample="expanded")  # warm-up
        for bs in args.loader_batches:
            out[f"grads_bs{bs}_expanded_s"] = median_of(lambda: collect(bs, per_sample="expanded"))
        # all N in one chunk (one vmap call) against the default chunk budget: fewer launches, larger working set
        one = max(1, n * numel * 4)
        out["grads_bs64_onechunk_s"] = median_of(lambda: collect(64, chunk_bytes=one))
        for label, fn in (("batched", batched), ("vmap", lambda: collect(64)),
                          ("expanded", lambda: collect(64, per_sample="expanded"))):
            for kind, count in operator_counts(fn).items():
                out[f"ops_{label}_{kind}"] = count
    steps = {"old defaults": (OLD_DEFAULTS, args.loader_batches)}
    if args.impl == "after":
        steps["new defaults"] = ({}, [max(args.loader_batches)])
    for label, (options, batches) in steps.items():
        for bs in batches:
            m = build(args.model, 1, device)[0]
            # at most the n samples there are (--quick: n = 64; the package refuses a loader that runs out)
            m_step = min(OLD_DEFAULTS["num_grads"], n)
            kw = dict(OLD_DEFAULTS, **options) if label == "old defaults" else {}
            kw["num_grads"] = m_step
            secs, res = timed(lambda: wf.prune_one_shot(m, loader(bs), sparsity=SPARSITY, modules=modules,
                                                        progress=False, **kw))
            out[f"step {label} bs{bs}"] = dict(res.timings, wall=secs, steps=len(res.config.get("steps") or [1]),
                                               overlap=getattr(res, "magnitude_overlap", None))
    return out


# ---------------------------------------------------------------------------- driver side
def run_worker(model: str, impl: str, args, pythonpath: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pythonpath, ROOT) if p))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--model", model, "--impl", impl,
           "--device", args.device, "--num-grads", str(args.num_grads),
           "--loader-batches", *map(str, args.loader_batches)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {model}/{impl} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def extract(rev: str) -> str:
    folder = tempfile.mkdtemp(prefix=f"woodfisher_{rev}_")
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "python"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return os.path.join(folder, "python")


def _median(values):
    """Median of numbers, or per key of dicts of numbers (None stays None)."""
    if isinstance(values[0], dict):
        return {k: _median([v[k] for v in values]) for k in values[0]}
    if values[0] is None:
        return None
    return statistics.median(values)


def summarise(runs: list, loader_batches, num_grads: int) -> dict:
    """Medians over repeats; ratios computed per repeat (same load), then their median."""
    out = {k: _median([r[k] for r in runs]) for k in runs[0]}
    for bs in loader_batches:
        out[f"ratio_bs{bs}"] = statistics.median(r["yardstick_s"] / r[f"grads_bs{bs}_s"] for r in runs)
        out[f"floor_ratio_bs{bs}"] = statistics.median(r["floor_s"] / r[f"grads_bs{bs}_s"] for r in runs)
        if f"grads_bs{bs}_expanded_s" in runs[0]:
            out[f"ratio_expanded_bs{bs}"] = statistics.median(
                r["yardstick_s"] / r[f"grads_bs{bs}_expanded_s"] for r in runs)
    out["yardstick_samples_per_s"] = num_grads / out["yardstick_s"]
    return out


PHASES = ("gradients", "inverse", "select", "update")


def below_goal(report: dict, goal: float = 0.5) -> list:
    """One line per measured code whose ratio misses ``goal``, with the bound the memory floor sets."""
    lines = []
    for model, by_impl in report["models"].items():
        for impl, r in by_impl.items():
            ratios = [r[k] for k in sorted(r) if k.startswith("ratio_bs")]
            if impl != "after" or min(ratios) >= goal:
                continue
            bound = r["yardstick_s"] / r["floor_s"]
            batches = " / ".join(k[8:] for k in sorted(r) if k.startswith("ratio_bs"))
            lines.append(f"- {model}: ratio {' / '.join(f'{x:.2f}' for x in ratios)} (loader batch {batches}) is "
                         f"below {goal:g}" + (
                             f", and can't reach it here: writing the {report['num_grads']} x {r['numel']:,} "
                             f"gradient entries once takes {r['floor_s']:.3f} s against {r['yardstick_s']:.3f} s for "
                             f"the batched fwd+bwd, so any method that materialises per-sample gradients is bounded "
                             f"at ratio <= {bound:.2f} on this machine (the batched pass is cheap next to the "
                             f"gradients' size)." if bound < goal else
                             f" (the memory floor bounds it at {bound:.2f})."))
    met = [m for m, by_impl in report["models"].items() if "after" in by_impl and
           min(v for k, v in by_impl["after"].items() if k.startswith("ratio_bs")) >= goal]
    if met:
        lines.append(f"- meet the {goal:g} goal with both loaders: {', '.join(met)}.")
    return lines + [""] if lines else []


def _having(report: dict, key: str) -> list:
    """(model, result) of every measured code whose result has ``key``."""
    return [(model, r) for model, by_impl in report["models"].items() for r in by_impl.values() if key in r]


def _table(report: dict, key: str, title: str, header: str, cells) -> list:
    """Markdown lines of a table with one row per result holding ``key`` (``cells(result)``: its cells after
    the model's), or none."""
    rows = _having(report, key)
    if not rows:
        return []
    rule = "|---|" + "---:|" * (header.count("|") - 2)
    return [title, "", header, rule] + [f"| {model} | {cells(r)} |" for model, r in rows] + [""]


# How the memory floor was measured: "mapped" (since 618b5f4) rewrites a buffer already written once; reports
# without the key were written by the code before it, which timed the first write into fresh memory.
FLOOR_TEXT = {"mapped": "memory already mapped (fresh memory adds the operating system's page faults: more)",
              "fresh": "fresh memory"}


def floor_kind(report: dict) -> str:
    """``report["memory_floor"]`` ("mapped" or "fresh"); "fresh" for reports written before the key existed."""
    return report.get("memory_floor", "fresh")


def markdown(report: dict) -> str:
    dev = report["device"]
    lines = [f"# The whole pruning step by phase ({dev.get('device_name', dev.get('host_cpu'))})", "",
             f"Device: {json.dumps(dev)}.", f"Shared machine: {report['note']}", "",
             f"N = {report['num_grads']} samples / gradients (fisher_batch_size 1); medians over "
             f"{report['repeats']} repeats, each in a fresh process, before/after alternated.", "",
             "## Per-sample gradients against the model's own batched forward+backward", "",
             "| model | code | weights | batched fwd+bwd (s) | grads, loader batch 1 (s) | ratio | "
             "grads, loader batch 64 (s) | ratio | memory floor (s) | ratio bound |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model, by_impl in report["models"].items():
        for impl, r in by_impl.items():
            lines.append(f"| {model} | {impl} | {r['numel']:,} | {r['yardstick_s']:.3f} | {r['grads_bs1_s']:.3f} | "
                         f"**{r['ratio_bs1']:.2f}** | {r['grads_bs64_s']:.3f} | **{r['ratio_bs64']:.2f}** | "
                         f"{r['floor_s']:.3f} | {r['yardstick_s'] / r['floor_s']:.2f} |")
    lines += ["", "ratio = batched fwd+bwd time / gradient collection time (goal >= 0.5). Memory floor: "
              f"writing the N x weights gradient entries once into {FLOOR_TEXT[floor_kind(report)]}. Ratio bound = "
              "batched fwd+bwd / memory floor: no method that materialises the N per-sample gradients can reach a "
              "higher ratio.", ""]
    lines += _table(report, "ratio_expanded_bs1",
                    "Second per-sample path, `per_sample_grads=\"expanded\"` (torch's expanded weights; not the "
                    "default until measured on a GPU), same samples:",
                    "| model | grads, loader batch 1 (s) | ratio | grads, loader batch 64 (s) | ratio |",
                    lambda r: f"{r['grads_bs1_expanded_s']:.3f} | **{r['ratio_expanded_bs1']:.2f}** | "
                              f"{r['grads_bs64_expanded_s']:.3f} | **{r['ratio_expanded_bs64']:.2f}**")
    lines += _table(report, "grads_bs64_onechunk_s",
                    "The N gradients in one chunk (one `vmap` call; `chunk_bytes` = their size) against the default "
                    "chunk budget (`woodfisher.chunking.CHUNK_BYTES`), loader batch 64:",
                    "| model | default chunks (s) | one chunk (s) | one chunk / default |",
                    lambda r: f"{r['grads_bs64_s']:.3f} | {r['grads_bs64_onechunk_s']:.3f} | "
                              f"{r['grads_bs64_onechunk_s'] / r['grads_bs64_s']:.2f}")
    counted = _having(report, "ops_batched_kernels")
    if counted:
        lines += ["Operators dispatched for the N samples (loader batch 64; kernels = operators that launch one on a "
                  "GPU, views and bare allocations apart). On a GPU whose host thread is the bottleneck (small "
                  "models: launch-bound) collection time follows the kernel count:", "",
                  "| model | batched fwd+bwd | vmap | expanded | vmap / batched | expanded / batched | "
                  "views: batched / vmap / expanded |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for model, r in counted:
            b, v, e = (r[f"ops_{k}_kernels"] for k in ("batched", "vmap", "expanded"))
            views = "/".join(str(int(r[f"ops_{k}_views"])) for k in ("batched", "vmap", "expanded"))
            lines.append(f"| {model} | {int(b)} | {int(v)} | {int(e)} | {v / b:.2f} | {e / b:.2f} | {views} |")
        lines.append("")
    lines += below_goal(report) + [
              f"## Phase split of one prune_one_shot call ({100 * SPARSITY:.0f}% sparsity), seconds", "",
              "| model | code | setting | loader batch | gradients | inverse | statistics | update | total | "
              "gradients share |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for model, by_impl in report["models"].items():
        for impl, r in by_impl.items():
            for key, t in r.items():
                if not key.startswith("step "):
                    continue
                label, bs = key[5:].rsplit(" bs", 1)
                total = t.get("total") or t["wall"]
                steps = f" ({int(t['steps'])} steps)" if t.get("steps", 1) > 1 else ""
                lines.append(f"| {model} | {impl} | {label}{steps} | {bs} | " + " | ".join(
                    f"{t[p]:.2f}" for p in PHASES) + f" | {total:.2f} | {100 * t['gradients'] / total:.0f}% |")
    m = min(OLD_DEFAULTS["num_grads"], report["num_grads"])
    lines += ["", f"old defaults: {json.dumps(OLD_DEFAULTS)} (num_grads at most N). new defaults: block_size, damp "
              f"and num_steps 'auto' with num_grads = {m} as the old ones (the package's default num_grads is 512, "
              "which gives more steps: 8 from dense to 80%)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-grads", type=int, default=256)
    p.add_argument("--loader-batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--before", default=None, help="git revision to measure as 'before' (e.g. 7637a2b)")
    p.add_argument("--out", default=None, help="write step_<device>.json/.md here")
    p.add_argument("--quick", action="store_true", help="smoke run: mlpnet only, N = 64, one repeat")
    p.add_argument("--markdown", metavar="JSON", help="only rewrite the .md next to a step_<device>.json from it")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="after", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.markdown:
        with open(args.markdown) as f:
            text = markdown(json.load(f))
        with open(os.path.splitext(args.markdown)[0] + ".md", "w") as f:
            f.write(text)
        print(text)
        return 0
    if args.quick:
        args.models, args.num_grads, args.repeats = ["mlpnet"], 64, 1
    import torch

    from benchmarks import _common as cm
    impls = {"after": ""}
    if args.before:
        impls = {f"before ({args.before})": extract(args.before), "after": ""}
    load0 = os.getloadavg()
    report = {"device": cm.device_info(torch.device(args.device)), "num_grads": args.num_grads,
              "repeats": args.repeats, "commit": cm.git_commit(ROOT), "memory_floor": "mapped",
              "sparsity": SPARSITY, "old_defaults": OLD_DEFAULTS, "models": {}}
    for model in args.models:
        runs = {impl: [] for impl in impls}
        for rep in range(args.repeats):
            for impl, path in impls.items():
                runs[impl].append(run_worker(model, "after" if impl == "after" else "before", args, path))
                print(f"{model} {impl} repeat {rep + 1}: {runs[impl][-1]}", flush=True)
        report["models"][model] = {impl: summarise(r, args.loader_batches, args.num_grads)
                                   for impl, r in runs.items()}
    load1 = os.getloadavg()
    report["note"] = (f"{os.cpu_count()}-core CPU (other jobs may share it); load average {load0[0]:.1f} at the "
                      f"start and {load1[0]:.1f} at the end; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    text = markdown(report)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        tag = args.device if args.device != "cuda" else "cuda"
        with open(os.path.join(args.out, f"step_{tag}.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.out, f"step_{tag}.md"), "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
