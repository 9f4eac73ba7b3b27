"""Cost model behind ``backend="auto"`` on CUDA float32 tensors.

:func:`rank` orders the candidate backends of an op for one call, best first, and drops
any predicted to be more than ``MAX_SLOWDOWN`` (2x) slower than the best one.

The model is a roofline per kernel (:func:`predict`), with the flop / byte counts of
:func:`woodfisher_kernels.lowrank.choose_form` (a dense build or update of k gradients costs
``4 k c^2`` flops per block) refined by what each implementation really executes:

* ``cuda`` (csrc/): register-blocked rank-K chunks of up to 32 gradients. Shared-memory
  kernel while the block fits (F read once, written once, not read from I / damp; U = F G^T
  skipped on the first chunk from I / damp; the F update touches the upper 64 x 64 macro
  tiles only); tiled kernel beyond (F streamed from L2 / HBM 2.5 times per chunk, one CTA
  per block, so B < #SMs leaves SMs idle).
* ``triton``: register variant for padded ``C <= 64`` (chunks of 16 padded to C, or rank-one
  steps for k <= 4), tiled variant beyond (32 x 32 tiles, chunks of 16 / 32, F streamed 3
  times per chunk).
* ``torch`` (reference.py): chunks of max(c, 16) gradients as batched cuBLAS products, a
  batched Cholesky and triangular solve: ~7 c^3 flops per chunk of c gradients for the
  nominal 4 c^3, F read and written by separate kernels, ~10 launches per chunk.

``EFFICIENCY`` (the fraction of the float32 FMA peak an implementation's inner loops reach) is
an estimate, not a measurement: the CUDA kernels' hot loops issue 16 FFMA per 2 vector shared
loads (SASS, benchmarks/results/kernels_static.md), discounted for barriers, the serial K x K
factorisation and (tiled) one CTA per SM; Triton's FMA-based ``tl.dot`` and cuBLAS batched
small GEMMs get lower figures. No GPU has run the kernels yet: ``scripts/gpu_check.sh`` measures
them, and the constants should then be replaced by measured values. The occupancy, shared
memory and kernel paths used here are checked against the build in CI
(``python -m benchmarks.static_model --check``).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

PREFERENCE = ("cuda", "triton", "torch")
MAX_SLOWDOWN = 2.0
WOODBURY_OPS = ("woodbury_update_", "fisher_inverse")


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    sms: int
    fp32_flops: float      # FMA peak, non-tensor
    hbm_bytes_s: float
    l2_bytes: float
    l2_bytes_s: float
    smem_optin: int = 232448   # bytes per block after opt-in (sm_90)
    launch_s: float = 5e-6


H100 = DeviceSpec("NVIDIA H100 SXM", 132, 67e12, 3.35e12, 50 * 2**20, 10e12)
H200 = DeviceSpec("NVIDIA H200", 132, 67e12, 4.8e12, 50 * 2**20, 10e12)


@functools.lru_cache(maxsize=8)
def _spec_for(name: str, sms: int) -> DeviceSpec:
    base = H200 if "H200" in name else H100
    scale = sms / base.sms  # other GPUs: Hopper rates per SM (a ranking needs ratios, not absolutes)
    return DeviceSpec(name, sms, base.fp32_flops * scale, base.hbm_bytes_s * scale, base.l2_bytes,
                      base.l2_bytes_s * scale)


def device_spec(device: Optional[torch.device]) -> DeviceSpec:
    """Peak rates of ``device`` (H100 / H200 datasheet figures; Hopper per-SM rates otherwise)."""
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return H100
    props = torch.cuda.get_device_properties(torch.device(device))
    return _spec_for(props.name, props.multi_processor_count)


# --------------------------------------------------------------------------- kernel geometry

def chunk_width(k: int) -> int:
    """CUDA chunk width: min(k, 32) rounded up to a multiple of 4 (csrc/woodbury_internal.h)."""
    return 4 * math.ceil(min(max(k, 1), 32) / 4)


def cuda_shared_smem(c: int, kk: int) -> int:
    """Dynamic shared memory (bytes) of the CUDA shared-memory kernel (csrc/woodbury_shared.cu)."""
    ld = 4 * math.ceil(c / 4)
    return 4 * (ld * ld + max(ld * (kk + 4), 2 * kk * (kk + 1)) + kk * ld + kk * (kk + 4) + kk)


def cuda_tiled_smem(c: int, kk: int) -> int:
    """Dynamic shared memory (bytes) of the CUDA tiled kernel (csrc/woodbury_tiled.cu)."""
    ld = 4 * math.ceil(c / 4)
    return 4 * (kk * ld + 2 * 32 * 128 + 2 * 32 * (kk + 4) + kk * (kk + 4) + kk)


def ctas_per_sm(smem: int, regs: int, threads: int) -> int:
    """Resident CTAs per SM on sm_90 (228 KiB shared memory, 1 KiB reserved per CTA, 64 K registers)."""
    by_smem = (228 * 1024) // (smem + 1024)
    by_regs = 65536 // (threads * 8 * math.ceil(regs / 8))
    return max(0, min(by_smem, by_regs, 2048 // threads, 32))


def cuda_path(c: int, k: int, spec: DeviceSpec = H100) -> str:
    """``"shared"`` or ``"tiled"``: the kernel csrc/woodbury.cu runs for (c, k)."""
    return "shared" if cuda_shared_smem(c, chunk_width(k)) <= spec.smem_optin else "tiled"


def _chunks(k: int, width: int) -> List[int]:
    return [min(width, k - s) for s in range(0, max(k, 1), width)]


def _upper_macro_fraction(c: int, tile: int = 64) -> float:
    """Share of the c x c entries (padded to macro tiles) in the upper macro tiles."""
    t = math.ceil(c / tile)
    return (t * (t + 1) / 2) * tile * tile / (c * c)


# --------------------------------------------------------------------------- per-path models

@dataclass
class Prediction:
    seconds: float
    flops: float          # nominal (4 k c^2 per block for the Woodbury ops)
    executed: float       # flops the implementation executes
    bytes: float          # bytes moved through device memory
    bound: str            # "compute" | "memory" | "launch"


# Fraction of the FMA peak reached by the inner loops (estimates, see the module docstring).
EFFICIENCY = {"cuda_shared": 0.70, "cuda_tiled": 0.55, "triton_reg": 0.40, "triton_tiled": 0.35,
              "torch_small": 0.25, "torch": 0.60}
# Fraction of HBM bandwidth: DRAM_EFFICIENCY at best; the CUDA kernels are further limited by the
# bytes each SM keeps in flight (Little's law over DRAM_LATENCY_S); Triton and torch: estimates.
DRAM_EFFICIENCY = 0.9
DRAM_LATENCY_S = 700e-9
BANDWIDTH_EFFICIENCY = {"cuda": DRAM_EFFICIENCY, "triton": 0.80, "torch": 0.75}
# 16-byte loads in flight per thread: the shared kernel's block copy (kCopyBatch), the tiled
# kernel's prefetched 4 x 4 tile.
CUDA_LOADS_IN_FLIGHT = {"shared": 4, "tiled": 4}


def little_fraction(spec: DeviceSpec, inflight_bytes_per_sm: float) -> float:
    """Share of HBM bandwidth that ``inflight_bytes_per_sm`` outstanding bytes per SM sustain."""
    needed = spec.hbm_bytes_s / spec.sms * DRAM_LATENCY_S
    return min(1.0, inflight_bytes_per_sm / needed)


def _roofline(spec, blocks, slots, executed, nominal, hbm_bytes, reread_bytes, eff, bw_eff, launches):
    """Time of ``blocks`` independent blocks on ``slots`` resident CTAs / programs. Per block:
    ``executed`` flops, ``hbm_bytes`` compulsory traffic (each input read once, each output
    written once) and ``reread_bytes`` more that hits L2 while the resident blocks fit in it."""
    waves = math.ceil(blocks / slots) if slots else 1
    fill = blocks / (waves * slots) if slots else 1.0        # tail / idle-SM effect
    t_flop = executed * blocks / (spec.fp32_flops * eff * fill)
    working_set = hbm_bytes * min(blocks, slots or blocks)
    if reread_bytes and working_set > spec.l2_bytes:
        hbm_bytes, reread_bytes = hbm_bytes + reread_bytes, 0.0
    t_mem = max(hbm_bytes * blocks / (spec.hbm_bytes_s * bw_eff),
                (hbm_bytes + reread_bytes) * blocks / (spec.l2_bytes_s * bw_eff))
    t_launch = launches * spec.launch_s
    seconds = max(t_flop, t_mem) + t_launch
    bound = "launch" if t_launch > max(t_flop, t_mem) else ("compute" if t_flop >= t_mem else "memory")
    return Prediction(seconds, nominal * blocks, executed * blocks, (hbm_bytes + reread_bytes) * blocks, bound)


def _compulsory(c, k, init):
    return 4.0 * c * c * (1 if init else 2) + 4.0 * k * c


def _cuda_woodbury(spec, b, c, k, init):
    kk = chunk_width(k)
    nominal = 4.0 * k * c * c
    ex, reread = 0.0, 0.0
    for i, kc in enumerate(_chunks(k, kk)):
        first = init and i == 0
        ex += (0.0 if first else 2.0 * c * c * kk) + 2.0 * c * kk * kk + 2.0 * c * c * kc * _upper_macro_fraction(c)
        reread += 4.0 * c * c * (1.0 if first else 2.5)     # tiled kernel: F streamed per chunk
    path = cuda_path(c, k, spec)
    if path == "shared":
        per_sm = ctas_per_sm(cuda_shared_smem(c, kk), 128, 256)
        bw = DRAM_EFFICIENCY * little_fraction(spec, per_sm * 256 * 16 * CUDA_LOADS_IN_FLIGHT[path])
        return _roofline(spec, b, spec.sms * per_sm, ex, nominal, _compulsory(c, k, init), 0.0,
                         EFFICIENCY["cuda_shared"], bw, 1)
    per_sm = ctas_per_sm(cuda_tiled_smem(c, kk), 192, 256)
    bw = DRAM_EFFICIENCY * little_fraction(spec, per_sm * 256 * 16 * CUDA_LOADS_IN_FLIGHT[path])
    hbm = _compulsory(c, k, init)
    return _roofline(spec, b, spec.sms * per_sm, ex, nominal, hbm, max(0.0, reread - hbm), EFFICIENCY["cuda_tiled"],
                     bw, 1)


def _triton_woodbury(spec, b, c, k, init):
    nominal = 4.0 * k * c * c
    size = max(16, 1 << (c - 1).bit_length())
    hbm = _compulsory(c, k, init)
    if size <= 64:  # register variant: one program per block, 2 per SM (16 warps for C = 64 unaligned)
        if k <= 4:
            ex = 4.0 * k * size * size
        else:
            ex = sum(2.0 * size * size * 16 * (0 if (init and i == 0) else 1) + 4.0 * size * 16 * 16
                     + 2.0 * size * size * 16 for i, _ in enumerate(_chunks(k, 16)))
        return _roofline(spec, b, spec.sms * 2, ex, nominal, hbm, 0.0, EFFICIENCY["triton_reg"],
                         BANDWIDTH_EFFICIENCY["triton"], 1)
    width = 1 if k <= 4 else (16 if k <= 16 else 32)
    cp = 32 * math.ceil(c / 32)
    ex, total = 0.0, 4.0 * k * c
    for kc in _chunks(k, width):
        ex += 4.0 * cp * cp * width + 4.0 * cp * width * width
        total += 4.0 * (3.0 * c * c + 3.0 * c * width)
    return _roofline(spec, b, spec.sms * 2, ex, nominal, hbm, max(0.0, total - hbm), EFFICIENCY["triton_tiled"],
                     BANDWIDTH_EFFICIENCY["triton"], 1)


def _torch_woodbury(spec, b, c, k, init):
    nominal, width = 4.0 * k * c * c, max(c, 16)
    ex, bytes_, launches = 0.0, 4.0 * k * c, 2 if init else 0
    for kc in _chunks(k, width):
        ex += 4.0 * c * c * kc + 3.0 * c * kc * kc + kc ** 3 / 3.0
        bytes_ += 4.0 * (3.0 * c * c + 4.0 * c * kc + 3.0 * kc * kc)
        launches += 10
    eff = EFFICIENCY["torch_small"] if c <= 128 else EFFICIENCY["torch"]
    return _roofline(spec, b, b, ex, nominal, bytes_, 0.0, eff, BANDWIDTH_EFFICIENCY["torch"], launches)


def _obs(spec, backend, b, c, op, taylor):
    passes = {"cuda": 1 + taylor, "triton": 1 + taylor, "torch": 1 + taylor}[backend]
    if op == "obs_saliency":
        passes = taylor
    bytes_ = 4.0 * (passes * c * c + (3 + 2 * taylor) * c) + (c if op == "obs_update" else 0)
    launches = 1 if backend != "torch" else (4 if op == "obs_saliency" else 8) + 2 * taylor
    flops = 2.0 * passes * c * c
    return _roofline(spec, b, b, flops, flops, bytes_, 0.0, 0.5, BANDWIDTH_EFFICIENCY[backend], launches)


def predict(op: str, backend: str, shape: Tuple[int, ...], num_grads: Optional[int] = None,
            spec: DeviceSpec = H100, taylor: bool = False) -> Prediction:
    """Predicted cost of ``op`` on ``backend`` for ``shape`` ((B, c, c) or (B, m, c))."""
    b, c = int(shape[0]), int(shape[-1])
    if op in WOODBURY_OPS:
        init = op == "fisher_inverse"
        k = int(shape[1]) if init or num_grads is None else int(num_grads)
        model = {"cuda": _cuda_woodbury, "triton": _triton_woodbury, "torch": _torch_woodbury}[backend]
        return model(spec, b, c, k, init)
    return _obs(spec, backend, b, c, op, taylor)


def rank(op: str, shape: Tuple[int, ...], num_grads: Optional[int], device: torch.device,
         candidates: Sequence[str]) -> List[str]:
    """Candidate backends for ``op`` on ``shape`` ((B, c, c) inverse or (B, m, c) gradients), best first.

    ``num_grads`` is the k of an update (None when ``shape`` holds it). Candidates predicted
    more than ``MAX_SLOWDOWN`` times slower than the best are dropped; ties keep the order
    of ``PREFERENCE``.
    """
    names = [n for n in PREFERENCE if n in candidates]
    if not names or int(shape[0]) == 0 or int(shape[-1]) == 0:
        return names
    spec = device_spec(device)
    times: Dict[str, float] = {n: predict(op, n, shape, num_grads, spec).seconds for n in names}
    best = min(times.values())
    ranked = sorted(names, key=lambda n: (times[n], PREFERENCE.index(n)))
    return [n for n in ranked if times[n] <= MAX_SLOWDOWN * best]
