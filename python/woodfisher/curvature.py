"""Phase one of a pruning step: the curvature (gradients -> block inverses, damp resolved once).

:func:`estimate_curvature` collects the gradients of the pruned weights
(:mod:`woodfisher.gradients`) and builds what the method needs, through the public ops
of :mod:`woodfisher_kernels`:

- ``"blockwise"`` (WoodFisher): per weight, the blocks ``(damp I + G^T G / N)^-1`` in the
  form :func:`woodfisher_kernels.choose_form` picks (dense "sequential" or "lowrank"
  factors, paper Eq. 2 / Woodbury), or, when ``memory_budget`` cannot hold the gradients,
  "stream": gradients fed k at a time into dense inverses with ``woodbury_update_`` (with
  ``damp="auto"`` the streamed gradients are summed into ``G^T G`` blocks instead, and the
  blocks inverted once lambda is known; :mod:`woodfisher.streaming`);
- ``"diagonal"``: ``1 / (damp + mean g^2)`` per weight (blocks of size 1);
- ``"kfac"``: Kronecker factors (:mod:`woodfisher.kfac`).

The damp is resolved once per step (:func:`woodfisher.damping.resolve_damp`) from the
Fisher statistics gathered with the gradients. The result, a :class:`Curvature`, can be
reused by :func:`woodfisher.prune_with` for many sparsities (a sweep collects gradients
once), and re-damped without new gradients (:meth:`Curvature.with_damp`).
"""
from __future__ import annotations

import time
from typing import Iterable, List, Optional

import torch
from torch import nn

from .batches import check_loader, peek, to_batch
from .checks import check_prunable
from .conditioning import warn_ill_conditioned
from .config import PruneConfig, pattern_fixed_sparsity
from .curvature_result import Curvature, blockwise_from_grads
from .damping import FisherStats, resolve_damp
from .diagnostics import notices_dropped, warn_at_caller, warnings_held
from .diagonal import empirical_fisher_diagonal
from .distributed.consistent import check_same_call, collective_entry, entry_group
from .distributed.estimate import estimate_sharded
from .distributed.fsdp import full_parameters
from .distributed.group import active_group, shows_progress
from .flops import flops_per_param_of_batch
from .gradients import GradientCollector
from .kfac import kfac_factors, kfac_inverse
from .left_out import warn_left_out
from .offload import estimate_offloaded
from .per_weight import fit_sparsities
from .plan import plan_memory, stat_itemsize
from .progress import display, phase
from .state import caller_modes_off, derived_weights_kept, fingerprint
from .streaming import estimate_streamed
from .structured import fit_pattern
from .targets import PruneTarget, resolve_targets, unwrap_model

__all__ = ["Curvature", "estimate_curvature", "resolve_config", "require_loader", "check_memory_plan"]


def resolve_config(config: Optional[PruneConfig], options: dict, sparsity: Optional[float] = None) -> PruneConfig:
    """A PruneConfig from ``config`` and/or keyword options (options override). ``sparsity`` not among the options:
    the argument, else the one an N:M ``pattern`` fixes, else 0 (phase one does not use it); ``sparsity=None`` among
    them is PruneConfig's to refuse or fill. A ``pattern`` option over a ``config`` brings its own fixed sparsity
    unless ``sparsity`` is passed too."""
    if config is None:
        if "sparsity" not in options:
            fixed = pattern_fixed_sparsity(options.get("pattern"), 0.0)
            options = {**options, "sparsity": fixed if sparsity is None else sparsity}
        return PruneConfig.from_options(**options)
    if not isinstance(config, PruneConfig):
        raise ValueError(f"config must be a woodfisher.PruneConfig, got {type(config).__name__}")
    if "pattern" in options and "sparsity" not in options:
        options = {**options, "sparsity": pattern_fixed_sparsity(options["pattern"], config.sparsity)}
    return config.replace(**options) if options else config


def estimate_curvature(model: nn.Module, loader: Optional[Iterable], config: Optional[PruneConfig] = None,
                       **options) -> Curvature:
    """Gradients and block inverses of the pruned weights of ``model`` (phase one of a step).

    For WoodFisher: per weight, ``(damp I + G^T G / m)^-1`` per block of block size c from m
    per-sample gradients (the fisher subsample size), WoodFisher paper Sec. 3.2, Eq. 2 and its
    block-wise approximation; ``damp="auto"`` resolves lambda once from the Fisher diagonal
    (:func:`woodfisher.damping.auto_damp`).

    Args:
        model: the network (not modified; its current zeros count as pruned).
        loader: batches for the Fisher (see :mod:`woodfisher.batches`); may be None for
            magnitude methods without ``beta``.
        config: a :class:`PruneConfig`; keyword ``options`` (its field names) override it,
            or build one (``sparsity`` defaults to the one an N:M ``pattern`` fixes, else 0 here: it is used by
            :func:`prune_with`; a sparsity that contradicts an N:M pattern is a ValueError naming ``sparsity``).
    Returns:
        :class:`Curvature` (inverses (B, c, c) or low-rank per weight, see its attributes).
    Raises:
        ValueError: bad options, no loader where one is needed, an empty loader, NaN/Inf
            gradients (naming the weight), or a ``memory_budget`` that fits nothing.
    """
    with collective_entry(entry_group(config, options)):  # a check failing on one rank: every rank raises
        return _estimate_curvature(model, loader, resolve_config(config, options))


def _estimate_curvature(model: nn.Module, loader: Optional[Iterable], config: PruneConfig) -> Curvature:
    """:func:`estimate_curvature` with its options resolved."""
    if loader is not None:  # refused before any notice (fit_pattern's) is printed
        check_loader(loader)
    # the notices (fit_pattern's, warn_left_out's) only for a call that goes ahead: not refused by a check, nor by
    # its loader and model on the data
    with full_parameters(model), caller_modes_off(), warnings_held():  # FSDP: the full weights for the call
        config = fit_pattern(model, config)  # N:M on the default targets: those it fits
        config = fit_sparsities(model, config)  # a per-weight dict: the weights its keys select
        method = config.method_impl
        targets = resolve_targets(model, config.modules, method.block_size(config), channels_last=config.channels_last,
                                  exclude=config.exclude)
        method.check_targets(targets, config)
        check_prunable(targets, config)
        require_loader(config, loader)
        check_memory_plan(targets, config, config.num_grads)
        warn_left_out(model, config.modules)
        with display(config.progress and shows_progress(config.group)):
            curv = _estimate(model, loader, targets, config)
        if curv.kind != "none":  # what prune_with checks (prune_one_shot uses its curvature at once: not needed)
            curv.fingerprint = fingerprint(targets)
    warn_ill_conditioned(curv.kappa, curv.forms, curv.damp, config.damp == "auto")
    warn_zero_gradients([curv.stats])
    return curv


def _estimate(model, loader, targets: List[PruneTarget], config: PruneConfig) -> Curvature:
    """Phase one for resolved ``targets``; the model's prune-derived weights are left as they were."""
    with derived_weights_kept(unwrap_model(model)[0]):
        return _estimate_steps(model, loader, targets, config)


def warn_zero_gradients(stats: List[Optional[FisherStats]]) -> None:
    """Warn once, at the caller's line, when the loss gave exactly zero gradients in the steps of a call: for
    every pruned weight (the mask is then magnitude pruning's), or for some of them (ranked least important,
    pruned first).

    Args:
        stats: the :class:`FisherStats` of each step (None for a step without curvature).
    """
    stats = [s for s in stats if s is not None]
    if any(s.all_zero for s in stats):
        warn_at_caller("every gradient of the loss with respect to the weights being pruned is exactly zero: the "
                       "Fisher carries no curvature and the mask is magnitude pruning's. Check loss_fn (does the "
                       "loss depend on the model's outputs? the default cross-entropy needs >= 2 classes) and that "
                       "the pruned weights reach the output")
        return
    zero = list(dict.fromkeys(name for s in stats for name in s.zero_layers))
    if zero:
        warn_at_caller(f"the loss has exactly zero gradient with respect to {zero} over every sample: nothing "
                       "connects them to the loss (an auxiliary head, an unused branch, or the weights after them "
                       "pruned away; loss_fn sees only the first output of a tuple), so their Fisher is damp * I "
                       "alone and they rank as the least important weights (pruned first in mode='global'); leave "
                       "them out with modules=[the other weights], or make the model's first output depend on them "
                       "(or give loss_fn the whole outputs: loss_fn=woodfisher.losses.whole_outputs(your_loss))")


def require_loader(config: PruneConfig, loader: Optional[Iterable]) -> None:
    """A ValueError naming ``loader`` when it is None and ``config`` needs data (curvature, or ``beta > 0``)."""
    if config.needs_data and loader is None:
        raise ValueError(f"loader is required for method={config.method!r} (and for beta > 0)")


def check_memory_plan(targets: List[PruneTarget], config: PruneConfig, num_grads: int) -> None:
    """Refuse, up front, a ``memory_budget`` that no plan fits for a step of ``num_grads`` gradients (a ValueError
    naming ``memory_budget``, from :func:`woodfisher.plan.plan_memory`); a sharded call checks its own shard, and the
    plan's own notice comes from the step that uses it."""
    if config.method_impl.curvature not in ("blockwise", "diagonal") or active_group(config.group) is not None:
        return
    with notices_dropped():
        plan_memory(targets, num_grads, stat_itemsize(targets), config.memory_budget, config.damp == "auto",
                    config.inverse_form, config.fisher_batch_size)


def _estimate_steps(model, loader, targets: List[PruneTarget], config: PruneConfig) -> Curvature:
    require_loader(config, loader)
    if config.needs_data:
        check_loader(loader)
    kind = config.method_impl.curvature
    keep = {target.name: target.keep_mask() for target in targets}
    curv = Curvature(kind, config, {target.name: target.layout() for target in targets}, keep=keep,
                     timings={"gradients": 0.0, "inverse": 0.0})
    if config.beta > 0:
        first, loader = peek(loader)
        if first is None:
            raise ValueError("loader is empty: cannot measure FLOPs per parameter")
        curv.flops = flops_per_param_of_batch(model, to_batch(first, config.batch_adapter), targets)
    group = active_group(config.group)
    if group is not None:  # every rank makes the same call (any method): ValueError on every rank otherwise
        check_same_call(group, config, targets)
    if kind == "none":
        return curv
    if group is not None:  # sharded across the ranks of a process group
        return estimate_sharded(model, loader, targets, config, curv, group)
    if kind == "kfac":
        return _kfac(model, loader, targets, config, curv)
    itemsize = stat_itemsize(targets)
    m = config.num_grads
    plan, k = plan_memory(targets, m, itemsize, config.memory_budget, config.damp == "auto",
                          config.inverse_form, config.fisher_batch_size) if kind == "blockwise" else ("diag", None)
    if plan == "offload":  # the device must also hold one loader batch of gradients
        first, loader = peek(loader)
        groups = 0 if first is None else to_batch(first, config.batch_adapter).size // config.fisher_batch_size
    if config.inverse_form == "stream" and kind == "blockwise":
        plan, k = "stream", k or min(m, 32)
    chunk_bytes = None  # gradients buffered per chunk: the soft default; under a memory budget, the plan's
    if config.memory_budget is not None and plan in ("offload", "stream"):
        per_grad = sum(target.numel for target in targets) * itemsize
        chunk_bytes = per_grad * max(1, groups if plan == "offload" else k)
    collector = GradientCollector(model, loader, targets, want_loss_grad=config.woodtaylor, keep_masks=keep,
                                  loss_fn=config.loss_fn, num_grads=m, fisher_batch_size=config.fisher_batch_size,
                                  sampled_fisher=config.sampled_fisher, seed=config.seed, progress=config.progress,
                                  batch_adapter=config.batch_adapter, chunk_bytes=chunk_bytes,
                                  per_sample=config.per_sample_grads)
    if plan == "diag":
        _diagonal(collector, targets, config, curv)
    elif plan == "keep":
        t0 = time.perf_counter()
        grads = collector.collect(blocked=True)
        curv.timings["gradients"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        curv.stats = FisherStats.live(curv.keep, collector.sum_sq, collector.count)
        curv.damp = resolve_damp(config.damp, curv.stats)
        curv.inverses, curv.forms, curv.kappa, curv.refined = blockwise_from_grads(
            grads, curv.layouts, curv.damp, collector.count, config)
        curv.grads = grads
        curv.timings["inverse"] += time.perf_counter() - t0
    elif plan == "offload":  # gradients and inverses in host memory (woodfisher.offload)
        estimate_offloaded(collector, targets, config, curv, max(1, min(m, groups)))
    else:
        estimate_streamed(collector, targets, config, curv, k)
    if config.woodtaylor:
        curv.loss_grad = {target.name: target.blocks(collector.loss_grad[target.name]) for target in targets}
    curv.stats.zero_layers = tuple(target.name for target in targets
                                   if not collector.nonzero.get(target.name, True) and bool(keep[target.name].any()))
    return curv


def _diagonal(collector, targets, config, curv) -> None:
    """c = 1: each 1x1 block is 1 / (damp + sum g^2 / N)."""
    t0 = time.perf_counter()
    fd = empirical_fisher_diagonal(collector, min(config.num_grads, 256))
    sq, count = fd.sum_sq, fd.count
    curv.stats = FisherStats.live(curv.keep, fd.total(), count)
    curv.damp = resolve_damp(config.damp, curv.stats)
    curv.inverses = {target.name: target.canonical((1.0 / (curv.damp + sq[target.name] / count))).view(-1, 1, 1)
                     for target in targets}
    curv.forms = {target.name: "diagonal" for target in targets}
    curv.timings["gradients"] += time.perf_counter() - t0


def _kfac(model, loader, targets, config, curv) -> Curvature:
    t0 = time.perf_counter()
    factors = kfac_factors(model, loader, targets, loss_fn=config.loss_fn,
                           num_samples=config.num_grads * config.fisher_batch_size,
                           sampled_fisher=config.sampled_fisher, seed=config.seed, progress=config.progress,
                           batch_adapter=config.batch_adapter)
    curv.timings["gradients"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    # the diagonal of S (x) A at entry (i, j) of the canonical (out, in') weight is S_ii A_jj: summed over the
    # live entries, it is one "gradient" of that scale
    total = 0.0
    for target in targets:
        f = factors[target.name]
        live = target.canonical(curv.keep[target.name]).view(f.S.shape[0], -1).to(f.S.dtype)
        total += float(torch.diagonal(f.S) @ live @ torch.diagonal(f.A))
    curv.stats = FisherStats.live(curv.keep, total, 1)
    curv.damp = resolve_damp(config.damp, curv.stats)
    with phase("inverses"):
        curv.inverses = {n: kfac_inverse(f, curv.damp) for n, f in factors.items()}
    curv.forms = {target.name: "kfac" for target in targets}
    curv.timings["inverse"] += time.perf_counter() - t0
    return curv
