"""Conditioning, the stated float32 accuracy, and what happens to blocks that fail.

Conditioning of a block (DESIGN.md section 1): ``kappa = lambda_max(G^T G / N) / damp``,
so ``cond(F) = 1 + kappa`` for ``F = damp I + G^T G / N``.

Guarantee (float32 inputs, every backend): each block returned by ``fisher_inverse``,
``woodbury_update_`` (with kappa that of the accumulated Fisher) or ``lowrank_inverse``
has relative errors -- largest diagonal entry, and the whole inverse in spectral norm --
of at most :func:`error_bound` ``(kappa) = 8 eps32 (1 + kappa)``, ``eps32 = 2^-23``.
So 3 correct digits are guaranteed up to kappa ~ 1e3, none beyond kappa ~ 1e6; warn
when ``eps32 * kappa > 1e-3`` (:func:`condition_estimate`). Measured against a float64
SVD reference over c in {64, 257}, m in {c/2, 2c+1}, damp in {1e-8, 1e-5, 1e-1},
gradient scales 1e-6..1e6, Gaussian and rank-1 gradients (tests/test_precision_table.py,
benchmarks/results/PRECISION.md): at most 2.3 eps32 (1 + kappa), reached at kappa ~ 0;
about 0.1-0.2 eps32 kappa for Gaussian gradients with m > c (3e-3..6e-3 at kappa 3e5); near eps32
when m < c or the gradients have low rank, even at kappa 1e8, for the diagonal and norms. Products
``F^-1 v`` with v in the gradients' span are another matter for the low-rank form (its cancellation
costs them eps32 * kappa, all of a block whose other coordinates carry no gradient): blocks beyond
``eps32 * kappa > 1e-3`` keep a float64 factor (:func:`refine_lowrank`).

Failed blocks: a result holding NaN / Inf or a diagonal entry <= 0, or (torch path) a
K x K system not positive definite in float64. ``on_failure="recompute"`` (default)
recomputes them in float64 with the torch path and stores them rounded to float32 (they
then meet the bound with eps64: a block at kappa 1e8 comes back accurate to ~1e-7);
``on_failure="raise"`` raises a ValueError naming damp and the measured kappa and
suggesting a larger damp (``damp="auto"`` in the pruner). A ValueError also comes when
float64 fails too: one-shot builds only beyond ``8 eps64 (1 + kappa) >= 1`` (kappa ~ 5e14);
a streaming update from a float32 running inverse already beyond ``8 eps32 (1 + kappa) >= 1``
(kappa ~ 1e6), since that inverse holds no correct digit to start from. Float64 inputs
are never recomputed (ValueError). The in-place ``woodbury_update_`` is transactional:
new blocks go to scratch memory and are committed once all succeeded, so on any error
(ValueError, or a backend raising) its input is left bit-for-bit as it was.
"""
from __future__ import annotations

import numbers
from typing import Callable, Dict, Optional, Tuple

import torch

from . import _checks as chk
from ._woodbury import bad_blocks, woodbury_blocks

ON_FAILURE = ("recompute", "raise")
ERROR_FACTOR = 8.0
WARN_LEVEL = 1e-3          # eps32 * kappa above this: float32 results may lose most digits


def error_bound(kappa, dtype: torch.dtype = torch.float32):
    """Stated relative-error bound ``8 eps(dtype) (1 + kappa)`` of a returned inverse block.

    Args:
        kappa: float or tensor, ``lambda_max(G^T G / N) / damp`` (:func:`condition_estimate`).
        dtype: the dtype the inverse was computed in.
    Returns:
        The bound, same type as ``kappa``.
    Raises:
        ValueError: ``kappa`` not a number or floating tensor with every entry >= 0 (NaN
            refused; +inf gives an infinite bound), or ``dtype`` not a floating torch dtype.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if isinstance(kappa, torch.Tensor):
        if not kappa.is_floating_point() or not bool((kappa >= 0).all()):
            raise ValueError(f"kappa must be a floating tensor with entries >= 0, got {kappa}")
    elif isinstance(kappa, bool) or not isinstance(kappa, numbers.Real) or not kappa >= 0:
        raise ValueError(f"kappa must be a number >= 0, got {kappa!r}")
    return ERROR_FACTOR * torch.finfo(dtype).eps * (1.0 + kappa)


def _power_lmax(apply: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, iters: int) -> torch.Tensor:
    """Rayleigh quotient after ``iters`` power steps of a PSD operator: (B,) float64, <= lambda_max."""
    v = start
    for _ in range(iters):
        v = apply(v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny))
    v = v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
    return (v * apply(v)).sum(1).double().clamp_min(0.0)


#: Relative margin of the Frobenius upper bound (its squares are summed in float32).
UPPER_MARGIN = 1e-3
#: The power iteration runs over tiles of Gram blocks of about this many bytes (CPU), so that each
#: tile stays in L2 for all the steps.
POWER_TILE_BYTES = 2 ** 20


def gram_lmax(grads: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """lambda_max(G^T G) per block: (B,) float64.

    The smaller Gram matrix (G G^T when m <= c, else G^T G; k = min(m, c)) is formed once (one
    batched product, 2 B k^2 max(m, c) flops), then ``iters`` power steps run on it (2 B k^2 each),
    tile by tile on the CPU: a step reads k^2 entries per block instead of 2 m c. Every block
    starts from the same fixed pseudo-random vector, so a block's estimate does not depend on
    which other blocks are in the call (a subset, a chunk or a rank's shard gives the same value).
    """
    num_blocks, m, c = grads.shape
    k = min(m, c)
    gen = torch.Generator(device=grads.device).manual_seed(0)
    start = torch.randn(k, generator=gen, device=grads.device, dtype=grads.dtype).expand(num_blocks, k)
    tile = num_blocks
    if grads.device.type == "cpu":
        tile = max(1, POWER_TILE_BYTES // max(1, k * k * grads.element_size()))
    out = []
    for lo in range(0, num_blocks, tile):
        g = grads[lo:lo + tile]
        gram = torch.bmm(g, g.transpose(1, 2)) if m <= c else torch.bmm(g.transpose(1, 2), g)
        out.append(_power_lmax(lambda v, gram=gram: torch.bmm(gram, v.unsqueeze(2)).squeeze(2),
                               start[lo:lo + tile], iters))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=grads.device)


def condition_estimate(grads: torch.Tensor, damp: float, num_samples: Optional[float] = None, *,
                       iters: int = 20, upper: bool = False) -> torch.Tensor:
    """Estimate ``kappa = lambda_max(G^T G / N) / damp`` of every block (cond(F) = 1 + kappa).

    Power iteration (``iters`` steps from a fixed pseudo-random start, the same for every block, on G G^T when
    m <= c, else G^T G, formed once: ~2 k^2 (max(m, c) + iters) flops per block, k = min(m, c))
    returns a Rayleigh quotient,
    a lower bound that converges to lambda_max. ``upper=True`` returns the cheap upper
    bound ``(1 + 1e-3) ||G||_F^2 / (N damp)`` instead (one read of the gradients; at most
    min(m, c) times too large).

    Use: float32 results lose about log10(eps32 * kappa) + 7 of their 7 digits; warn when
    ``2**-23 * kappa > 1e-3`` (see :func:`error_bound` for the stated guarantee).

    Args:
        grads: (B, m, c) gradient blocks (float32 or float64).
        damp: lambda > 0.
        num_samples: N > 0 (default m).
        iters: power steps >= 1 (20: within a few percent for typical gradient spectra).
        upper: return the Frobenius upper bound instead of the estimate.
    Returns:
        (B,) float64 kappa per block.
    Raises:
        ValueError: bad grads, damp, num_samples or iters.
    """
    chk.check_tensor("grads", grads, 3)
    d = chk.check_positive("damp", damp)
    n = float(grads.shape[1]) if num_samples is None else chk.check_positive("num_samples", num_samples)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an integer >= 1, got {iters!r}")
    if upper:  # one read of the gradients, no float64 copy; the margin covers the float32 sum's rounding
        fro = torch.linalg.vector_norm(grads, dim=(1, 2)).double()
        if not bool(torch.isfinite(fro).all()):
            chk.check_finite("grads", grads)                            # NaN / Inf: the ValueError
            fro = torch.linalg.vector_norm(grads.double(), dim=(1, 2))  # finite, but float32 squares overflowed
        return fro.square() * (1.0 + UPPER_MARGIN) / (n * d)
    chk.check_finite("grads", grads)
    return gram_lmax(grads, iters) / (n * d)


#: :func:`refine_lowrank`: a low-rank block is refined only if its live coordinates number at most this times m.
LIVE_PER_GRAD = 2


def refine_lowrank(grads: torch.Tensor, damp: float, num_samples: float,
                   recompute64: Callable[[torch.Tensor], Tuple[Tuple[torch.Tensor, ...], torch.Tensor]]
                   ) -> Optional[Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]]:
    """The float32 low-rank blocks with ``eps32 * kappa > WARN_LEVEL``, their factor recomputed in float64.

    ``F^-1 v = (v - A^T A v) / damp`` cancels for the components of v in the gradients' span: a float32 factor
    ``A = L^-1 G`` gives them a relative error of about eps32 * kappa. Where some coordinates carry no gradient
    (weights pruned in an earlier step, padding, dead inputs) the live ones can lie wholly in that span, and
    the OBS update went 79% wrong at kappa ~ 1e8 (the dense form is exact there). A block is refined when
    ``eps32 * kappa > 1e-3`` (the Frobenius bound ``||G||_F^2 / (N damp)``, then the power iteration on those
    it does not certify: the level and the estimates of the dense path, :mod:`woodfisher.conditioning`) and
    its live coordinates (columns of G not all zero) number at most ``LIVE_PER_GRAD * m``: only then can the
    m-dimensional span hold most of every live coordinate. With more live coordinates each keeps, on
    average, more than half of its ``1 - ||a_q||^2`` outside the span, where nothing cancels: on the
    ResNet-20 m = 1000 paper setting (damp 1e-5, every layer flagged by kappa alone, 2304-36864 live
    coordinates) the float32 factor's diagonal was within 3e-7 of float64 and ``F^-1 e_q`` within 2e-6, and
    refining all 18 layers made the inverse 8x slower. ``recompute64(idx) -> ((A, diag), bad)`` rebuilds the
    flagged blocks in float64; blocks float64 refuses keep their float32 factor.

    Returns:
        None (no block flagged), or (block indices, (float64 factor, float64 diagonal) of those blocks).
    """
    if grads.dtype != torch.float32 or not grads.numel():
        return None
    eps = torch.finfo(torch.float32).eps
    bound = condition_estimate(grads, damp, num_samples, upper=True)
    idx = (eps * bound > WARN_LEVEL).nonzero().squeeze(1)
    if idx.numel():
        live = (grads[idx] != 0).any(dim=1).sum(dim=1)
        idx = idx[live <= LIVE_PER_GRAD * grads.shape[1]]
    if idx.numel():
        kappa = condition_estimate(grads[idx], damp, num_samples)
        idx = idx[(eps * kappa > WARN_LEVEL).to(idx.device)]
    if not idx.numel():
        return None
    results, bad = recompute64(idx)
    good = ~bad.to(idx.device)
    if not bool(good.any()):
        return None
    return idx[good], tuple(r[good] for r in results)


def _failure_message(op: str, dtype, idx: torch.Tensor, total: int, kappa: torch.Tensor, damp_text: str,
                     tried64: bool) -> str:
    """The ValueError text: which blocks, the damp, the measured kappa, what to change."""
    worst = float(kappa.max()) if kappa.numel() else float("nan")
    first = idx[:5].tolist()
    head = (f"{op}: {idx.numel()} of {total} blocks (first: {first}) gave a non-finite inverse or a "
            f"diagonal entry <= 0 in {str(dtype).replace('torch.', '')}")
    if tried64:
        head += " and again when recomputed in float64"
    return (f"{head}, at {damp_text}; measured kappa = {worst:.3g} "
            f"(float32 keeps no digits beyond kappa ~ 1e6). Increase damp (the pruner's damp='auto' "
            f"chooses it from the gradients' scale)"
            + ("." if tried64 or dtype == torch.float64 else
               ", or pass on_failure='recompute' to recompute these blocks in float64."))


def repair(op: str, outs: Tuple[torch.Tensor, ...], bad: torch.Tensor, on_failure: str,
           recompute64: Callable[[torch.Tensor], Tuple[Tuple[torch.Tensor, ...], torch.Tensor]],
           kappa_of: Callable[[torch.Tensor], torch.Tensor], damp_text: str,
           check: Callable[[Tuple[torch.Tensor, ...]], torch.Tensor] = lambda t: bad_blocks(t[0]),
           inputs: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Fix the failed blocks (``bad``, (B,) bool) of ``outs`` in place, or raise ValueError.

    ``outs`` are per-block results (dim 0 = block); ``recompute64(idx) -> (results64, bad64)``
    recomputes blocks ``idx`` in float64; ``check(results)`` flags blocks still failed after
    rounding back; ``kappa_of(idx)`` estimates their kappa for the message. ``inputs``
    ({argument name: per-block tensor}): the lazy NaN / Inf check. A non-finite input entry
    always fails its block (it reaches the block's result through a product, and NaN / Inf
    stays non-finite or makes a pivot fail; tests/test_validation.py plants them on every
    backend), so only the failed blocks' inputs are read, and a NaN / Inf there is the
    ValueError naming the argument, as an eager check before the op would raise.
    """
    if not bool(bad.any()):
        return
    idx = bad.nonzero().squeeze(1)
    for name, x in (inputs or {}).items():
        chk.check_finite(name, x[idx])
    dtype = outs[0].dtype
    if on_failure == "raise" or dtype == torch.float64:
        raise ValueError(_failure_message(op, dtype, idx, bad.numel(), kappa_of(idx), damp_text, False))
    results64, bad64 = recompute64(idx)
    fixed = tuple(r.to(o.dtype) for r, o in zip(results64, outs))
    still = bad64 | check(fixed)
    if bool(still.any()):
        raise ValueError(_failure_message(op, dtype, idx[still], bad.numel(), kappa_of(idx[still]),
                                          damp_text, True))
    for o, f in zip(outs, fixed):
        o[idx] = f


def _wrap(result):
    out, bad = result
    return (out,), bad


def guarded_fisher_inverse(impl, grads: torch.Tensor, damp: float, num_samples: float,
                           on_failure: str, check_finite: bool = False) -> torch.Tensor:
    """``impl(grads, damp, N)`` with failed blocks recomputed in float64 or refused; ``check_finite``:
    NaN / Inf gradients are the ValueError (read in the failed blocks only, see :func:`repair`)."""
    checked = getattr(impl, "checked", None)
    if checked is not None:
        out, bad = checked(grads, damp, num_samples)
    else:
        out = impl(grads, damp, num_samples)
        bad = bad_blocks(out)
    repair("fisher_inverse", (out,), bad, on_failure,
           lambda idx: _wrap(woodbury_blocks(grads[idx].double(), num_samples, None, damp)),
           lambda idx: gram_lmax(grads[idx]) / (num_samples * damp),
           f"damp={damp:g} (kappa = lambda_max(G^T G / N) / damp)", inputs={"grads": grads} if check_finite else None)
    return out


def guarded_woodbury_update_(impl, inv: torch.Tensor, grads: torch.Tensor, num_samples: float,
                             on_failure: str, check_finite: bool = False) -> None:
    """``impl`` on scratch, failed blocks recomputed in float64 or refused, then one commit to ``inv``
    (``check_finite``: as :func:`guarded_fisher_inverse`, for ``inv`` and ``grads``).

    For the message, an update's kappa is ``lambda_max(inv) * lambda_max(G^T G / N)``: the
    inverse's smallest curvature ``1 / lambda_max(inv)`` plays the role of damp.
    """
    checked = getattr(impl, "checked", None)
    if checked is not None:
        new, bad = checked(inv, grads, num_samples)
    else:
        new = inv.clone()
        impl(new, grads, num_samples)
        bad = bad_blocks(new)

    def kappa_of(idx):
        inv_lmax = _power_lmax(lambda v: torch.bmm(inv[idx], v.unsqueeze(2)).squeeze(2),
                               torch.ones(idx.numel(), inv.shape[-1], dtype=inv.dtype, device=inv.device), 20)
        return gram_lmax(grads[idx]) * inv_lmax / num_samples

    repair("woodbury_update_", (new,), bad, on_failure,
           lambda idx: _wrap(woodbury_blocks(grads[idx].double(), num_samples, inv[idx].double())),
           kappa_of, "the damp of the inverse, 1 / lambda_max(inv) (kappa = lambda_max(inv) lambda_max(G^T G / N))",
           inputs={"inv": inv, "grads": grads} if check_finite else None)
    inv.copy_(new)
