"""Streaming (k-buffered) inverse updates, and OBS statistics + update over all blocks.

Streaming: ``woodbury_update_(inv, grads (B, k, c))`` for k in (1, 8, 32) on every
backend of the device, against baseline (b), one einsum + one baddbmm per gradient,
compared per gradient. Statistics: ``obs_saliency`` and ``obs_update`` on the dense
inverse (every backend) and on a ``LowRankInverse``. Like the build section, work
that does not fit the memory or time budget runs on fewer blocks and is extrapolated
(and labelled so).
"""
from __future__ import annotations

import inspect
from typing import Dict, List

import torch

import woodfisher_kernels as wk
from benchmarks import _common as cm
from benchmarks import baselines
from benchmarks.bench_build import _free, make_grads
from woodfisher_kernels import testing


def _no_check_kw(op) -> Dict:
    """``check_finite=False`` where the public op accepts it (validation passes untimed)."""
    return {"check_finite": False} if "check_finite" in inspect.signature(op).parameters else {}


def _impl(op_name: str, backend: str, inv):
    """The registered backend function itself, without the public op's validation."""
    fn = testing.implementation(op_name, backend)
    if op_name == "obs_saliency":
        return lambda inv, w, mask: fn(inv, w, None)
    return lambda inv, w, mask: fn(inv, w, mask, None)


def _backends(op: str, device) -> List[str]:
    """cuda / triton on a GPU, the C kernel on the CPU (where built), torch everywhere
    (the Triton interpreter is no timing)."""
    wanted = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
    return [b for b in wanted if b in wk.available_backends(op)]


def _blocks(d: int, c: int, per_block_bytes: float, cfg: Dict) -> int:
    full = wk.num_blocks(d, c)
    return max(1, min(full, int(cfg["mem_bytes"] // (1.3 * per_block_bytes)), cfg.get("max_blocks", full)))


def _record(section, name, c, extra, d, blocks, timing, flops_blk, bytes_blk, per=1, err=None):
    """JSON record; ``per`` divides the call time (gradients per call for streaming)."""
    full = wk.num_blocks(d, c)
    scale = full / blocks
    sec = timing["median_s"]
    rec = {"section": section, "method": name, "c": c, **extra, "d": d, "blocks_full": full,
           "blocks_measured": blocks, "scale": scale, "scaled": scale != 1,
           "how": "measured" if scale == 1 else f"extrapolated x{scale:.4g} from {blocks} of {full} blocks",
           "time_measured_s": sec, "time_full_s": sec * scale, "times_s": timing["times_s"],
           "time_per_gradient_full_s": sec * scale / per,
           "flops_per_block": flops_blk, "bytes_per_block": bytes_blk,
           "flops_measured": flops_blk * blocks, "bytes_measured": bytes_blk * blocks,
           "tflops": flops_blk * blocks / sec / 1e12, "gbs": bytes_blk * blocks / sec / 1e9,
           "rel_err_vs_float64": err}
    return rec


def _try(records, fn, section, name, c, extra, progress):
    try:
        rec = fn()
    except (RuntimeError, ValueError) as exc:
        rec = {"section": section, "method": name, "c": c, **extra,
               "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    records.append(rec)
    if progress is not None:
        progress(rec)


def run_streaming(block_sizes, ks, d: int, cfg: Dict, device, progress=None) -> List[Dict]:
    """k-buffered updates of the dense inverse vs one einsum + baddbmm per gradient."""
    records = []
    timing_kw = dict(repeats=cfg["repeats"], warmup=cfg["warmup"], budget_s=cfg["call_budget_s"] * 4)
    for c in block_sizes:
        kmax = max(ks)
        blocks = _blocks(d, c, cm.FP32 * (c * c + kmax * c + 4 * kmax * c), cfg)
        eye = torch.eye(c, device=device).div_(cfg["damp"])
        inv = eye.expand(blocks, c, c).contiguous()     # stays SPD under repeated updates
        grads = make_grads(blocks, kmax, c, device, cfg["grad_scale"])
        n = 1024.0
        base_k = min(8, kmax)

        def run_b():
            t = cm.time_call(lambda: baselines.batched_einsum_update_(inv, grads[:, :base_k], n),
                             device, **timing_kw)
            return _record("stream", "einsum_baddbmm", c, {"k": base_k}, d, blocks, t,
                           cm.seq_flops(base_k, c), cm.per_gradient_bytes(base_k, c), per=base_k)

        _try(records, run_b, "stream", "einsum_baddbmm", c, {"k": base_k}, progress)
        b_per_grad = records[-1].get("time_per_gradient_full_s")
        for backend in _backends("woodbury_update_", device):
            for k in ks:
                def run_k(k=k, backend=backend):
                    g = grads[:, :k].contiguous()
                    t = cm.time_call(lambda: wk.woodbury_update_(inv, g, n, backend=backend,
                                                                 check_finite=False), device, **timing_kw)
                    rec = _record("stream", backend, c, {"k": k}, d, blocks, t,
                                  cm.seq_flops(k, c), cm.stream_bytes(k, c), per=k)
                    if b_per_grad:
                        rec["speedup_vs"] = {"einsum_baddbmm": b_per_grad / rec["time_per_gradient_full_s"]}
                    return rec
                _try(records, run_k, "stream", backend, c, {"k": k}, progress)
        inv = grads = eye = None
        _free(device)
    return records


def _stats_inputs(blocks, c, m, cfg, device, lowrank: bool):
    grads = make_grads(blocks, m, c, device, cfg["grad_scale"])
    if lowrank:
        inv = wk.lowrank_inverse(grads, cfg["damp"], check_finite=False)
    else:
        inv = wk.fisher_inverse(grads, cfg["damp"], backend="torch", check_finite=False)
    gen = torch.Generator(device=device).manual_seed(2)
    weights = torch.randn(blocks, c, device=device, generator=gen)
    mask = torch.rand(blocks, c, device=device, generator=gen) < 0.5
    return grads, inv, weights, mask


def _stats_error(op, inv, grads, weights, mask, cfg, out) -> float:
    """Relative error on 4 sampled blocks against the same formula evaluated in float64."""
    b = weights.shape[0]
    idx = torch.linspace(0, b - 1, min(4, b)).round().long().unique().to(weights.device)
    w64 = weights[idx].double()
    if isinstance(inv, torch.Tensor):
        inv64 = inv[idx].double()
    else:
        inv64 = wk.LowRankInverse(grads[idx].double(), cfg["damp"], float(grads.shape[1]))
    if op == "obs_saliency":
        ref = wk.obs_saliency(inv64, w64, backend="torch")
    else:
        ref = wk.obs_update(inv64, w64, mask[idx], backend="torch")
    return cm.relative_error(out[idx], ref)


def run_stats(shapes, d: int, cfg: Dict, device, progress=None) -> List[Dict]:
    """obs_saliency and obs_update on all blocks; shapes are (c, m, form)."""
    records = []
    timing_kw = dict(repeats=cfg["repeats"], warmup=cfg["warmup"], budget_s=cfg["call_budget_s"] * 4)
    for c, m, form in shapes:
        lowrank = form == "lowrank"
        per_block = cm.FP32 * ((3 * m * c + 4 * m * m) * 2 if lowrank else (c * c + m * c + 4 * c * c))
        blocks = _blocks(d, c, per_block, cfg)
        try:
            grads, inv, weights, mask = _stats_inputs(blocks, c, m, cfg, device, lowrank)
        except (RuntimeError, ValueError) as exc:
            records.append({"section": "stats", "c": c, "m": m, "form": form,
                            "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            continue
        backends = ["torch"] if lowrank else _backends("obs_update", device)
        extra = {"m": m, "form": form}
        # nominal costs per block (float32): saliency reads diag, w, writes rho
        costs = {"obs_saliency": (3.0 * c, cm.FP32 * 3 * c)}
        if lowrank:   # F^-1 v from the m x c factor
            costs["obs_update"] = (4.0 * m * c, cm.FP32 * (m * c + 4 * c) + c)
        else:
            costs["obs_update"] = (2.0 * c * c, cm.FP32 * (c * c + 3 * c) + c)
        for backend in backends:
            for op_name in ("obs_saliency", "obs_update"):
                op = getattr(wk, op_name)
                kw = {} if lowrank else {"backend": backend, **_no_check_kw(op)}
                variants = [("lowrank" if lowrank else backend,
                             lambda op=op, kw=kw: op(inv, weights, *([mask] if op is wk.obs_update else []), **kw))]
                if not lowrank and not _no_check_kw(op):
                    # the public op validates (a full isfinite pass over inv); time the kernel alone too
                    impl = _impl(op_name, backend, inv)
                    variants.append((f"{backend} (impl only)", lambda impl=impl: impl(inv, weights, mask)))
                for name, call in variants:
                    def run(call=call, name=name, op_name=op_name):
                        holder = {}
                        t = cm.time_call(lambda: holder.__setitem__("o", call()), device, **timing_kw)
                        err = _stats_error(op_name, inv, grads, weights, mask, cfg, holder["o"])
                        return _record("stats", name, c, {**extra, "op": op_name}, d, blocks, t,
                                       *costs[op_name], err=err)
                    _try(records, run, "stats", name, c, {**extra, "op": op_name}, progress)
        grads = inv = weights = mask = None
        _free(device)
    return records
