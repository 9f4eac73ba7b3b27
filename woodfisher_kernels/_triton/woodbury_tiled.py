"""Tiled Triton Woodbury kernel: the block stays in global memory (L2) and is streamed in
``(BM, BM)`` tiles (the algorithm and precision notes are in :mod:`.woodbury`, which launches it).

* ``SEQ``: one rank-one step per gradient: pass 1 ``u = F g`` (and ``g^T u``) tile by
  tile into a (c,) scratch vector, pass 2 ``F -= w w^T`` with ``w = u / sqrt(d)``.
* chunks of K gradients: pass 1 ``U = F G^T`` and ``S = G U`` (U to a (c, K) scratch
  buffer), the float64 subspace factor ``A``, pass 1b ``W = U A`` in place, pass 2
  ``F -= W W^T`` tile by tile.

The first step of ``fisher_inverse`` reads no tile: it synthesizes ``I / damp``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import REG_LIMIT, SUM, div_rn, safe_pivot, sqrt_rn, subspace_factor

TILE = 32          # tile edge
CHUNK = 32         # gradients per chunk (k > 16)
SMALL_CHUNK = 16   # chunk for SEQ_MAX_GRADS < k <= 16
# 4 warps, no software pipelining: every variant compiles for sm_90 without spills (triton
# 3.6 and 3.9) and fits 2 programs per SM (K = 32: <= 204 registers; see
# scripts/triton_spec_compile.py).
OPTIONS = {"num_warps": 4, "num_stages": 1, **REG_LIMIT}


@triton.jit
def _tile(base, rows, cols, c, from_mem, from_eye, inv_damp):
    """Tile F[rows, cols] (zero outside the block) from memory, or of I / damp."""
    fm = (rows < c)[:, None] & (cols < c)[None, :]
    f = tl.load(base + rows[:, None] * c + cols[None, :], mask=fm & from_mem, other=0.0)
    return tl.where(fm & from_eye & (rows[:, None] == cols[None, :]), inv_damp, f)


@triton.jit
def _woodbury_tiled_kernel(inv_ptr, g_ptr, w_ptr, c, k, num_samples, inv_damp, tol,
                           K: tl.constexpr, BM: tl.constexpr, INIT: tl.constexpr, SEQ: tl.constexpr):
    """One program per block; ``w_ptr`` is a (B, c, K) (SEQ: (B, c, 1)) float32 scratch buffer."""
    b = tl.program_id(0).to(tl.int64)
    base = inv_ptr + b * c * c
    gbase = g_ptr + b * k * c
    tile = tl.arange(0, BM)
    if SEQ:
        wbase = w_ptr + b * c
        for i in range(k):
            from_mem = (i > 0) | (INIT == 0)
            from_eye = (i == 0) & (INIT == 1)
            gi = gbase + i * c
            sv = tl.zeros((BM,), dtype=tl.float32)
            sa = tl.zeros((BM,), dtype=tl.float32)
            for r0 in range(0, c, BM):                    # pass 1: u = F g, g^T u
                rows = r0 + tile
                u = tl.zeros((BM,), dtype=tl.float32)
                for c0 in range(0, c, BM):
                    cols = c0 + tile
                    gc = tl.load(gi + cols, mask=cols < c, other=0.0)
                    u += tl.reduce(_tile(base, rows, cols, c, from_mem, from_eye, inv_damp) * gc[None, :], 1, SUM)
                tl.store(wbase + rows, u, mask=rows < c)
                gu = tl.load(gi + rows, mask=rows < c, other=0.0) * u
                sv += gu
                sa += tl.abs(gu)
            d = safe_pivot(num_samples + tl.reduce(sv, 0, SUM), num_samples, num_samples + tl.reduce(sa, 0, SUM), tol)
            r = sqrt_rn(div_rn(tl.full((BM,), 1.0, tl.float32), tl.zeros((BM,), dtype=tl.float32) + d))
            tl.debug_barrier()
            for r0 in range(0, c, BM):                    # pass 2: F -= w w^T
                rows = r0 + tile
                wr = tl.load(wbase + rows, mask=rows < c, other=0.0) * r
                for c0 in range(0, c, BM):
                    cols = c0 + tile
                    wc = tl.load(wbase + cols, mask=cols < c, other=0.0) * r
                    f = _tile(base, rows, cols, c, from_mem, from_eye, inv_damp) - wr[:, None] * wc[None, :]
                    tl.store(base + rows[:, None] * c + cols[None, :], f,
                             mask=(rows < c)[:, None] & (cols < c)[None, :])
            tl.debug_barrier()
    else:
        wbase = w_ptr + b * c * K
        kk = tl.arange(0, K)
        for start in range(0, k, K):
            gk = start + kk
            kmask = gk < k
            from_mem = (start > 0) | (INIT == 0)
            from_eye = (start == 0) & (INIT == 1)
            s = tl.zeros((K, K), dtype=tl.float32)
            for r0 in range(0, c, BM):                    # pass 1: U = F G^T, S = G U
                rows = r0 + tile
                rmask = rows < c
                u = tl.zeros((BM, K), dtype=tl.float32)
                for c0 in range(0, c, BM):
                    cols = c0 + tile
                    gt = tl.load(gbase + gk[None, :] * c + cols[:, None],
                                 mask=(cols < c)[:, None] & kmask[None, :], other=0.0)   # (BM, K)
                    f = _tile(base, rows, cols, c, from_mem, from_eye, inv_damp)
                    u = tl.dot(f, gt, u, input_precision="ieee")
                tl.store(wbase + rows[:, None] * K + kk[None, :], u, mask=rmask[:, None])
                gr = tl.load(gbase + gk[:, None] * c + rows[None, :],
                             mask=kmask[:, None] & rmask[None, :], other=0.0)            # (K, BM)
                s = tl.dot(gr, u, s, input_precision="ieee")
            s = 0.5 * (s + tl.trans(s))
            a = subspace_factor(s, num_samples, tl.minimum(k - start, K), tol, K)
            tl.debug_barrier()
            for r0 in range(0, c, BM):                    # pass 1b: W = U A, in place
                rows = r0 + tile
                ptrs = wbase + rows[:, None] * K + kk[None, :]
                u = tl.load(ptrs, mask=(rows < c)[:, None], other=0.0)
                tl.store(ptrs, tl.dot(u, a, input_precision="ieee"), mask=(rows < c)[:, None])
            tl.debug_barrier()
            for r0 in range(0, c, BM):                    # pass 2: F -= W W^T
                rows = r0 + tile
                wr = tl.load(wbase + rows[:, None] * K + kk[None, :], mask=(rows < c)[:, None], other=0.0)
                for c0 in range(0, c, BM):
                    cols = c0 + tile
                    wc = tl.load(wbase + cols[:, None] * K + kk[None, :], mask=(cols < c)[:, None], other=0.0)
                    f = _tile(base, rows, cols, c, from_mem, from_eye, inv_damp)
                    f = tl.dot(-wr, tl.trans(wc), f, input_precision="ieee")
                    tl.store(base + rows[:, None] * c + cols[None, :], f,
                             mask=(rows < c)[:, None] & (cols < c)[None, :])
            tl.debug_barrier()


KERNEL = _woodbury_tiled_kernel


def launch_config(num_grads: int, seq: bool):
    """(kernel, constexprs, launch options) of the tiled variant; ``INIT`` added by the caller."""
    chunk = SMALL_CHUNK if num_grads <= SMALL_CHUNK else CHUNK
    return KERNEL, {"K": chunk, "BM": TILE, "SEQ": seq}, dict(OPTIONS)
