"""The CPU fallback as it was before issues 9 and 10, kept as the baseline of the speed-ups.

- :func:`fisher_inverse`: chunks of K = max(c, 16) gradients over all blocks at once,
  float32 Cholesky of the K x K system, a triangular solve of the whole (K x c) panel;
- :func:`lowrank_factor`: float64 Gram ``G G^T``, float64 Cholesky and a float64
  triangular solve over the whole (m x c) matrix, the diagonal in float64.

Same maths as ``woodfisher_kernels.fisher_inverse`` / ``lowrank_inverse`` (DESIGN.md
section 1); no validation (benchmark inputs only).
"""
from __future__ import annotations

from typing import Tuple

import torch


def woodbury_update_(inv: torch.Tensor, grads: torch.Tensor, num_samples: float) -> torch.Tensor:
    """inv (B, c, c) <- (inv^-1 + G^T G / N)^-1 in place, chunks of max(c, 16) gradients."""
    step = max(inv.shape[-1], 16)
    for start in range(0, grads.shape[1], step):
        g = grads[:, start:start + step]
        u = torch.bmm(inv, g.transpose(1, 2))
        s = torch.bmm(g, u)
        s.diagonal(dim1=1, dim2=2).add_(num_samples)
        chol = torch.linalg.cholesky(0.5 * (s + s.transpose(1, 2)))
        w = torch.linalg.solve_triangular(chol, u.transpose(1, 2), upper=False)
        inv.baddbmm_(w.transpose(1, 2), w, beta=1.0, alpha=-1.0)
    return inv


def fisher_inverse(grads: torch.Tensor, damp: float, num_samples: float) -> torch.Tensor:
    """(damp I + G^T G / N)^-1 per block from I / damp: (B, m, c) -> (B, c, c)."""
    b, _, c = grads.shape
    inv = torch.eye(c, dtype=grads.dtype).div_(damp).expand(b, c, c).contiguous()
    return woodbury_update_(inv, grads, num_samples)


def lowrank_factor(grads: torch.Tensor, damp: float, num_samples: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A = L^-1 G in the grads' dtype, diag(F^-1) from float64): (B, m, c) -> (B, m, c), (B, c)."""
    g64 = grads.to(torch.float64)
    gram = torch.bmm(g64, g64.transpose(1, 2))
    gram.diagonal(dim1=1, dim2=2).add_(num_samples * damp)
    a64 = torch.linalg.solve_triangular(torch.linalg.cholesky(gram), g64, upper=False)
    return a64.to(grads.dtype), ((1.0 - a64.square().sum(1)) / damp).to(grads.dtype)
