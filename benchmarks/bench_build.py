"""Build of the blockwise inverse from m gradients: every method side by side.

Methods: (a) the paper's reference loop, (b) the per-gradient einsum + baddbmm form,
(c) this package's torch fallback, the low-rank path, and the fused CUDA / Triton
kernels when they are available on the device. Each method runs on as many blocks of
the nominal model size ``d`` as memory and the per-call time budget allow; anything
run on fewer blocks (or, for the per-gradient baselines, on a prefix of the gradients)
is extrapolated linearly and labelled as such in the record.
"""
from __future__ import annotations

import gc
from typing import Callable, Dict, List, Optional

import torch

import woodfisher_kernels as wk
from benchmarks import _common as cm
from benchmarks import baselines
from woodfisher_kernels import LowRankInverse


class Method:
    """One way to build the inverse: how to run it and what it costs per block."""

    def __init__(self, name: str, label: str, run: Callable, flops: Callable, bytes_: Callable,
                 mem: Callable, per_gradient: bool = False):
        self.name, self.label, self.run = name, label, run
        self.flops, self.bytes, self.mem = flops, bytes_, mem
        self.per_gradient = per_gradient   # time is linear in the number of gradients


def _torch_mem(m, c):
    k = min(m, max(c, 16))
    return cm.FP32 * (c * c + m * c + 2 * k * c + 2 * k * k)


def build_methods(device: torch.device, damp: float) -> List[Method]:
    """Methods runnable on ``device`` (fused kernels only on CUDA: the Triton
    interpreter on CPU is a correctness tool, not a timing)."""
    def dense_mem(m, c):
        return cm.FP32 * (c * c + m * c + 3 * c)

    methods = [
        Method("ref_loop", "(a) paper loop: per block, per gradient",
               lambda g, n: baselines.reference_loop_inverse(g, damp, n),
               cm.seq_flops, cm.per_gradient_bytes, dense_mem, per_gradient=True),
        Method("einsum_baddbmm", "(b) per gradient: einsum + baddbmm",
               lambda g, n: baselines.batched_einsum_inverse(g, damp, n),
               cm.seq_flops, cm.per_gradient_bytes, dense_mem, per_gradient=True),
        Method("torch", "(c) package torch fallback (fisher_inverse)",
               lambda g, n: wk.fisher_inverse(g, damp, n, backend="torch", check_finite=False),
               cm.seq_flops, cm.fused_build_bytes, _torch_mem),
        Method("lowrank", "low-rank path (lowrank_inverse)",
               lambda g, n: wk.lowrank_inverse(g, damp, n, check_finite=False),
               cm.lowrank_flops, cm.lowrank_bytes,
               lambda m, c: 24 * m * c + 16 * m * m + 12 * c),
    ]
    if device.type == "cuda":
        for backend in ("cuda", "triton"):
            if backend in wk.available_backends("fisher_inverse"):
                methods.append(Method(
                    backend, f"fused {backend} kernel (fisher_inverse backend={backend!r})",
                    lambda g, n, b=backend: wk.fisher_inverse(g, damp, n, backend=b, check_finite=False),
                    cm.seq_flops, cm.fused_build_bytes, lambda m, c: 1.1 * dense_mem(m, c)))
    return methods


def make_grads(blocks: int, m: int, c: int, device, scale: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(blocks, m, c, device=device, generator=gen).mul_(scale)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _apply(out, idx: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """Sampled blocks of the built inverse applied to probes (S, c, r)."""
    if isinstance(out, LowRankInverse):
        sub = out.select(idx)
        return sub.matmat(probes)
    return torch.bmm(out[idx], probes)


def accuracy(out, grads: torch.Tensor, damp: float, n: float, samples: int = 4) -> float:
    """max relative error of F^-1 V on ``samples`` blocks vs a float64 solve (4 probes)."""
    b, _, c = grads.shape
    idx = torch.linspace(0, b - 1, min(samples, b)).round().long().unique().to(grads.device)
    gen = torch.Generator(device=grads.device).manual_seed(1)
    probes = torch.randn(len(idx), c, 4, device=grads.device, generator=gen, dtype=grads.dtype)
    ref = cm.float64_apply_reference(grads[idx], damp, n, probes)
    return cm.relative_error(_apply(out, idx, probes), ref)


def _probe(meth: Method, blocks: int, grads: int, c: int, n: float, cfg: Dict, device) -> float:
    """Seconds per block of a warm call on ``blocks`` blocks and ``grads`` gradients."""
    g = make_grads(blocks, grads, c, device, cfg["grad_scale"])
    t = cm.time_call(lambda: meth.run(g, n), device, repeats=2, warmup=1)["min_s"]
    g = None
    _free(device)
    return t / blocks


def run_method(meth: Method, c: int, m: int, d: int, cfg: Dict, device) -> Dict:
    """Time one method on one shape; returns a JSON record (see module docstring)."""
    full_blocks = wk.num_blocks(d, c)
    cap_mem = max(1, int(cfg["mem_bytes"] // (1.2 * meth.mem(m, c))))
    blocks = min(full_blocks, cap_mem, cfg.get("max_blocks", full_blocks))
    if meth.name == "ref_loop":
        blocks = min(blocks, cfg["ref_max_blocks"])
    n = float(m)
    budget = cfg["call_budget_s"]
    grads_used = m
    if meth.name == "einsum_baddbmm":
        # batched over blocks, sequential over gradients: keep every block that fits and
        # time a prefix of the gradients (time is linear in the number of gradients)
        per_grad = _probe(meth, blocks, 2, c, n, cfg, device) * blocks / 2
        if per_grad > budget:
            blocks = max(1, int(blocks * budget / per_grad))
            per_grad = budget
        grads_used = max(1, min(m, int(budget / per_grad)))
    elif meth.name == "ref_loop":
        # Python loop: cost per (block, gradient) is constant, so scale both ways
        per_unit = _probe(meth, 1, min(m, 4), c, n, cfg, device) / min(m, 4)
        units = max(1, int(budget / per_unit))
        grads_used = min(m, units)
        blocks = max(1, min(blocks, units // m))
    else:
        per_block = _probe(meth, 1, m, c, n, cfg, device)
        guess = int(budget / per_block)
        if guess >= 8 and blocks >= 8:                       # refine past launch overheads
            nb = min(blocks, guess // 4)
            per_block = _probe(meth, nb, m, c, n, cfg, device)
        blocks = max(1, min(blocks, int(budget / per_block)))
    g = make_grads(blocks, grads_used, c, device, cfg["grad_scale"])
    holder = {}

    def call():
        holder["out"] = meth.run(g, n)

    timing = cm.time_call(call, device, repeats=cfg["repeats"], warmup=cfg["warmup"],
                          budget_s=cfg["call_budget_s"] * 4)
    err = accuracy(holder.pop("out"), g, cfg["damp"], n) if cfg["check_error"] else None
    g = None
    _free(device)
    scale = (full_blocks / blocks) * (m / grads_used)
    flops = meth.flops(grads_used, c) * blocks
    nbytes = meth.bytes(grads_used, c) * blocks
    sec = timing["median_s"]
    label = "measured" if scale == 1 else (
        f"extrapolated x{scale:.4g} from {blocks} of {full_blocks} blocks"
        + ("" if grads_used == m else f" and {grads_used} of {m} gradients"))
    return {"section": "build", "c": c, "m": m, "method": meth.name, "label": meth.label,
            "d": d, "blocks_full": full_blocks, "blocks_measured": blocks,
            "grads_measured": grads_used, "scale": scale, "scaled": scale != 1, "how": label,
            "time_measured_s": sec, "time_full_s": sec * scale, "times_s": timing["times_s"],
            "flops_per_block": meth.flops(m, c), "bytes_per_block": meth.bytes(m, c),
            "flops_measured": flops, "bytes_measured": nbytes,
            "tflops": flops / sec / 1e12, "gbs": nbytes / sec / 1e9,
            "rel_err_vs_float64": err}


def run_build(shapes, d: int, cfg: Dict, device, methods: Optional[List[Method]] = None,
              progress=None) -> List[Dict]:
    """All methods on all (c, m) shapes; speed-ups against (a), (b), (c) added per shape."""
    methods = methods or build_methods(device, cfg["damp"])
    records = []
    for c, m in shapes:
        shape_recs = []
        for meth in methods:
            if meth.name in cfg.get("skip", ()):
                continue
            try:
                rec = run_method(meth, c, m, d, cfg, device)
            except (RuntimeError, ValueError) as exc:   # OOM, unsupported shape, ...
                rec = {"section": "build", "c": c, "m": m, "method": meth.name,
                       "label": meth.label, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                _free(device)
            shape_recs.append(rec)
            if progress is not None:
                progress(rec)
        base = {r["method"]: r["time_full_s"] for r in shape_recs if "time_full_s" in r}
        for r in shape_recs:
            if "time_full_s" in r:
                r["speedup_vs"] = {k: base[k] / r["time_full_s"]
                                   for k in ("ref_loop", "einsum_baddbmm", "torch") if k in base}
        records.extend(shape_recs)
    return records
