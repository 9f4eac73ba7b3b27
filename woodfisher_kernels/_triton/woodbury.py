"""Fused blockwise Woodbury (sequential Sherman-Morrison) kernels in Triton.

For every block b (one program per block) and k gradients ``G = grads[b]`` (k, c)::

    inv[b] <- (inv[b]^-1 + G^T G / N)^-1

which equals k successive rank-one updates ``u = F g; F <- F - u u^T / (N + g^T u)``.
The k updates are applied in chunks of K gradients in their *blocked* form: with
``U = F G_K^T`` (c, K) and ``S = G_K F G_K^T`` (K, K), the K rank-one steps are replayed
inside the K-dimensional subspace (:func:`_subspace_factor`, an O(K^3) right-looking
Cholesky-like recurrence on S, kept in registers) which yields a (K, K) coefficient
matrix ``A`` such that the K rank-one corrections sum to ``(U A)(U A)^T``. So one chunk
costs three ``tl.dot`` products (``F G^T``, ``G U``, ``U A``) and one rank-K update
``F -= W W^T``: the same ~4 K c^2 flops as K rank-one updates, as matrix products.

Two variants (chosen by the padded block size ``C = max(16, next_pow2(c))``):

* register-resident (``C <= REG_MAX_BLOCK`` = 64): the whole padded block lives in
  registers for all k gradients; the inverse is read once and written once per launch
  (not read at all when starting from ``I / damp``).
* tiled (larger blocks): the block stays in global memory (L2-resident for
  c <= ~256 on an H100) and is streamed in ``BM x BM`` tiles, twice per chunk of K
  gradients (once to form ``U``, once for ``F -= W W^T``); ``U`` / ``W`` (c, K) live in
  a small scratch buffer. Chunks of K = 32 gradients keep the traffic per flop low.

All matrix products use ``input_precision="ieee"`` (true float32 FMA, no TF32), accepted
by ``tl.dot`` in triton 3.x. Padded rows / columns of the block and padded gradients
are masked to zero, so they never couple with real entries.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import SUM

REG_MAX_BLOCK = 64      # largest padded block size kept entirely in registers
TILE = 64               # tile edge of the tiled variant
REG_CHUNK = 16          # gradients per chunk, register variant (tl.dot needs >= 16)
TILED_CHUNK = 32        # gradients per chunk, tiled variant


@triton.jit
def _subspace_factor(s, num_samples, count, K: tl.constexpr):
    """Replay ``count`` (<= K) rank-one Sherman-Morrison steps inside the span of K gradients.

    ``s`` (K, K) is ``G F G^T`` (symmetric). Step i uses ``u_i = U c_i`` (``U = F G^T``,
    ``c_i`` the i-th column of the running coefficient matrix) and ``d_i = N + s_ii``;
    both ``s`` and the coefficients are updated as ``F`` would be. Returns ``a`` (K, K)
    with columns ``c_i / sqrt(d_i)`` (zero beyond ``count``): the corrections sum to
    ``(U a)(U a)^T``. Zero (padded) gradients give ``U c_i = 0`` and change nothing.
    Sums use ``tl.reduce(.., SUM)`` (see ``_common``: faster in the interpreter).
    """
    idx = tl.arange(0, K)
    rows = idx[:, None]
    cols = idx[None, :]
    coef = tl.where(rows == cols, 1.0, 0.0)
    out = tl.zeros((K, K), dtype=tl.float32)
    for i in range(count):
        srow = tl.reduce(tl.where(rows == i, s, 0.0), 0, SUM)             # s[i, :] = s[:, i]^T
        ci = tl.reduce(tl.where(cols == i, coef, 0.0), 1, SUM)            # coef[:, i]
        rd = 1.0 / (num_samples + tl.reduce(tl.where(idx == i, srow, 0.0), 0, SUM))
        coef -= ci[:, None] * (srow[None, :] * rd)
        s -= srow[:, None] * (srow[None, :] * rd)
        out = tl.where(cols == i, ci[:, None] * tl.sqrt(rd), out)
    return out


@triton.jit
def _woodbury_reg_kernel(inv_ptr, g_ptr, c, k, num_samples, inv_damp,
                         C: tl.constexpr, K: tl.constexpr, INIT: tl.constexpr):
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
    kk = tl.arange(0, K)
    for start in range(0, k, K):
        gk = start + kk
        g = tl.load(gbase + gk[:, None] * c + idx[None, :],
                    mask=(gk < k)[:, None] & real[None, :], other=0.0)       # (K, C)
        u = tl.dot(f, tl.trans(g), input_precision="ieee")                     # (C, K)
        s = tl.dot(g, u, input_precision="ieee")                               # (K, K)
        s = 0.5 * (s + tl.trans(s))
        a = _subspace_factor(s, num_samples, tl.minimum(k - start, K), K)
        w = tl.dot(u, a, input_precision="ieee")
        f = tl.dot(-w, tl.trans(w), f, input_precision="ieee")
    tl.store(base + offs, f, mask=blk)


@triton.jit
def _woodbury_tiled_kernel(inv_ptr, g_ptr, w_ptr, c, k, num_samples, inv_damp,
                           K: tl.constexpr, BM: tl.constexpr, INIT: tl.constexpr):
    """One program per block; the block is streamed in (BM, BM) tiles, K gradients per chunk.

    ``w_ptr`` is a (B, c, K) float32 scratch buffer holding U = F G^T, then W = U A.
    """
    b = tl.program_id(0).to(tl.int64)
    base = inv_ptr + b * c * c
    gbase = g_ptr + b * k * c
    wbase = w_ptr + b * c * K
    tile = tl.arange(0, BM)
    kk = tl.arange(0, K)
    for start in range(0, k, K):
        gk = start + kk
        kmask = gk < k
        # tiles of F come from memory, except I/damp (never read) before the first chunk of INIT
        from_mem = (start > 0) | (INIT == 0)
        from_eye = (start == 0) & (INIT == 1)
        # pass 1: U = F G^T (row tile by row tile) and S = G U
        s = tl.zeros((K, K), dtype=tl.float32)
        for r0 in range(0, c, BM):
            rows = r0 + tile
            rmask = rows < c
            u = tl.zeros((BM, K), dtype=tl.float32)
            for c0 in range(0, c, BM):
                cols = c0 + tile
                gt = tl.load(gbase + gk[None, :] * c + cols[:, None],
                             mask=(cols < c)[:, None] & kmask[None, :], other=0.0)   # (BM, K)
                fm = rmask[:, None] & (cols < c)[None, :]
                f = tl.load(base + rows[:, None] * c + cols[None, :], mask=fm & from_mem, other=0.0)
                f = tl.where(fm & from_eye & (rows[:, None] == cols[None, :]), inv_damp, f)
                u = tl.dot(f, gt, u, input_precision="ieee")
            tl.store(wbase + rows[:, None] * K + kk[None, :], u, mask=rmask[:, None])
            gr = tl.load(gbase + gk[:, None] * c + rows[None, :],
                         mask=kmask[:, None] & rmask[None, :], other=0.0)            # (K, BM)
            s = tl.dot(gr, u, s, input_precision="ieee")
        s = 0.5 * (s + tl.trans(s))
        a = _subspace_factor(s, num_samples, tl.minimum(k - start, K), K)
        tl.debug_barrier()
        # pass 1b: W = U A, in place in the scratch buffer
        for r0 in range(0, c, BM):
            rows = r0 + tile
            ptrs = wbase + rows[:, None] * K + kk[None, :]
            u = tl.load(ptrs, mask=(rows < c)[:, None], other=0.0)
            tl.store(ptrs, tl.dot(u, a, input_precision="ieee"), mask=(rows < c)[:, None])
        tl.debug_barrier()
        # pass 2: F -= W W^T, tile by tile
        for r0 in range(0, c, BM):
            rows = r0 + tile
            rmask = rows < c
            wr = tl.load(wbase + rows[:, None] * K + kk[None, :], mask=rmask[:, None], other=0.0)
            for c0 in range(0, c, BM):
                cols = c0 + tile
                cmask = cols < c
                wc = tl.load(wbase + cols[:, None] * K + kk[None, :], mask=cmask[:, None], other=0.0)
                fm = rmask[:, None] & cmask[None, :]
                ptrs = base + rows[:, None] * c + cols[None, :]
                f = tl.load(ptrs, mask=fm & from_mem, other=0.0)
                f = tl.where(fm & from_eye & (rows[:, None] == cols[None, :]), inv_damp, f)
                f = tl.dot(-wr, tl.trans(wc), f, input_precision="ieee")
                tl.store(ptrs, f, mask=fm)
        tl.debug_barrier()


def _padded(c: int) -> int:
    return max(16, triton.next_power_of_2(c))


def use_tiled(block_size: int) -> bool:
    """True when a block of this size runs in the tiled (global-memory) variant."""
    return _padded(block_size) > REG_MAX_BLOCK


def launch_config(block_size: int, num_grads: int, tiled=None):
    """(kernel, constexprs, launch options) for blocks of ``block_size`` and ``num_grads``
    gradients; ``INIT`` is added by the caller. ``tiled`` forces the variant."""
    if tiled is None:
        tiled = use_tiled(block_size)
    if not tiled:
        size = _padded(block_size)
        return _woodbury_reg_kernel, {"C": size, "K": REG_CHUNK}, {"num_warps": 8 if size >= 64 else 4}
    chunk = REG_CHUNK if num_grads <= REG_CHUNK else TILED_CHUNK
    return _woodbury_tiled_kernel, {"K": chunk, "BM": TILE}, {"num_warps": 8, "num_stages": 2}


def _launch(inv: torch.Tensor, grads: torch.Tensor, num_samples: float, inv_damp: float,
            init: bool, tiled=None) -> None:
    num_blocks, num_grads, c = grads.shape
    kernel, consts, opts = launch_config(c, num_grads, tiled)
    args = [inv, grads, c, num_grads, float(num_samples), float(inv_damp)]
    if kernel is _woodbury_tiled_kernel:       # scratch for U = F G^T, then W = U A
        args.insert(2, torch.empty((num_blocks, c, consts["K"]), dtype=torch.float32, device=grads.device))
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
