"""The dampening lambda of ``F = lambda I + G^T G / N``: one rule, resolved once per step.

``damp=1e-5`` is the paper's fixed value (appendix S1.2). It is not scale-free: a loss
multiplied by s multiplies every gradient by s and the Fisher by s^2, so a fixed lambda
means a different amount of regularisation for every model and loss.
``damp="auto"`` uses the relative rule common in OBS-type pruners:

    lambda = alpha * mean_j (1/N) sum_i g_ij^2 ,   alpha = 0.1 (:data:`AUTO_ALPHA`),

alpha times the mean diagonal of the empirical Fisher over all pruned weights, i.e. the
damping carries alpha / (1 + alpha) of the trace of ``F``. It is scale-equivariant
(gradients x s -> lambda x s^2), so pruning decisions do not depend on the scale of the loss.

:func:`resolve_damp` turns the option into a number from :class:`FisherStats`, which the
curvature stage accumulates while the gradients stream past (kept, streamed, diagonal or
K-FAC alike), so the rule never needs a pass over the data of its own. Tuning lambda on
held-out data is :func:`woodfisher.tuning.search_damp`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch

from .masks import is_real

__all__ = ["DEFAULT_DAMP", "AUTO_ALPHA", "FisherStats", "check_damp", "auto_damp", "resolve_damp"]

DEFAULT_DAMP = 1e-5
#: ``damp="auto"``: lambda = AUTO_ALPHA x the mean diagonal of the empirical Fisher. Chosen on the held-out
#: train split, 5 seeds (benchmarks/results/damp_alpha_mlpnet.md, damp_alpha_resnet20.md; the earlier 1e-2
#: was never measured): the defaults' MLPNet accuracy at 95% is flat for alpha 0.03-1 (84.8-85.6%) and falls
#: off a cliff below it (1e-2: 81.7 +- 2.1, 1e-3: 54 +- 15; global magnitude 82.9). With 64 gradients a step
#: and a small lambda the noise of the rank-64 Fisher decides the mask: the small layers with large
#: gradients (fc2, fc3: 9x and 27x the mean Fisher diagonal) kept 29% / 53% of their weights vs global
#: magnitude's 70% / 81%. MLPNet 70-90%: within 0.2 points. ResNet-20: 70% 90.9 +- 1.4 -> 89.7 +- 0.7,
#: 80% 78.8 +- 3.6 -> 77.2 +- 3.5 (within noise), 90% 33.2 +- 5.0 -> 41.5 +- 6.9.
AUTO_ALPHA = 0.1


def check_damp(damp) -> Union[float, str]:
    """``damp`` must be a finite number > 0 or the string "auto"."""
    if isinstance(damp, str):
        if damp != "auto":
            raise ValueError(f"damp must be a number > 0 or 'auto', got {damp!r}")
        return damp
    if not is_real(damp) or not math.isfinite(damp) or damp <= 0:
        raise ValueError(f"damp must be a finite number > 0 or 'auto', got {damp!r}")
    return float(damp)


@dataclass
class FisherStats:
    """Scale of the empirical Fisher over all pruned weights.

    Attributes:
        sum_sq: sum over the N gradients and all ``numel`` coordinates of g^2 (float64),
            i.e. N times the trace of ``G^T G / N``.
        count: N, the number of gradients.
        numel: coordinates (entries of all pruned weights).
        zero_layers: weights (with entries left to prune) whose every gradient was exactly zero: the loss
            does not reach them (an auxiliary head, an unused branch); filled where per-weight sums are known.
    """

    sum_sq: float = 0.0
    count: int = 0
    numel: int = 0
    zero_layers: Tuple[str, ...] = ()

    @classmethod
    def from_grads(cls, grads: Dict[str, torch.Tensor]) -> "FisherStats":
        """Statistics of kept gradients {name: (N, numel)}."""
        sum_sq = sum(float(g.double().square().sum()) for g in grads.values())
        count = next(iter(grads.values())).shape[0]
        return cls(sum_sq, count, sum(g.shape[1] for g in grads.values()))

    @property
    def all_zero(self) -> bool:
        """True when N >= 1 gradients were taken and every entry is exactly 0 (a Fisher without curvature)."""
        return self.count >= 1 and self.sum_sq == 0.0

    @property
    def mean_diag(self) -> float:
        """Mean diagonal entry of ``G^T G / N``."""
        if self.count < 1 or self.numel < 1:
            raise ValueError(f"Fisher statistics need count >= 1 and numel >= 1, got {self.count}, {self.numel}")
        return self.sum_sq / (self.count * self.numel)


def auto_damp(sum_sq: float, count: int, numel: int, alpha: Optional[float] = None) -> float:
    """lambda = alpha * mean diagonal of ``G^T G / N``.

    Args:
        sum_sq: sum over the N gradients and all ``numel`` pruned coordinates of g^2.
        count: N, the number of gradients. numel: coordinates (all pruned weights).
        alpha: relative strength (> 0); None: :data:`AUTO_ALPHA` as it is at the call (a benchmark may patch it).
    Returns:
        lambda > 0; the paper's 1e-5 when every gradient is zero.
    Raises:
        ValueError: count or numel < 1, or a non-finite Fisher diagonal.
    """
    mean_diag = FisherStats(float(sum_sq), int(count), int(numel)).mean_diag
    if not math.isfinite(mean_diag):
        raise ValueError("auto_damp: the Fisher diagonal is not finite")
    alpha = AUTO_ALPHA if alpha is None else alpha
    return alpha * mean_diag if mean_diag > 0 else DEFAULT_DAMP


def resolve_damp(damp: Union[float, str], stats: FisherStats) -> float:
    """The lambda of one pruning step: ``damp`` itself, or :func:`auto_damp` of ``stats`` for "auto"."""
    damp = check_damp(damp)
    if damp == "auto":
        return auto_damp(stats.sum_sq, stats.count, stats.numel)
    return damp
