"""Blockwise Woodbury build / update in torch: the CPU fallback of ``fisher_inverse`` and
``woodbury_update_`` (any float dtype), batched over blocks.

Maths (DESIGN.md section 1). Sequential Sherman-Morrison over k gradients equals one
rank-k Woodbury update, applied here in chunks of K = :func:`chunk_size` (c) gradients G (K, c)::

    U = F^-1 G^T (c, K),  S = N I + G U (K, K),  F^-1 <- F^-1 - W^T W,  W = L^-1 U^T

with L the Cholesky factor of S (the paper's Eq. 2 replayed K gradients at a time; the
product of the K rank-one corrections). Every chunk costs ~4 K c^2 flops per block as
batched matrix products. Starting from I/damp (``fisher_inverse``) the first chunk needs
no product for U (U = G^T / damp).

Precision: the products run in the input dtype; the small K x K factorisation (S, its
Cholesky factor and the triangular inverse L^-1) always runs in float64, so it never
fails on the symmetric positive definite S that float32 would round to an indefinite
matrix at kappa ~ 1e7 (kappa = lambda_max(G^T G / N) / damp). When S is not positive
definite even in float64 (it was rounded from float32, or the input inverse is not
positive definite), that block is flagged (``cholesky_ex`` info) and the caller decides
(:mod:`._numerics`: float64 recomputation or ValueError).

Speed: blocks are processed in tiles of ~``TILE_BYTES`` of inverses (kept in cache
across all chunks of a tile), with preallocated scratch and one output buffer, so
the result is written once; the inverse is read once (update) or never (build).
The tile loop is a loop over groups of blocks, not over blocks.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

CHUNK_SMALL, CHUNK, CHUNK_LARGE = 16, 32, 64   # gradients per K x K factorisation (more: faster
TILE_BYTES = 4 << 20      # products, slower LAPACK); inverse bytes per tile (L2 of one or two cores)


def chunk_size(block_size: int) -> int:
    """K for blocks of size c: 16 below c = 128 (the LAPACK calls dominate there), 32 below
    c = 256, else 64 (the c x c products dominate: cpu_fallback.md)."""
    return CHUNK_SMALL if block_size < 128 else CHUNK if block_size < 256 else CHUNK_LARGE


def tile_size(num_blocks: int, block_size: int, itemsize: int) -> int:
    """Blocks per tile: about TILE_BYTES of inverses, at least 1, at most num_blocks."""
    return max(1, min(num_blocks, TILE_BYTES // max(1, block_size * block_size * itemsize)))


def bad_blocks(inv: torch.Tensor) -> torch.Tensor:
    """(B,) bool: True where a block is not finite or has a diagonal entry <= 0.

    One read of each block (its sum is non-finite iff some entry is, up to an overflow
    of the sum itself, which also flags the block).
    """
    finite = torch.isfinite(inv.sum(dim=(1, 2)))
    positive = (inv.diagonal(dim1=1, dim2=2) > 0).all(dim=1)
    return ~(finite & positive)


def woodbury_blocks(grads: torch.Tensor, num_samples: float, inv: Optional[torch.Tensor] = None,
                    damp: Optional[float] = None, chunk: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """New inverses ``(inv^-1 + G^T G / N)^-1`` (or from ``I / damp`` when ``inv`` is None).

    Args:
        grads: (B, k, c) gradients. num_samples: N > 0.
        inv: (B, c, c) current inverses (not modified), or None to start from I / damp.
        damp: lambda > 0 when ``inv`` is None.
        chunk: K, gradients per K x K factorisation (default :func:`chunk_size`).
    Returns:
        ``(out, bad)``: out (B, c, c) new inverses (a new tensor), bad (B,) bool flags of
        blocks whose result is not finite, has a diagonal entry <= 0, or whose K x K
        system was not positive definite in float64.
    """
    num_blocks, num_grads, c = grads.shape
    dtype, device = grads.dtype, grads.device
    tile = tile_size(num_blocks, c, grads.element_size())
    k_max = max(1, min(chunk or chunk_size(c), num_grads))
    out = torch.empty(num_blocks, c, c, dtype=dtype, device=device)
    bad = torch.zeros(num_blocks, dtype=torch.bool, device=device)
    buffers = {}                          # (t, k) -> contiguous scratch (out= on a slice is slow)

    def scratch(t: int, k: int):
        if (t, k) not in buffers:
            buffers[(t, k)] = (torch.empty(t, c, k, dtype=dtype, device=device),
                               torch.empty(t, k, k, dtype=dtype, device=device),
                               torch.empty(t, k, c, dtype=dtype, device=device),
                               torch.eye(k, dtype=torch.float64, device=device).expand(t, k, k))
        return buffers[(t, k)]

    eye_c = None if inv is not None else torch.eye(c, dtype=dtype, device=device).div_(damp).unsqueeze(0)
    for b0 in range(0, num_blocks, tile):
        o = out[b0:b0 + tile]
        g = grads[b0:b0 + tile]
        t = o.shape[0]
        failed = torch.zeros(t, dtype=torch.bool, device=device)
        for j in range(0, num_grads, k_max):
            gk = g[:, j:j + k_max]
            k = gk.shape[1]
            u, s, w, eye = scratch(t, k)
            first = j == 0 and inv is None
            if first:                                   # U = G^T / damp: S = G G^T / damp + N I
                torch.bmm(gk, gk.transpose(1, 2), out=s)
            else:
                torch.bmm(o if j else inv[b0:b0 + tile], gk.transpose(1, 2), out=u)
                torch.bmm(gk, u, out=s)
            s64 = s.to(torch.float64)
            if first:
                s64.div_(damp)
            s64.diagonal(dim1=1, dim2=2).add_(num_samples)
            chol, info = torch.linalg.cholesky_ex(s64)
            failed |= info != 0
            linv = torch.linalg.solve_triangular(chol, eye, upper=False)
            if first:                                   # W = L^-1 G / damp; F^-1 = I / damp - W^T W
                torch.bmm(linv.div_(damp).to(dtype), gk, out=w)
                torch.baddbmm(eye_c, w.transpose(1, 2), w, alpha=-1.0, out=o)
            else:
                torch.bmm(linv.to(dtype), u.transpose(1, 2), out=w)
                if j:
                    o.baddbmm_(w.transpose(1, 2), w, alpha=-1.0)
                else:                                   # first chunk of an update: read inv once
                    torch.baddbmm(inv[b0:b0 + tile], w.transpose(1, 2), w, alpha=-1.0, out=o)
        bad[b0:b0 + t] = failed | bad_blocks(o)
    return out, bad


def woodbury_ops(blocks: Callable) -> Tuple[Callable, Callable]:
    """``(woodbury_update_, fisher_inverse)`` of a backend from its ``blocks`` function (the
    signature of :func:`woodbury_blocks`), each with the ``checked`` out-of-place variant
    returning ``(result, bad)`` that the public ops use (:mod:`._numerics`)."""
    def woodbury_update_(inv: torch.Tensor, grads: torch.Tensor, num_samples: float) -> None:
        """inv (B, c, c) <- (inv^-1 + grads^T grads / num_samples)^-1, in place; grads (B, k, c)."""
        inv.copy_(blocks(grads, num_samples, inv)[0])

    def fisher_inverse(grads: torch.Tensor, damp: float, num_samples: float) -> torch.Tensor:
        """(damp I + grads^T grads / num_samples)^-1 per block; grads (B, m, c) -> (B, c, c)."""
        return blocks(grads, num_samples, None, damp)[0]

    woodbury_update_.checked = lambda inv, grads, num_samples: blocks(grads, num_samples, inv)
    fisher_inverse.checked = lambda grads, damp, num_samples: blocks(grads, num_samples, None, damp)
    return woodbury_update_, fisher_inverse
