"""Public ops: validate, then dispatch to the cuda | triton | torch backend.

Shapes: B blocks of size c; k (or m) gradients per block; G groups of q entries.
Every op refuses bad input with a ValueError naming the argument, before anything
is written, and every op has exactly one torch reference in :mod:`.reference`.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import _checks as chk
from . import reference
from ._dispatch import select
from .lowrank import LowRankInverse, choose_form

Inverse = Union[torch.Tensor, LowRankInverse]

def _num_samples(num_samples, grads):
    return float(grads.shape[1]) if num_samples is None else chk.check_positive("num_samples", num_samples)


def woodbury_update_(inv: torch.Tensor, grads: torch.Tensor, num_samples: float, *,
                     backend: str = "auto", check_finite: bool = True) -> torch.Tensor:
    """Apply k successive Sherman-Morrison updates to every block, in place.

    For each block b and each gradient g = grads[b, i] in order::

        u = inv[b] g;  inv[b] <- inv[b] - u u^T / (num_samples + g^T u)

    i.e. ``inv[b] <- (inv[b]^-1 + grads[b]^T grads[b] / num_samples)^-1``.

    Args:
        inv: (B, c, c) symmetric positive definite inverses, float32 (float64 on torch).
        grads: (B, k, c) gradient slices, same dtype and device.
        num_samples: N > 0, the Fisher's normaliser (usually the total gradient count m).
        backend: "auto" | "cuda" | "triton" | "torch".
        check_finite: refuse NaN/Inf inputs (costs one pass over the inputs).
    Returns:
        ``inv`` (modified in place).
    """
    chk.check_square_blocks("inv", inv)
    chk.check_tensor("grads", grads, 3)
    chk.check_same("grads", grads, "inv", inv)
    if grads.shape[0] != inv.shape[0] or grads.shape[2] != inv.shape[2]:
        raise ValueError(f"grads must have shape ({inv.shape[0]}, k, {inv.shape[2]}), got {tuple(grads.shape)}")
    n = chk.check_positive("num_samples", num_samples)
    if check_finite:
        chk.check_finite("inv", inv)
        chk.check_finite("grads", grads)
    impl = select("woodbury_update_", backend, inv, grads.shape[1])
    target = inv if inv.is_contiguous() else inv.contiguous()
    impl(target, grads.contiguous(), n)
    if target is not inv:
        inv.copy_(target)
    return inv


def fisher_inverse(grads: torch.Tensor, damp: float, num_samples: Optional[float] = None, *,
                   backend: str = "auto", check_finite: bool = True) -> torch.Tensor:
    """Blockwise inverse empirical Fisher built from I/damp by m rank-one updates.

    ``out[b] = (damp I + grads[b]^T grads[b] / N)^-1``; the fused kernels start from
    I/damp in registers and never read an initial inverse from memory.

    Args:
        grads: (B, m, c) gradient slices (zero-padded entries stay decoupled).
        damp: lambda > 0.
        num_samples: N > 0; defaults to m.
    Returns:
        (B, c, c) inverses, dtype of ``grads``.
    """
    chk.check_tensor("grads", grads, 3)
    d = chk.check_positive("damp", damp)
    n = _num_samples(num_samples, grads)
    impl = select("fisher_inverse", backend, grads)
    if check_finite:
        chk.check_finite("grads", grads)
    return impl(grads.contiguous(), d, n)


def lowrank_inverse(grads: torch.Tensor, damp: float, num_samples: Optional[float] = None,
                    *, check_finite: bool = True) -> LowRankInverse:
    """Low-rank representation of ``(damp I + G^T G / N)^-1`` for grads (B, m, c), m < c."""
    chk.check_tensor("grads", grads, 3)
    d = chk.check_positive("damp", damp)
    n = _num_samples(num_samples, grads)
    if check_finite:
        chk.check_finite("grads", grads)
    return LowRankInverse(grads, d, n)


def blockwise_inverse(grads: torch.Tensor, damp: float, num_samples: Optional[float] = None, *,
                      form: str = "auto", memory_budget: Optional[int] = None,
                      backend: str = "auto") -> Inverse:
    """Dense (B, c, c) inverse or :class:`LowRankInverse`, chosen by :func:`choose_form`.

    Args:
        grads: (B, m, c). form: "auto" | "sequential" | "lowrank".
        memory_budget: bytes available for the representation (None = unlimited).
    """
    if form not in ("auto", "sequential", "lowrank"):
        raise ValueError(f"form must be 'auto', 'sequential' or 'lowrank', got {form!r}")
    chk.check_tensor("grads", grads, 3, finite=True)
    if form == "auto":
        b, m, c = grads.shape
        form = choose_form(m, c, b, memory_budget, grads.element_size())
    if form == "lowrank":
        return lowrank_inverse(grads, damp, num_samples, check_finite=False)
    return fisher_inverse(grads, damp, num_samples, backend=backend, check_finite=False)


def _check_inverse(inv: Inverse, check_finite: bool = True) -> None:
    if isinstance(inv, LowRankInverse):
        return
    chk.check_square_blocks("inv", inv)
    if check_finite:
        chk.check_finite("inv", inv)


def _check_weights(inv: Inverse, weights, loss_grad, check_finite: bool = True):
    b, c, _ = inv.shape
    chk.check_tensor("weights", weights, 2)
    ref = inv.factor if isinstance(inv, LowRankInverse) else inv
    chk.check_same("weights", weights, "inv", ref, shape=(b, c))
    if check_finite:
        chk.check_finite("weights", weights)
    if loss_grad is not None:
        chk.check_tensor("loss_grad", loss_grad, 2)
        chk.check_same("loss_grad", loss_grad, "inv", ref, shape=(b, c))
        if check_finite:
            chk.check_finite("loss_grad", loss_grad)


def inverse_diagonal(inv: Inverse) -> torch.Tensor:
    """Diagonal of every block: (B, c, c) or LowRankInverse -> (B, c)."""
    _check_inverse(inv)
    if isinstance(inv, LowRankInverse):
        return inv.diag()
    return torch.diagonal(inv, dim1=1, dim2=2).clone()


def obs_saliency(inv: Inverse, weights: torch.Tensor, loss_grad: Optional[torch.Tensor] = None,
                 *, backend: str = "auto", check_finite: bool = True) -> torch.Tensor:
    """OBS pruning statistic of every weight, fused with the diagonal extraction.

    Plain (Eq. 10): ``rho_q = w_q^2 / (2 [F^-1]_qq)``. WoodTaylor (Eq. 22), when
    ``loss_grad`` is given: ``rho_q = (w_q - h_q)^2 / (2 [F^-1]_qq)``, ``h = F^-1 loss_grad``.

    Args:
        inv: (B, c, c) inverses or a LowRankInverse.
        weights: (B, c) blocked weights. loss_grad: (B, c) or None.
        check_finite: refuse NaN/Inf inputs; this reads the whole inverse, which costs
            far more than the statistic itself (pass False for inverses you just built).
    Returns:
        rho: (B, c).
    """
    _check_inverse(inv, check_finite)
    _check_weights(inv, weights, loss_grad, check_finite)
    if isinstance(inv, LowRankInverse):
        return inv.saliency(weights, loss_grad)
    g = None if loss_grad is None else loss_grad.contiguous()
    return select("obs_saliency", backend, inv)(inv.contiguous(), weights.contiguous(), g)


def obs_update(inv: Inverse, weights: torch.Tensor, prune_mask: torch.Tensor,
               loss_grad: Optional[torch.Tensor] = None, *, backend: str = "auto",
               check_finite: bool = True) -> torch.Tensor:
    """OBS weight update for all blocks at once; returns new weights (B, c).

    ``w + dw`` with ``dw = -F^-1 v (- h)``, ``v_q = (w_q - h_q) / [F^-1]_qq`` on the
    pruned set P (``prune_mask``), 0 elsewhere; entries in P are exactly 0 afterwards.
    ``h = F^-1 loss_grad`` (WoodTaylor) or 0.

    Args:
        inv: (B, c, c) or LowRankInverse. weights: (B, c). prune_mask: (B, c) bool.
        loss_grad: (B, c) or None. check_finite: as in :func:`obs_saliency`.
    """
    _check_inverse(inv, check_finite)
    _check_weights(inv, weights, loss_grad, check_finite)
    chk.check_mask("prune_mask", prune_mask, "weights", weights)
    if isinstance(inv, LowRankInverse):
        return inv.update(weights, prune_mask, loss_grad)
    g = None if loss_grad is None else loss_grad.contiguous()
    impl = select("obs_update", backend, inv)
    return impl(inv.contiguous(), weights.contiguous(), prune_mask.contiguous(), g)


def gather_rows(inv: Inverse, index: torch.Tensor) -> torch.Tensor:
    """Rows of the inverse for each group: index (B, G, q) -> (B, G, q, c)."""
    _check_inverse(inv)
    b, c, _ = inv.shape
    chk.check_index("index", index, b, c, inv.device)
    if isinstance(inv, LowRankInverse):
        return inv.rows(index)
    return reference.gather_rows(inv, index)


def gather_subblocks(inv: Inverse, index: torch.Tensor) -> torch.Tensor:
    """[F^-1]_QQ for each group Q = index[b, g]: (B, G, q) -> (B, G, q, q)."""
    return reference.subblocks_from_rows(gather_rows(inv, index), index)


def group_obs_saliency(inv: Inverse, weights: torch.Tensor, groups: torch.Tensor,
                       *, exact: bool = True) -> torch.Tensor:
    """Statistic for removing each group Q at once: groups (B, G, q) -> rho (B, G).

    exact: ``rho_Q = w_Q^T ([F^-1]_QQ)^-1 w_Q / 2``; otherwise the paper's Eq. 18
    relaxation ``(1_Q^T w)^2 / (2 * 1_Q^T F^-1 1_Q)``.
    """
    _check_weights(inv, weights, None)
    rows = gather_rows(inv, groups)
    return reference.group_obs_saliency(rows, weights, groups, exact)


def group_obs_update(inv: Inverse, weights: torch.Tensor, groups: torch.Tensor,
                     prune: torch.Tensor, *, exact: bool = True) -> torch.Tensor:
    """Remove the groups where ``prune`` (B, G) is True; returns new weights (B, c).

    exact: ``dw = -F^-1[:, Q] ([F^-1]_QQ)^-1 w_Q`` per removed group, summed over groups;
    otherwise Eq. 18's ``dw = -(1_Q^T w) F^-1 1_Q / (1_Q^T F^-1 1_Q)``. Entries of
    removed groups are exactly 0 afterwards. Groups removed together should not overlap.
    """
    _check_weights(inv, weights, None)
    rows = gather_rows(inv, groups)
    chk.check_mask("prune", prune, "groups[..., 0]", groups[..., 0])
    return reference.group_obs_update(rows, weights, groups, prune, exact)
