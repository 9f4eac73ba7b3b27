"""Shared benchmark helpers: device info, timing, machine peaks, flop/byte models, errors.

Timing is the median of repeats after warm-up; on CUDA it uses CUDA events around the
call (plus a synchronize before), on CPU ``time.perf_counter``. Float32 matmuls run
without TF32 (``allow_tf32 = False``) so every figure is a true float32 figure.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Dict, Optional, Sequence

import torch

FP32 = 4  # bytes per float32 entry


def configure_precision() -> None:
    """Plain float32 everywhere (no TF32) so that peaks and kernels are comparable."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; refuses ``cuda`` without a GPU."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but torch.cuda.is_available() is False")
    return torch.device(name)


def device_info(device: torch.device) -> Dict[str, object]:
    """Name and environment of the machine the figures come from."""
    info = {"device_type": device.type, "torch": torch.__version__,
            "python": platform.python_version(), "host_cpu": _cpu_name(),
            "cpu_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    sm_count=props.multi_processor_count)
        try:
            import triton
            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    else:
        info["device_name"] = info["host_cpu"]
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, *, repeats: int = 5, warmup: int = 1,
              setup: Optional[Callable[[], None]] = None, budget_s: Optional[float] = None) -> Dict:
    """Median wall time of ``fn()`` in seconds.

    ``setup`` (untimed) runs before every call, e.g. to restore an in-place target.
    With ``budget_s``, repeats are cut (to no fewer than 3) when one call is long.
    Returns ``{"median_s", "min_s", "times_s", "repeats"}``.
    """
    for i in range(warmup):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        sync(device)
        if budget_s is not None and time.perf_counter() - t0 > budget_s / 8:
            break                                   # long calls: one warm-up is enough
    sync(device)
    times = []
    while len(times) < repeats:
        if setup is not None:
            setup()
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if budget_s is not None and len(times) >= 3 and sum(times) > budget_s:
            break
    return {"median_s": statistics.median(times), "min_s": min(times),
            "times_s": [round(t, 7) for t in times], "repeats": len(times)}


def measure_peaks(device: torch.device, *, quick: bool = False) -> Dict[str, float]:
    """Measured float32 peak (large sgemm) and memory bandwidth (large copy) of ``device``.

    Bandwidth counts read + write bytes of ``dst.copy_(src)``.
    """
    configure_precision()
    if device.type == "cuda":
        n, numel = (2048, 2 ** 26) if quick else (8192, 2 ** 29)   # 2 GiB per copy buffer
    else:
        n, numel = (512, 2 ** 22) if quick else (2048, 2 ** 26)    # 256 MiB per copy buffer
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    t = time_call(lambda: torch.mm(a, b), device, repeats=3 if quick else 10, warmup=1)
    flops = 2.0 * n ** 3
    a = b = None                 # free the buffers (the timed lambda is done with them)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    tc = time_call(lambda: dst.copy_(src), device, repeats=3 if quick else 10, warmup=1)
    src = dst = None
    return {"fp32_peak_tflops": flops / t["min_s"] / 1e12, "sgemm_n": n,
            "mem_bandwidth_gbs": 2 * numel * FP32 / tc["min_s"] / 1e9,
            "copy_bytes": 2 * numel * FP32,
            "method": "best of repeats: torch.mm (n x n float32, TF32 off) and dst.copy_(src)"}


# ---- flop and byte models (per block; c = block size, m or k = gradients) -------------

def seq_flops(m: int, c: int) -> float:
    """Sequential Sherman-Morrison build: ~4 m c^2 (u = F^-1 g, then the rank-one update)."""
    return 4.0 * m * c * c


def lowrank_flops(m: int, c: int) -> float:
    """Low-rank build: ~4 m^2 c + m^3 / 3 (Gram G G^T, triangular solve, Cholesky)."""
    return 4.0 * m * m * c + m ** 3 / 3.0


def fused_build_bytes(m: int, c: int) -> float:
    """Minimum traffic of a fused build: read m gradients, write the c x c inverse once."""
    return FP32 * (m * c + c * c)


def per_gradient_bytes(m: int, c: int) -> float:
    """One einsum + one baddbmm per gradient: read and write the inverse m times."""
    return FP32 * m * (2 * c * c + c)


def lowrank_bytes(m: int, c: int) -> float:
    """Low-rank build: read grads, write the m x c factor and the diagonal."""
    return FP32 * (2 * m * c + c)


def stream_bytes(k: int, c: int) -> float:
    """k-buffered update: read + write the inverse once, read k gradients."""
    return FP32 * (2 * c * c + k * c)


def human_time(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


# ---- accuracy against a float64 reference ---------------------------------------------

def float64_apply_reference(grads: torch.Tensor, damp: float, num_samples: float,
                            probes: torch.Tensor) -> torch.Tensor:
    """F^-1 V in float64 by a Cholesky solve of the dense F (c <= 4096) per block.

    grads (S, m, c), probes (S, c, r) -> (S, c, r) float64. For larger c the c x c
    factorisation is replaced by the float64 Woodbury solve (exact in exact arithmetic).
    """
    g = grads.double()
    v = probes.double()
    s, m, c = g.shape
    if c <= 4096:
        fisher = torch.bmm(g.transpose(1, 2), g) / num_samples
        fisher.diagonal(dim1=1, dim2=2).add_(damp)
        return torch.cholesky_solve(v, torch.linalg.cholesky(fisher))
    gram = torch.bmm(g, g.transpose(1, 2))
    gram.diagonal(dim1=1, dim2=2).add_(num_samples * damp)
    inner = torch.cholesky_solve(torch.bmm(g, v), torch.linalg.cholesky(gram))
    return (v - torch.bmm(g.transpose(1, 2), inner)) / damp


def relative_error(approx: torch.Tensor, ref: torch.Tensor) -> float:
    """max over blocks of ||approx - ref||_F / ||ref||_F (blocks along dim 0)."""
    a = approx.double().flatten(1)
    r = ref.double().flatten(1)
    return float(((a - r).norm(dim=1) / r.norm(dim=1)).max())


def write_results(out_dir: str, stem: str, result: Dict, markdown: str) -> str:
    """Write ``<out_dir>/<stem>.json`` (``result``) and ``<stem>.md`` (``markdown``); returns the path stem."""
    import json
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, stem)
    with open(path + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(path + ".md", "w") as f:
        f.write(markdown)
    return path


def append_row(path: str, fields: Sequence[str], row: Dict) -> None:
    """Append ``row`` to the CSV ``path`` (columns ``fields``), writing the header when the file is new: a
    resumable sweep's one row per finished run. A file written before a column was added is rewritten once
    with the wider header (its old rows get that column empty), so rows never shift under the header."""
    import csv
    old_fields, rows = None, []
    if os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old_fields = list(reader.fieldnames or [])
            if old_fields and old_fields != list(fields):
                rows = list(reader)
    if old_fields and old_fields != list(fields):
        fields = old_fields + [k for k in fields if k not in old_fields]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        if not old_fields:
            writer.writeheader()
        writer.writerow(row)


def git_commit(root: Optional[str] = None) -> str:
    """Short commit of the checkout at ``root`` (default: this repository) the figures were made with, with
    "+changes" when tracked files differ from it; "" outside a git checkout."""
    import subprocess
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return ""
    dirty = subprocess.run(["git", "-C", root, "diff", "--quiet", "HEAD", "--", "python", "woodfisher_kernels"],
                           capture_output=True).returncode != 0
    return head.stdout.strip() + ("+changes" if dirty else "")


def sweep_parser(doc: str, models: Sequence[str], data_root: str, sparsities: Sequence[float],
                 seeds: Sequence[int]):
    """The arguments of an accuracy sweep over (sparsity, seed) on one model: ``--model``, ``--data-root``,
    ``--out`` (benchmarks/results), ``--sparsities``, ``--seeds`` and ``--report``; the caller adds its own."""
    import argparse
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--model", choices=sorted(models), default="mlpnet")
    p.add_argument("--data-root", default=data_root)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--sparsities", type=float, nargs="+", default=list(sparsities))
    p.add_argument("--seeds", type=int, nargs="+", default=list(seeds))
    p.add_argument("--report", action="store_true", help="only the report of the CSV (no runs)")
    return p
