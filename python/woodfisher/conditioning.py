"""Conditioning of the Fisher blocks, as the pruner handles it (per layer, once per call).

A block ``F = damp I + G^T G / N`` has ``cond(F) = 1 + kappa`` with
``kappa = lambda_max(G^T G / N) / damp`` (:func:`woodfisher_kernels.condition_estimate`).
The kernels state their float32 accuracy as a function of kappa
(:func:`woodfisher_kernels.error_bound`: relative error <= 8 eps32 (1 + kappa)), so a
dense float32 inverse is guaranteed fewer than 3 correct digits once
``eps32 * kappa > 1e-3`` (:data:`WARN_LEVEL`, kappa >~ 8e3).

That bound is a worst case, and kappa alone cannot tell whether a block is really lost:
measured against float64, the dense float32 blocks of a random-config BERT classifier
head at eps32 kappa = 0.2 had inverse diagonals within 2.2e-6 of float64 and the same
masks, nearly rank-deficient Gaussian blocks at eps32 kappa = 14 had diagonals off by 17%,
and a small MLP with inputs x100 at damp 1e-5 (eps32 kappa ~ 1-10) lost 8 of 384 mask
entries (``tests/test_conditioning.py``). So the pruner does not warn on kappa: :func:`layer_inverse` recomputes the
blocks beyond the level in float64 from the kept gradients (public
:func:`woodfisher_kernels.fisher_inverse` on float64 input, chunked; the result is rounded
to float32), which costs ``c^3`` float64 flops per such block -- usually a handful of
blocks of an output or classifier layer, whose Fisher is far above the model's mean and
so gets relatively less of ``damp="auto"``. Only blocks that stay float32 beyond the level
(the float64 recompute refused them too, kappa >~ 5e14) are warned about, once per call,
naming the layers, their kappa and the damp. The low-rank form (m < c) applies the same level itself
(:class:`woodfisher_kernels.LowRankInverse` keeps a float64 factor for such blocks, its ``refined`` count
is reported here): its float32 products lose eps32 * kappa in the directions the
gradients span, which is all of a block whose other coordinates carry no gradient (weights pruned in an
earlier step: at damp 1e-8 a float32 factor put the OBS update of such a block 79% off).

Every blockwise path runs the same step (:func:`refine_dense`): in memory (:func:`layer_inverse`),
offloaded (:mod:`woodfisher.offload`: bounds taken chunk by chunk on the device, flagged blocks
recomputed from the host gradients), sharded (:mod:`woodfisher.distributed.estimate`: each rank its
own blocks, the layer's largest bound found across ranks, the report reduced so every rank holds the
single-process values) and streamed (:mod:`woodfisher.streaming`: the bound summed over the stream,
the flagged blocks' gradients read again in a second pass, or float64 Gram blocks with
``damp="auto"``). A block's estimate does not depend on the other blocks in the call
(:func:`woodfisher_kernels.condition_estimate` starts every block from the same vector), so the
paths report the same values on the same gradients.

A block that fails outright (NaN / Inf, or a diagonal entry <= 0, even after the kernels'
float64 recompute) is a ValueError naming the layer, the damp and the measured kappa, and
suggesting ``damp="auto"``.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple, Union

import torch

import woodfisher_kernels as wk

from .damping import AUTO_ALPHA

__all__ = ["EPS32", "REFINE_BYTES", "WARN_LEVEL", "block_kappa", "ill_conditioned", "layer_inverse", "refine_bytes",
           "refine_dense", "uncertified", "warn_ill_conditioned"]

EPS32 = torch.finfo(torch.float32).eps  # 2^-23, as in woodfisher_kernels.error_bound
#: warn when ``EPS32 * kappa`` exceeds this (fewer than 3 correct digits left).
WARN_LEVEL = 1e-3


#: float64 memory for one chunk of blocks recomputed by :func:`layer_inverse` (gradients + inverses).
REFINE_BYTES = 64 * 2 ** 20


def layer_inverse(name: str, grads: torch.Tensor, damp: float, count: int, form: str,
                  memory_budget: Optional[int], backend: str) -> Tuple[object, Optional[float], int]:
    """(inverse of the layer's blocks, largest kappa of its blocks left in float32, blocks recomputed in float64).

    Dense float32 blocks with ``eps32 * kappa > WARN_LEVEL`` are recomputed in float64 from
    ``grads`` and stored rounded to float32 (:func:`refine_dense`); a block the float64
    recompute refuses keeps its float32 result and its kappa is reported. The kappa is None
    for float64 gradients, the low-rank form (the kernel library refines its factors at the same level,
    :attr:`woodfisher_kernels.LowRankInverse.refined`: that count is returned) and when every block was
    recomputed.

    Args:
        name: the weight's name (for messages). grads: (B, m, c) gradient blocks.
        damp, count, form, memory_budget, backend: as :func:`woodfisher_kernels.blockwise_inverse`.
    Raises:
        ValueError: naming the layer, when the kernels refuse a block (see the module doc).
    """
    try:
        inv = wk.blockwise_inverse(grads, damp, count, form=form, memory_budget=memory_budget, backend=backend)
    except ValueError as err:
        raise ValueError(f"layer {name!r}, damp={damp:.3g}: {err}") from err
    if isinstance(inv, wk.LowRankInverse):  # its own float64 refinement (woodfisher_kernels.LowRankInverse.refined)
        return inv, None, inv.refined
    if grads.dtype != torch.float32 or not grads.numel():
        return inv, None, 0  # only float32 blocks are checked
    return (inv, *refine_dense(grads, inv, damp, count))


def refine_dense(grads: torch.Tensor, inv: torch.Tensor, damp: float, count: int, *,
                 upper: Optional[torch.Tensor] = None, largest: Union[str, int, None] = "local",
                 device: Optional[torch.device] = None) -> Tuple[Optional[float], int]:
    """Estimate the kappa of dense float32 blocks and recompute, in place, those beyond :data:`WARN_LEVEL`.

    The one conditioning step of every blockwise path (in memory, offloaded, sharded, streamed
    with a second pass): :func:`block_kappa`, then the flagged blocks of ``inv`` are replaced by
    :func:`woodfisher_kernels.fisher_inverse` of their float64 gradients (chunks of
    :data:`REFINE_BYTES`), rounded to float32; a block float64 refuses too (kappa >~ 5e14) keeps
    its float32 inverse.

    Args:
        grads: (B, m, c) float32 gradients ``inv`` was built from (may live in host memory).
        inv: (B, c, c) their dense inverses, written in place (may live in host memory).
        damp, count: lambda and N of ``F = damp I + G^T G / N``.
        upper, largest, device: as :func:`block_kappa`.
    Returns:
        (largest kappa among the blocks left in float32 -- 0 for blocks the bound certified --, or
        None when every block was recomputed; number of blocks recomputed).
    """
    kappa = block_kappa(grads, damp, count, upper=upper, largest=largest, device=device)
    flagged = (EPS32 * kappa > WARN_LEVEL).nonzero().squeeze(1)
    refined = torch.zeros_like(kappa, dtype=torch.bool)
    dev = grads.device if device is None else device
    step = _chunk_blocks(grads.shape[1], grads.shape[2])
    for start in range(0, flagged.numel(), step):
        idx = flagged[start:start + step]
        try:
            exact = wk.fisher_inverse(grads[idx.to(grads.device)].to(dev).double(), damp, count, backend="torch")
        except ValueError:  # beyond float64 too (kappa >~ 5e14): keep the float32 blocks, warned about
            continue
        inv[idx.to(inv.device)] = exact.to(inv.device, inv.dtype)
        refined[idx] = True
    left = kappa[~refined]
    return float(left.max()) if left.numel() else None, int(refined.sum())


def _chunk_blocks(m: int, c: int) -> int:
    """Blocks (of m gradients, size c) per float64 chunk of :data:`REFINE_BYTES` (gradients + inverses)."""
    return max(1, REFINE_BYTES // (8 * (m * c + c * c)))


def refine_bytes(num_blocks: int, m: int, c: int) -> int:
    """Bytes of the largest float64 chunk :func:`refine_dense` holds for one layer (gradients + inverses).

    Args:
        num_blocks: the layer's blocks B. m: gradients per block. c: block size.
    Returns:
        ``min(B, blocks per chunk) * 8 (m c + c^2)``: at most :data:`REFINE_BYTES`, or one block's worth when a
        single block is larger.
    """
    return min(num_blocks, _chunk_blocks(m, c)) * 8 * (m * c + c * c)


def block_kappa(grads: torch.Tensor, damp: float, count: int, *, upper: Optional[torch.Tensor] = None,
                largest: Union[str, int, None] = "local", device: Optional[torch.device] = None) -> torch.Tensor:
    """(B,) float64 CPU kappa estimates (:func:`woodfisher_kernels.condition_estimate`) where they matter.

    The Frobenius bound ``||G||_F^2 / (N damp)`` >= kappa (one read of the gradients) certifies
    most blocks below :data:`WARN_LEVEL`; the power iteration (1-3x the cost of the float32 build)
    runs only on the others and on the block with the largest bound, so that the layer's reported
    kappa is an estimate. The certified blocks get 0 (below the level, never reported). A
    block's estimate does not depend on the other blocks (one start vector for all), so chunks,
    subsets and shards of a layer give the values the whole layer gives.

    Args:
        grads: (B, m, c) gradient blocks (any device; host memory for the offload path).
        damp, count: lambda and N.
        upper: (B,) bounds already computed (chunk by chunk, or summed over a stream); None: computed here.
        largest: the block estimated even when certified: "local" (the largest bound of ``grads``), a
            block index (a shard holding the largest bound of the whole layer), or None.
        device: where the power iteration runs (default: ``grads.device``), in chunks of
            :data:`REFINE_BYTES`.
    """
    if upper is None:
        upper = wk.condition_estimate(grads, damp, count, upper=True)
    upper = upper.cpu()
    idx = uncertified(upper, largest)
    kappa = torch.zeros_like(upper)
    dev = grads.device if device is None else device
    step = _chunk_blocks(grads.shape[1], grads.shape[2])
    for start in range(0, idx.numel(), step):
        part = idx[start:start + step]
        kappa[part] = wk.condition_estimate(grads[part.to(grads.device)].to(dev), damp, count).cpu()
    return kappa


def uncertified(upper: torch.Tensor, largest: Union[str, int, None] = "local") -> torch.Tensor:
    """Indices of the blocks whose kappa is estimated: bound ``upper`` (B,) beyond :data:`WARN_LEVEL`, and
    ``largest`` (as :func:`block_kappa`)."""
    check = EPS32 * upper > WARN_LEVEL
    if largest == "local":
        largest = int(upper.argmax()) if upper.numel() else None
    if largest is not None:
        check[largest] = True
    return check.nonzero().squeeze(1)


def ill_conditioned(kappa: Dict[str, float], forms: Dict[str, Optional[str]]) -> Dict[str, float]:
    """{name: kappa} of the dense (float32) inverses beyond :data:`WARN_LEVEL`."""
    return {n: k for n, k in kappa.items()
            if forms.get(n) in ("sequential", "stream", "offload-sequential") and EPS32 * k > WARN_LEVEL}


def warn_ill_conditioned(kappa: Dict[str, float], forms: Dict[str, Optional[str]], damp, auto: bool = False,
                         stacklevel: int = 2) -> None:
    """One UserWarning naming every dense float32 layer with ``eps32 * kappa > 1e-3`` left after
    :func:`layer_inverse`'s float64 recompute (none: no warning).

    The message gives the smallest damp that brings every listed layer under the level
    (``damp * kappa * eps32 / 1e-3``) and, when ``auto`` (the damp came from ``damp="auto"``),
    says why the automatic value was too small for them.
    """
    bad = ill_conditioned(kappa, forms)
    if not bad:
        return
    worst = sorted(bad.items(), key=lambda kv: -kv[1])
    listed = ", ".join(f"{n!r} (kappa {k:.2g})" for n, k in worst[:8]) + (" ..." if len(worst) > 8 else "")
    bound = float(wk.error_bound(worst[0][1]))
    needed = damp * worst[0][1] * EPS32 / WARN_LEVEL
    if auto:
        advice = (f"damp='auto' is one value for the whole model ({AUTO_ALPHA:g} x the mean Fisher diagonal over "
                  f"the live entries of the pruned weights) and these layers' Fisher is larger than that mean; pass "
                  f"damp >= {needed:.2g} to bring them under the level")
    else:
        advice = f"pass damp='auto' (relative to the Fisher's scale) or damp >= {needed:.2g}"
    streamed = [n for n, _ in worst if forms.get(n) == "stream"]
    why = "even a float64 recompute refused them"
    if streamed:  # woodfisher.streaming could not read their gradients again (its _conditioning)
        why += (f" or (streamed: {', '.join(map(repr, streamed[:8]))}) their gradients were not kept and the loader "
                "did not give the same ones again (single pass, another order, or no memory for them), so their kappa "
                "is the upper bound ||G||_F^2 / (N damp); a loader that can be read again in the same order gets "
                "them recomputed")
    warnings.warn(f"Fisher blocks too ill-conditioned for float32 at damp={damp:.3g}: {listed}; {why}, "
                  f"so their dense float32 inverses were kept and may be off by up to "
                  f"{min(bound, 1.0):.1g} (relative; "
                  f"bound 8 eps32 (1 + kappa), eps32 kappa > {WARN_LEVEL:g}); {advice}",
                  UserWarning, stacklevel=stacklevel + 1)
