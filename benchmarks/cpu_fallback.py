"""CPU fallback speed (issue 10), side by side with the machine's sgemm peak of the same run.

Part 1, blockwise build: ``fisher_inverse`` with the C kernel (``backend="cpu"``, where built)
and the torch fallback (``backend="torch"``) against the previous torch fallback
(:mod:`benchmarks.previous`) for c in {64, 128, 256}, m = c, at two sizes: 2^27 bytes of
inverses (8192 / 2048 / 512 blocks: the build streams its gradients in and its inverses out
of main memory; the public op) and 2 MiB (the L2 cache of one core, the backends' raw
implementations timed right after an untimed call on the same inputs: the kernel's own
speed). Every repeat times a 2048^3 sgemm right before the call, so each "% of peak" is a
ratio of two measurements seconds apart, both in CPU time of this process (a shared host's
other jobs do not count); medians over the repeats. Flop rate = nominal 4 m c^2 flops per
block over the CPU time. Every repeat also times a copy of the bytes the build must move
(read the m x c gradients, write the c x c inverse of every block once): that memory
floor bounds any build of that size, and "ceiling" = the % of peak a build running at the
floor would reach (the roofline: min(1, flops / floor / peak)). Accuracy: 4 blocks against
the float64 SVD reference.

Part 2, ResNet-20 low-rank inverse: the 18 residual 3x3 convs of the CIFAR-10 ResNet-20
(whole-layer blocks, c = 2304..36864), m = 1000 per-sample gradients (seed 0), damp 1e-5:
``lowrank_inverse`` against the previous float64 factorisation; largest relative error of
the diagonal against the float64 one, and the global OBS masks (Eq. 10 statistic, one
threshold over all layers) at 50 / 70 / 80% sparsity from both.

Part 3, the inverse phase of a whole pruning step: ``prune_one_shot`` with the defaults on
MLPNet, ResNet-20 and a MobileNet-like net, C kernel against torch fallback.

Usage (repository root):
    OMP_NUM_THREADS=1 python -m benchmarks.cpu_fallback --data-root ../shared/data --out benchmarks/results
    ... --parts cache step                              # re-measure some parts, keep the others
    python -m benchmarks.cpu_fallback --quick            # tiny synthetic shapes (CI smoke)
    python -m benchmarks.cpu_fallback --plot benchmarks/results/cpu_fallback.json   # only redraw the plot
Writes ``<out>/cpu_fallback.json``, ``.md`` and ``.png`` (``cpu_fallback_quick.*`` with --quick).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch

import woodfisher_kernels as wk
from benchmarks import _common as cm
from benchmarks import previous
from woodfisher_kernels import testing

SPARSITIES = (0.5, 0.7, 0.8)
CPU_KERNEL = "C kernel (backend cpu)"
PARTS = ("build", "cache", "lowrank", "step")


def _timed(fn) -> Tuple[float, float, float]:
    """(wall seconds, CPU seconds of this process, of which in the kernel) of one call.

    The kernel (system) part is mostly the page faults that map fresh memory (a new output) on
    its first write: on a virtual machine that can cost as much as the arithmetic."""
    w0, c0, s0 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_stime
    fn()
    sys_s = resource.getrusage(resource.RUSAGE_SELF).ru_stime - s0
    return time.perf_counter() - w0, time.process_time() - c0, sys_s


def _side_by_side(calls: Dict[str, Callable], flops: float, repeats: int, peak_n: int,
                  moved_bytes: int = 0, warm: bool = False) -> Dict[str, Dict]:
    """Per method: median wall and CPU seconds, GFLOP/s, and % of the sgemm peak timed just before each call.

    Methods are interleaved within every repeat (sgemm, method 1, sgemm, method 2, ...), and
    the percentage compares CPU seconds (``time.process_time``) of the call and of the sgemm:
    on a shared host the wall clock also counts the time other jobs hold the cores. The
    speed-up of method 1 over method k is the median over repeats of their CPU-time ratio.
    With ``moved_bytes`` > 0 every call is also preceded by a copy of ``moved_bytes / 2``
    bytes (``moved_bytes`` moved): the memory floor of the call, and its roofline ceiling
    ``min(1, flops / floor / peak)`` as a % of the same repeat's peak. ``warm``: call the
    method once, untimed, right before the timed call (its inputs then sit in cache: the
    sgemm and the copy evict them otherwise).
    """
    a = torch.randn(peak_n, peak_n)
    peak_flops = 2.0 * peak_n ** 3
    src = torch.empty(max(1, moved_bytes // 8)).normal_()
    dst = torch.empty_like(src)

    def sgemm():
        torch.mm(a, a)

    def copy():
        dst.copy_(src)
    for fn in list(calls.values()) + [sgemm, copy]:
        fn()                                                     # warm-up
    log = {name: {"wall": [], "cpu": [], "sys": [], "peak": [], "floor": []} for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            peak_cpu = _timed(sgemm)[1]
            floor_cpu = _timed(copy)[1] if moved_bytes else 0.0
            if warm:
                fn()
            wall, cpu, sys_s = _timed(fn)
            log[name]["sys"].append(sys_s)
            log[name]["wall"].append(wall)
            log[name]["cpu"].append(cpu)
            log[name]["peak"].append(peak_flops / peak_cpu)
            log[name]["floor"].append(floor_cpu)
    first = log[next(iter(calls))]["cpu"]
    out = {}
    for name, rec in log.items():
        ratios = [flops / cpu / peak for cpu, peak in zip(rec["cpu"], rec["peak"])]
        out[name] = {"median_s": statistics.median(rec["wall"]), "median_cpu_s": statistics.median(rec["cpu"]),
                     "times_s": [round(t, 5) for t in rec["wall"]], "cpu_times_s": [round(t, 5) for t in rec["cpu"]],
                     "gflops": flops / statistics.median(rec["cpu"]) / 1e9,
                     "pct_of_peak": 100 * statistics.median(ratios),
                     "pct_of_peak_best": 100 * max(ratios),   # the least disturbed repeat (shared host)
                     "median_sys_s": statistics.median(rec["sys"]),
                     # the same without the system time (page faults): the arithmetic's own speed
                     "pct_of_peak_user": 100 * statistics.median(
                         flops / max(cpu - sy, 1e-9) / pk for cpu, sy, pk in zip(rec["cpu"], rec["sys"], rec["peak"])),
                     "peak_gflops_median": statistics.median(rec["peak"]) / 1e9,
                     "speedup_of_first": statistics.median(c / f for c, f in zip(rec["cpu"], first))}
        if moved_bytes:
            ceilings = [min(1.0, flops / max(fl, 1e-9) / peak) for fl, peak in zip(rec["floor"], rec["peak"])]
            out[name].update({"memory_floor_cpu_s": statistics.median(rec["floor"]),
                              "memory_gb_per_s": moved_bytes / max(statistics.median(rec["floor"]), 1e-9) / 1e9,
                              "ceiling_pct_of_peak": 100 * statistics.median(ceilings),
                              "pct_of_ceiling": 100 * statistics.median(r / c for r, c in zip(ratios, ceilings))})
    return out


def _build_methods(damp: float, num_samples: float, raw: bool = False) -> Dict[str, Callable]:
    """{name: grads -> inverses}: the C kernel (when built), the torch fallback, the previous fallback.

    ``raw``: the backends' implementations without the public op's input checks and dispatch
    (:func:`woodfisher_kernels.testing.implementation`; ~1-2 ms a call, which would dominate the
    short in-cache calls), else the public ``fisher_inverse`` as users call it.
    """
    out = {}
    for name, backend in ((CPU_KERNEL, "cpu"), ("torch fallback", "torch")):
        if backend not in wk.available_backends("fisher_inverse"):
            continue
        if raw:
            impl = testing.implementation("fisher_inverse", backend)
            out[name] = lambda g, impl=impl: impl(g, damp, num_samples)
        else:
            out[name] = lambda g, backend=backend: wk.fisher_inverse(g, damp, backend=backend)
    out["previous"] = lambda g: previous.fisher_inverse(g, damp, num_samples)
    return out


def run_build(sizes: List[int], inverse_bytes: int, repeats: int, peak_n: int, damp: float = 1e-3,
              in_cache: bool = False) -> List[Dict]:
    """One row per c: every method at m = c with ``inverse_bytes`` of float32 inverses.

    ``in_cache``: the backends' raw implementations (:func:`_build_methods`), each timed right
    after an untimed call on the same inputs (warm caches), no memory floor; else the public op
    with the memory floor of the bytes it moves."""
    rows = []
    for c in sizes:
        blocks = max(1, inverse_bytes // (4 * c * c))
        grads = torch.randn(blocks, c, c, generator=torch.Generator().manual_seed(c))
        flops = 4.0 * c * c * c * blocks
        methods = _build_methods(damp, float(c), in_cache)
        res = _side_by_side({name: (lambda fn=fn: fn(grads)) for name, fn in methods.items()},
                            flops, repeats, peak_n, moved_bytes=0 if in_cache else 2 * 4 * c * c * blocks,
                            warm=in_cache)
        idx = torch.arange(min(4, blocks))
        ref = testing.svd_inverse(grads[idx], damp)
        for name, fn in methods.items():
            res[name]["rel_err_vs_float64"] = float(testing.spectral_error(fn(grads[idx]), ref.inverse).max())
            res[name]["bound"] = float(wk.error_bound(ref.kappa.max()))
        rows.append({"c": c, "m": c, "blocks": blocks, "inverse_bytes": 4 * c * c * blocks,
                     "nominal_gflop": flops / 1e9, "methods": res,
                     "speedup": res["previous"]["speedup_of_first"]})
        print(f"[build] c={c} B={blocks}: " + ", ".join(
            f"{k} {v['gflops']:.1f} GFLOP/s ({v['pct_of_peak']:.0f}% of peak)" for k, v in res.items()), flush=True)
    return rows


def resnet20_gradients(data_root: str, num_grads: int):
    """{name: (m, numel) gradients}, {name: weights (numel,)} of ResNet-20's 18 residual convs."""
    from woodfisher import GradientCollector, resolve_layers
    from woodfisher.checkpoint import load_checkpoint
    from woodfisher.data import load_cifar10, make_loader
    from woodfisher.models import MODEL_SPECS, RESNET20_PRUNABLE
    spec = MODEL_SPECS["resnet20"]
    model = load_checkpoint(spec.factory(), os.path.join(data_root, "checkpoints", "resnet20_cifar10.pth.tar"),
                            trust_pickle=False).eval()
    layers = resolve_layers(model, RESNET20_PRUNABLE)
    loader = make_loader(load_cifar10(data_root, "train"), 64, shuffle=True, seed=0)
    grads = GradientCollector(model, loader, layers, loss_fn=spec.loss_fn, num_grads=num_grads,
                              progress=False).collect()
    return grads, {lay.param_name: lay.param.detach().flatten().clone() for lay in layers}


def _global_keep(scores: Dict[str, torch.Tensor], sparsity: float) -> Dict[str, torch.Tensor]:
    flat = torch.cat([s.flatten().double() for s in scores.values()])
    k = int(round(sparsity * flat.numel()))
    threshold = flat.kthvalue(k).values if k > 0 else flat.min() - 1
    return {n: s.double() > threshold for n, s in scores.items()}


def run_lowrank(grads: Dict[str, torch.Tensor], weights: Dict[str, torch.Tensor], damp: float, repeats: int,
                peak_n: int) -> Dict:
    blocks = {n: g.unsqueeze(0).contiguous() for n, g in grads.items()}
    m = next(iter(blocks.values())).shape[1]
    flops = sum(2.0 * m * m * g.shape[-1] for g in blocks.values())      # ~Gram + L^-1 G, block-triangular
    res = _side_by_side({"lowrank_inverse": lambda: [wk.lowrank_inverse(g, damp) for g in blocks.values()],
                         "previous float64": lambda: [previous.lowrank_factor(g, damp, float(m))
                                                      for g in blocks.values()]}, flops, repeats, peak_n)
    new = {n: wk.lowrank_inverse(g, damp).diag()[0] for n, g in blocks.items()}
    old = {n: previous.lowrank_factor(g, damp, float(m))[1][0] for n, g in blocks.items()}
    diag_err = max(float(((new[n].double() - old[n].double()) / old[n].double()).abs().max()) for n in new)
    masks = {}
    for s in SPARSITIES:
        keep_new = _global_keep({n: weights[n].square() / (2 * new[n]) for n in new}, s)
        keep_old = _global_keep({n: weights[n].square() / (2 * old[n]) for n in old}, s)
        masks[str(s)] = sum(int((keep_new[n] != keep_old[n]).sum()) for n in new)
    speedup = res["previous float64"]["speedup_of_first"]
    print(f"[lowrank] m={m}: {speedup:.2f}x, diag rel. error {diag_err:.2e}, mask differences {masks}", flush=True)
    return {"m": m, "damp": damp, "layers": len(blocks), "numel": sum(g.shape[-1] for g in blocks.values()),
            "methods": res, "speedup": speedup, "diag_max_rel_err_vs_float64": diag_err,
            "mask_entries_differing": masks,
            "default_shape": run_lowrank_backends(grads, damp, repeats, peak_n)}


def run_lowrank_backends(grads: Dict[str, torch.Tensor], damp: float, repeats: int, peak_n: int,
                         m: int = 64, c: int = 256) -> Dict:
    """The low-rank factor at the shape of a default step (m = 64 gradients, blocks of c = 4 m = 256)
    on every backend that has one (raw implementations: C kernel against torch)."""
    m = min(m, next(iter(grads.values())).shape[0])
    blocks = [wk.to_blocks(g[:m], c).transpose(0, 1).contiguous() for g in grads.values()]
    found = [b for b in ("cpu", "torch") if b in testing.backends("lowrank_factor")]
    impls = {b: testing.implementation("lowrank_factor", b) for b in found}
    flops = sum(g.shape[0] * (2.0 * m * m * c + m ** 3 / 3.0) for g in blocks)
    res = _side_by_side({b: (lambda f=f: [f(g, damp, float(m)) for g in blocks]) for b, f in impls.items()},
                        flops, repeats, peak_n)
    print(f"[lowrank] default shape m={m} c={c}: " + ", ".join(f"{b} {r['gflops']:.1f} GFLOP/s"
                                                               for b, r in res.items()), flush=True)
    return {"m": m, "c": c, "blocks": sum(g.shape[0] for g in blocks), "methods": res}


def _goal_lines(result: Dict, goal: float = 40.0) -> List[str]:
    """One line per c: the fastest build's % of peak against the 40% goal, in memory and in L2."""
    out = []
    for row in result.get("build", []):
        best = next(iter(row["methods"]))                # the C kernel when built, else the torch fallback
        r = row["methods"][best]
        top, user = r.get("pct_of_peak_best"), r.get("pct_of_peak_user")
        line = (f"- c = {row['c']}, {best}: {r['pct_of_peak']:.0f}% of peak in main memory, median over repeats "
                f"({'meets' if r['pct_of_peak'] >= goal else 'misses'} the {goal:.0f}% goal"
                + (f"; best repeat {top:.0f}%" if top is not None else "")
                + (f"; {user:.0f}% in user time, without the system's page faults on the fresh output"
                   if user is not None else ""))
        if "ceiling_pct_of_peak" in r:
            line += f"; the memory floor caps that size at {r['ceiling_pct_of_peak']:.0f}%"
        cached = [x for x in result.get("build_in_cache", []) if x["c"] == row["c"]]
        if cached:
            line += f"), {cached[0]['methods'][best]['pct_of_peak']:.0f}% with the inverses in L2"
        else:
            line += ")"
        out.append(line + ".")
    return out + [""] if out else out


def run_step(models: List[str], num_grads: int, repeats: int) -> List[Dict]:
    """Part 3: ``prune_one_shot`` with the package defaults at 80% on random CIFAR / MNIST-shaped
    inputs (:func:`benchmarks.step_cpu.build`), the C kernel against the torch fallback
    (``backend="cpu"`` / ``"torch"``, alternated in every repeat); seconds per phase (medians)."""
    from benchmarks.step_cpu import build
    from woodfisher import prune_one_shot
    backends = [b for b in ("cpu", "torch") if b in wk.available_backends("fisher_inverse")]
    rows = []
    for name in models:
        log = {b: [] for b in backends}
        for rep in range(repeats + 1):                  # repeat 0: warm-up (vmap tracing, allocator)
            for backend in backends:
                model, x, y, modules = build(name, num_grads, torch.device("cpu"))
                loader = [(x[i:i + 64], y[i:i + 64]) for i in range(0, num_grads, 64)]
                res = prune_one_shot(model, loader, sparsity=0.8, modules=modules, num_grads=num_grads,
                                     backend=backend, progress=False)
                if rep:
                    log[backend].append(dict(res.timings))
        row = {"model": name, "num_grads": num_grads, "phases": {
            b: {k: statistics.median(t[k] for t in runs) for k in runs[0]} for b, runs in log.items()}}
        rows.append(row)
        print(f"[step] {name}: " + ", ".join(f"{b} inverse {v['inverse']:.2f} s of {v['total']:.2f} s"
                                           for b, v in row["phases"].items()), flush=True)
    return rows


def _pct(r: Dict) -> str:
    """Median % of peak; the best repeat's and the one without system time where recorded."""
    extra = [f"best {r['pct_of_peak_best']:.0f}%"] if "pct_of_peak_best" in r else []
    extra += [f"user time {r['pct_of_peak_user']:.0f}%"] if "pct_of_peak_user" in r else []
    return f"{r['pct_of_peak']:.0f}%" + (f" ({'; '.join(extra)})" if extra else "")


def _cpu_time(r: Dict) -> str:
    """Median CPU time, with its system (page-fault) part where recorded."""
    sys_s = r.get("median_sys_s")
    return cm.human_time(r["median_cpu_s"]) + (f" (system {cm.human_time(sys_s)})" if sys_s is not None else "")


def markdown(result: Dict) -> str:
    info = result["device"]
    lines = ["# CPU fallback: blockwise build and ResNet-20 low-rank inverse", "",
             f"Device: {info['device_name']}, torch {info['torch']}, {info['cpu_threads']} threads "
             f"(OMP_NUM_THREADS={info['omp_num_threads']}). {result['note']}", "",
             "## Blockwise build, m = c (nominal 4 m c^2 flops per block)", "",
             "Times are medians; GFLOP/s and % of peak use CPU time (see the note), wall time is listed too; "
             "(best N%): the repeat least disturbed by the host's other load; (system T): CPU time spent in the "
             "operating system, mostly page faults mapping the fresh output on its first write; "
             "(user time N%): the % of peak without it. "
             "Memory floor: a copy of the bytes the build must move (gradients in, inverses out), timed before "
             "every call; ceiling: the % of peak of a build that ran at that floor, min(1, flops / floor / peak).",
             ""]
    for key, title in (("build", "inverses in main memory, the public op"),
                       ("build_in_cache", "inverses in L2 (warm), the backends' implementations "
                                          "(the kernel's own speed)")):
        if not result.get(key):
            continue
        lines += [f"### {title}", "",
                  "| c | blocks | MiB of inverses | method | CPU time | wall time | GFLOP/s "
                  "| % of sgemm peak (same run) | memory floor | ceiling (% of peak) | % of ceiling "
                  "| speed-up over previous | rel. error vs float64 |",
                  "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in result[key]:
            mib = row.get("inverse_bytes", 4 * row["c"] ** 2 * row["blocks"]) / 2 ** 20
            prev = row["methods"]["previous"]["speedup_of_first"]
            for name, r in row["methods"].items():
                floor = (f"{cm.human_time(r['memory_floor_cpu_s'])} ({r['memory_gb_per_s']:.2f} GB/s) | "
                         f"{r['ceiling_pct_of_peak']:.0f}% | {r['pct_of_ceiling']:.0f}%"
                         if "memory_floor_cpu_s" in r else " | ")
                lines.append(f"| {row['c']} | {row['blocks']} | {mib:g} | {name} | "
                             f"{_cpu_time(r)} | {cm.human_time(r['median_s'])} | "
                             f"{r['gflops']:.1f} | {_pct(r)} | "
                             f"{floor} | {prev / r['speedup_of_first']:.2f}x | {r['rel_err_vs_float64']:.1e} |")
        lines.append("")
    lines += _goal_lines(result)
    lr = result.get("lowrank")
    if lr:
        lines += ["", f"## Low-rank inverse, {lr['layers']} layers, {lr['numel']:,} weights, m = {lr['m']}, "
                  f"damp {lr['damp']:g}", "", "| method | CPU time | wall time | % of sgemm peak (2 m^2 c flops) |",
                  "|---|---:|---:|---:|"]
        for name, r in lr["methods"].items():
            lines.append(f"| {name} | {cm.human_time(r['median_cpu_s'])} | {cm.human_time(r['median_s'])} | "
                         f"{r['pct_of_peak']:.0f}% |")
        lines += ["", f"Speed-up {lr['speedup']:.2f}x; diagonal: largest relative error vs float64 "
                  f"{lr['diag_max_rel_err_vs_float64']:.1e}; global masks, entries that differ: "
                  + ", ".join(f"{float(s):.0%}: {d}" for s, d in lr["mask_entries_differing"].items()) + "."]
        ds = lr.get("default_shape")
        if ds:
            lines += ["", f"At the shape of a default step ({ds['blocks']} blocks, m = {ds['m']}, c = {ds['c']}; "
                      "raw implementations of the factor, 2 m^2 c + m^3 / 3 flops per block):", "",
                      "| backend | CPU time | wall time | GFLOP/s | % of sgemm peak | speed-up of the first |",
                      "|---|---:|---:|---:|---:|---:|"]
            for name, r in ds["methods"].items():
                lines.append(f"| {name} | {cm.human_time(r['median_cpu_s'])} | {cm.human_time(r['median_s'])} | "
                             f"{r['gflops']:.1f} | {r['pct_of_peak']:.0f}% | {r['speedup_of_first']:.2f}x |")
    if result.get("step"):
        lines += ["", "## The inverse phase of a pruning step", "",
                  "`prune_one_shot(model, loader, sparsity=0.8, num_grads=512)` with the package defaults "
                  "(block size, damp and steps 'auto': 8 steps of 64 gradients, blocks of 256), random inputs, "
                  "loader batch 64; seconds per phase, medians over repeats after a warm-up call, wall clock.", "",
                  "| model | backend | gradients | inverse | saliency + selection | update | total |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for row in result["step"]:
            for backend, ph in row["phases"].items():
                cells = [ph.get(k, 0.0) for k in ("gradients", "inverse", "select", "update", "total")]
                lines.append(f"| {row['model']} | {backend} | " + " | ".join(f"{v:.2f}" for v in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: Dict, path: str, goal: float = 40.0) -> str:
    """Bar chart of the blockwise build's % of the same-run sgemm peak (median, with the best repeat as a tick)
    per block size, main memory and warm caches side by side, one bar per method; the goal as a dashed line.
    Writes ``path`` (PNG) and returns it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, title) for key, title in (("build", "inverses in main memory (the public op)"),
                                              ("build_in_cache", "inverses in L2 (the kernel's own speed)"))
              if result.get(key)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), sharey=True, squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        rows = result[key]
        methods = list(rows[0]["methods"])
        width = 0.8 / len(methods)
        for i, name in enumerate(methods):
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(rows))]
            med = [r["methods"][name]["pct_of_peak"] for r in rows]
            best = [r["methods"][name].get("pct_of_peak_best", m) for r, m in zip(rows, med)]
            ax.bar(xs, med, width, label=name)
            ax.scatter(xs, best, marker="_", color="black", s=120, zorder=3)
        ax.axhline(goal, color="gray", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(rows)), [f"c = {r['c']}" for r in rows])
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 100)
    axes[0][0].set_ylabel("% of sgemm peak, same run\n(bar: median; tick: best repeat)")
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"CPU blockwise build, m = c, one thread ({result['device'].get('host_cpu', 'CPU')}); "
                 f"dashed: the {goal:g}% goal", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny synthetic shapes (seconds)")
    p.add_argument("--data-root", default=os.path.join("..", "shared", "data"))
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--out", default=None, help="directory for cpu_fallback[_quick].json / .md")
    p.add_argument("--note", default="", help="free text for the report (e.g. 'host shared with other jobs')")
    p.add_argument("--plot", metavar="JSON", help="only draw <JSON without .json>.png from a cpu_fallback JSON")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="measure only these parts; the others are kept from an existing JSON in --out")
    args = p.parse_args(argv)
    if args.plot:
        with open(args.plot) as f:
            return {"plot": plot(json.load(f), os.path.splitext(args.plot)[0] + ".png")}
    device = torch.device("cpu")
    repeats = args.repeats or (2 if args.quick else 5)
    peak_n = 512 if args.quick else 2048
    result = {"device": cm.device_info(device), "note": args.note, "repeats": repeats}
    base = os.path.join(args.out or ".", "cpu_fallback" + ("_quick" if args.quick else ""))
    if set(args.parts) != set(PARTS) and args.out and os.path.exists(base + ".json"):
        with open(base + ".json") as f:
            result = dict(json.load(f), note=args.note or result["note"])
    sizes = [16, 32] if args.quick else [64, 128, 256]
    if "build" in args.parts:
        result["build"] = run_build(sizes, 2 ** 18 if args.quick else 2 ** 27, repeats, peak_n)
    if "cache" in args.parts and not args.quick:  # the kernel's own speed: warm L2, short calls, more repeats
        result["build_in_cache"] = run_build(sizes, 2 ** 21, 4 * repeats, peak_n, in_cache=True)
    if "lowrank" in args.parts:
        if args.quick:
            gen = torch.Generator().manual_seed(0)
            grads = {f"l{i}": torch.randn(40, 300 * (i + 1), generator=gen) * 0.05 for i in range(2)}
            weights = {n: torch.randn(g.shape[1], generator=gen) for n, g in grads.items()}
        else:
            grads, weights = resnet20_gradients(args.data_root, 1000)
        result["lowrank"] = run_lowrank(grads, weights, 1e-5, max(1, repeats // 2 + 1), peak_n)
    if "step" in args.parts and not args.quick:
        result["step"] = run_step(["mlpnet", "resnet20", "mobilenet"], 512, max(1, repeats // 2 + 1))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(base + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(base + ".md", "w") as f:
            f.write(markdown(result))
        if result.get("build"):
            plot(result, base + ".png")
    return result


if __name__ == "__main__":
    main()
