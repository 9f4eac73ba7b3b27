"""Low-rank (Woodbury) representation of the blockwise inverse, for m < c.

    F^-1 = (1/damp) * (I - G^T (N*damp*I + G G^T)^-1 G),   G = grads (B, m, c)

With ``L`` the Cholesky factor of ``K = N*damp*I + G G^T`` (B, m, m) and ``A = L^-1 G``
(B, m, c), ``F^-1 = (I - A^T A) / damp``: the diagonal and products ``F^-1 v`` cost
O(m c) per block and the c x c inverse is never formed. The Gram matrix and its
Cholesky factor are computed in float64 (m^3 / 3 flops, small next to m^2 c), which
keeps the diagonal ``(1 - ||A[:, q]||^2) / damp`` accurate when damp is tiny.
"""
from __future__ import annotations

import torch

from . import reference


class LowRankInverse:
    """Blockwise ``(damp I + G^T G / num_samples)^-1`` kept as factors, never c x c.

    Attributes:
        factor: (B, m, c) ``A = L^-1 G`` in the gradients' dtype.
        damp, num_samples: the scalars of F.
        diag_cached: (B, c) the inverse's diagonal.
    """

    def __init__(self, grads: torch.Tensor, damp: float, num_samples: float):
        dtype = grads.dtype
        g64 = grads.to(torch.float64)
        gram = torch.bmm(g64, g64.transpose(1, 2))                     # (B, m, m)
        gram.diagonal(dim1=1, dim2=2).add_(num_samples * damp)
        chol = torch.linalg.cholesky(gram)
        a64 = torch.linalg.solve_triangular(chol, g64, upper=False)    # (B, m, c)
        self.damp = float(damp)
        self.num_samples = float(num_samples)
        self.diag_cached = ((1.0 - a64.square().sum(1)) / damp).to(dtype)
        self.factor = a64.to(dtype)

    @property
    def shape(self):
        b, _, c = self.factor.shape
        return torch.Size((b, c, c))

    @property
    def dtype(self):
        return self.factor.dtype

    @property
    def device(self):
        return self.factor.device

    def diag(self) -> torch.Tensor:
        """Diagonal of F^-1, (B, c)."""
        return self.diag_cached

    def matmat(self, v: torch.Tensor) -> torch.Tensor:
        """F^-1 v for v (B, c, r) -> (B, c, r)."""
        a = self.factor
        return (v - torch.bmm(a.transpose(1, 2), torch.bmm(a, v))) / self.damp

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """F^-1 v for v (B, c) -> (B, c)."""
        return self.matmat(v.unsqueeze(-1)).squeeze(-1)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows F^-1[b, index[b, g, i], :] -> (B, G, q, c) (F^-1 is symmetric)."""
        a = self.factor
        cols = torch.gather(a, 2, index.long().flatten(1).unsqueeze(1).expand(-1, a.shape[1], -1))
        rows = -torch.bmm(cols.transpose(1, 2), a)                    # (B, G*q, c)
        onehot = torch.zeros_like(rows).scatter_(2, index.long().flatten(1).unsqueeze(-1), 1.0)
        return ((rows + onehot) / self.damp).view(*index.shape, -1)

    def dense(self) -> torch.Tensor:
        """The full (B, c, c) inverse (for tests and small blocks)."""
        b, _, c = self.factor.shape
        eye = torch.eye(c, dtype=self.dtype, device=self.device).expand(b, c, c)
        return self.matmat(eye.contiguous())

    def saliency(self, weights, loss_grad=None):
        return reference.saliency_from(self.diag(), self.matvec, weights, loss_grad)

    def update(self, weights, prune_mask, loss_grad=None):
        return reference.update_from(self.diag(), self.matvec, weights, prune_mask, loss_grad)


def choose_form(num_grads: int, block_size: int, num_blocks: int = 1,
                memory_budget: int | None = None, itemsize: int = 4) -> str:
    """Pick ``"sequential"`` (dense c x c inverses) or ``"lowrank"`` (factors, m x c).

    Flops per block: sequential ~4 m c^2, low-rank ~4 m^2 c + m^3 / 3; memory per
    block: c^2 against m c + m^2 entries. The cheaper form in flops is chosen unless
    it does not fit ``memory_budget`` (bytes) and the other one does.
    """
    m, c = int(num_grads), int(block_size)
    if m < 1:
        raise ValueError(f"num_grads must be >= 1, got {num_grads}")
    if c < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    seq_flops, lr_flops = 4.0 * m * c * c, 4.0 * m * m * c + m ** 3 / 3.0
    seq_bytes = num_blocks * c * c * itemsize
    lr_bytes = num_blocks * (m * c + m * m) * itemsize
    form = "sequential" if seq_flops <= lr_flops else "lowrank"
    if memory_budget is not None:
        fits = {"sequential": seq_bytes <= memory_budget, "lowrank": lr_bytes <= memory_budget}
        if not fits[form]:
            other = "lowrank" if form == "sequential" else "sequential"
            if fits[other]:
                form = other
            else:
                raise ValueError(
                    f"memory_budget={memory_budget} bytes fits neither form: sequential needs "
                    f"{seq_bytes}, lowrank needs {lr_bytes}; use smaller blocks or fewer gradients"
                )
    return form
