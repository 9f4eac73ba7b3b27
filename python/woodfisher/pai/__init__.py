"""Pruning at initialization with scalable second-order criteria.

Hutchinson and empirical-Fisher diagonals (linear time and memory), OBD-style
saliencies built on them, the SNIP / GraSP / SynFlow / magnitude / random baselines,
BatchNorm statistics warm-up and layer-collapse detection. Built on the package's shared
pieces: prune targets (woodfisher.targets), the batch adapter and default loss
(woodfisher.batches), per-sample gradients (woodfisher.gradients) and the Fisher
diagonal (woodfisher.diagonal), masks (woodfisher.masks) and PruneResult.
"""
from .criteria import BASELINES, CRITERIA, DATA_FREE, SECOND_ORDER, compute_scores, synflow_scores
from .estimators import (
                         DiagonalEstimate,
                         fisher_diagonal,
                         hessian_gradient_product,
                         hutchinson_diagonal,
                         loss_gradient,
                         rademacher,
)
from .prune import PaIResult, prune_at_init
from .training import attach_masks, make_permanent, train
from .warmup import preserved_batchnorm_state, warmup_batchnorm

__all__ = [
    "BASELINES", "CRITERIA", "DATA_FREE", "SECOND_ORDER", "DiagonalEstimate", "PaIResult",
    "attach_masks", "compute_scores", "make_permanent", "fisher_diagonal", "hessian_gradient_product",
    "hutchinson_diagonal", "loss_gradient", "preserved_batchnorm_state", "prune_at_init", "rademacher",
    "synflow_scores", "train", "warmup_batchnorm",
]
