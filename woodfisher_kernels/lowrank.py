"""Low-rank (Woodbury) representation of the blockwise inverse, for m < c.

    F^-1 = (1/damp) * (I - G^T (N*damp*I + G G^T)^-1 G),   G = grads (B, m, c)

With ``L`` the Cholesky factor of ``K = N*damp*I + G G^T`` (B, m, m) and ``A = L^-1 G``
(B, m, c), ``F^-1 = (I - A^T A) / damp``: the diagonal ``(1 - ||A[:, q]||^2) / damp`` and
products ``F^-1 v`` cost O(m c) per block and the c x c inverse is never formed.

Precision and speed: the Gram matrix ``G G^T`` is a float32 product (~1.25 m^2 c flops:
only its lower block-triangle, in 4 row blocks); only the m x m Cholesky factorisation of
K (~m^3 / 3 flops) runs in float64; ``A = L^-1 G`` is one float32 triangular solve (m^2 c
flops) with that factor rounded to float32, solved from the right on the transposed views
(``A^T = G^T L^-T``) so that G is not copied; the diagonal sums the squares of A in
float32 over 32 rows at a time and those sums in float64. This keeps the diagonal within 1e-6 of
a float64 computation on ResNet-20 gradients at damp 1e-5
(benchmarks/results/cpu_fallback.md). Products ``F^-1 v`` cancel in the gradients' span (relative error
eps32 * kappa there), so blocks beyond ``eps32 * kappa > 1e-3`` keep a float64 factor apart
(:func:`._numerics.refine_lowrank`, ``refined``). The stated bound of :mod:`._numerics` holds;
blocks that fail (non-finite factor, diagonal <= 0, K not positive definite in float64)
are recomputed in float64 or refused (``on_failure``).

Backends: the torch implementation above (:func:`woodfisher_kernels.reference.lowrank_factor`,
any dtype and device) or, for float32 CPU gradients, the fused C kernel (backend "cpu",
csrc/cpu/lowrank_cpu_kernel.h: the same steps one block at a time in cache, the triangular
solve replaced by the product with L^-1 computed in float64 and rounded to float32, as the
C Woodbury kernel does). CUDA tensors use the torch implementation (cuBLAS / cuSOLVER calls).

For m >= c the low-rank form has no memory advantage (m c >= c^2) and its float32
factor loses everything to the cancellation in I - A^T A, so :class:`LowRankInverse`
then holds the dense (B, c, c) inverse of the torch Woodbury path instead (same
interface, ``factor`` is None).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _dispatch, reference
from . import _numerics as num
from ._checks import check_choice, check_int, check_positive, check_tensor
from .sizes import check_bytes


def _factor_impl(backend: str, grads: torch.Tensor):
    """The lowrank_factor implementation for ``backend`` (ValueError naming it when it cannot run)."""
    if backend in ("cuda", "triton"):                  # no low-rank kernel: library calls on the device
        backend = "torch"
    return _dispatch.select("lowrank_factor", backend, grads)


class LowRankInverse:
    """Blockwise ``(damp I + G^T G / num_samples)^-1`` kept as factors, never c x c (m < c).

    Args:
        grads: (B, m, c) gradients (float32 or float64).
        damp, num_samples: the scalars of F (> 0).
        on_failure: "recompute" (float64 for failed blocks) or "raise" (ValueError).
        backend: "auto" (the C kernel for float32 CPU gradients when built, else torch),
            "cpu" or "torch"; "cuda" / "triton" have no low-rank kernel and use torch.
    Attributes:
        factor: (B, m, c) ``A = L^-1 G`` in the gradients' dtype (None when m >= c); zero for refined blocks.
        refined: float32 blocks with ``eps32 * kappa > 1e-3`` whose factor is kept in float64 (apart, for those
            blocks only; every product and diagonal entry of theirs comes from it), see
            :func:`._numerics.refine_lowrank`. 0: none.
        damp, num_samples: the scalars of F.
        diag_cached: (B, c) the inverse's diagonal.
    Raises:
        ValueError: ``grads`` not a 3-D float32/float64 tensor without empty dimensions, ``damp`` /
            ``num_samples`` not a finite number > 0, an unknown ``on_failure`` / ``backend`` (or one
            that cannot run here), failed blocks that float64 cannot fix, or any with on_failure="raise".
            NaN / Inf gradients are refused by :func:`woodfisher_kernels.lowrank_inverse` (one read).
    """

    def __init__(self, grads: torch.Tensor, damp: float, num_samples: float, on_failure: str = "recompute",
                 backend: str = "auto"):
        check_tensor("grads", grads, 3)
        self.damp = check_positive("damp", damp)
        self.num_samples = check_positive("num_samples", num_samples)
        check_choice("on_failure", on_failure, num.ON_FAILURE)
        check_choice("backend", backend, _dispatch.CHOICES)
        grads = grads.detach().contiguous()
        num_blocks, m, c = grads.shape
        self._dense: Optional[torch.Tensor] = None
        self._exact = None  # (block indices, LowRankInverse of their float64 factor): see ``refined``
        self.refined = 0
        kappa_of = lambda idx: num.gram_lmax(grads[idx]) / (self.num_samples * self.damp)  # noqa: E731
        if m >= c:
            self.factor = None
            self._dense = num.guarded_fisher_inverse(reference.fisher_inverse, grads, self.damp,
                                                     self.num_samples, on_failure)
            self.diag_cached = torch.diagonal(self._dense, dim1=1, dim2=2)
            return
        factor, diag, bad = _factor_impl(backend, grads)(grads, self.damp, self.num_samples)

        def recompute64(idx):
            a64, d64, bad64 = reference.lowrank_factor(grads[idx].double(), self.damp, self.num_samples)
            return (a64, d64), bad64

        def check(fixed):
            return ~torch.isfinite(fixed[0].sum(dim=(1, 2))) | ~(fixed[1] > 0).all(dim=1)

        num.repair("lowrank_inverse", (factor, diag), bad, on_failure, recompute64, kappa_of,
                   f"damp={self.damp:g} (kappa = lambda_max(G^T G / N) / damp)", check)
        self.factor, self.diag_cached = factor, diag
        exact = num.refine_lowrank(grads, self.damp, self.num_samples, recompute64)
        if exact is not None:  # their float32 factor zeroed (no failure there); results from the float64 one
            idx, (a64, d64) = exact
            factor[idx] = 0.0
            diag[idx] = d64.to(diag.dtype)
            self._exact = (idx, LowRankInverse._of_factor(a64, d64, self.damp, self.num_samples))
            self.refined = int(idx.numel())

    @classmethod
    def _of_factor(cls, factor: torch.Tensor, diag: torch.Tensor, damp: float, num_samples: float) -> "LowRankInverse":
        out = cls.__new__(cls)
        out.factor, out.diag_cached, out.damp, out.num_samples = factor, diag, damp, num_samples
        out._dense, out._exact, out.refined = None, None, 0
        return out

    def _patch(self, out, method: str, *args):
        """``out`` (a tensor or tuple of per-block tensors) with the refined blocks' entries from the float64
        factor's ``method(*args)`` (per-block tensor arguments taken at those blocks, floats in float64)."""
        if self._exact is None:
            return out
        idx, exact = self._exact
        taken = [a if not isinstance(a, torch.Tensor) else a[idx].double() if a.is_floating_point() else a[idx]
                 for a in args]
        part = getattr(exact, method)(*taken)
        fixed = []
        for o, p in zip(out if isinstance(out, tuple) else (out,), part if isinstance(part, tuple) else (part,)):
            o = o.contiguous()
            o[idx] = p.to(o.dtype)
            fixed.append(o)
        return tuple(fixed) if isinstance(out, tuple) else fixed[0]

    @property
    def shape(self):
        b, c = self.diag_cached.shape
        return torch.Size((b, c, c))

    @property
    def dtype(self):
        return self.diag_cached.dtype

    @property
    def device(self):
        return self.diag_cached.device

    def select(self, index: torch.Tensor) -> "LowRankInverse":
        """The inverse of some blocks only, sharing nothing with this one.

        Args:
            index: 1-D int64 tensor (or bool mask of length B) of block indices.
        Returns:
            :class:`LowRankInverse` of shape (len(index), c, c).
        Raises:
            ValueError: ``index`` not a 1-D integer tensor with entries in [0, B) or a bool mask of length B.
        """
        b = self.shape[0]
        if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.is_floating_point():
            raise ValueError(f"index must be a 1-D integer or bool tensor, got {index!r}"[:200])
        if index.dtype == torch.bool and index.numel() != b:
            raise ValueError(f"index as a bool mask must have length B = {b}, got {index.numel()}")
        if index.dtype != torch.bool and index.numel() and not (0 <= int(index.min()) and int(index.max()) < b):
            raise ValueError(f"index entries must lie in [0, {b}), got range [{int(index.min())}, {int(index.max())}]")
        sub = LowRankInverse.__new__(LowRankInverse)
        sub.damp, sub.num_samples = self.damp, self.num_samples
        sub.factor = None if self.factor is None else self.factor[index]
        sub._dense = None if self._dense is None else self._dense[index]
        sub.diag_cached = self.diag_cached[index]
        sub._exact, sub.refined = None, 0
        if self._exact is not None:  # the refined blocks among the selected ones
            idx, exact = self._exact
            where = torch.full((b,), -1, dtype=torch.long, device=idx.device)
            where[idx] = torch.arange(idx.numel(), device=idx.device)
            picked = where[torch.arange(b, device=idx.device)[index.to(idx.device)]]
            inside = (picked >= 0).nonzero().squeeze(1)
            if inside.numel():
                sub._exact = (inside, exact.select(picked[inside]))
                sub.refined = int(inside.numel())
        return sub

    def diag(self) -> torch.Tensor:
        """Diagonal of F^-1 (cached at construction).

        Returns:
            (B, c) ``[F^-1]_qq = (1 - ||A[:, q]||^2) / damp``, dtype and device of the gradients.
        """
        return self.diag_cached

    def matmat(self, v: torch.Tensor) -> torch.Tensor:
        """Products ``F^-1 v`` in O(m c r) per block, the c x c inverse never formed.

        Args:
            v: (B, c, r), dtype and device of the factor.
        Returns:
            (B, c, r).
        Raises:
            ValueError: ``v`` not a (B, c, r) tensor of the factor's dtype and device.
        """
        b, c, _ = self.shape
        if (not isinstance(v, torch.Tensor) or v.dim() != 3 or tuple(v.shape[:2]) != (b, c)
                or v.dtype != self.dtype or v.device != self.device):
            got = f"{tuple(v.shape)} {v.dtype} on {v.device}" if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"v must be ({b}, {c}, r) {self.dtype} on {self.device}, got {got}")
        if self._dense is not None:
            return torch.bmm(self._dense, v)
        a = self.factor
        return self._patch((v - torch.bmm(a.transpose(1, 2), torch.bmm(a, v))) / self.damp, "matmat", v)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Product ``F^-1 v``.

        Args:
            v: (B, c), dtype and device of the factor.
        Returns:
            (B, c).
        Raises:
            ValueError: ``v`` not (B, c) of the factor's dtype and device (as in :meth:`matmat`).
        """
        if not isinstance(v, torch.Tensor) or v.dim() != 2:
            raise ValueError(f"v must be a (B, c) tensor, got {tuple(v.shape) if isinstance(v, torch.Tensor) else v!r}")
        return self.matmat(v.unsqueeze(-1)).squeeze(-1)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``F^-1[b, index[b, g, i], :]`` (F^-1 is symmetric), for group OBS.

        Args:
            index: (B, G, q) integer indices in [0, c) (not checked here: see :func:`.ops.gather_rows`).
        Returns:
            (B, G, q, c).
        """
        if self._dense is not None:
            return reference.gather_rows(self._dense, index)
        a = self.factor
        cols = self._columns(index).transpose(1, 2).flatten(2)        # (B, m, G*q)
        rows = -torch.bmm(cols.transpose(1, 2), a)                    # (B, G*q, c)
        onehot = torch.zeros_like(rows).scatter_(2, index.long().flatten(1).unsqueeze(-1), 1.0)
        return self._patch(((rows + onehot) / self.damp).view(*index.shape, -1), "rows", index)

    def subblocks(self, index: torch.Tensor) -> torch.Tensor:
        """``[F^-1]_QQ = (I_QQ - A_Q^T A_Q) / damp`` for each group Q = index[b, g], for group OBS: O(m q^2)
        flops and q^2 entries per group, no row of F^-1 formed.

        Args:
            index: (B, G, q) integer indices in [0, c) (not checked here: see :func:`.ops.gather_subblocks`).
        Returns:
            (B, G, q, q).
        """
        if self._dense is not None:
            return reference.gather_subblocks(self._dense, index)
        cols = self._columns(index)                                          # (B, G, m, q)
        eye = (index.unsqueeze(-1) == index.unsqueeze(-2)).to(cols.dtype)    # I_QQ (repeated indices too)
        return self._patch((eye - torch.matmul(cols.transpose(-1, -2), cols)) / self.damp, "subblocks", index)

    def _columns(self, index: torch.Tensor) -> torch.Tensor:
        """A_Q: the factor's columns of each group, (B, G, m, q)."""
        a = self.factor
        b, g, q = index.shape
        cols = torch.gather(a, 2, index.long().flatten(1).unsqueeze(1).expand(-1, a.shape[1], -1))
        return cols.view(b, a.shape[1], g, q).transpose(1, 2)

    def group_coefficients(self, index: torch.Tensor, weights: torch.Tensor, exact: bool = True):
        """Group OBS coefficients ``a_Q = ([F^-1]_QQ)^-1 w_Q`` and statistics ``rho_Q = w_Q^T a_Q / 2`` (WoodFisher
        paper Sec. 4.2; ``exact=False``: the Eq. 18 relaxation), for :func:`.ops.group_obs_saliency` / ``_update``.

        Groups wider than the factor (q > m, e.g. whole rows of a layer) never form a q x q matrix: by the
        Woodbury identity ``([F^-1]_QQ)^-1 = damp (I + A_Q^T (I_m - A_Q A_Q^T)^-1 A_Q)``, one m x m system per group
        (float64), and Eq. 18's ``1^T [F^-1]_QQ 1 = (1^T I_QQ 1 - ||A_Q 1||^2) / damp``. Narrower groups use the
        q x q subblocks (:meth:`subblocks`).

        Args:
            index: (B, G, q) integer indices in [0, c) (not checked here). weights: (B, c) blocked weights.
            exact: the exact statistic (True) or Eq. 18 (False).
        Returns:
            (a (B, G, q), rho (B, G)), the dtype of the factor.
        """
        q = index.shape[-1]
        if self._dense is not None or q <= self.factor.shape[1]:
            return reference.group_coefficients(self.subblocks(index), weights, index, exact)
        return self._patch(self._wide_group_coefficients(index, weights, exact), "group_coefficients", index,
                           weights, exact)

    def _wide_group_coefficients(self, index: torch.Tensor, weights: torch.Tensor, exact: bool):
        """:meth:`group_coefficients` of groups wider than the factor (q > m), from the factor alone."""
        a = self.factor
        m = a.shape[1]
        cols = self._columns(index)                                           # A_Q: (B, G, m, q)
        w_q = reference.group_weights(weights, index)
        if not exact:
            s = index.sort(dim=-1).values                                     # 1^T I_QQ 1 = sum of count^2
            ones = (torch.searchsorted(s, s, right=True) - torch.searchsorted(s, s)).sum(-1).to(a.dtype)
            denom = (ones - cols.sum(-1).square().sum(-1)) / self.damp
            total = w_q.sum(-1)
            return (total / denom).unsqueeze(-1).expand_as(w_q), total.square() / (2.0 * denom)
        c64 = cols.double()
        eye = torch.eye(m, dtype=torch.float64, device=a.device)
        chol = torch.linalg.cholesky(eye - torch.matmul(c64, c64.transpose(-1, -2)))
        u = torch.matmul(c64, w_q.double().unsqueeze(-1))                     # A_Q w_Q: (B, G, m, 1)
        z = torch.cholesky_solve(u, chol)
        coef = (self.damp * (w_q.double() + torch.matmul(c64.transpose(-1, -2), z).squeeze(-1))).to(a.dtype)
        return coef, 0.5 * (w_q * coef).sum(-1)

    def dense(self) -> torch.Tensor:
        """The full inverse (for tests and small blocks).

        Returns:
            (B, c, c), dtype and device of the gradients.
        """
        if self._dense is not None:
            return self._dense.clone()
        b, c = self.diag_cached.shape
        eye = torch.eye(c, dtype=self.dtype, device=self.device).expand(b, c, c)
        return self.matmat(eye.contiguous())

    def saliency(self, weights, loss_grad=None):
        """OBS saliency from the factors (WoodFisher paper Eq. 11; Eq. 23 with ``loss_grad``).

        Unchecked: the public entry point is :func:`woodfisher_kernels.obs_saliency`.

        Args:
            weights: (B, c) blocked weights. loss_grad: (B, c) or None (WoodTaylor).
        Returns:
            rho: (B, c).
        """
        return reference.saliency_from(self.diag(), self.matvec, weights, loss_grad)

    def update(self, weights, prune_mask, loss_grad=None):
        """OBS update from the factors (WoodFisher paper Eq. 10 summed over the pruned set; Eq. 21
        with ``loss_grad``).

        Unchecked: the public entry point is :func:`woodfisher_kernels.obs_update`.

        Args:
            weights: (B, c). prune_mask: (B, c) bool. loss_grad: (B, c) or None.
        Returns:
            (B, c) new weights, exactly 0 where ``prune_mask``.
        """
        return reference.update_from(self.diag(), self.matvec, weights, prune_mask, loss_grad)


def form_bytes(num_grads: int, block_size: int, num_blocks: int = 1, itemsize: int = 4) -> dict:
    """Bytes of each form's representation: {"sequential": B c^2, "lowrank": B (m c + m^2)} entries x itemsize."""
    m, c = num_grads, block_size
    return {"sequential": num_blocks * c * c * itemsize, "lowrank": num_blocks * (m * c + m * m) * itemsize}


def choose_form(num_grads: int, block_size: int, num_blocks: int = 1,
                memory_budget: int | str | None = None, itemsize: int = 4) -> str:
    """Pick ``"sequential"`` (dense c x c inverses) or ``"lowrank"`` (factors, m x c).

    Flops per block: sequential ~4 m c^2, low-rank ~4 m^2 c + m^3 / 3; memory per
    block: c^2 against m c + m^2 entries. The cheaper form in flops is chosen unless
    it does not fit ``memory_budget`` and the other one does.

    Args:
        num_grads: m, the fisher subsample size (>= 1).
        block_size: c (>= 1).
        num_blocks: B (>= 1).
        memory_budget: bytes available for the representation: a number, a size string of
            :func:`woodfisher_kernels.parse_bytes` ("1GB", "512MiB"), or None (unlimited).
        itemsize: bytes per entry (4 for float32).
    Returns:
        "sequential" or "lowrank".
    Raises:
        ValueError: ``num_grads``, ``block_size``, ``num_blocks`` or ``itemsize`` not an
            integer >= 1, ``memory_budget`` not None, a size string or a finite number > 0, or a
            ``memory_budget`` that fits neither form.
    """
    m, c = check_int("num_grads", num_grads, 1), check_int("block_size", block_size, 1)
    num_blocks, itemsize = check_int("num_blocks", num_blocks, 1), check_int("itemsize", itemsize, 1)
    if memory_budget is not None:
        memory_budget = check_bytes("memory_budget", memory_budget)
    seq_flops, lr_flops = 4.0 * m * c * c, 4.0 * m * m * c + m ** 3 / 3.0
    seq_bytes, lr_bytes = form_bytes(m, c, num_blocks, itemsize).values()
    form = "sequential" if seq_flops <= lr_flops else "lowrank"
    if memory_budget is not None:
        fits = {"sequential": seq_bytes <= memory_budget, "lowrank": lr_bytes <= memory_budget}
        if not fits[form]:
            other = "lowrank" if form == "sequential" else "sequential"
            if fits[other]:
                form = other
            else:
                raise ValueError(
                    f"memory_budget={memory_budget:.0f} bytes fits neither form: sequential needs "
                    f"{seq_bytes}, lowrank needs {lr_bytes}; use smaller blocks or fewer gradients"
                )
    return form
