"""Phase two of a pruning step, and the steps of a run.

:func:`prune_with` applies one step from a :class:`woodfisher.curvature.Curvature`:
the method scores, the masks are selected, the update is written. :func:`run` is the
whole of :func:`woodfisher.prune_one_shot`: the steps of :meth:`PruneConfig.steps` from
the current to the target sparsity, each with fresh curvature from its share of the
``num_grads`` gradients. Both are transactional: everything is checked before anything is
written (:mod:`woodfisher.checks`), and if anything fails later, the weights, masks and
buffers are restored bit for bit. Both report how much the mask overlaps magnitude
pruning's (:mod:`woodfisher.diagnostics`) and warn when a curvature method degenerated to
it. Layers left (nearly) empty are reported in ``PruneResult.collapsed`` with a warning
(:func:`woodfisher.masks.collapsed`, the rule pruning at initialisation uses too).
"""
from __future__ import annotations

import math
import numbers
import time
import warnings
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from .batches import check_loader, is_single_pass
from .checks import check_prunable
from .chunking import fitted_chunks
from .conditioning import warn_ill_conditioned
from .config import AUTO_MANY_STEPS, AUTO_STEP_KEEP, PruneConfig, pattern_fixed_sparsity
from .curvature import Curvature, _estimate, check_memory_plan, require_loader, warn_zero_gradients
from .diagnostics import magnitude_overlap, release_notices, warn_at_caller, warn_if_degenerate, warnings_held
from .distributed.consistent import check_same_call, collective_entry
from .distributed.fsdp import full_parameters, refuse_held_masks
from .distributed.group import active_group, shows_progress
from .finetune import hold_target_masks
from .gradients import LoaderExhausted
from .left_out import warn_left_out
from .masks import COLLAPSE_DENSITY, collapsed, sparsity_of
from .memory import note_out_of_memory
from .methods import StepContext
from .methods.outputs import check_step_output
from .per_weight import fit_sparsities, is_per_weight, resolve_sparsities, weight_starts
from .progress import display, step_label
from .result import PruneResult, layer_rows
from .start_notices import warn_below, warn_floor
from .state import Snapshot, caller_modes_off, changed_weights, fingerprint
from .structured import fit_pattern, parse_pattern, pattern_sparsity
from .targets import PruneTarget, resolve_targets

__all__ = ["prune_with", "run"]


def _apply(targets: List[PruneTarget], curvature: Curvature, config: PruneConfig, sparsity: float,
           timings: Dict[str, float]) -> None:
    keep = {target.name: target.keep_mask() for target in targets}
    ctx = StepContext(targets, curvature, config, sparsity, keep, timings)
    new, keep = check_step_output(ctx, config.method_impl.step(ctx))
    with ctx.timed("update"):
        for target in targets:
            target.write(new[target.name], keep[target.name])


def _start(targets: List[PruneTarget]):
    """(weights, keep-masks) before a call, for the overlap with magnitude pruning."""
    return {target.name: target.effective_weight().clone() for target in targets}, {
        target.name: target.keep_mask() for target in targets
    }


def _result(model, targets, config, damp, forms, timings, start, extra=None, stacklevel: int = 4) -> PruneResult:
    masks = {target.name: target.keep_mask() for target in targets}
    sparsity = sparsity_of(masks)
    overlap = None
    if config.pattern is None:
        per = is_per_weight(config.sparsity)  # magnitude pruning asked for each weight's sparsity reached
        overlap, count = magnitude_overlap(start[0], start[1], masks, weight_starts(config, masks) if per else sparsity,
                                           "layerwise" if per else config.method_impl.fixed_mode or config.mode,
                                           config.min_density)
        if config.method_impl.curvature != "none":
            warn_if_degenerate(overlap, count, config, stacklevel)
    if config.keep_masks:  # last: a failure here is undone by hold_target_masks, then by the snapshot
        hold_target_masks(targets, masks, model)
    per = is_per_weight(config.sparsity)  # each weight ranked on its own, whatever config.mode says
    empty = collapsed(masks)
    if empty:
        mode = "layerwise" if per else config.method_impl.fixed_mode or config.mode  # the mode the method ranked by
        warnings.warn(f"layer collapse: {empty} keep less than {COLLAPSE_DENSITY:g} of their entries at "
                      f"sparsity={config.sparsity!r} (mode={mode!r}); {_collapse_advice(empty, start[1])}",
                      stacklevel=stacklevel)
    return PruneResult(masks=masks, layers=layer_rows(masks, forms, config.sparsity),
                       sparsity=sparsity, damp=damp,
                       config={**config.as_dict(), "modules": [target.name for target in targets],
                               **({"mode": "layerwise"} if per else {}), **(extra or {})},
                       timings=timings, collapsed=empty, magnitude_overlap=overlap)


def _collapse_advice(empty: List[str], keep_before: Dict[str, torch.Tensor]) -> str:
    """What to do about the collapsed weights ``empty``: a floor for those this call emptied; those already empty
    before it stay so (no floor refills them: zeros are never revived)."""
    before = set(collapsed({name: keep_before[name] for name in empty}))
    new, old = [n for n in empty if n not in before], [n for n in empty if n in before]
    advice = [f"pass min_density > 0 to keep a floor in every layer{f' (for {new})' if old else ''}"] if new else []
    return "; ".join(advice + ([f"{old} were so before this call (zeros are never revived)"] if old else []))


def _timings() -> Dict[str, float]:
    return {"gradients": 0.0, "inverse": 0.0, "select": 0.0, "update": 0.0}


def prune_with(model: nn.Module, curvature: Curvature, sparsity: Optional[float] = None, **options) -> PruneResult:
    """Prune ``model`` in place to ``sparsity`` with a curvature estimated before (phase two).

    ``model`` must hold the weights the curvature was estimated on (the same model, or a
    copy of it made before pruning: a sweep prunes copies with one curvature); that is checked.
    ``options`` override selection options of the curvature's config (mode, min_density, obs_update,
    beta, pattern, ...);
    the options the curvature fixed (:data:`FIXED_BY_CURVATURE`: method, block_size,
    num_grads, damp, woodtaylor, modules, ...) can only be passed with the curvature's values, except ``method``,
    which may name another method of the same curvature kind and block size (your own next to "woodfisher", on
    the same inverses; not on a curvature sharded across ranks).
    The statistic and OBS update are those of :func:`woodfisher_kernels.obs_saliency` /
    :func:`woodfisher_kernels.obs_update` (WoodFisher paper, Eqs. 10-11; Eqs. 21, 23 with WoodTaylor).

    Args:
        model: the network the curvature was estimated on (or a copy); pruned in place.
        curvature: a :class:`Curvature` from :func:`estimate_curvature`.
        sparsity: target fraction of pruned weights in [0, 1); with an N:M ``pattern`` (this call's, else the
            curvature's) it may be omitted and is then 1 - N/M; another value is a ValueError naming ``sparsity``.
        **options: selection fields of :class:`PruneConfig` (mode, min_density, obs_update, beta,
            pattern, keep_masks, ...). ``pattern`` defaults to the curvature's: a curvature estimated with
            ``pattern="2:4"`` prunes 2:4 unless ``pattern=None`` is passed (unstructured masks from the same blocks).
    Returns:
        :class:`PruneResult`.
    Raises:
        ValueError: bad options (``sparsity`` omitted without an N:M pattern), an option the curvature fixed
            with another value (naming it; ``Curvature.with_damp`` changes the damp), a model missing a weight of
            the curvature or holding it with another shape, or weights that cannot be pruned
            (:func:`woodfisher.checks.check_prunable`); the model is unchanged. ``curvature`` holding other weights
            than the model's (another instance of the architecture, other weights loaded or the model pruned or
            trained since estimating; compared by :func:`woodfisher.state.fingerprint`, so copies pass): a
            ValueError naming ``curvature``. A :class:`woodfisher.FisherHook` curvature is not compared (its window
            spans training steps).
    """
    if not isinstance(curvature, Curvature):
        raise ValueError(f"curvature must be a woodfisher.Curvature (from estimate_curvature), got "
                         f"{type(curvature).__name__}")
    shard = curvature.shard  # sharded (woodfisher.distributed): collective; a check failing on one rank stops all
    # FSDP: the full weights, re-sharded after; a refused call prints no notice
    with collective_entry(None if shard is None else shard.group), full_parameters(model), caller_modes_off(), \
            warnings_held():
        return _prune_with(model, curvature, sparsity, options)


#: Options a curvature was estimated with: :func:`prune_with` cannot change them (it would ignore them).
FIXED_BY_CURVATURE = ("method", "block_size", "num_grads", "fisher_batch_size", "damp", "num_steps", "step_schedule",
                      "woodtaylor", "modules", "exclude", "sampled_fisher", "seed", "loss_fn", "batch_adapter",
                      "inverse_form", "memory_budget", "group")


def _check_fixed(curvature: Curvature, config: PruneConfig) -> None:
    """ValueError naming an option of ``config`` that differs from one the curvature fixed."""
    for name in FIXED_BY_CURVATURE:
        value, fixed = getattr(config, name), getattr(curvature.config, name)
        if value == fixed or (name == "damp" and value == curvature.damp) or (name == "num_steps" and value == 1):
            continue
        if name == "method" and _same_curvature(curvature, config):
            continue
        if name == "method":
            how = (f"it may only become another method of the same curvature kind ({curvature.kind!r}) and block "
                   f"size, unsharded; estimate a new curvature with estimate_curvature(model, loader, method=...)")
        elif name == "damp":
            how = "curvature.with_damp(d) re-inverts it for another damp without new gradients"
        elif name in ("num_steps", "step_schedule"):
            how = ("prune_with is one step with the curvature it is given; prune_one_shot(model, loader, "
                   f"{name}=...) recomputes the Fisher on the way")
        else:
            how = f"estimate a new curvature with estimate_curvature(model, loader, {name}=...)"
        raise ValueError(f"{name}={value!r} cannot be changed by prune_with: the curvature was estimated with "
                         f"{name}={fixed!r}; {how}")


def _same_curvature(curvature: Curvature, config: PruneConfig) -> bool:
    """Whether ``config.method`` reads ``curvature`` as it is: the same kind of curvature and block size (e.g. a
    method of one's own next to "woodfisher" on one set of inverses), not sharded across ranks."""
    new, old = config.method_impl, curvature.config.method_impl
    return (curvature.shard is None and new.curvature == curvature.kind
            and new.block_size(config) == old.block_size(curvature.config))


def _check_same_weights(curvature: Curvature, targets: List[PruneTarget]) -> None:
    """ValueError naming ``curvature`` when ``targets`` do not hold the weights it was estimated on."""
    saved = getattr(curvature, "fingerprint", None)  # None: a curvature pickled before it was recorded
    if not saved:
        return
    names = dict(zip(curvature.layouts, targets))  # the curvature's names (a wrapped copy adds its prefix)
    now = fingerprint(targets)
    changed = changed_weights(saved, {n: now[t.name] for n, t in names.items()}, {n: t.numel for n, t in names.items()})
    if changed:
        raise ValueError(f"curvature was estimated on other weights than the model holds now ({changed[:3]}"
                         f"{' and more' if len(changed) > 3 else ''} differ): another instance, other weights "
                         "loaded, or weights pruned or trained since. Its scores and OBS update are only right for "
                         "the weights it was estimated on: pass the model it was estimated on, or a copy of it "
                         "(copy.deepcopy or wf.clone_model, before pruning), or estimate_curvature(model, loader) "
                         "again")


def _check_inherited_pattern(curvature: Curvature, sparsity, options: dict) -> None:
    """A sparsity other than the one the curvature's N:M pattern fixes, with no ``pattern`` passed: a ValueError
    that says the pattern came from the curvature and how to leave it (the config's own message names neither)."""
    pattern = curvature.config.pattern
    fixed = pattern_sparsity(parse_pattern(pattern)) if pattern is not None and "pattern" not in options else None
    if fixed is None or not isinstance(sparsity, numbers.Real) or math.isclose(sparsity, fixed, abs_tol=1e-6):
        return
    raise ValueError(f"sparsity={sparsity:g}: the curvature was estimated with pattern={pattern!r}, which prune_with "
                     f"keeps unless told otherwise and which fixes the sparsity at {fixed:g}; pass pattern=None for "
                     f"unstructured masks at sparsity={sparsity:g} (the same Fisher blocks serve both), or omit "
                     f"sparsity (it is then {fixed:g})")


def _prunes_nothing(config: PruneConfig) -> bool:
    """Whether a call with ``config`` leaves every weight as it is, so that it needs no gradients: sparsity 0 (no
    N:M pattern fixing another), except WoodTaylor with the OBS update, whose update also takes the Newton step
    ``-F^-1 g`` (WoodFisher paper, Eqs. 21-23) and so moves the weights even when nothing is pruned."""
    final = config.final_sparsity
    nothing = not any(final.values()) if is_per_weight(final) else final == 0
    return nothing and not (config.woodtaylor and config.obs_update)


def _prune_with(model, curvature: Curvature, sparsity: float, options: dict) -> PruneResult:
    _check_inherited_pattern(curvature, sparsity, options)
    if sparsity is None:  # the one an N:M pattern fixes (this call's, else the curvature's), else required
        sparsity = pattern_fixed_sparsity(options.get("pattern", curvature.config.pattern))
    config = curvature.config.replace(sparsity=sparsity, **options)
    _check_fixed(curvature, config)
    targets = curvature.targets(model)
    if curvature.kind == "none":  # no Fisher blocks were built: the blocks' order follows this call's pattern
        for target in targets:
            target.channels_last = config.channels_last and target.kind == "conv"
    _check_same_weights(curvature, targets)
    if is_per_weight(config.sparsity):  # the curvature's weights its keys select, each to its own fraction
        if curvature.shard is not None:
            raise ValueError("sparsity: per-weight fractions (a dict) are not supported on a curvature sharded over a "
                             "process group; pass one number")
        names = [t.name for t in targets]
        pool = (f"the curvature was estimated on ({', '.join(names[:6])}{' ...' if len(names) > 6 else ''}); "
                "estimate one on the weights to prune: estimate_curvature(model, loader, modules=[...])")
        config = config.replace(sparsity=resolve_sparsities(model, config.sparsity, names, pool=pool))
        targets = [t for t in targets if t.name in config.sparsity]
    config.method_impl.check_targets(targets, config)
    check_prunable(targets, config)
    if config.beta > 0 and not curvature.flops:
        raise ValueError("beta > 0 needs a curvature estimated with beta > 0 (it measures FLOPs per parameter)")
    timings = dict(curvature.timings, select=0.0, update=0.0)
    start = time.perf_counter()
    before = _start(targets)
    warn_below(config, before[1])
    warn_floor(config, before[1])
    snapshot = Snapshot(targets, model)
    try:
        with display(config.progress and shows_progress(config.group)):
            _apply(targets, curvature, config, config.final_sparsity, timings)
        # the curvature's gradients and inverses are part of what this result cost: total covers them too
        timings["total"] = time.perf_counter() - start + timings.get("gradients", 0.0) + timings.get("inverse", 0.0)
        return _result(model, targets, config, curvature.damp, curvature.forms, timings, before, stacklevel=4)
    except BaseException as err:
        snapshot.restore()
        note_out_of_memory(err, "prune_with (selection and OBS update)")
        raise


def _estimate_step(model, loader, targets, step_config: PruneConfig, config: PruneConfig, num_steps: int):
    """:func:`_estimate` of one step; a loader that runs out is reported against the call's num_grads."""
    try:
        return _estimate(model, loader, targets, step_config)
    except LoaderExhausted as exc:
        if num_steps == 1:
            raise
        ranks = f" (over the ranks of the process group: {exc.detail})" if getattr(exc, "detail", None) else ""
        raise ValueError(f"num_grads={config.num_grads} is the total over the call: {num_steps} steps of about "
                         f"{exc.needed} gradients, each read from the start of the loader, which ran out after "
                         f"{exc.got}{ranks}; pass num_grads <= {exc.got * num_steps} ({exc.got} per step), fewer "
                         "num_steps, or more data") from exc


#: How a difference in the planned steps between ranks is named (num_steps="auto" plans one step for a single-pass
#: loader, several for a list or a DataLoader).
STEPS_PLANNED = "the steps planned ([sparsity, gradients] each; num_steps='auto' plans one for a single-pass loader)"


def _plan(model: nn.Module, loader: Optional[Iterable], config: PruneConfig):
    """Every check of :func:`run` and its plan: (config fitted to the pattern, targets, keep-masks and weights
    before, starting sparsity, steps, the steps' configs, block size). Its notices are issued by the caller once
    every check has passed (:func:`woodfisher.diagnostics.warnings_held`)."""
    config = fit_pattern(model, config)  # N:M on the default targets: the weights it fits
    config = fit_sparsities(model, config)  # a per-weight dict: keyed by the targets it selects
    if is_per_weight(config.sparsity) and active_group(config.group) is not None:
        raise ValueError("sparsity: per-weight fractions (a dict) are not supported over a process group; pass one "
                         "number, or group=None to prune on each process by itself")
    if config.keep_masks:
        refuse_held_masks(model, "keep_masks=True")
    method = config.method_impl
    targets = resolve_targets(model, config.modules, None, exclude=config.exclude)
    before = _start(targets)
    start_sparsity = sparsity_of(before[1])
    steps = config.steps(weight_starts(config, before[1]))
    if len(steps) > 1 and config.num_steps == "auto" and is_single_pass(loader):
        warn_at_caller(f"num_steps='auto' would recompute the Fisher in {len(steps)} steps, but the loader can be "
                       "read only once (a generator?): pruning in one step; pass a list or a DataLoader to get "
                       "the recomputation")
        steps = config.replace(num_steps=1).steps(weight_starts(config, before[1]))
    if config.num_steps == "auto" and len(steps) > AUTO_MANY_STEPS:
        final = config.final_sparsity
        final = max(final.values()) if is_per_weight(final) else final
        warn_at_caller(f"num_steps='auto' plans {len(steps)} Fisher recomputations to reach sparsity "
                       f"{final:g} (each step keeps >= {AUTO_STEP_KEEP:.0%} of the weights still "
                       f"unpruned; each is a full gradient collection and inversion); pass num_steps=<fewer> for "
                       "fewer, larger steps")
    configs = [config.replace(num_grads=m, num_steps=1) for _, m in steps]
    block_size = method.block_size(configs[0])
    targets = resolve_targets(model, config.modules, block_size, channels_last=config.channels_last,
                              exclude=config.exclude)
    method.check_targets(targets, config)
    check_prunable(targets, config)
    require_loader(config, loader)
    if len(steps) > 1 and config.needs_data and is_single_pass(loader):
        raise ValueError(f"num_steps={config.num_steps} needs a loader that can be iterated once per step; got a "
                         "single-pass iterator (a generator?): pass a list or a DataLoader, or num_steps=1")
    if _prunes_nothing(config):
        every = " (every fraction of the sparsity dict is 0)" if is_per_weight(config.sparsity) else ""
        warn_at_caller(f"sparsity=0 prunes nothing{every}: no gradients were computed and the weights are unchanged "
                       "(the result holds the current keep-masks); pass sparsity > 0 to prune")
        steps, configs = [], []
    if steps:
        check_memory_plan(targets, config, configs[0].num_grads)
    if steps:  # else the note above says it all
        warn_below(config, before[1])
        warn_floor(config, before[1])
    warn_left_out(model, config.modules)
    return config, targets, before, start_sparsity, steps, configs, block_size


def run(model: nn.Module, loader: Optional[Iterable], config: PruneConfig) -> PruneResult:
    """Every step of :func:`woodfisher.prune_one_shot` (see there); transactional."""
    start = time.perf_counter()
    if loader is not None:  # refused before any notice (fit_pattern's) is printed
        check_loader(loader)
    # a call refused by its checks, or by its loader and model on the first step's data, prints no notice
    with warnings_held():
        config, targets, before, start_sparsity, steps, configs, block_size = _plan(model, loader, config)
        group = active_group(config.group)
        if group is not None:  # the same call on every rank, the same steps planned (ValueError on every rank)
            check_same_call(group, config, targets, **{STEPS_PLANNED: [list(s) for s in steps]})
        method = config.method_impl
        timings = _timings()
        snapshot = Snapshot(targets, model)
        damp, forms, kappa, stats = None, {}, {}, []
        i = 0
        try:
            # a chunk size lowered by running out of memory: kept; one display under torchrun (rank 0's)
            with display(config.progress and shows_progress(config.group)), fitted_chunks():
                for i, ((target, _), step_config) in enumerate(zip(steps, configs)):
                    with step_label(f"step {i + 1}/{len(steps)}" if len(steps) > 1 else None):
                        targets = resolve_targets(model, config.modules, method.block_size(step_config),
                                                  channels_last=config.channels_last, exclude=config.exclude)
                        curvature = _estimate_step(model, loader, targets, step_config, config, len(steps))
                        release_notices()  # the loader and the model took the data: the call goes ahead
                        for phase in ("gradients", "inverse"):
                            timings[phase] += curvature.timings[phase]
                        _apply(targets, curvature, step_config, target, timings)
                    damp, forms = curvature.damp, curvature.forms
                    kappa.update({n: max(k, kappa.get(n, 0.0)) for n, k in curvature.kappa.items()})
                    stats.append(curvature.stats)
                    curvature = None  # this step's gradients and inverses are freed before the next step's are built
            # once per call, with the worst step of each layer
            warn_ill_conditioned(kappa, forms, damp, config.damp == "auto", stacklevel=3)
            warn_zero_gradients(stats)
            timings["total"] = time.perf_counter() - start
            extra = {"steps": [[s, m] for s, m in steps], "fisher_block_size": block_size}
            return _result(model, targets, config, damp, forms, timings, before, extra, stacklevel=4)
        except BaseException as err:
            snapshot.restore()
            note_out_of_memory(err, f"step {i + 1}/{len(steps)}")
            raise
