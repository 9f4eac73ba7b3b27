"""The diagonal of the empirical Fisher, shared by ``method="diag_fisher"`` and pruning at init.

The empirical Fisher of m gradients g_1..g_m (each the gradient of the mean loss over
``fisher_batch_size`` samples) is F = (1/m) sum_i g_i g_i^T (WoodFisher paper, Sec. 2: the empirical
Fisher, Eq. 1 with the data's labels in place of the model's); its diagonal is
(1/m) sum_i g_i * g_i, which is all the diagonal OBD / OBS saliencies need (LeCun et al. 1990,
"Optimal Brain Damage", Eq. 6).

The squares are summed in the collector's compute dtype (float32 for float16 / bfloat16
models, see :func:`woodfisher.precision.compute_dtype`), so they never underflow in
half precision.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

from .gradients import GradientCollector

__all__ = ["FisherDiagonal", "empirical_fisher_diagonal"]


@dataclass
class FisherDiagonal:
    """Sums of squared gradients of each pruned weight.

    Attributes:
        sum_sq: {weight name: (numel,) sum_i g_i^2}, flat in the weight's storage order.
        count: m, the number of gradients summed.
    """

    sum_sq: Dict[str, torch.Tensor]
    count: int

    @property
    def diag(self) -> Dict[str, torch.Tensor]:
        """{weight name: (numel,) diagonal (1/m) sum_i g_i^2} of the empirical Fisher."""
        return {n: s / self.count for n, s in self.sum_sq.items()}

    def total(self) -> float:
        """sum over every weight of sum_i g_i^2 (float64 sum), for :class:`woodfisher.damping.FisherStats`."""
        return sum(float(s.double().sum()) for s in self.sum_sq.values())


def empirical_fisher_diagonal(collector: GradientCollector, chunk_size: int = 256) -> FisherDiagonal:
    """Run ``collector`` to the end and sum the squares of its gradients.

    Args:
        collector: a fresh :class:`woodfisher.gradients.GradientCollector` (its gradients are
            masked by its keep-masks and computed in its compute dtype).
        chunk_size: gradients held in memory at a time (memory ~ chunk_size * numel entries);
            the result does not depend on it beyond rounding.
    Returns:
        :class:`FisherDiagonal`. After the call ``collector.loss_grad`` holds the mean gradient
        when the collector was built with ``want_loss_grad=True``.
    Raises:
        ValueError: from the collector (empty loader, NaN / Inf gradients naming the weight).
    """
    sums: Dict[str, torch.Tensor] = {}
    for chunk in collector.chunks(chunk_size):
        for name, g in chunk.items():
            sq = g.square().sum(0)
            sums[name] = sq if name not in sums else sums[name] + sq
    return FisherDiagonal(sums, collector.count)
