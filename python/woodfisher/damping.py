"""Choice of the dampening lambda of ``F = lambda I + G^T G / N``.

``damp=1e-5`` is the paper's fixed value (appendix S1.2). It is not scale-free: a
loss multiplied by s multiplies every gradient by s and the Fisher by s^2, so a fixed
lambda means a different amount of regularisation for every model and loss. Two
automatic choices are provided:

* :func:`auto_damp` (``damp="auto"`` in :func:`woodfisher.prune_one_shot`): lambda is
  ``alpha`` times the mean diagonal of the empirical Fisher over all pruned weights,

      lambda = alpha * mean_j (1/N) sum_i g_ij^2 ,   alpha = 1e-2 by default,

  the relative rule common in OBS-type pruners. It is scale-equivariant
  (gradients x s -> lambda x s^2), so the pruning decisions do not depend on the scale
  of the loss. With streamed gradients it costs one extra pass over the data.
* :func:`search_damp`: a small one-shot search over a log grid: prune a copy of the
  model with each candidate and keep the one with the lowest held-out loss.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .fisher import eval_mode, split_batch

DEFAULT_DAMP = 1e-5
AUTO_ALPHA = 1e-2


def check_damp(damp) -> object:
    """``damp`` must be a finite number > 0 or the string "auto"."""
    if isinstance(damp, str):
        if damp != "auto":
            raise ValueError(f"damp must be a number > 0 or 'auto', got {damp!r}")
        return damp
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp <= 0:
        raise ValueError(f"damp must be a finite number > 0 or 'auto', got {damp!r}")
    return float(damp)


def auto_damp(sum_sq: float, count: int, numel: int, alpha: float = AUTO_ALPHA) -> float:
    """lambda = alpha * mean diagonal of G^T G / N.

    Args:
        sum_sq: sum over the N gradients and all ``numel`` pruned coordinates of g^2.
        count: N, the number of gradients. numel: coordinates (all pruned layers).
        alpha: relative strength (> 0).
    Returns:
        lambda > 0; falls back to the paper's 1e-5 when every gradient is zero.
    """
    if count < 1 or numel < 1:
        raise ValueError(f"auto_damp needs count >= 1 and numel >= 1, got {count}, {numel}")
    mean_diag = float(sum_sq) / (count * numel)
    if not math.isfinite(mean_diag):
        raise ValueError("auto_damp: the Fisher diagonal is not finite")
    return alpha * mean_diag if mean_diag > 0 else DEFAULT_DAMP


def auto_damp_from_grads(grads: Dict[str, torch.Tensor], alpha: float = AUTO_ALPHA) -> float:
    """:func:`auto_damp` of kept gradients {name: (N, numel)}."""
    sum_sq = sum(float(g.double().square().sum()) for g in grads.values())
    count = next(iter(grads.values())).shape[0]
    numel = sum(g.shape[1] for g in grads.values())
    return auto_damp(sum_sq, count, numel, alpha)


@torch.no_grad()
def heldout_loss(model, loader, loss_fn: Optional[Callable] = None) -> float:
    """Sample-weighted mean of ``loss_fn`` over ``loader`` (eval mode)."""
    loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
    device = next(model.parameters()).device
    total, n = 0.0, 0
    with eval_mode(model):
        for batch in loader:
            x, y = split_batch(batch)
            out = model(x.to(device))
            total += float(loss_fn(out, y.to(device))) * x.shape[0]
            n += x.shape[0]
    if n == 0:
        raise ValueError("heldout loader is empty")
    return total / n


def search_damp(model, loader, heldout, *, sparsity: float, grid: Optional[Sequence[float]] = None,
                loss_fn: Optional[Callable] = None, **prune_kwargs) -> Tuple[float, Dict[float, float]]:
    """One-shot search of lambda on a log grid, by held-out loss after pruning.

    Every candidate prunes a deep copy of ``model`` (the model itself is unchanged)
    with :func:`woodfisher.prune_one_shot` and the same other arguments.

    Args:
        model, loader: as for prune_one_shot. heldout: loader of held-out batches.
        sparsity: target sparsity of the search.
        grid: candidate lambdas (> 0); default ``auto * 10**k`` for k in -3..1, where
            ``auto`` is the :func:`auto_damp` value.
        prune_kwargs: other prune_one_shot arguments (``damp`` is not allowed).
    Returns:
        (best lambda, {lambda: held-out loss}).
    """
    from .pruner import prune_one_shot  # late import: pruner imports this module

    if "damp" in prune_kwargs:
        raise ValueError("search_damp chooses damp itself; do not pass damp")
    prune_kwargs.setdefault("progress", False)
    if grid is None:
        probe = copy.deepcopy(model)
        base = prune_one_shot(probe, loader, sparsity=0.0, damp="auto", loss_fn=loss_fn,
                              **{k: v for k, v in prune_kwargs.items() if k != "sparsity"}).damp
        grid = [base * 10.0 ** k for k in range(-3, 2)]
    grid = [check_damp(float(d)) for d in _as_list(grid)]
    if not grid:
        raise ValueError("grid is empty")
    losses = {}
    for d in grid:
        trial = copy.deepcopy(model)
        prune_one_shot(trial, loader, sparsity=sparsity, damp=d, loss_fn=loss_fn, **prune_kwargs)
        losses[d] = heldout_loss(trial, heldout, loss_fn)
    best = min(losses, key=lambda d: (losses[d], d))
    return best, losses


def _as_list(grid: Iterable[float]):
    try:
        return list(grid)
    except TypeError as exc:
        raise ValueError(f"grid must be a sequence of numbers, got {grid!r}") from exc
