"""Baseline pruning statistics that run through the same mask selection and writing.

* ``"magnitude"``: ``|w|``, every layer to the target sparsity (layerwise).
* ``"global_magnitude"``: ``|w|`` ranked across all pruned layers.
* ``"diag_fisher"``: OBS with a *diagonal* empirical Fisher, ``F = damp + mean_i g_i^2``
  per weight. Its inverse diagonal is ``1 / (damp + mean g^2)``, so the statistic is
  ``rho = w^2 (damp + mean g^2) / 2`` (the paper's Eq. 11 with a diagonal Hessian, i.e.
  Optimal Brain Damage) and the OBS update of a diagonal Fisher only zeroes the pruned
  weights. The pruner computes it exactly this way by running WoodFisher with blocks of
  size 1 (same gradients, same kernels); :func:`diag_fisher_saliency` is the closed
  form, used to check that.
* ``"kfac"``: see :mod:`woodfisher.kfac`.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from .layout import PrunableLayer

METHODS = ("woodfisher", "magnitude", "global_magnitude", "diag_fisher", "kfac")


def magnitude_scores(layers: List[PrunableLayer]) -> Dict[str, torch.Tensor]:
    """{param_name: |w|} of the weights the modules compute with."""
    return {l.param_name: l.effective_weight().abs() for l in layers}


def diag_fisher_saliency(weight: torch.Tensor, mean_sq_grad: torch.Tensor, damp: float) -> torch.Tensor:
    """rho = w^2 / (2 [F^-1]_qq) with F = damp + mean g^2 (elementwise, same shape as w)."""
    return weight.square() * (damp + mean_sq_grad) / 2.0
