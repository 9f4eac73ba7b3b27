"""Side-by-side kernel benchmark: one run, ratios, device named, roofline.

    python -m benchmarks.side_by_side --full --out benchmarks/results    # GPU (H100 / H200)
    python -m benchmarks.side_by_side --out benchmarks/results           # CPU profile (scaled d)
    python -m benchmarks.side_by_side --quick                            # CI smoke run (< 60 s)

Sections: build of the blockwise inverse (baselines (a) paper loop, (b) einsum +
baddbmm per gradient, (c) torch fallback; low-rank path; fused CUDA / Triton kernels
on a GPU), k-buffered streaming updates, OBS statistics + update. Writes
``kernels_<device>.json``, ``kernels_<device>.md`` and ``roofline_<device>.png`` under
``--out`` (nothing is written in ``--quick`` mode unless ``--out`` is given).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import torch

from benchmarks import _common as cm
from benchmarks.bench_build import run_build
from benchmarks.bench_stream_stats import run_stats, run_streaming
from benchmarks.report import evaluate_targets, make_markdown

RESNET50_PARAMS = 25_557_032
BUILD_SHAPES = [(50, 1024), (64, 64), (128, 128), (128, 256), (256, 256), (1000, 80), (1000, 400),
                (10000, 400)]
STATS_SHAPES = [(128, 128, "dense"), (1000, 80, "dense"), (1000, 80, "lowrank"), (10000, 400, "lowrank")]

PROFILES = {
    # GPU: ResNet-50 size; blocks capped only by memory (and a generous time budget)
    "full": dict(d=RESNET50_PARAMS, shapes=BUILD_SHAPES, stream_c=[64, 128, 256], ks=[1, 8, 32],
                 stats=STATS_SHAPES, repeats=20, warmup=3, call_budget_s=5.0, ref_max_blocks=64,
                 mem_gb=None),
    # CPU: d scaled to 2^20 and ~1 s per timed call; anything larger is extrapolated
    "cpu": dict(d=2 ** 20, shapes=BUILD_SHAPES, stream_c=[64, 128], ks=[1, 8, 32], stats=STATS_SHAPES,
                repeats=5, warmup=1, call_budget_s=1.0, ref_max_blocks=8, mem_gb=3.0),
    # CI smoke test: tiny shapes, tiny budgets
    "quick": dict(d=4096, shapes=[(16, 32), (32, 8)], stream_c=[16], ks=[1, 4],
                  stats=[(16, 16, "dense"), (32, 8, "lowrank")], repeats=2, warmup=1,
                  call_budget_s=0.05, ref_max_blocks=2, mem_gb=0.25),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="ResNet-50-sized d (for the GPU machine)")
    mode.add_argument("--quick", action="store_true", help="tiny CI smoke run")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results, none for --quick)")
    p.add_argument("--d", type=int, default=None, help="override the nominal number of parameters")
    p.add_argument("--sections", default="build,stream,stats", help="comma list of build,stream,stats")
    p.add_argument("--damp", type=float, default=1e-5)
    p.add_argument("--grad-scale", type=float, default=1e-2, help="std of the random gradients")
    p.add_argument("--mem-gb", type=float, default=None, help="memory budget per method (GiB)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--note", action="append", default=[], help="extra note for the report")
    args = p.parse_args(argv)
    bad = set(args.sections.split(",")) - {"build", "stream", "stats"}
    if bad:
        p.error(f"--sections: unknown section(s) {sorted(bad)}")
    if args.d is not None and args.d < 1:
        p.error("--d must be >= 1")
    return args


def make_config(args, device):
    mode = "quick" if args.quick else ("full" if args.full or device.type == "cuda" else "cpu")
    prof = dict(PROFILES[mode])
    d = args.d or prof["d"]
    if args.mem_gb is not None:
        mem = args.mem_gb * 2 ** 30
    elif prof["mem_gb"] is not None:
        mem = prof["mem_gb"] * 2 ** 30
    elif device.type == "cpu":
        mem = PROFILES["cpu"]["mem_gb"] * 2 ** 30
    else:
        free, _ = torch.cuda.mem_get_info(device)
        mem = 0.8 * free
    return mode, prof, dict(mode=mode, d=d, damp=args.damp, grad_scale=args.grad_scale,
                            mem_bytes=mem, repeats=prof["repeats"], warmup=prof["warmup"],
                            call_budget_s=prof["call_budget_s"], ref_max_blocks=prof["ref_max_blocks"],
                            probe_blocks=1, check_error=True)


def best_peaks(start, end):
    """Ceilings for the roofline: the better of the start- and end-of-run measurements."""
    best = dict(start)
    for key in ("fp32_peak_tflops", "mem_bandwidth_gbs"):
        best[key] = max(start[key], end[key])
    best["method"] = start["method"] + "; best of the start- and end-of-run measurements"
    return best


def default_notes(device, mode):
    notes = []
    if device.type == "cpu":
        notes += [
            "CPU figures are for the torch fallback, the low-rank path and baselines (a), (b) only. "
            "The Triton backend is excluded on CPU: it would run in the Triton interpreter "
            "(TRITON_INTERPRET=1), a correctness tool whose speed means nothing. The CUDA kernels "
            "need a GPU. GPU figures: run `--full` on the GPU machine.",
            f"The host's cores are shared with other jobs (torch threads = {torch.get_num_threads()}); "
            "timings can be noisy and pessimistic.",
            "The paper loop (a) updates one block at a time, so a c x c inverse that fits in the CPU "
            "cache (4 MB at c = 1000) is never re-read from DRAM: its nominal GB/s can exceed the "
            "measured copy bandwidth.",
        ]
    if mode == "cpu":
        notes.append(f"d is scaled down to {PROFILES['cpu']['d']:,} parameters; any row whose `how` says "
                     "'extrapolated' ran on fewer blocks (and, for (a)/(b), possibly fewer gradients) "
                     "and was scaled linearly to all blocks of d and all m gradients.")
    return notes


def main(argv=None):
    args = parse_args(argv)
    cm.configure_precision()
    device = cm.pick_device(args.device)
    mode, prof, cfg = make_config(args, device)
    out_dir = args.out if args.out is not None else (None if mode == "quick" else "benchmarks/results")
    started = time.time()
    info = cm.device_info(device)
    print(f"[side_by_side] mode={mode} device={info['device_name']} d={cfg['d']:,}", flush=True)
    peaks = cm.measure_peaks(device, quick=mode == "quick")
    print(f"[side_by_side] peak {peaks['fp32_peak_tflops'] * 1e3:.4g} GFLOP/s, "
          f"bandwidth {peaks['mem_bandwidth_gbs']:.4g} GB/s", flush=True)

    def progress(rec):
        msg = rec.get("error") or f"{cm.human_time(rec['time_full_s'])} ({rec['how']})"
        shape = " ".join(f"{k}={rec[k]}" for k in ("c", "m", "k", "op") if k in rec)
        print(f"  [{rec['section']}] {shape} {rec.get('method', '')}: {msg}", flush=True)

    records = []
    sections = args.sections.split(",")
    if "build" in sections:
        records += run_build(prof["shapes"], cfg["d"], cfg, device, progress=progress)
    if "stream" in sections:
        records += run_streaming(prof["stream_c"], prof["ks"], cfg["d"], cfg, device, progress=progress)
    if "stats" in sections:
        records += run_stats(prof["stats"], cfg["d"], cfg, device, progress=progress)
    peaks_end = cm.measure_peaks(device, quick=mode == "quick")   # contention check on shared hosts
    result = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "device": info, "peaks": best_peaks(peaks, peaks_end), "peaks_start_of_run": peaks,
              "peaks_end_of_run": peaks_end, "config": cfg,
              "notes": default_notes(device, mode) + args.note,
              "flop_model": {"sequential_build": "4 m c^2 per block", "lowrank_build": "4 m^2 c + m^3/3 per block",
                             "stream_update": "4 k c^2 per block", "obs_update_dense": "2 c^2 per block",
                             "obs_update_lowrank": "4 m c per block", "obs_saliency": "3 c per block"},
              "byte_model": {"fused_build": "4 (m c + c^2) per block",
                             "per_gradient_forms": "4 m (2 c^2 + c) per block",
                             "lowrank_build": "4 (2 m c + c) per block", "stream_update": "4 (2 c^2 + k c)",
                             "obs_saliency": "12 c per block (diag, w, rho)",
                             "obs_update_dense": "4 (c^2 + 3 c) + c per block",
                             "obs_update_lowrank": "4 (m c + 4 c) + c per block"},
              "records": records, "wall_s": None}
    result["targets"] = evaluate_targets(result)
    result["wall_s"] = round(time.time() - started, 1)
    md = make_markdown(result)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        tag = device.type + ("_quick" if mode == "quick" else "")
        base = os.path.join(out_dir, f"kernels_{tag}")
        with open(base + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(base + ".md", "w") as f:
            f.write(md)
        if not args.no_plot:
            from benchmarks.roofline import plot_roofline
            plot_roofline(result, os.path.join(out_dir, f"roofline_{tag}.png"))
        print(f"[side_by_side] wrote {base}.json / .md in {result['wall_s']} s", flush=True)
    else:
        print(md)
    return result


if __name__ == "__main__":
    main()
