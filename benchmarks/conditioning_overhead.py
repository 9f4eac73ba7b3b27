"""Cost of the conditioning check (kappa, float64 recompute) on every blockwise path: ResNet-20, CPU.

Phase one (:func:`woodfisher.estimate_curvature`) of a well-conditioned ResNet-20 case on each path --
in memory, offloaded (``inverse_form="offload"``), streamed with a fixed damp and with
``damp="auto"``, sharded over 2 gloo processes -- timed with this checkout's ``woodfisher`` and
with another checkout's (``--base``: e.g. main, where only the in-memory path has the check), in
subprocesses with ``PYTHONPATH=<checkout>/python`` and the same installed kernels. Each figure is
the fastest of ``--repeats`` interleaved runs (the machine may be shared); the seconds spent in
the check itself (its functions, timed in this checkout's runs) are reported beside.

    OMP_NUM_THREADS=1 python benchmarks/conditioning_overhead.py --base /path/to/main \\
        --out benchmarks/results/conditioning_overhead
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
import warnings

import torch

PATHS = ("memory", "offload", "stream", "stream_auto", "sharded")
OPTS = dict(num_grads=128, block_size=64, progress=False)


def _shared():
    """The shared data folder (CIFAR-10, trained ResNet-20), or None (random inputs, initial weights)."""
    root = os.environ.get("WOODFISHER_BENCH_DATA")
    ok = root and os.path.isfile(os.path.join(root, "checkpoints", "resnet20_cifar10.pth.tar"))
    return root if ok else None


def _data(n=OPTS["num_grads"], batch=16, part=None, world=1):
    if _shared():
        from woodfisher.data import load_cifar10
        x, y = load_cifar10(os.path.join(_shared(), "cifar-10-batches-py"), "test")[:n]
    else:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    batches = [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]
    return batches if part is None else batches[part::world]


def _model():
    from woodfisher.models import resnet20
    torch.manual_seed(0)
    model = resnet20()
    if _shared():
        from woodfisher.checkpoint import load_checkpoint
        load_checkpoint(model, os.path.join(_shared(), "checkpoints", "resnet20_cifar10.pth.tar"))
    return model.eval()


_CHECK = {"seconds": 0.0, "depth": 0}
#: the functions of the check, wherever a path calls them (names absent from a checkout are skipped)
CHECK_FUNCTIONS = [("woodfisher.conditioning", "refine_dense"), ("woodfisher.offload", "refine_dense"),
                   ("woodfisher.streaming", "refine_dense"), ("woodfisher.streaming", "_second_pass"),
                   ("woodfisher.streaming", "_gram_conditioning"), ("woodfisher.distributed.estimate", "_conditioning")]


def _timed(fn, when=lambda *a, **k: True):
    def wrapper(*args, **kwargs):
        if _CHECK["depth"] or not when(*args, **kwargs):
            return fn(*args, **kwargs)
        _CHECK["depth"] += 1
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _CHECK["seconds"] += time.perf_counter() - start
            _CHECK["depth"] -= 1
    return wrapper


def _instrument():
    """Count the seconds spent in the check: its functions, and the Frobenius bounds taken outside them."""
    import importlib

    import woodfisher_kernels as wk
    for module, name in CHECK_FUNCTIONS:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if hasattr(mod, name):
            setattr(mod, name, _timed(getattr(mod, name)))
    wk.condition_estimate = _timed(wk.condition_estimate, lambda *a, **k: k.get("upper", False))


def _once(path, damp):
    import woodfisher as wf
    opts = dict(OPTS, damp="auto" if path == "stream_auto" else damp)
    if path == "offload":
        opts.update(inverse_form="offload", memory_budget=2 ** 30)
    elif path.startswith("stream"):
        opts.update(inverse_form="stream")
    model, data = _model(), _data()
    _CHECK["seconds"] = 0.0
    start = time.perf_counter()
    curv = wf.estimate_curvature(model, data, **opts)
    return time.perf_counter() - start, _CHECK["seconds"], curv


def _rank(rank, world, port, damp, queue):
    import torch.distributed as dist

    import woodfisher as wf
    warnings.simplefilter("ignore")
    _instrument()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, data = _model(), _data(part=rank, world=world)
        dist.barrier()
        start = time.perf_counter()
        curv = wf.estimate_curvature(model, data, **dict(OPTS, damp=damp))
        queue.put((rank, time.perf_counter() - start, _CHECK["seconds"], curv.kappa, curv.refined))
    finally:
        dist.destroy_process_group()


def _sharded(damp, world=2):
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(r, world, port, damp, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out = sorted(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    slow = max(out, key=lambda o: o[1])
    return slow[1], slow[2], out[0][3], out[0][4]


def run(scale: float) -> dict:
    """{path: {seconds, check_seconds, kappa, refined}} of one run with the importable ``woodfisher``,
    damp = scale x auto."""
    warnings.simplefilter("ignore")
    _instrument()
    damp = scale * _once("memory", "auto")[2].damp   # a fixed value for every path but stream_auto
    out = {"damp": damp}
    for path in PATHS:
        if path == "sharded":
            seconds, check, kappa, refined = _sharded(damp)
        else:
            seconds, check, curv = _once(path, damp)
            kappa, refined = curv.kappa, curv.refined
        out[path] = {"seconds": seconds, "check_seconds": check, "kappa": kappa, "refined": refined}
    return out


def _measure(checkout, scale):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.join(checkout, "python"), env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--run", "--damp-scale", str(scale)]
    res = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _fastest(runs):
    """Per path, the run with the fewest seconds (the machine is shared: the others were disturbed)."""
    out = {"damp": runs[0]["damp"]}
    for path in PATHS:
        out[path] = min((r[path] for r in runs), key=lambda v: v["seconds"])
    return out


def _markdown(new, base, meta) -> str:
    lines = [f"# Conditioning check: cost per blockwise path (ResNet-20, {meta['device']})", "",
             f"{meta['date']}; torch {meta['torch']}; OMP_NUM_THREADS={meta['threads']}; fastest of "
             f"{meta['repeats']} runs; a shared 2-core machine (other jobs running), so differences of a few "
             f"percent are noise. Phase one (`estimate_curvature`) of ResNet-20 (272k pruned weights), {meta['case']}, "
             f"num_grads={OPTS['num_grads']}, block_size={OPTS['block_size']} (dense blocks), "
             f"damp {new['damp']:.3g} = {meta['damp_scale']:g} x the damp='auto' value (stream_auto: 'auto'); "
             "sharded: 2 gloo processes, the slower rank. `base`: the same run with the base checkout's "
             "woodfisher (no check on the offloaded, streamed and sharded paths). Columns kappa/refined: "
             "layers with a kappa recorded, blocks recomputed in float64 (this checkout).", "",
             "| path | base s | this s | this / base | check s (this) | check share | kappa | refined |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for path in PATHS:
        b, n = base[path]["seconds"] if base else float("nan"), new[path]["seconds"]
        check = new[path]["check_seconds"]
        lines.append(f"| {path} | {b:.2f} | {n:.2f} | {n / b:.2f} | {check:.3f} | {100 * check / n:.1f}% | "
                     f"{len(new[path]['kappa'])} | {sum(new[path]['refined'].values())} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base", default=None, help="another checkout to compare with (its python/ is used)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--damp-scale", type=float, default=1.0,
                        help="damp = this x the damp='auto' value (fixed; stream_auto always uses 'auto')")
    parser.add_argument("--out", default=None, help="path prefix of the .json / .md results")
    parser.add_argument("--data", default=None, help="the shared data folder (trained ResNet-20, CIFAR-10); "
                        "default ../shared/data or ../../shared/data when present, else random inputs")
    args = parser.parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for root in [args.data] if args.data else [os.path.join(here, "..", "shared", "data"),
                                               os.path.join(here, "..", "..", "shared", "data")]:
        if os.path.isdir(root):
            os.environ["WOODFISHER_BENCH_DATA"] = os.path.abspath(root)
            break
    if args.run:
        print(json.dumps(run(args.damp_scale)))
        return
    news, bases = [], []
    for _ in range(args.repeats):   # interleaved, so that both see the same load of the shared machine
        news.append(_measure(here, args.damp_scale))
        if args.base:
            bases.append(_measure(args.base, args.damp_scale))
    new, base = _fastest(news), (_fastest(bases) if bases else None)
    meta = {"device": f"CPU {platform.processor() or platform.machine()}", "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "threads": os.environ.get("OMP_NUM_THREADS", "1"),
            "repeats": args.repeats, "damp_scale": args.damp_scale,
            "case": ("the trained checkpoint on the first CIFAR-10 test images" if _shared() else
                     "initial weights on random CIFAR-shaped inputs")}
    text = _markdown(new, base, meta)
    print(text)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump({"meta": meta, "this": new, "base": base, "runs": {"this": news, "base": bases}}, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
