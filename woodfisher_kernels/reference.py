"""Torch implementations of every op: the CPU fallback and the reference for tests.

Batched over blocks (no Python loop over blocks); any float dtype, float64 included.
Shapes: B blocks of size c, k (or m) gradients per block, G groups of size q.

The Woodbury build / update live in :mod:`._woodbury` (chunks of 16, 32 or 64 gradients,
float64 K x K factorisation, cache-sized tiles of blocks). Their functions here also
carry a ``checked`` attribute, an out-of-place variant returning ``(result, bad)`` with
per-block failure flags, which the public ops use for their float64 recomputation and
to keep ``woodbury_update_`` transactional without an extra copy.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ._woodbury import woodbury_blocks, woodbury_ops

woodbury_update_, fisher_inverse = woodbury_ops(woodbury_blocks)


def _matvec(inv: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.bmm(inv, v.unsqueeze(-1)).squeeze(-1)


def saliency_from(diag, matvec, weights, loss_grad=None) -> torch.Tensor:
    """rho = (w - h)^2 / (2 diag), h = matvec(loss_grad); any inverse given by (diag, matvec)."""
    resid = weights if loss_grad is None else weights - matvec(loss_grad)
    return resid.square() / (2.0 * diag)


def update_from(diag, matvec, weights, prune_mask, loss_grad=None) -> torch.Tensor:
    """w - matvec(v) - h with v = (w - h) / diag on the pruned set; pruned entries set to 0."""
    if loss_grad is None:
        resid, shift = weights, None
    else:
        shift = matvec(loss_grad)
        resid = weights - shift
    v = torch.where(prune_mask, resid / diag, torch.zeros_like(resid))
    new = weights - matvec(v)
    if shift is not None:
        new = new - shift
    return new.masked_fill(prune_mask, 0.0)


def obs_saliency(inv: torch.Tensor, weights: torch.Tensor, loss_grad=None) -> torch.Tensor:
    """rho (B, c) = (w - h)^2 / (2 diag(inv)), h = inv @ loss_grad (h = 0 without it)."""
    diag = torch.diagonal(inv, dim1=1, dim2=2)
    return saliency_from(diag, lambda v: _matvec(inv, v), weights, loss_grad)


def obs_update(inv, weights, prune_mask, loss_grad=None) -> torch.Tensor:
    """New weights (B, c) after the OBS / WoodTaylor update; pruned entries exactly 0."""
    diag = torch.diagonal(inv, dim1=1, dim2=2)
    return update_from(diag, lambda v: _matvec(inv, v), weights, prune_mask, loss_grad)


def gather_rows(inv: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows inv[b, index[b, g, i], :] -> (B, G, q, c)."""
    batch = torch.arange(inv.shape[0], device=inv.device).view(-1, 1, 1)
    return inv[batch, index.long()]


def subblocks_from_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Columns ``index`` of gathered rows (B, G, q, c) -> (B, G, q, q)."""
    q = index.shape[-1]
    cols = index.long().unsqueeze(2).expand(*index.shape[:2], q, q)
    return torch.gather(rows, 3, cols)


def gather_subblocks(inv: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``inv[b, index[b, g, i], index[b, g, j]]`` -> (B, G, q, q), without forming the groups' rows."""
    idx = index.long()
    batch = torch.arange(inv.shape[0], device=inv.device).view(-1, 1, 1, 1)
    return inv[batch, idx.unsqueeze(-1), idx.unsqueeze(-2)]


def _group_coefficients(sub, w_q, exact: bool):
    """Per-group coefficients a (B, G, q) with dw = -rows^T a, and rho (B, G)."""
    if exact:  # the q x q system in float64: its condition number reaches cond(F) for wide groups
        sub64 = sub.double()
        chol = torch.linalg.cholesky(0.5 * (sub64 + sub64.transpose(-1, -2)))
        coef = torch.cholesky_solve(w_q.double().unsqueeze(-1), chol).squeeze(-1).to(w_q.dtype)
        rho = 0.5 * (w_q * coef).sum(-1)
    else:  # the paper's Eq. 18: one combined constraint 1_Q^T (w + dw) = 0
        denom = sub.sum(dim=(-1, -2))
        total = w_q.sum(-1)
        rho = total.square() / (2.0 * denom)
        coef = (total / denom).unsqueeze(-1).expand_as(w_q)
    return coef, rho


def group_weights(weights, groups):
    """w_Q (B, G, q) of each group of ``groups`` (B, G, q) from blocked ``weights`` (B, c)."""
    return torch.gather(weights, 1, groups.long().flatten(1)).view(groups.shape)


def group_coefficients(sub, weights, groups, exact: bool = True):
    """(a (B, G, q), rho (B, G)) of group OBS from the groups' subblocks ``[F^-1]_QQ`` (B, G, q, q)
    (:func:`gather_subblocks`): ``rho_Q = w_Q^T a_Q / 2``, ``dw = -F^-1 E_Q a_Q`` per removed group."""
    return _group_coefficients(sub, group_weights(weights, groups), exact)


def group_update_with(coef, matvec, weights, groups, prune) -> torch.Tensor:
    """New weights (B, c) after removing the groups where ``prune`` (B, G) is True, from their coefficients
    (:func:`group_coefficients`) and ``matvec(v) = F^-1 v``: ``dw = -F^-1 sum_Q E_Q a_Q`` is one product per block,
    whatever the number of groups (no row of F^-1 is formed)."""
    coef = coef * prune.unsqueeze(-1).to(coef.dtype)
    v = torch.zeros_like(weights).scatter_add_(1, groups.long().flatten(1), coef.flatten(1))
    mask = torch.zeros_like(weights, dtype=torch.bool)
    mask.scatter_(1, groups.long().flatten(1), prune.unsqueeze(-1).expand(groups.shape).flatten(1))
    return (weights - matvec(v)).masked_fill(mask, 0.0)


def group_obs_saliency(inv, weights, groups, exact: bool = True) -> torch.Tensor:
    """rho (B, G) for removing each group of ``groups`` (B, G, q) at once; ``inv`` (B, c, c)."""
    return group_coefficients(gather_subblocks(inv, groups), weights, groups, exact)[1]


def group_obs_update(inv, weights, groups, prune, exact: bool = True) -> torch.Tensor:
    """New weights (B, c) after removing the groups where ``prune`` (B, G) is True; ``inv`` (B, c, c)."""
    coef = group_coefficients(gather_subblocks(inv, groups), weights, groups, exact)[0]
    return group_update_with(coef, lambda v: _matvec(inv, v), weights, groups, prune)


ROW_STEP_MIN = 128        # rows of the Gram per product (block-triangular products)
ROW_BLOCKS = 4            # about m / 4 rows per product: 1.25 m^2 c flops each, still large products
SQUARES_ROWS = 32         # rows of A whose squares are summed in float32 (as the C kernel)


def _row_steps(m: int):
    step = max(ROW_STEP_MIN, -(-m // ROW_BLOCKS))
    return [(r0, min(m, r0 + step)) for r0 in range(0, m, step)]


def lowrank_factor(grads: torch.Tensor, damp: float, num_samples: float
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, diag, bad)`` of the low-rank inverse (:mod:`woodfisher_kernels.lowrank`, which states
    the formula and the precision): A = L^-1 G (B, m, c) and diag(F^-1) (B, c) in the grads'
    dtype, bad (B,) bool flags of failed blocks; grads (B, m, c), m >= 1."""
    num_blocks, m, c = grads.shape
    steps = _row_steps(m)
    gram = torch.zeros(num_blocks, m, m, dtype=grads.dtype, device=grads.device)
    for r0, r1 in steps:                                         # lower block-triangle of G G^T
        gram[:, r0:r1, :r1] = torch.bmm(grads[:, r0:r1], grads[:, :r1].transpose(1, 2))
    low = torch.tril(gram.to(torch.float64), -1)
    k64 = low + low.transpose(1, 2)
    k64.diagonal(dim1=1, dim2=2).copy_(gram.diagonal(dim1=1, dim2=2)).add_(num_samples * damp)
    chol, info = torch.linalg.cholesky_ex(k64)
    # A^T = G^T L^-T: a right-side solve on the transposed views needs no copy of G (column-major
    # as LAPACK wants it) and returns A^T column-major, i.e. A row-major (a left solve copies G).
    factor = torch.linalg.solve_triangular(chol.to(grads.dtype).transpose(1, 2), grads.transpose(1, 2),
                                           upper=True, left=False).transpose(1, 2)
    sq = torch.zeros(num_blocks, c, dtype=torch.float64, device=grads.device)
    for r0 in range(0, m, SQUARES_ROWS):                         # float32 partial sums, added in float64
        sq += factor[:, r0:r0 + SQUARES_ROWS].square().sum(1)    # (an einsum is 10x slower on CPU)
    diag = ((1.0 - sq) / damp).to(grads.dtype)
    # a NaN / Inf (or an overflowing entry) in A gives a NaN / -Inf diagonal entry: one check covers both
    bad = (info != 0) | ~(torch.isfinite(diag) & (diag > 0)).all(dim=1)
    return factor, diag, bad


IMPLS = {"woodbury_update_": woodbury_update_, "fisher_inverse": fisher_inverse,
         "obs_saliency": obs_saliency, "obs_update": obs_update,
         "lowrank_factor": lowrank_factor}
