"""One-shot pruning: the public entry points.

- :func:`prune_one_shot`: prune a model in place, ``num_steps`` steps of (gradients ->
  curvature -> statistic -> masks -> update), through :mod:`woodfisher.engine`;
- :func:`estimate_curvature` + :func:`prune_with`: the same step in two phases, so a sweep
  over sparsities (or damps, :meth:`Curvature.with_damp`) collects gradients once.

Options are the fields of :class:`woodfisher.PruneConfig`; every one is validated before
anything runs, and if anything fails later the weights (and prune masks) are restored,
so a refused call changes nothing.
"""
from __future__ import annotations

from typing import Iterable, Optional

from torch import nn

from . import engine
from .config import PruneConfig
from .curvature import Curvature, estimate_curvature, resolve_config
from .distributed.consistent import collective_entry, entry_group
from .distributed.fsdp import full_parameters
from .engine import prune_with
from .result import PruneResult
from .state import caller_modes_off

__all__ = ["prune_one_shot", "estimate_curvature", "prune_with", "PruneResult", "Curvature"]


def prune_one_shot(model: nn.Module, loader: Optional[Iterable], config: Optional[PruneConfig] = None,
                   **options) -> PruneResult:
    """Prune ``model`` in place to ``sparsity`` over its prunable weights.

    WoodFisher (the default method), after the WoodFisher paper (Singh & Alistarh, 2020): blockwise
    inverse empirical Fisher (Sec. 3.2, Eq. 2), saliency ``rho_q = w_q^2 / (2 [F^-1]_qq)`` (Eq. 11),
    OBS update (Eq. 10, summed over the pruned set), global (joint) or layerwise (independent)
    masks (Sec. 4.3); WoodTaylor Eqs. 21 and 23; FLOPs-aware statistic with ``beta`` (Sec. 5.4);
    group OBS for N:M and rows (Sec. 4.2 / 6.1).

    Args:
        model: the network; wrappers (DataParallel, DDP, FSDP, torch.compile) are seen through,
            tied weights are pruned once. Pruned entries become exact zeros. Under a
            ``torch.distributed`` process group (option ``group``) the call is collective:
            see :mod:`woodfisher.distributed`. The Fisher's gradients are computed in eval mode (dropout
            off, BatchNorm on its running statistics) whatever the model's mode; every submodule's
            train/eval flag and every buffer but the masks (running statistics, counters a forward
            writes) are as they were afterwards.
        loader: iterable of batches for the Fisher: ``(inputs, targets)``, dicts (HF) or
            tensors (see :mod:`woodfisher.batches`); None for magnitude methods.
        config: a :class:`PruneConfig`; keyword ``options`` override its fields.
        **options: the fields of :class:`PruneConfig` (``sparsity`` is required, except with an
            N:M ``pattern``, which fixes it at 1 - N/M), e.g.
            ``sparsity=0.8, method="woodfisher", mode="global", block_size=1000,
            num_grads=1000, fisher_batch_size=1, damp="auto", num_steps=4``. The defaults
            (``block_size``, ``damp`` and ``num_steps`` "auto") give a real second-order mask:
            Fisher blocks as large as the gradients of a step, relative damping, and several
            steps toward a high sparsity, ``num_grads`` being the total over the steps; the
            paper's one-shot setting is ``block_size=None, damp=1e-5, num_steps=1``.
    Returns:
        :class:`PruneResult` (masks, per-weight table, sparsity, damp, timings, collapsed);
        weights left (nearly) empty are listed in ``collapsed`` and warned about. ``sparsity=0``
        prunes nothing: the options and weights are checked, then the result (the current keep-masks,
        ``damp`` None, no steps) is returned with a warning, without reading the loader or computing
        gradients, the weights bit for bit unchanged -- except with ``woodtaylor=True`` (and
        ``obs_update``), whose update also takes the Newton step ``-F^-1 g`` (Eqs. 21-23) and so
        changes the weights at sparsity 0 too.
    Raises:
        ValueError: any bad option (naming it and quoting the value), a sparsity that would
            prune every weight, a model that is not a module, on the meta device, of a
            non-floating dtype, with NaN/Inf or all-zero weights; a missing, non-iterable or
            empty loader, one that runs out before ``num_grads`` gradients, a single-pass
            loader with ``num_steps > 1``, a batch the model or the loss fails on (naming the
            loader, with the batch's shapes), NaN/Inf gradients (naming the weight), a BatchNorm
            without running statistics when per-sample gradients are needed (``fisher_batch_size=1``:
            they are undefined, :func:`woodfisher.per_sample.check_batch_statistics`), a named weight
            that the layer's forward transforms or recomputes (:mod:`woodfisher.weight_transform`). Every
            check runs before anything is written; whatever fails later (any exception,
            KeyboardInterrupt included), the model is restored bit for bit.
    """
    with collective_entry(entry_group(config, options)):  # a check failing on one rank: every rank raises
        if config is None and "sparsity" not in options:
            PruneConfig.from_options(**options)  # raises: unknown option names first, else "sparsity is required"
        config = resolve_config(config, options)
        with full_parameters(model), caller_modes_off():  # FSDP: the full weights, re-sharded after
            return engine.run(model, loader, config)
