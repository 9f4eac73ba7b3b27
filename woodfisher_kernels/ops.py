"""Public ops: validate, then call the torch.library op (:mod:`._library`), which dispatches
to the cuda | triton | cpu | torch backend.

Shapes: B blocks of size c; k (or m) gradients per block; G groups of q entries.
Every op refuses bad input with a ValueError naming the argument, before anything
is written, and every op has exactly one torch reference in :mod:`.reference`.
Inverses built in float32 follow the accuracy guarantee of :mod:`._numerics`
(:func:`error_bound`); blocks that fail are recomputed in float64 or refused
(``on_failure="recompute" | "raise"``). The ops are not differentiable: inputs that require
grad are read as constants (``detach()``) and no output requires grad. Scalars may be Python or
numpy numbers or one-element tensors; under ``torch.compile(fullgraph=True)`` pass Python numbers
(the compiler traces numpy scalars and tensors as data whose value it cannot check).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import _checks as chk
from . import _library as lib
from . import reference
from ._dispatch import CHOICES
from ._numerics import ON_FAILURE
from .lowrank import LowRankInverse, choose_form, form_bytes
from .sizes import check_bytes

Inverse = Union[torch.Tensor, LowRankInverse]


def _contig(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``x`` as a contiguous constant: the ops are not differentiable (no autograd formula), so an
    input that requires grad is read through ``detach()`` and no output requires grad."""
    return None if x is None else x.detach().contiguous()


def _num_samples(num_samples, grads):
    return float(grads.shape[1]) if num_samples is None else chk.check_positive("num_samples", num_samples)


def woodbury_update_(inv: torch.Tensor, grads: torch.Tensor, num_samples: float, *,
                     backend: str = "auto", check_finite: bool = True,
                     on_failure: str = "recompute") -> torch.Tensor:
    """Apply k successive Sherman-Morrison updates to every block, in place.

    Source: the WoodFisher paper (Singh & Alistarh, 2020), Sec. 3.2, Eq. 2. For each block b
    and each gradient g = grads[b, i] in order::

        u = inv[b] g;  inv[b] <- inv[b] - u u^T / (num_samples + g^T u)

    i.e. ``inv[b] <- (inv[b]^-1 + grads[b]^T grads[b] / num_samples)^-1``. Transactional:
    the new blocks are computed into scratch memory (one (B, c, c) buffer) and written to
    ``inv`` only when every block succeeded; on any error ``inv`` is left bit-for-bit as it was.

    Args:
        inv: (B, c, c) symmetric positive definite inverses (B blocks of block size c),
            float32 or float64 (float64 runs on the torch backend), any device.
        grads: (B, k, c) gradient slices, same dtype and device as ``inv``.
        num_samples: N > 0, the Fisher's normaliser (usually the fisher subsample size m
            over the whole build, not k).
        backend: "auto" | "cuda" | "triton" | "cpu" | "torch".
        check_finite: refuse NaN/Inf inputs (costs one pass over the inputs).
        on_failure: "recompute" (failed blocks, see :mod:`._numerics`, redone in float64)
            or "raise".
    Returns:
        ``inv`` (modified in place), (B, c, c).
    Raises:
        ValueError: ``inv`` not a 3-D float32/float64 tensor of square blocks, ``grads`` not
            (B, k, c) on the same device and dtype, an empty dimension, ``num_samples`` not a
            finite number > 0, an unknown ``backend`` / ``on_failure``, NaN/Inf inputs (with
            ``check_finite``), ``inv`` whose entries share memory (``expand``; it is written in
            place), or blocks that failed (with ``on_failure="raise"``, or even in float64),
            naming the inverse's damp and the measured kappa.
    """
    chk.check_square_blocks("inv", inv)
    chk.check_tensor("grads", grads, 3)
    chk.check_same("grads", grads, "inv", inv)
    if grads.shape[0] != inv.shape[0] or grads.shape[2] != inv.shape[2]:
        raise ValueError(f"grads must have shape ({inv.shape[0]}, k, {inv.shape[2]}), got {tuple(grads.shape)}")
    n = chk.check_positive("num_samples", num_samples)
    chk.check_choice("backend", backend, CHOICES)
    chk.check_choice("on_failure", on_failure, ON_FAILURE)
    chk.check_writable("inv", inv)
    inv_const = inv.detach()
    target = inv_const if inv.is_contiguous() else inv_const.contiguous()
    lib.woodbury_update_(target, _contig(grads), n, backend, on_failure, check_finite)
    if not inv.is_contiguous():
        inv_const.copy_(target)
    return inv


def fisher_inverse(grads: torch.Tensor, damp: float, num_samples: Optional[float] = None, *,
                   backend: str = "auto", check_finite: bool = True, on_failure: str = "recompute") -> torch.Tensor:
    """Blockwise inverse empirical Fisher built from I/damp by m rank-one updates.

    Source: the WoodFisher paper, Sec. 3.2, Eq. 2 (recursion started at ``F_0^-1 = I / damp``)
    with the block-wise approximation of the same section. ``out[b] = (damp I + grads[b]^T
    grads[b] / N)^-1``; the fused kernels start from I/damp in registers and never read an
    initial inverse from memory.

    Args:
        grads: (B, m, c) gradient slices, float32 or float64, any device: B blocks of block
            size c, m = fisher subsample size (zero-padded entries stay decoupled).
        damp: lambda > 0 (absolute, in the units of the Fisher's diagonal).
        num_samples: N > 0; defaults to m.
        backend, check_finite, on_failure: as in :func:`woodbury_update_`.
    Returns:
        (B, c, c) inverses, dtype and device of ``grads``.
    Raises:
        ValueError: ``grads`` not a 3-D float32/float64 tensor or with an empty dimension,
            ``damp`` / ``num_samples`` not a finite number > 0, an unknown ``backend`` /
            ``on_failure``, NaN/Inf gradients (with ``check_finite``), or failed blocks
            (see :func:`woodbury_update_`).
    """
    chk.check_tensor("grads", grads, 3)
    d = chk.check_positive("damp", damp)
    n = _num_samples(num_samples, grads)
    chk.check_choice("backend", backend, CHOICES)
    chk.check_choice("on_failure", on_failure, ON_FAILURE)
    return lib.fisher_inverse(_contig(grads), d, n, backend, on_failure, check_finite)


def lowrank_inverse(grads: torch.Tensor, damp: float, num_samples: Optional[float] = None,
                    *, check_finite: bool = True, on_failure: str = "recompute",
                    backend: str = "auto") -> LowRankInverse:
    """Low-rank representation of ``(damp I + G^T G / N)^-1`` for grads (B, m, c), m < c.

    Source: the Woodbury identity (WoodFisher paper, Sec. 3.2) applied to the whole
    m-gradient update at once; see :mod:`.lowrank`. For m >= c the returned object holds the
    dense inverse instead.

    Args:
        grads: (B, m, c) gradient slices, float32 or float64, any device.
        damp: lambda > 0.
        num_samples: N > 0; defaults to m.
        check_finite, on_failure: as in :func:`woodbury_update_`.
        backend: "auto" (the C kernel for float32 CPU gradients when built, else torch),
            "cpu" or "torch"; "cuda" / "triton" have no low-rank kernel and use torch.
    Returns:
        :class:`LowRankInverse` with ``shape`` (B, c, c), factors (B, m, c).
    Raises:
        ValueError: as :func:`fisher_inverse` (bad ``grads`` / ``damp`` / ``num_samples`` /
            ``backend`` / ``on_failure``, NaN/Inf gradients, failed blocks).
    """
    chk.check_tensor("grads", grads, 3)
    d = chk.check_positive("damp", damp)
    n = _num_samples(num_samples, grads)
    chk.check_choice("backend", backend, CHOICES)
    chk.check_choice("on_failure", on_failure, ON_FAILURE)
    if check_finite:
        chk.check_finite("grads", grads)
    return LowRankInverse(_contig(grads), d, n, on_failure, backend)


def blockwise_inverse(grads: torch.Tensor, damp: float, num_samples: Optional[float] = None, *,
                      form: str = "auto", memory_budget: Union[int, str, None] = None,
                      backend: str = "auto", on_failure: str = "recompute") -> Inverse:
    """Dense (B, c, c) inverse or :class:`LowRankInverse`, chosen by :func:`choose_form`.

    Both forms represent ``(damp I + G^T G / N)^-1`` (WoodFisher paper, Sec. 3.2, Eq. 2).

    Args:
        grads: (B, m, c) gradient slices, float32 or float64, any device.
        damp: lambda > 0. num_samples: N > 0; defaults to m.
        form: "auto" | "sequential" | "lowrank".
        memory_budget: bytes available for the representation: a number, a size string ("1GB",
            "512MiB", :func:`woodfisher_kernels.parse_bytes`) or None (unlimited); a forced ``form`` must fit it too.
        backend, on_failure: as in :func:`fisher_inverse`.
    Returns:
        (B, c, c) tensor (form "sequential") or :class:`LowRankInverse` (form "lowrank").
    Raises:
        ValueError: an unknown ``form``, NaN/Inf gradients, a bad ``memory_budget`` (naming it) or one
            that fits neither form (or not the forced ``form``), and every case of :func:`fisher_inverse` /
            :func:`lowrank_inverse`.
    """
    if form not in ("auto", "sequential", "lowrank"):
        raise ValueError(f"form must be 'auto', 'sequential' or 'lowrank', got {form!r}")
    if memory_budget is not None:
        memory_budget = check_bytes("memory_budget", memory_budget)
    chk.check_tensor("grads", grads, 3, finite=True)
    b, m, c = grads.shape
    if form == "auto":
        form = choose_form(m, c, b, memory_budget, grads.element_size())
    elif memory_budget is not None:  # a forced form is held to the budget too (not silently over it)
        need = form_bytes(m, c, b, grads.element_size())
        if need[form] > memory_budget:
            other = "lowrank" if form == "sequential" else "sequential"
            raise ValueError(f"memory_budget={memory_budget:.0f} bytes: form={form!r} needs {need[form]} "
                             f"({other} {need[other]}); pass a larger memory_budget, form='auto' or None")
    if form == "lowrank":
        return lowrank_inverse(grads, damp, num_samples, check_finite=False, on_failure=on_failure, backend=backend)
    return fisher_inverse(grads, damp, num_samples, backend=backend, check_finite=False, on_failure=on_failure)


def condition_estimate(grads: torch.Tensor, damp: float, num_samples: Optional[float] = None, *,
                       iters: int = 20, upper: bool = False) -> torch.Tensor:
    """Per-block ``kappa = lambda_max(G^T G / N) / damp``, so that cond(F) = 1 + kappa.

    Power iteration (a lower estimate) or, with ``upper=True``, ``||G||_F^2 / (N damp)``;
    details, cost and use in :func:`woodfisher_kernels._numerics.condition_estimate`.
    A float32 inverse is accurate to :func:`error_bound` ``(kappa)``; warn when
    ``2**-23 * kappa > 1e-3``.

    Args:
        grads: (B, m, c) gradient slices, float32 or float64, any device.
        damp: lambda > 0. num_samples: N > 0; defaults to m.
        iters: power-iteration steps (>= 1). upper: return the Frobenius upper bound instead.
    Returns:
        (B,) float64 kappa, on the device of ``grads``.
    Raises:
        ValueError: bad ``grads``, ``damp`` or ``num_samples`` (as :func:`fisher_inverse`),
            ``iters`` not an integer >= 1, or ``upper`` not a bool.
    """
    chk.check_tensor("grads", grads, 3)
    d = chk.check_positive("damp", damp)
    n = _num_samples(num_samples, grads)
    iters = chk.check_int("iters", iters, 1)
    return lib.condition_estimate(_contig(grads), d, n, iters, chk.check_flag("upper", upper))


def _check_inverse(inv: Inverse) -> None:
    if not isinstance(inv, LowRankInverse):
        chk.check_square_blocks("inv", inv)


def _check_weights(inv: Inverse, weights, loss_grad):
    b, c, _ = inv.shape
    chk.check_tensor("weights", weights, 2)
    chk.check_same("weights", weights, "inv", inv.diag() if isinstance(inv, LowRankInverse) else inv,
                   shape=(b, c))
    if loss_grad is not None:
        chk.check_tensor("loss_grad", loss_grad, 2)
        chk.check_same("loss_grad", loss_grad, "weights", weights, shape=(b, c))


def inverse_diagonal(inv: Inverse) -> torch.Tensor:
    """Diagonal ``[F^-1]_qq`` of every block (the denominator of the saliency, paper's Eq. 11).

    Args:
        inv: (B, c, c) float32/float64 inverses or a :class:`LowRankInverse`.
    Returns:
        (B, c), dtype and device of ``inv``.
    Raises:
        ValueError: ``inv`` not a 3-D float32/float64 tensor of square blocks (or empty).
    """
    _check_inverse(inv)
    if isinstance(inv, LowRankInverse):
        return inv.diag()
    return lib.inverse_diagonal(_contig(inv), True)


def obs_saliency(inv: Inverse, weights: torch.Tensor, loss_grad: Optional[torch.Tensor] = None,
                 *, backend: str = "auto", check_finite: bool = True) -> torch.Tensor:
    """OBS saliency (pruning statistic) of every weight, fused with the diagonal extraction.

    Source: the WoodFisher paper. Plain OBS (Sec. 4.1, Eq. 11): ``rho_q = w_q^2 / (2 [F^-1]_qq)``.
    WoodTaylor (Sec. 6.2, Eq. 23), when ``loss_grad`` is given: ``rho_q = (w_q - h_q)^2 /
    (2 [F^-1]_qq)`` with ``h = F^-1 loss_grad`` (Eq. 23 written as one square; it is the loss change
    of Eq. 22 without that equation's q-independent term ``-loss_grad^T h / 2``).

    Args:
        inv: (B, c, c) inverses or a :class:`LowRankInverse`, float32 or float64.
        weights: (B, c) blocked weights, same dtype and device as ``inv``.
        loss_grad: (B, c) blocked loss gradient (WoodTaylor) or None.
        backend: "auto" | "cuda" | "triton" | "cpu" | "torch".
        check_finite: refuse NaN/Inf inputs; this reads the whole inverse, which costs
            far more than the statistic itself (pass False for inverses you just built).
    Returns:
        rho: (B, c), in loss units (the increase of the quadratic model; with ``loss_grad``, that increase
        plus ``loss_grad^T h / 2``, the same for every q), dtype of ``weights``.
    Raises:
        ValueError: ``inv`` not square blocks, ``weights`` / ``loss_grad`` not (B, c) on the
            device and dtype of ``inv``, an unknown ``backend``, or NaN/Inf inputs (with
            ``check_finite``).
    """
    _check_inverse(inv)
    _check_weights(inv, weights, loss_grad)
    chk.check_choice("backend", backend, CHOICES)
    if isinstance(inv, LowRankInverse):
        chk.check_all_finite(check_finite, weights=weights, loss_grad=loss_grad)
        return inv.saliency(_contig(weights), _contig(loss_grad))
    return lib.obs_saliency(_contig(inv), _contig(weights), _contig(loss_grad), backend, check_finite)


def obs_update(inv: Inverse, weights: torch.Tensor, prune_mask: torch.Tensor,
               loss_grad: Optional[torch.Tensor] = None, *, backend: str = "auto",
               check_finite: bool = True) -> torch.Tensor:
    """OBS update of all blocks at once: the new weights after removing the pruned set.

    Source: the WoodFisher paper. ``w + dw`` with ``dw = -F^-1 v - h``, ``v_q = (w_q - h_q) /
    [F^-1]_qq`` on the pruned set P (``prune_mask``), 0 elsewhere: the single-weight update of
    Sec. 4.1, Eq. 10, summed over P (the pruning direction of Sec. 4.3), with ``h = F^-1
    loss_grad`` (WoodTaylor, Sec. 6.2, Eq. 21) or 0. Entries in P are exactly 0 afterwards.

    Args:
        inv: (B, c, c) inverses or a :class:`LowRankInverse`, float32 or float64.
        weights: (B, c) blocked weights, same dtype and device as ``inv``.
        prune_mask: (B, c) bool, True on the weights to remove.
        loss_grad: (B, c) or None (WoodTaylor).
        backend, check_finite: as in :func:`obs_saliency`.
    Returns:
        (B, c) new weights (``weights`` is not modified).
    Raises:
        ValueError: as :func:`obs_saliency`, or ``prune_mask`` not a bool (B, c) tensor on
            the device of ``weights``.
    """
    _check_inverse(inv)
    _check_weights(inv, weights, loss_grad)
    chk.check_mask("prune_mask", prune_mask, "weights", weights)
    chk.check_choice("backend", backend, CHOICES)
    if isinstance(inv, LowRankInverse):
        chk.check_all_finite(check_finite, weights=weights, loss_grad=loss_grad)
        return inv.update(_contig(weights), prune_mask, _contig(loss_grad))
    return lib.obs_update(_contig(inv), _contig(weights), prune_mask.contiguous(), _contig(loss_grad),
                          backend, check_finite)


def _check_index(name: str, inv: Inverse, index: torch.Tensor) -> None:
    _check_inverse(inv)
    chk.check_index(name, index, inv.shape[0], inv.device)


def gather_rows(inv: Inverse, index: torch.Tensor) -> torch.Tensor:
    """Rows of the inverse for each group (used by group OBS, paper Sec. 6.1).

    Args:
        inv: (B, c, c) inverses or a :class:`LowRankInverse`.
        index: (B, G, q) int64/int32 entries in [0, c), on the device of ``inv``.
    Returns:
        (B, G, q, c): ``out[b, g, i] = F^-1[b, index[b, g, i], :]``.
    Raises:
        ValueError: ``inv`` not square blocks, ``index`` not a 3-D int64/int32 tensor with B
            blocks on the device of ``inv``, or entries outside [0, c).
    """
    _check_index("index", inv, index)
    if isinstance(inv, LowRankInverse):
        chk.check_index_range("index", index, inv.shape[-1])
        return inv.rows(index)
    return lib.gather_rows(_contig(inv), index.contiguous())


def gather_subblocks(inv: Inverse, index: torch.Tensor) -> torch.Tensor:
    """``[F^-1]_QQ`` for each group Q = index[b, g] (the q x q system of group OBS, Sec. 6.1).

    Args:
        inv: (B, c, c) inverses or a :class:`LowRankInverse`.
        index: (B, G, q) int64/int32 entries in [0, c), on the device of ``inv``.
    Returns:
        (B, G, q, q).
    Raises:
        ValueError: as :func:`gather_rows`.
    """
    _check_index("index", inv, index)
    if isinstance(inv, LowRankInverse):
        chk.check_index_range("index", index, inv.shape[-1])
        return inv.subblocks(index)
    return lib.gather_subblocks(_contig(inv), index.contiguous())


def group_obs_saliency(inv: Inverse, weights: torch.Tensor, groups: torch.Tensor,
                       *, exact: bool = True) -> torch.Tensor:
    """Saliency of removing each group Q at once (group OBS; N:M and row patterns).

    Source: the WoodFisher paper. ``exact=True``: ``rho_Q = w_Q^T ([F^-1]_QQ)^-1 w_Q / 2``, the
    optimum of the multi-weight problem of Sec. 4.2 (Eqs. 12-17, there for two weights,
    here for |Q| = q); ``exact=False``: the Sec. 6.1 relaxation, Eq. 18,
    ``(1_Q^T w)^2 / (2 * 1_Q^T F^-1 1_Q)``.

    Args:
        inv: (B, c, c) inverses or a :class:`LowRankInverse`, float32 or float64.
        weights: (B, c) blocked weights, same dtype and device.
        groups: (B, G, q) int64/int32 indices of each group's entries in [0, c).
        exact: the exact statistic (True) or Eq. 18 (False).
    Returns:
        rho: (B, G), loss units.
    Raises:
        ValueError: ``weights`` not (B, c) on the device and dtype of ``inv``, ``groups``
            as ``index`` in :func:`gather_rows`, or ``exact`` not a bool.
    """
    _check_weights(inv, weights, None)
    _check_index("groups", inv, groups)
    exact = chk.check_flag("exact", exact)
    if isinstance(inv, LowRankInverse):  # from the factor: no row of F^-1 formed
        chk.check_index_range("groups", groups, inv.shape[-1])
        return inv.group_coefficients(groups, _contig(weights), exact)[1]
    return lib.group_obs_saliency(_contig(inv), _contig(weights), groups.contiguous(), exact)


def group_obs_update(inv: Inverse, weights: torch.Tensor, groups: torch.Tensor,
                     prune: torch.Tensor, *, exact: bool = True) -> torch.Tensor:
    """OBS update removing the groups where ``prune`` is True.

    Source: the WoodFisher paper. ``exact=True``: ``dw = -F^-1[:, Q] ([F^-1]_QQ)^-1 w_Q`` per
    removed group (the Sec. 4.2 optimum, Eqs. 12-17, for q weights), summed over groups;
    ``exact=False``: the Sec. 6.1 update of Eq. 18's relaxation, ``dw = -(1_Q^T w) F^-1 1_Q /
    (1_Q^T F^-1 1_Q)``. Entries of removed groups are exactly 0 afterwards. Groups removed
    together should not overlap.

    Args:
        inv: (B, c, c) inverses or a :class:`LowRankInverse`, float32 or float64.
        weights: (B, c) blocked weights, same dtype and device.
        groups: (B, G, q) int64/int32 indices in [0, c).
        prune: (B, G) bool, True on the groups to remove.
        exact: as in :func:`group_obs_saliency`.
    Returns:
        (B, c) new weights (``weights`` is not modified).
    Raises:
        ValueError: as :func:`group_obs_saliency`, or ``prune`` not a bool (B, G) tensor on
            the device of ``groups``.
    """
    _check_weights(inv, weights, None)
    _check_index("groups", inv, groups)
    chk.check_mask("prune", prune, "groups[..., 0]", groups[..., 0])
    exact = chk.check_flag("exact", exact)
    weights = _contig(weights)
    if isinstance(inv, LowRankInverse):  # from the factor and one product F^-1 v per block
        chk.check_index_range("groups", groups, inv.shape[-1])
        coef = inv.group_coefficients(groups, weights, exact)[0]
        return reference.group_update_with(coef, inv.matvec, weights, groups, prune)
    return lib.group_obs_update(_contig(inv), weights, groups.contiguous(), prune.contiguous(), exact)
