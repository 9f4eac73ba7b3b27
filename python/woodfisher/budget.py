"""What a pruning call will need in memory, before running it: :func:`estimate_memory`.

The numbers are those :func:`woodfisher.plan.plan_memory` decides with when the call runs (its first step:
the gradients per step and the Fisher block size of ``num_steps`` / ``block_size`` resolved as
:func:`woodfisher.prune_one_shot` resolves them), so a caller can size ``memory_budget``, ``num_grads`` or
``block_size`` without computing a gradient.
"""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch import nn

from .checks import check_prunable
from .config import PruneConfig
from .curvature import resolve_config
from .diagnostics import notices_dropped, warnings_held
from .distributed.estimate import check_shard_budget, check_sharded, plan_for, shard_bytes
from .distributed.group import active_group
from .per_weight import fit_sparsities, weight_starts
from .plan import keep_step_bytes, plan_memory, stat_itemsize, stream_step_bytes
from .structured import fit_pattern
from .targets import resolve_targets

__all__ = ["estimate_memory"]


def estimate_memory(model: nn.Module, config: Optional[PruneConfig] = None, **options) -> dict:
    """Bytes a :func:`woodfisher.prune_one_shot` call with these options needs for its gradients and inverses.

    Args:
        model: the network (nothing is computed on it; its current zeros set the starting sparsity).
        config: a :class:`woodfisher.PruneConfig`; ``**options`` are its fields (as for ``prune_one_shot``).
    Returns:
        dict with ``num_steps``; ``grads_per_step`` (m of the first step); ``block_size`` (c; None: whole
        layers); ``pruned_weights`` (D); ``keep_bytes`` (m D gradients kept + the larger of the collector's
        chunk and the inverses with their working buffers, :func:`woodfisher.plan.keep_step_bytes`);
        ``stream_min_bytes`` (streaming one gradient at a time, :func:`woodfisher.plan.stream_step_bytes`);
        ``plan`` ("keep", "stream", "offload" or "diag"; None when the call would be refused) and ``stream_k``
        (gradients per streamed chunk, or None) under ``memory_budget`` (None: the memory the device has
        available); ``refused`` (None, or the ValueError message the call would raise, with what fits).
        Under a process group (option ``group``, :mod:`woodfisher.distributed`): ``plan`` "sharded",
        ``world_size`` and ``rank_bytes`` (this rank's gradient slices, inverses of its blocks and
        gradient buffer, :func:`woodfisher.distributed.estimate.shard_bytes`), the share ``memory_budget``
        is checked against; ``keep_bytes`` / ``stream_min_bytes`` stay the single-process figures.
        Not counted: the model itself and its activations for the samples in flight.
    Raises:
        ValueError: naming the field, for a bad option.
    """
    config = resolve_config(config, options)
    with warnings_held() as held:  # the notices of the call it estimates, only when that call would go ahead
        config, report = _estimate(model, config)
        if report["refused"] is not None:
            held.clear()
    return report


def _estimate(model: nn.Module, config: PruneConfig):
    """(config fitted to its pattern, :func:`estimate_memory`'s report)."""
    config = fit_sparsities(model, fit_pattern(model, config))
    method = config.method_impl
    targets = resolve_targets(model, config.modules, None, exclude=config.exclude)
    steps = config.steps(weight_starts(config, {t.name: t.keep_mask() for t in targets}))
    first = config.replace(num_grads=steps[0][1] if steps else config.num_grads, num_steps=1)
    block = method.block_size(first)
    targets = resolve_targets(model, config.modules, block, channels_last=config.channels_last,
                              exclude=config.exclude)
    itemsize = stat_itemsize(targets)
    m, auto = first.num_grads, config.damp == "auto"
    plan, k, refused = "diag", None, None
    try:  # weights the call would refuse (an N:M pattern its rows / input channels do not fit, ...)
        method.check_targets(targets, config)
        check_prunable(targets, config)
    except ValueError as err:
        plan, refused = None, str(err)
    group = active_group(config.group)
    sharded = {}
    if group is not None and method.curvature in ("blockwise", "diagonal") and refused is None:
        # each rank of the process group holds its shard (woodfisher.distributed): what this rank needs
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        shard = plan_for(targets, first, world, rank)[1]
        sharded = dict(world_size=world, rank_bytes=shard_bytes(shard, targets, m, itemsize))
        plan = "sharded"
        try:
            check_sharded(first)
            check_shard_budget(shard, targets, m, itemsize, config.memory_budget)
        except ValueError as err:
            plan, refused = None, str(err)
    elif method.curvature == "blockwise" and refused is None:
        with notices_dropped():   # the call's own warning says so when it runs
            try:
                plan, k = plan_memory(targets, m, itemsize, config.memory_budget, auto, config.inverse_form,
                                      config.fisher_batch_size)
            except ValueError as err:   # the call would be refused: say why, and what fits
                plan, refused = None, str(err)
    return config, dict(num_steps=len(steps), grads_per_step=m, block_size=block,
                pruned_weights=sum(t.numel for t in targets),
                keep_bytes=keep_step_bytes(targets, m, itemsize, config.fisher_batch_size, config.inverse_form),
                stream_min_bytes=stream_step_bytes(targets, 1, itemsize, auto), plan=plan, stream_k=k,
                refused=refused, **sharded)
