"""Checks of the caller's weights that every pruning call makes before it changes anything.

:func:`check_prunable` refuses weights holding NaN / Inf (no saliency can rank them), a
model whose pruned weights are all zero already, and a sparsity that would prune every
entry (:func:`woodfisher.masks.check_keeps_weights`). The checks of options are in
:class:`woodfisher.PruneConfig`, those of the model's structure in
:func:`woodfisher.targets.resolve_targets`, those of the data where it is read
(:mod:`woodfisher.batches`, :mod:`woodfisher.gradients`).
"""
from __future__ import annotations

from typing import List, Optional

import torch

import woodfisher_kernels as wk

from .config import PruneConfig
from .masks import check_keeps_weights
from .precision import compute_dtype
from .targets import PruneTarget

__all__ = ["check_prunable"]


def check_prunable(targets: List[PruneTarget], config: PruneConfig, sparsity: Optional[float] = None,
                   name: str = "sparsity") -> None:
    """Refuse weights that cannot be pruned to ``sparsity`` (default: ``config.final_sparsity``;
    ``name``: what the caller called it, for the message).

    Raises:
        ValueError: a weight with NaN / Inf entries (naming it and the count), every entry of
            the pruned weights already zero, or a sparsity that keeps no entry (naming the value).
    """
    for target in targets:
        bad = int((~torch.isfinite(target.effective_weight())).sum())
        if bad:
            raise ValueError(f"model: weight {target.name!r} holds {bad} NaN or Inf entries of {target.numel}; "
                             "no saliency can rank them (fix or reload the weights first)")
    if all(not bool(target.keep_mask().any()) for target in targets):
        raise ValueError(f"model: every entry of the {len(targets)} pruned weights is already zero "
                         "(sparsity 1.0); there is nothing left to prune")
    _check_backend(targets, config)
    mode = config.method_impl.fixed_mode or config.mode
    check_keeps_weights(config.final_sparsity if sparsity is None else sparsity,
                        {target.name: target.numel for target in targets}, mode, config.min_density, name)


def _check_backend(targets: List[PruneTarget], config: PruneConfig) -> None:
    """A ``backend`` other than "auto" must run on the weights' device and compute dtype: refused here, before any
    gradient is collected (the kernels' own dispatch, on a one-entry probe), not at the first inverse, and not
    ignored where a step happens to use a form without kernels (low-rank blocks)."""
    if config.backend == "auto" or config.method_impl.curvature == "none":
        return
    param = targets[0].param
    probe = torch.ones(1, 1, 1, dtype=compute_dtype(param.dtype), device=param.device)
    try:
        wk.fisher_inverse(probe, 1.0, backend=config.backend)
    except ValueError as err:
        raise ValueError(f"backend={config.backend!r} cannot prune weights of {param.dtype} on {param.device}: {err}; "
                         "backend='auto' chooses one that can") from None
