"""The two baselines every kernel is compared with (DESIGN.md section 4).

(a) :func:`reference_loop_inverse`: the paper's Sherman-Morrison recursion written
    plainly: for each block, for each gradient, one matrix-vector product and one
    outer-product update (a Python loop over blocks and over gradients).
(b) :func:`batched_einsum_inverse`: the batched torch form of an oBERT-style pruner:
    for each gradient, one ``einsum`` computing F^-1 g for all blocks at once and
    one ``baddbmm_`` applying all rank-one updates at once.

Both compute ``(damp I + G_b^T G_b / N)^-1`` for every block b, the same matrix as
``woodfisher_kernels.fisher_inverse`` (this is tested in tests/test_benchmarks_quick.py).
"""
from __future__ import annotations

from typing import Optional

import torch


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _validate(grads: torch.Tensor, damp: float, num_samples: Optional[float]):
    if not isinstance(grads, torch.Tensor) or grads.dim() != 3:
        raise ValueError("grads must be a (B, m, c) tensor")
    damp = _positive("damp", damp)
    n = float(grads.shape[1]) if num_samples is None else _positive("num_samples", num_samples)
    return damp, n


def _identity_over_damp(num_blocks: int, c: int, damp: float, like: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(c, dtype=like.dtype, device=like.device).div_(damp)
    return eye.expand(num_blocks, c, c).contiguous()


def reference_loop_update_(inv: torch.Tensor, grads: torch.Tensor, num_samples: float) -> torch.Tensor:
    """(a) in place: per block, per gradient ``u = F^-1 g; F^-1 -= u u^T / (N + g.u)``.

    inv (B, c, c), grads (B, k, c); a Python loop over the B blocks and k gradients.
    """
    for b in range(grads.shape[0]):
        block = inv[b]
        for i in range(grads.shape[1]):
            g = grads[b, i]
            u = torch.matmul(block, g)
            block.sub_(torch.outer(u, u), alpha=1.0 / (num_samples + float(torch.dot(g, u))))
    return inv


def _build(update_, grads: torch.Tensor, damp: float, num_samples: Optional[float]) -> torch.Tensor:
    """Run an in-place update form from I/damp over all m gradients: (B, m, c) -> (B, c, c)."""
    damp, n = _validate(grads, damp, num_samples)
    b, _, c = grads.shape
    return update_(_identity_over_damp(b, c, damp, grads), grads, n)


def reference_loop_inverse(grads: torch.Tensor, damp: float, num_samples: Optional[float] = None
                           ) -> torch.Tensor:
    """(a) the paper's loop from I/damp; grads (B, m, c) -> (B, c, c)."""
    return _build(reference_loop_update_, grads, damp, num_samples)


def batched_einsum_update_(inv: torch.Tensor, grads: torch.Tensor, num_samples: float) -> torch.Tensor:
    """(b) in place: per gradient, one einsum (all blocks) + one baddbmm (all blocks).

    inv (B, c, c), grads (B, k, c): k einsum + k baddbmm launches, each reading and
    writing every block's inverse once.
    """
    for i in range(grads.shape[1]):
        g = grads[:, i]                                        # (B, c)
        u = torch.einsum("bij,bj->bi", inv, g)                 # F^-1 g for every block
        denom = (g * u).sum(1).add_(num_samples)               # (B,)
        scaled = u / denom.unsqueeze(1)
        inv.baddbmm_(u.unsqueeze(2), scaled.unsqueeze(1), alpha=-1.0)
    return inv


def batched_einsum_inverse(grads: torch.Tensor, damp: float, num_samples: Optional[float] = None
                           ) -> torch.Tensor:
    """(b) the per-gradient einsum + baddbmm form from I/damp; grads (B, m, c) -> (B, c, c)."""
    return _build(batched_einsum_update_, grads, damp, num_samples)
