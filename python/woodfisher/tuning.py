"""Tuning above the pruner: choosing the damp on held-out data.

:func:`search_damp` collects the gradients once (:func:`woodfisher.estimate_curvature`),
re-inverts them for every candidate lambda (:meth:`Curvature.with_damp`), prunes a copy of
the model with each (:func:`woodfisher.prune_with`) and keeps the lambda with the lowest
held-out loss. Runs that cannot reuse one curvature (more than one step, streamed
gradients, non-blockwise methods) prune each copy from scratch with
:func:`woodfisher.prune_one_shot`.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from .batches import check_loader, loader_errors, to_batch
from .config import pattern_fixed_sparsity
from .curvature import estimate_curvature, resolve_config
from .damping import check_damp
from .diagnostics import reissue
from .distributed.consistent import collective_entry, entry_group
from .distributed.group import active_group, all_reduce_, local_phase, shows_progress
from .engine import prune_with
from .losses import compute_loss
from .per_weight import fit_sparsities, weight_starts
from .precision import prepare_batch
from .progress import display, phase, step_label
from .pruner import prune_one_shot
from .state import clone_model, eval_mode
from .targets import resolve_targets

__all__ = ["search_damp", "heldout_loss"]


@torch.no_grad()
def heldout_loss(model, loader, loss_fn: Optional[Callable] = None, batch_adapter: Optional[Callable] = None
                 ) -> float:
    """Sample-weighted mean loss over ``loader`` (eval mode; every module's flag restored).

    Floating inputs are cast to the model's dtype.

    Args:
        model: the network (not modified). loader: a re-iterable or single-pass iterable of batches.
        loss_fn: (outputs, target) -> mean loss, or None for the default loss (a model's own ``loss``
            output when present). batch_adapter: loader item -> :class:`woodfisher.Batch`.
    Returns:
        The mean loss per sample (float, the loss's units).
    Raises:
        ValueError: a loader that is None or not iterable, an empty loader, or a batch the model or
            the loss fails on (naming heldout and the batch's shapes).
    """
    total, n = _heldout_sums(model, loader, loss_fn, batch_adapter)
    if n == 0:
        raise ValueError("heldout loader is empty")
    return total / n


def _heldout_sums(model, loader, loss_fn, batch_adapter) -> Tuple[float, int]:
    """(sum of the per-sample losses, samples) over ``loader``: :func:`heldout_loss` before the division."""
    check_loader(loader)
    param = next(p for p in model.parameters() if p.is_floating_point())
    total, n = 0.0, 0
    with eval_mode(model):
        for item in loader:
            batch = prepare_batch(to_batch(item, batch_adapter), param.device, param.dtype)
            with loader_errors(batch, "heldout"):
                out = model(*batch.args, **batch.kwargs)
                total += float(compute_loss(out, batch.target, loss_fn)) * batch.size
            n += batch.size
    return total, n


def _shared_heldout_loss(model, heldout, loss_fn, adapter, group) -> float:
    """:func:`heldout_loss` over every rank's ``heldout`` of ``group`` (collective; None: this process's)."""
    if group is None:
        return heldout_loss(model, heldout, loss_fn, adapter)
    sums = torch.zeros(2, dtype=torch.float64)
    with local_phase(group):  # a batch failing on one rank stops every rank
        sums[0], sums[1] = _heldout_sums(model, heldout, loss_fn, adapter)
    total, n = all_reduce_(sums, group).tolist()
    if n == 0:
        raise ValueError("heldout loader is empty on every rank")
    return total / n


def _check_grid(grid) -> list:
    try:
        checked = [check_damp(float(d)) for d in grid]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"grid must be a sequence of numbers > 0, got {grid!r}") from exc
    if not checked:
        raise ValueError("grid is empty")
    return checked


def search_damp(model, loader, heldout, *, sparsity: Optional[float] = None, grid: Optional[Sequence[float]] = None,
                loss_fn: Optional[Callable] = None, **options) -> Tuple[float, Dict[float, float]]:
    """Choose lambda (the damp of ``F = lambda I + G^T G / N``, WoodFisher paper Sec. 3.2) on a log grid
    by the held-out loss after pruning.

    Every candidate prunes a copy of ``model`` (the model itself is unchanged; models
    holding ``torch.nn.utils.prune`` masks are copied too).

    Args:
        model, loader: as for :func:`woodfisher.prune_one_shot`. heldout: held-out batches.
        sparsity: target sparsity of the search, a fraction in [0, 1); may be omitted with an N:M ``pattern``
            (1 - N/M, as for :func:`woodfisher.prune_one_shot`).
        grid: candidate lambdas (> 0); default ``auto * 10**k`` for k in -3..1, where ``auto``
            is the :func:`woodfisher.damping.auto_damp` value of the same gradients.
        options: other :class:`woodfisher.PruneConfig` fields (``damp`` is not allowed);
            ``progress`` (default True, as for :func:`woodfisher.prune_one_shot`) shows one
            display over the whole search, each phase labelled with its candidate damp.
    Returns:
        (best lambda, {lambda: held-out loss per sample, as :func:`heldout_loss`}); under a process group
        (option ``group``) the loss over every rank's ``heldout`` batches, so every rank returns the same.
    Warns:
        the warnings of the candidate that was chosen (layer collapse, a mask that degenerated to
        magnitude pruning, ...), once each and at the caller's line; the other candidates' are dropped.
    Raises:
        ValueError: ``damp`` among the options, an empty or bad grid, ``sparsity`` omitted without an N:M
            ``pattern``, a ``method`` without curvature (magnitude: the damp changes nothing), or any bad option.
    """
    # under a process group every rank runs the same search (collective) on its own held-out batches; the losses
    # are the sample-weighted means over every rank's batches, so every rank chooses the same damp
    with collective_entry(entry_group(None, options)):
        best, losses, caught = _search(model, loader, heldout, sparsity, grid, loss_fn, options)
    reissue(caught)  # the chosen candidate's warnings, once each, at the caller's line
    return best, losses


def _search(model, loader, heldout, sparsity, grid, loss_fn, options):
    """:func:`search_damp`'s body: (best damp, {damp: loss}, the chosen candidate's warnings)."""
    if "damp" in options:
        raise ValueError("search_damp chooses damp itself; do not pass damp")
    if sparsity is None:
        sparsity = pattern_fixed_sparsity(options.get("pattern"))
    try:
        check_loader(heldout)
    except ValueError:
        raise ValueError(f"heldout must be an iterable of held-out batches, got {type(heldout).__name__}") from None
    adapter = options.get("batch_adapter")
    config = fit_sparsities(model, resolve_config(None, {**options, "loss_fn": loss_fn}, sparsity))
    weights = resolve_targets(model, config.modules, None, exclude=config.exclude)
    start = weight_starts(config, {target.name: target.keep_mask() for target in weights})
    if config.method_impl.curvature == "none":
        raise ValueError(f"method={config.method!r} uses no curvature, so its masks do not depend on the damp: "
                         "search_damp needs a method with a Fisher (e.g. 'woodfisher', 'diag_fisher', 'kfac')")
    # one gradient collection re-inverted per candidate: any blockwise method (a caller's own included)
    reuse = len(config.steps(start)) == 1 and config.method_impl.curvature == "blockwise" and \
        config.inverse_form != "stream"
    if grid is not None:  # a bad grid is refused before any gradient is computed
        grid = _check_grid(grid)
    with display(config.progress and shows_progress(config.group), "woodfisher search_damp"):
        curvature = None
        if reuse or grid is None:
            curvature = estimate_curvature(model, loader, sparsity=sparsity, damp="auto", loss_fn=loss_fn, **options)
            reuse = reuse and curvature.grads is not None
        if grid is None:
            grid = _check_grid([curvature.damp * 10.0 ** k for k in range(-3, 2)])
        losses, notes = {}, {}
        for i, d in enumerate(grid):
            with step_label(f"damp {d:.3g} ({i + 1}/{len(grid)})"), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                trial = clone_model(model)
                if reuse:
                    prune_with(trial, curvature.with_damp(d), sparsity)
                else:
                    prune_one_shot(trial, loader, sparsity=sparsity, damp=d, loss_fn=loss_fn, **options)
                with phase("held-out loss"):
                    losses[d] = _shared_heldout_loss(trial, heldout, loss_fn, adapter, active_group(config.group))
            notes[d] = caught
    best = min(losses, key=lambda d: (losses[d], d))
    return best, losses, notes[best]
