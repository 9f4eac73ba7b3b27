"""Fused CPU backend ``"cpu"``: the blockwise Woodbury build / update and the low-rank factor in C (csrc/cpu).

The kernel (``woodfisher_kernels._cpu_kernels``, a plain C shared library built by setup.py
wherever a C compiler is found and loaded here with ctypes) computes exactly what the torch
fallback :func:`woodfisher_kernels._woodbury.woodbury_blocks` computes (same K-gradient
Woodbury chunks, float32 products, float64 K x K factorisation, same failure flags), one
block at a time with the block's inverse kept in cache and the products in register tiles,
instead of batched library calls on small matrices. The low-rank factor of
:mod:`woodfisher_kernels.lowrank` (m < c) is fused the same way (:func:`lowrank_factor`).
The OBS statistics and update are the torch reference's (they are a few matrix-vector
products per block).

Float32 CPU tensors only; blocks are split across ``torch.get_num_threads()`` threads
(ctypes releases the GIL during the call). Without the library ``available()`` is False and
``backend="auto"`` uses the torch fallback. Speed: benchmarks/results/cpu_fallback.md.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Optional, Tuple

import torch

from . import reference
from ._woodbury import woodbury_ops

#: Gradients per K x K system by block size. Small K is faster (the K^2 c and K^3 parts cost
#: relatively more at small c: c = 64 runs 1.5x faster with K = 8 than with K = 32), large K
#: more accurate (every chunk rounds the inverse once, so the error grows with m / K): the
#: smallest K that keeps the precision table within the stated bound (tests/test_precision_table.py).
CHUNK_SMALL, CHUNK, CHUNK_LARGE = 8, 16, 32
#: Largest block size the kernel takes: one block's inverse must stay in a core's L2 cache
#: (c = 512: 1 MiB). Larger blocks go to the torch fallback (tiles of blocks over MKL).
MAX_BLOCK_SIZE = 512
#: Most gradients per block the low-rank kernel takes (its m x m factorisation works on the whole matrix
#: in cache, blocked only by 8 rows); more go to the torch implementation (LAPACK).
MAX_LOWRANK_GRADS = 256


@functools.lru_cache(maxsize=None)
def _library() -> Optional[ctypes.CDLL]:
    """The compiled kernel, or None when it was not built (loaded once)."""
    spec = importlib.util.find_spec(f"{__package__}._cpu_kernels")
    if spec is None or not spec.origin:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
        for name in ("wf_woodbury_blocks", "wf_lowrank_blocks", "wf_best_isa"):
            getattr(lib, name)  # AttributeError when the library lacks the C entry point
    except (OSError, AttributeError) as err:  # unloadable, or built without the C entry points
        warnings.warn(f"the CPU kernel {spec.origin} is unusable ({err}); the CPU runs the torch fallback. "
                      "Reinstall woodfisher_kernels to rebuild it.", RuntimeWarning, stacklevel=2)
        return None
    lib.wf_woodbury_blocks.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4 + [
        ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_double, ctypes.c_int]
    lib.wf_woodbury_blocks.restype = ctypes.c_int
    lib.wf_lowrank_blocks.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4 + [
        ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_double]
    lib.wf_lowrank_blocks.restype = ctypes.c_int
    lib.wf_best_isa.restype = ctypes.c_int
    return lib


def _built() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("the CPU kernel woodfisher_kernels._cpu_kernels is not built")
    return lib


def available() -> bool:
    """True when the compiled CPU kernel loaded."""
    return _library() is not None


#: Instruction sets the kernel is compiled for (x86-64 with GCC; elsewhere only "baseline").
ISAS = ("baseline", "x86-64-v3", "x86-64-v4")


def best_isa() -> str:
    """The instruction set the kernel runs with on this CPU (one of :data:`ISAS`)."""
    return ISAS[_built().wf_best_isa()]


def max_block_size(op: str = "fisher_inverse") -> Optional[int]:
    """Largest block size c of the fused Woodbury ops (None = no limit for the torch-based ones)."""
    return MAX_BLOCK_SIZE if op in ("woodbury_update_", "fisher_inverse") else None


def chunk_size(block_size: int) -> int:
    """K, gradients per K x K system, for blocks of size c: 8 below c = 128, 16 below 256, else 32."""
    return CHUNK_SMALL if block_size < 128 else CHUNK if block_size < 256 else CHUNK_LARGE


def woodbury_blocks(grads: torch.Tensor, num_samples: float, inv: Optional[torch.Tensor] = None,
                    damp: Optional[float] = None, chunk: Optional[int] = None,
                    threads: Optional[int] = None, isa: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out, bad)`` as :func:`woodfisher_kernels._woodbury.woodbury_blocks`, in C.

    Args:
        grads: (B, m, c) float32 CPU gradients. num_samples: N > 0.
        inv: (B, c, c) float32 inverses (not modified), or None to start from I / damp.
        damp: lambda > 0 when ``inv`` is None. chunk: K in 1..64 (default :func:`chunk_size`).
        threads: threads to split the blocks over (default ``torch.get_num_threads()``); the
            result does not depend on it (blocks are independent).
        isa: force one of :data:`ISAS` the CPU supports (tests); default :func:`best_isa`.
    Returns:
        out (B, c, c) new inverses, bad (B,) bool failure flags.
    Raises:
        ValueError: tensors that are not float32 on the CPU.
        RuntimeError: the library is not built, K is outside 1..64, the scratch could not be
            allocated, or the CPU lacks the forced ``isa``.
    """
    _check_float32_cpu(grads, inv)
    grads = grads.contiguous()
    inv = None if inv is None else inv.contiguous()
    num_blocks, m, c = grads.shape
    k = chunk or chunk_size(c)
    out = torch.empty(num_blocks, c, c, dtype=torch.float32)
    bad = torch.zeros(num_blocks, dtype=torch.uint8)
    lam = 1.0 if damp is None else float(damp)

    def part(lib, code, lo, hi):
        def at(t, per_block):
            return None if t is None else t.data_ptr() + lo * per_block * t.element_size()
        return lib.wf_woodbury_blocks(code, at(grads, m * c), at(inv, c * c), at(out, c * c), at(bad, 1),
                                      hi - lo, m, c, lam, float(num_samples), k)

    _split(part, num_blocks, threads, isa, f"c = {c}, K = {k}, K must be in 1..64")
    return out, bad.bool()


def lowrank_factor(grads: torch.Tensor, damp: float, num_samples: float, threads: Optional[int] = None,
                   isa: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, diag, bad)`` as :func:`woodfisher_kernels.reference.lowrank_factor`, in C.

    Args:
        grads: (B, m, c) float32 CPU gradients. damp, num_samples: lambda > 0 and N > 0.
        threads, isa: as :func:`woodbury_blocks`.
    Returns:
        A (B, m, c) = L^-1 G, diag (B, c) of F^-1 (float32), bad (B,) bool failure flags.
        Blocks the kernel does not fit (m = 0 or m > :data:`MAX_LOWRANK_GRADS`) go to the
        torch implementation.
    Raises:
        ValueError: tensors that are not float32 on the CPU.
        RuntimeError: as :func:`woodbury_blocks`.
    """
    _check_float32_cpu(grads)
    grads = grads.contiguous()
    num_blocks, m, c = grads.shape
    if m == 0 or m > MAX_LOWRANK_GRADS:
        return reference.lowrank_factor(grads, damp, num_samples)
    factor = torch.empty(num_blocks, m, c, dtype=torch.float32)
    diag = torch.empty(num_blocks, c, dtype=torch.float32)
    bad = torch.zeros(num_blocks, dtype=torch.uint8)

    def part(lib, code, lo, hi):
        return lib.wf_lowrank_blocks(code, grads.data_ptr() + 4 * lo * m * c, factor.data_ptr() + 4 * lo * m * c,
                                     diag.data_ptr() + 4 * lo * c, bad.data_ptr() + lo, hi - lo, m, c,
                                     float(damp), float(num_samples))

    _split(part, num_blocks, threads, isa, f"m = {m}, c = {c}")
    return factor, diag, bad.bool()


def _check_float32_cpu(*tensors: Optional[torch.Tensor]) -> None:
    """The kernel reads raw float32 memory: anything else would be read as garbage (or out of bounds)."""
    for t in tensors:
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            raise ValueError(f"the CPU kernel takes float32 CPU tensors, got {t.dtype} on {t.device}")


def _split(part: Callable, num_blocks: int, threads: Optional[int], isa: Optional[str], sizes: str) -> None:
    """Runs ``part(lib, isa code, lo, hi)`` over the blocks split across threads; RuntimeError on a refusal."""
    lib = _built()
    code = -1 if isa is None else ISAS.index(isa)
    threads = max(1, min(threads or torch.get_num_threads(), num_blocks))
    bounds = [num_blocks * i // threads for i in range(threads + 1)]
    if threads == 1:
        codes = [part(lib, code, 0, num_blocks)]
    else:
        with ThreadPoolExecutor(threads) as pool:
            codes = list(pool.map(lambda lo, hi: part(lib, code, lo, hi), bounds[:-1], bounds[1:]))
    if any(rc == -2 for rc in codes):
        raise RuntimeError(f"this CPU does not support isa={isa!r} (best: {best_isa()!r})")
    if any(rc != 0 for rc in codes):
        raise RuntimeError(f"the CPU kernel refused the sizes or could not allocate its scratch ({sizes})")


woodbury_update_, fisher_inverse = woodbury_ops(woodbury_blocks)

IMPLS: Dict[str, Callable] = {
    "woodbury_update_": woodbury_update_,
    "fisher_inverse": fisher_inverse,
    "obs_saliency": reference.obs_saliency,
    "obs_update": reference.obs_update,
    "lowrank_factor": lowrank_factor,
}
