"""Fused OBS statistic and OBS / WoodTaylor weight update over all blocks, in Triton.

Shapes: inv (B, c, c) symmetric positive definite, weights / loss_grad (B, c),
prune_mask (B, c) bool. Both kernels stream rows of each block in (BM, BN) tiles and
reduce ``F x`` on the fly; nothing but (B, c) vectors is written.

* :func:`obs_saliency`: ``rho = (w - h)^2 / (2 diag(F))`` with ``h = F loss_grad``
  (or h = 0). One launch, grid (B, row tiles): the diagonal is read in place.
* :func:`obs_update`: ``new = w - F v - h``, ``v = (w - h) / diag`` on the pruned set.
  One launch in both forms. Plain OBS: grid (B, row tiles); each program recomputes
  ``v`` for the columns it streams (v needs only w, the mask and the diagonal). WoodTaylor:
  ``v`` needs ``h`` on every pruned entry, i.e. a full pass over F first, so each block
  is handled by one program in two passes: pass 1 writes ``t = v + loss_grad`` to a
  (B, c) scratch vector, a barrier, pass 2 forms ``new = w - F t`` (``= w - F v - h``).
Pruned entries are written as exact zeros; padded lanes are masked. Divisions are
correctly rounded (``div_rn``), as in the torch reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import SUM, div_rn

ROW_TILE = 16
COL_TILE = 128


@triton.jit
def _rows_times(base, vec_ptr, rows, c, BN: tl.constexpr):
    """F[rows, :] @ vec for one block: (BM,)."""
    rmask = rows < c
    acc = tl.zeros(rows.shape, dtype=tl.float32)
    for c0 in range(0, c, BN):
        cols = c0 + tl.arange(0, BN)
        cmask = cols < c
        f = tl.load(base + rows[:, None] * c + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        v = tl.load(vec_ptr + cols, mask=cmask, other=0.0)
        acc += tl.reduce(f * v[None, :], 1, SUM)
    return acc


@triton.jit
def _saliency_kernel(inv_ptr, w_ptr, lg_ptr, out_ptr, c,
                     HAS_LG: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    rmask = rows < c
    base = inv_ptr + b * c * c
    diag = tl.load(base + rows * (c + 1), mask=rmask, other=1.0)
    resid = tl.load(w_ptr + b * c + rows, mask=rmask, other=0.0)
    if HAS_LG:
        resid -= _rows_times(base, lg_ptr + b * c, rows, c, BN)
    tl.store(out_ptr + b * c + rows, div_rn(resid * resid, 2.0 * diag), mask=rmask)


@triton.jit
def _update_kernel(inv_ptr, w_ptr, p_ptr, lg_ptr, t_ptr, out_ptr, c,
                   HAS_LG: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) * BM
    step = tl.num_programs(1) * BM
    base = inv_ptr + b * c * c
    wb = w_ptr + b * c
    pb = p_ptr + b * c
    tb = t_ptr + b * c
    if HAS_LG:
        # pass 1: t = v + loss_grad, v = (w - F loss_grad) / diag on the pruned set
        for r0 in range(first, c, step):
            rows = r0 + tl.arange(0, BM)
            rmask = rows < c
            h = _rows_times(base, lg_ptr + b * c, rows, c, BN)
            w = tl.load(wb + rows, mask=rmask, other=0.0)
            pruned = tl.load(pb + rows, mask=rmask, other=0) != 0
            diag = tl.load(base + rows * (c + 1), mask=rmask, other=1.0)
            lg = tl.load(lg_ptr + b * c + rows, mask=rmask, other=0.0)
            tl.store(tb + rows, tl.where(pruned, div_rn(w - h, diag), 0.0) + lg, mask=rmask)
        tl.debug_barrier()
    # pass 2: new = w - F t (t = v, computed per column tile, for plain OBS)
    for r0 in range(first, c, step):
        rows = r0 + tl.arange(0, BM)
        rmask = rows < c
        acc = tl.zeros((BM,), dtype=tl.float32)
        for c0 in range(0, c, BN):
            cols = c0 + tl.arange(0, BN)
            cmask = cols < c
            if HAS_LG:
                t = tl.load(tb + cols, mask=cmask, other=0.0)
            else:
                pc = tl.load(pb + cols, mask=cmask, other=0) != 0
                wc = tl.load(wb + cols, mask=cmask, other=0.0)
                dc = tl.load(base + cols * (c + 1), mask=cmask, other=1.0)
                t = tl.where(pc, div_rn(wc, dc), 0.0)
            f = tl.load(base + rows[:, None] * c + cols[None, :],
                        mask=rmask[:, None] & cmask[None, :], other=0.0)
            acc += tl.reduce(f * t[None, :], 1, SUM)
        w = tl.load(wb + rows, mask=rmask, other=0.0)
        pruned = tl.load(pb + rows, mask=rmask, other=0) != 0
        tl.store(out_ptr + b * c + rows, tl.where(pruned, 0.0, w - acc), mask=rmask)


def tile_config(c: int):
    """(constexprs {BM, BN}, launch options) for blocks of size c (both kernels)."""
    size = triton.next_power_of_2(c)
    bm, bn = min(ROW_TILE, size), min(COL_TILE, size)
    return {"BM": bm, "BN": bn}, {"num_warps": 8 if bm * bn >= 2048 else 4}


def obs_saliency(inv: torch.Tensor, weights: torch.Tensor, loss_grad=None) -> torch.Tensor:
    """rho (B, c) = (w - h)^2 / (2 diag(inv)), h = inv @ loss_grad or 0. One launch."""
    num_blocks, c = weights.shape
    out = torch.empty_like(weights)
    consts, opts = tile_config(c)
    lg = weights if loss_grad is None else loss_grad     # placeholder pointer when unused
    _saliency_kernel[(num_blocks, triton.cdiv(c, consts["BM"]))](
        inv, weights, lg, out, c, HAS_LG=loss_grad is not None, **consts, **opts)
    return out


def obs_update(inv: torch.Tensor, weights: torch.Tensor, prune_mask: torch.Tensor,
               loss_grad=None) -> torch.Tensor:
    """New weights (B, c) = w - inv v (- h); pruned entries exactly 0. One launch."""
    num_blocks, c = weights.shape
    out = torch.empty_like(weights)
    consts, opts = tile_config(c)
    mask = prune_mask.view(torch.uint8)
    if loss_grad is None:
        grid, lg, scratch = (num_blocks, triton.cdiv(c, consts["BM"])), weights, weights   # unused pointers
    else:
        grid, lg, scratch = (num_blocks, 1), loss_grad, torch.empty_like(weights)
    _update_kernel[grid](inv, weights, mask, lg, scratch, out, c,
                         HAS_LG=loss_grad is not None, **consts, **opts)
    return out
