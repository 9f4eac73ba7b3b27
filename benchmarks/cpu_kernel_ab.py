"""The C kernel of this checkout against the one of an earlier git revision, in paired runs.

Both libraries are compiled here from their csrc/cpu sources with the same compiler and flags
(``cc -O3 -Wno-psabi -shared -fPIC``), loaded side by side with ctypes and called on the same
inputs in alternation (before, after, before, ...), so that the host's changing speed falls on
both alike; the figure is the median over pairs of the after / before time ratio. The outputs
are allocated and written once before timing (mapped memory: the kernels' arithmetic and memory
traffic, not the operating system's page faults, which :mod:`benchmarks.cpu_fallback` records).

Cases: the blockwise build (``wf_woodbury_blocks``, m = c, K as ``woodfisher_kernels._cpu.chunk_size``)
at c = 64 / 128 / 256 with 2 MiB of inverses (in cache) and 128 MiB (main memory), and the
low-rank factor (``wf_lowrank_blocks``) at a default step's shape (m = 64, c = 256) and at
m = 128, c = 512. The two results are compared entry by entry (largest relative difference).

    OMP_NUM_THREADS=1 python -m benchmarks.cpu_kernel_ab --before 3d27703 --out benchmarks/results
Writes ``cpu_kernel_ab.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from typing import Dict, List

import torch

from benchmarks import _common as cm
from woodfisher_kernels import _cpu

SOURCES = ("woodbury_cpu.c", "woodbury_cpu_kernel.h", "lowrank_cpu_kernel.h")
FLAGS = ["-O3", "-Wno-psabi", "-shared", "-fPIC"]


def compile_library(rev: str, folder: str) -> ctypes.CDLL:
    """csrc/cpu of git revision ``rev`` (``"HEAD+"``: this working tree) compiled into ``folder``."""
    for name in SOURCES:
        path = os.path.join(folder, name)
        if rev == "HEAD+":
            shutil.copy(os.path.join("csrc", "cpu", name), path)
        else:
            with open(path, "w") as f:
                f.write(subprocess.run(["git", "show", f"{rev}:csrc/cpu/{name}"], check=True, capture_output=True,
                                       text=True).stdout)
    lib_path = os.path.join(folder, "kernel.so")
    subprocess.run([os.environ.get("CC", "cc"), *FLAGS, "-o", lib_path, os.path.join(folder, SOURCES[0]), "-lm"],
                   check=True)
    lib = ctypes.CDLL(lib_path)
    lib.wf_woodbury_blocks.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4 + [
        ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_double, ctypes.c_int]
    lib.wf_lowrank_blocks.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4 + [
        ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_double]
    return lib


def build_case(c: int, inverse_bytes: int) -> Dict:
    """Inputs, preallocated outputs and the call of one blockwise build."""
    blocks = max(1, inverse_bytes // (4 * c * c))
    grads = torch.randn(blocks, c, c, generator=torch.Generator().manual_seed(c))
    k = _cpu.chunk_size(c)

    def call(lib, out, bad):
        rc = lib.wf_woodbury_blocks(-1, grads.data_ptr(), None, out[0].data_ptr(), bad.data_ptr(), blocks, c, c,
                                    1e-2, float(c), k)
        assert rc == 0, rc

    outs = [(torch.ones(blocks, c, c),) for _ in range(2)]
    return {"label": f"build c = {c}, m = {c}, K = {k}, {blocks} blocks ({inverse_bytes >> 20} MiB)",
            "call": call, "outs": outs, "flops": 4.0 * c ** 3 * blocks}


def lowrank_case(m: int, c: int, blocks: int) -> Dict:
    """Inputs, preallocated outputs and the call of one low-rank factor."""
    grads = torch.randn(blocks, m, c, generator=torch.Generator().manual_seed(m + c))

    def call(lib, out, bad):
        rc = lib.wf_lowrank_blocks(-1, grads.data_ptr(), out[0].data_ptr(), out[1].data_ptr(), bad.data_ptr(),
                                   blocks, m, c, 1e-2, float(m))
        assert rc == 0, rc

    outs = [(torch.ones(blocks, m, c), torch.ones(blocks, c)) for _ in range(2)]
    return {"label": f"low-rank factor m = {m}, c = {c}, {blocks} blocks", "call": call, "outs": outs,
            "flops": (2.0 * m * m * c + m ** 3 / 3) * blocks}


def measure(case: Dict, libs: List[ctypes.CDLL], pairs: int) -> Dict:
    """Median seconds of each library and the median of the per-pair ratios after / before."""
    bad = torch.zeros(case["outs"][0][0].shape[0], dtype=torch.uint8)
    for lib, out in zip(libs, case["outs"]):
        case["call"](lib, out, bad)   # warm-up, and the outputs compared below
    diff = max(float(((a - b).abs().max() / b.abs().max())) for a, b in zip(*case["outs"]))
    times = [[], []]
    for _ in range(pairs):
        for which in (0, 1):
            t0 = time.process_time()
            case["call"](libs[which], case["outs"][which], bad)
            times[which].append(time.process_time() - t0)
    ratios = [a / b for a, b in zip(times[1], times[0])]
    before, after = statistics.median(times[0]), statistics.median(times[1])
    return {"case": case["label"], "before_s": before, "after_s": after, "speedup": 1.0 / statistics.median(ratios),
            "after_gflops": case["flops"] / after / 1e9, "before_gflops": case["flops"] / before / 1e9,
            "max_rel_difference": diff, "pairs": pairs}


def markdown(report: Dict) -> str:
    lines = [f"# C kernel: this checkout against {report['before']} (paired runs)", "",
             f"Device: {report['device']['host_cpu']}, torch {report['device']['torch']}, one thread. "
             f"{report['note']}", "",
             "Both kernels compiled here with the same flags, called in alternation on the same inputs "
             "(outputs already mapped: no page faults); CPU time, medians over pairs; speed-up = median "
             "of the per-pair time ratios.", "",
             f"| case | {report['before']} | this checkout | speed-up | GFLOP/s before / after | "
             "largest rel. difference of the outputs |", "|---|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['case']} | {cm.human_time(r['before_s'])} | {cm.human_time(r['after_s'])} | "
                     f"{r['speedup']:.2f}x | {r['before_gflops']:.1f} / {r['after_gflops']:.1f} | "
                     f"{r['max_rel_difference']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", required=True, help="git revision of the kernel to compare against")
    p.add_argument("--pairs", type=int, default=9)
    p.add_argument("--quick", action="store_true", help="small shapes, 2 pairs (smoke run)")
    p.add_argument("--out", default=None)
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    big, small = (1 << 22, 1 << 20) if args.quick else (1 << 27, 1 << 21)
    pairs = 2 if args.quick else args.pairs
    with tempfile.TemporaryDirectory() as tmp:
        libs = []
        for rev in (args.before, "HEAD+"):
            folder = os.path.join(tmp, rev.replace("+", "_"))
            os.makedirs(folder)
            libs.append(compile_library(rev, folder))
        cases = [build_case(c, size) for size in (small, big) for c in (64, 128, 256)]
        cases += [lowrank_case(64, 256, 64 if args.quick else 1044), lowrank_case(128, 512, 8 if args.quick else 128)]
        rows = []
        for case in cases:
            rows.append(measure(case, libs, pairs))
            r = rows[-1]
            print(f"[ab] {r['case']}: {r['speedup']:.2f}x ({r['before_gflops']:.1f} -> {r['after_gflops']:.1f} "
                  f"GFLOP/s), outputs differ by {r['max_rel_difference']:.1e}", flush=True)
            del case["outs"]
    report = {"before": args.before, "device": cm.device_info(torch.device("cpu")), "note": args.note, "rows": rows}
    if args.out:
        cm.write_results(args.out, "cpu_kernel_ab" + ("_quick" if args.quick else ""), report, markdown(report))
    return report


if __name__ == "__main__":
    main()
