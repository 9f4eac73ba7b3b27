"""Fused blockwise Woodbury (sequential Sherman-Morrison) kernels in Triton.

For every block b (one program per block) and k gradients ``G = grads[b]`` (k, c)::

    inv[b] <- (inv[b]^-1 + G^T G / N)^-1

which equals k successive rank-one updates ``u = F g; F <- F - u u^T / (N + g^T u)``.

* k <= ``SEQ_MAX_GRADS``: exactly those rank-one updates, one gradient at a time (no
  padding of a single streamed gradient to a matrix-product chunk).
* larger k: chunks of K gradients in *blocked* form. With ``U = F G_K^T`` (c, K) and
  ``S = G_K F G_K^T`` (K, K), the K rank-one steps are replayed inside the K-dimensional
  subspace (:func:`._common.subspace_factor`, O(K^3), in float64) which yields ``A`` (K, K) such
  that the K corrections sum to ``(U A)(U A)^T``: three ``tl.dot`` products and one
  rank-K update ``F -= W W^T``, the same ~4 K c^2 flops as K rank-one updates.

Two variants by padded block size ``C = max(16, next_pow2(c))``: register-resident
(``C <= REG_MAX_BLOCK``: the block stays in registers for all k gradients; read once,
written once, not read at all from I / damp) and tiled (:mod:`.woodbury_tiled`).

Precision: matrix products with ``input_precision="ieee"`` (float32 FMA, no TF32);
float32 divisions / square roots correctly rounded (``div_rn`` / ``sqrt_rn``); the K x K
subspace factor in float64. Every pivot ``N + g^T F' g`` goes through ``safe_pivot``: a
block is accurate to ~eps32 * kappa, or NaN when float32 lost positive definiteness.
Padded rows / columns and padded gradients are masked to zero and never couple.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import woodbury_tiled
from ._common import EPS32, REG_LIMIT, SUM, div_rn, safe_pivot, sqrt_rn, subspace_factor

REG_MAX_BLOCK = 64      # largest padded block size kept entirely in registers
REG_CHUNK = 16          # gradients per chunk, register variant (tl.dot needs >= 16)
SEQ_MAX_GRADS = 4       # up to this many gradients: plain rank-one steps, no chunk padding


@triton.jit
def _rank_one_step(f, g, num_samples, tol):
    """One Sherman-Morrison step on a register block f (C, C) with gradient g (C,)."""
    u = tl.reduce(f * g[None, :], 1, SUM)                                 # F g (F symmetric)
    gu = g * u
    d = safe_pivot(num_samples + tl.reduce(gu, 0, SUM), num_samples,
                   num_samples + tl.reduce(tl.abs(gu), 0, SUM), tol)
    w = u * sqrt_rn(div_rn(tl.full(u.shape, 1.0, tl.float32), d))
    return f - w[:, None] * w[None, :]


@triton.jit
def _woodbury_reg_kernel(inv_ptr, g_ptr, c, k, num_samples, inv_damp, tol,
                         C: tl.constexpr, K: tl.constexpr, INIT: tl.constexpr, SEQ: tl.constexpr):
    """One program per block; the (C, C) block stays in registers for all k gradients."""
    b = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, C)
    real = idx < c
    blk = real[:, None] & real[None, :]
    offs = idx[:, None] * c + idx[None, :]
    base = inv_ptr + b * c * c
    if INIT:
        f = tl.where(blk & (idx[:, None] == idx[None, :]), inv_damp, 0.0)
    else:
        f = tl.load(base + offs, mask=blk, other=0.0)
    gbase = g_ptr + b * k * c
    if SEQ:
        for i in range(k):
            g = tl.load(gbase + i * c + idx, mask=real, other=0.0)
            f = _rank_one_step(f, g, num_samples, tol)
    else:
        kk = tl.arange(0, K)
        for start in range(0, k, K):
            gk = start + kk
            g = tl.load(gbase + gk[:, None] * c + idx[None, :],
                        mask=(gk < k)[:, None] & real[None, :], other=0.0)       # (K, C)
            u = tl.dot(f, tl.trans(g), input_precision="ieee")                     # (C, K)
            s = tl.dot(g, u, input_precision="ieee")                               # (K, K)
            s = 0.5 * (s + tl.trans(s))
            a = subspace_factor(s, num_samples, tl.minimum(k - start, K), tol, K)
            w = tl.dot(u, a, input_precision="ieee")
            f = tl.dot(-w, tl.trans(w), f, input_precision="ieee")
    tl.store(base + offs, f, mask=blk)


def _padded(c: int) -> int:
    return max(16, triton.next_power_of_2(c))


def use_tiled(block_size: int) -> bool:
    """True when a block of this size runs in the tiled (global-memory) variant."""
    return _padded(block_size) > REG_MAX_BLOCK


def pivot_tolerance(block_size: int, chunk: int) -> float:
    """Rounding bound (c + K) eps32 of a pivot, relative to its scale (see ``safe_pivot``)."""
    return float((block_size + chunk) * EPS32)


def launch_config(block_size: int, num_grads: int, tiled=None):
    """(kernel, constexprs, launch options) for blocks of ``block_size`` and ``num_grads``
    gradients; ``INIT`` is added by the caller. ``tiled`` forces the variant."""
    if tiled is None:
        tiled = use_tiled(block_size)
    seq = num_grads <= SEQ_MAX_GRADS
    if tiled:
        return woodbury_tiled.launch_config(num_grads, seq)
    size = _padded(block_size)
    return _woodbury_reg_kernel, {"C": size, "K": REG_CHUNK, "SEQ": seq}, {"num_warps": _reg_warps(size), **REG_LIMIT}


def _reg_warps(size: int) -> int:
    """Warps of the register variant: 4 up to C = 32, 8 for C = 64 (<= 128 registers and two
    programs per SM when c % 16 == 0; up to 170 registers, one program, for the masked,
    unvectorised chunked variants; no spills with triton 3.6 or 3.9)."""
    return 4 if size < 64 else 8


def _launch(inv: torch.Tensor, grads: torch.Tensor, num_samples: float, inv_damp: float,
            init: bool, tiled=None) -> None:
    num_blocks, num_grads, c = grads.shape
    if num_grads == 0:
        if init:
            inv.copy_(torch.eye(c, dtype=inv.dtype, device=inv.device).expand_as(inv) * inv_damp)
        return
    kernel, consts, opts = launch_config(c, num_grads, tiled)
    tol = pivot_tolerance(c, 1 if consts["SEQ"] else consts["K"])
    args = [inv, grads, c, num_grads, float(num_samples), float(inv_damp), tol]
    if kernel is woodbury_tiled.KERNEL:       # scratch for U = F G^T, then W = U A
        width = 1 if consts["SEQ"] else consts["K"]
        args.insert(2, torch.empty((num_blocks, c, width), dtype=torch.float32, device=grads.device))
    kernel[(num_blocks,)](*args, INIT=init, **consts, **opts)


def woodbury_update_(inv: torch.Tensor, grads: torch.Tensor, num_samples: float, *, tiled=None) -> None:
    """In place: inv (B, c, c) <- (inv^-1 + grads^T grads / num_samples)^-1; grads (B, k, c).

    One launch. ``tiled`` forces the variant (None = by block size; for tests).
    """
    _launch(inv, grads, num_samples, 0.0, init=False, tiled=tiled)


def fisher_inverse(grads: torch.Tensor, damp: float, num_samples: float, *, tiled=None) -> torch.Tensor:
    """(damp I + grads^T grads / num_samples)^-1 per block: grads (B, m, c) -> (B, c, c).

    Starts from I / damp inside the kernel: no initial inverse is read from memory.
    """
    num_blocks, _, c = grads.shape
    out = torch.empty((num_blocks, c, c), dtype=grads.dtype, device=grads.device)
    _launch(out, grads, num_samples, 1.0 / damp, init=True, tiled=tiled)
    return out
