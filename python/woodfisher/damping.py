"""The dampening lambda of ``F = lambda I + G^T G / N``: one rule, resolved once per step.

``damp=1e-5`` is the paper's fixed value (appendix S1.2). It is not scale-free: a loss
multiplied by s multiplies every gradient by s and the Fisher by s^2, so a fixed lambda
means a different amount of regularisation for every model and loss.
``damp="auto"`` uses the relative rule common in OBS-type pruners:

    lambda = alpha * mean_{j live} (1/N) sum_i g_ij^2 ,   alpha = 0.01 (:data:`AUTO_ALPHA`),

alpha times the mean diagonal of the empirical Fisher over the *live* coordinates j of the
pruned weights (keep-mask True: the entries not pruned yet), i.e. the damping carries
alpha / (1 + alpha) of the trace of ``F`` restricted to the live coordinates. Entries pruned in
an earlier step have zero gradients (masked, :mod:`woodfisher.gradients`); counting them would
shrink lambda relative to the curvature of the weights still being ranked as sparsity grows.
It is scale-equivariant
(gradients x s -> lambda x s^2), so pruning decisions do not depend on the scale of the loss.
The number of live coordinates is counted in one place, :func:`live_coordinates`, used by every
producer of :class:`FisherStats` (kept, streamed, offloaded, sharded, diagonal, K-FAC,
:class:`woodfisher.FisherHook`).

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

__all__ = ["DEFAULT_DAMP", "AUTO_ALPHA", "FisherStats", "check_damp", "auto_damp", "live_coordinates",
           "resolve_damp"]

DEFAULT_DAMP = 1e-5
#: ``damp="auto"``: lambda = AUTO_ALPHA x the mean diagonal of the empirical Fisher over the live coordinates.
#: Chosen with that rule on the held-out train split (benchmarks/results/damp_live_heldout.md; the package's
#: defaults, 8 steps): 0.01 is at least as good as the earlier rule (mean over ALL coordinates, alpha 0.1) in
#: every cell measured -- MLPNet 70-95% within 0.25 points (10 seeds), ResNet-20 70 / 80 / 90% +0.6 / +2.1 /
#: +4.6 points (3-5 seeds) -- while the live rule with 0.1 lost 1.2 points on MLPNet at 95% (its lambda in the
#: last step was 16x the old rule's: alpha x the live fraction was the old rule's effective factor). With 0.01
#: the live rule shows no cliff at 95% (85.9 +- 0.7 vs 85.7 +- 0.7); the old rule at 0.01 fell to 81.7 +- 2.1
#: (damp_alpha_mlpnet.md): its last steps damped with ~0.01 x 5% of the live mean. The cost:
#: a single step (num_steps=1, N:M / rows patterns) damps 10x less than with 0.1 (MLPNet 90 / 95%: -0.07 /
#: -0.21 points held-out, 10 seeds; ResNet-20 80 / 90%: -1.2 / -0.4, 3 seeds). Test sets: damp_live.md.
AUTO_ALPHA = 0.01


def check_damp(damp) -> Union[float, str]:
    """``damp`` must be a finite number > 0 or the string "auto"."""
    if isinstance(damp, str):
        if damp != "auto":
            raise ValueError(f"damp must be a number > 0 or 'auto', got {damp!r}")
        return damp
    if not is_real(damp) or not math.isfinite(damp) or damp <= 0:
        raise ValueError(f"damp must be a finite number > 0 or 'auto', got {damp!r}")
    return float(damp)


def live_coordinates(keep: Dict[str, torch.Tensor]) -> int:
    """The live coordinates of the pruned weights: entries whose keep-mask is True.

    Args:
        keep: {weight name: bool keep-mask} (any shapes; the masks the gradients were taken with).
    Returns:
        The number of True entries over all masks (0 when every entry is pruned).
    """
    return sum(int(mask.sum()) for mask in keep.values())


@dataclass
class FisherStats:
    """Scale of the empirical Fisher over the live coordinates of the pruned weights.

    Attributes:
        sum_sq: sum over the N gradients and the live coordinates of g^2 (float64), i.e. N times the
            trace of ``G^T G / N`` (pruned coordinates have zero, masked gradients and add nothing).
        count: N, the number of gradients.
        numel: live coordinates (:func:`live_coordinates` of the keep-masks the gradients were taken with).
        zero_layers: weights (with entries left to prune) whose every gradient was exactly zero: the loss
            does not reach them (an auxiliary head, an unused branch); filled where per-weight sums are known.
    """

    sum_sq: float = 0.0
    count: int = 0
    numel: int = 0
    zero_layers: Tuple[str, ...] = ()

    @classmethod
    def live(cls, keep: Dict[str, torch.Tensor], sum_sq: float = 0.0, count: int = 0) -> "FisherStats":
        """Statistics over the live coordinates of ``keep`` ({weight name: bool keep-mask}); ``sum_sq`` and
        ``count`` as the attributes (0 for a producer that accumulates them later)."""
        return cls(float(sum_sq), int(count), live_coordinates(keep))

    @property
    def all_zero(self) -> bool:
        """True when N >= 1 gradients were taken and every entry is exactly 0 (a Fisher without curvature)."""
        return self.count >= 1 and self.sum_sq == 0.0

    @property
    def mean_diag(self) -> float:
        """Mean diagonal entry of ``G^T G / N`` over the live coordinates (0.0 when none is live)."""
        if self.count < 1 or self.numel < 0:
            raise ValueError(f"Fisher statistics need count >= 1 and numel >= 0, got {self.count}, {self.numel}")
        return self.sum_sq / (self.count * self.numel) if self.numel else 0.0


def auto_damp(sum_sq: float, count: int, numel: int, alpha: Optional[float] = None) -> float:
    """lambda = alpha * mean diagonal of ``G^T G / N`` over the live coordinates (module docstring).

    Args:
        sum_sq: sum over the N gradients and the ``numel`` live coordinates of g^2.
        count: N, the number of gradients. numel: live coordinates (:func:`live_coordinates`).
        alpha: relative strength (> 0); None: :data:`AUTO_ALPHA` as it is at the call (a benchmark may patch it).
    Returns:
        lambda > 0; the paper's 1e-5 when every gradient is zero (or no coordinate is live).
    Raises:
        ValueError: count < 1 or numel < 0, or a non-finite Fisher diagonal.
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
