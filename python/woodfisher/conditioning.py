"""Conditioning of the Fisher blocks, as the pruner reports it (per layer, once per call).

A block ``F = damp I + G^T G / N`` has ``cond(F) = 1 + kappa`` with
``kappa = lambda_max(G^T G / N) / damp`` (:func:`woodfisher_kernels.condition_estimate`).
The kernels state their float32 accuracy as a function of kappa
(:func:`woodfisher_kernels.error_bound`: relative error <= 8 eps32 (1 + kappa)), so a
float32 dense inverse holds fewer than 3 correct digits once ``eps32 * kappa > 1e-3``
(kappa >~ 8e3). The pruner then warns, once per call, naming the layers, their kappa and
the damp. The low-rank form (m < c) is not warned about: its rounding only touches the
directions the damp dominates, and it stays near eps32 even at kappa 1e8
(``benchmarks/results/PRECISION.md``).

A block that fails outright (NaN / Inf, or a diagonal entry <= 0, even after the kernels'
float64 recompute) is a ValueError naming the layer, the damp and the measured kappa, and
suggesting ``damp="auto"``.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple

import torch

import woodfisher_kernels as wk

from .damping import AUTO_ALPHA

__all__ = ["EPS32", "WARN_LEVEL", "ill_conditioned", "layer_inverse", "warn_ill_conditioned"]

EPS32 = torch.finfo(torch.float32).eps  # 2^-23, as in woodfisher_kernels.error_bound
#: warn when ``EPS32 * kappa`` exceeds this (fewer than 3 correct digits left).
WARN_LEVEL = 1e-3


def layer_inverse(name: str, grads: torch.Tensor, damp: float, count: int, form: str,
                  memory_budget: Optional[int], backend: str) -> Tuple[object, Optional[float]]:
    """(inverse of the layer's blocks, largest kappa of its blocks; None for float64 gradients or the low-rank form).

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
    if grads.dtype != torch.float32 or not grads.numel() or isinstance(inv, wk.LowRankInverse):
        return inv, None  # only dense float32 blocks are ever warned about: no power iteration for the others
    return inv, float(wk.condition_estimate(grads, damp, count).max())


def ill_conditioned(kappa: Dict[str, float], forms: Dict[str, Optional[str]]) -> Dict[str, float]:
    """{name: kappa} of the dense (float32) inverses beyond :data:`WARN_LEVEL`."""
    return {n: k for n, k in kappa.items() if forms.get(n) in ("sequential", "stream") and EPS32 * k > WARN_LEVEL}


def warn_ill_conditioned(kappa: Dict[str, float], forms: Dict[str, Optional[str]], damp, auto: bool = False,
                         stacklevel: int = 2) -> None:
    """One UserWarning naming every dense float32 layer with ``eps32 * kappa > 1e-3`` (none: no warning).

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
                  f"every pruned weight) and these layers' Fisher is larger than that mean; pass damp >= "
                  f"{needed:.2g} to bring them under the level, or prune them in float64 (a float64 model)")
    else:
        advice = f"pass damp='auto' (relative to the Fisher's scale) or damp >= {needed:.2g}"
    warnings.warn(f"Fisher blocks too ill-conditioned for float32 at damp={damp:.3g}: {listed}; the dense "
                  f"float32 inverses of these layers may be off by up to {min(bound, 1.0):.1g} (relative; "
                  f"bound 8 eps32 (1 + kappa), eps32 kappa > {WARN_LEVEL:g}); {advice}",
                  UserWarning, stacklevel=stacklevel + 1)
