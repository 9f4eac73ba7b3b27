"""After one-shot pruning: keep the masks while fine-tuning, recalibrate BatchNorm statistics.

- :func:`attach_masks` holds keep-masks in the ``torch.nn.utils.prune`` convention: the
  Parameter becomes ``<attr>_orig`` (the same object, at the same place in
  ``named_parameters()``, so an optimizer built before keeps working), a buffer
  ``<attr>_mask`` is added, and a forward pre-hook computes ``<attr> = <attr>_orig *
  <attr>_mask``: the pruned entries stay exactly 0 whatever the optimizer does.
  ``prune_one_shot(..., keep_masks=True)`` calls it on the pruned weights. Any parameter
  can hold a mask (``attn.in_proj_weight`` too; ``attn.out_proj.weight``, which the attention
  reads without calling ``out_proj``, is recomputed by a pre-hook of the attention module);
  a tied Parameter gets the mask on every module that holds it; weights already under a mask (torch.nn.utils.prune, or a
  ``torch.ao.pruning`` parametrization) have that mask updated instead.
- :func:`make_permanent` removes every such reparametrisation, ``torch.ao.pruning`` mask
  parametrizations included (the zeros stay, the Parameter gets its name and place back): call it before
  ``save_pretrained`` / ``state_dict`` for a file a model without masks can load, after the last training step
  (training after it revives the pruned weights: gradients and momentum reach them again).
- A module holding a mask gets an instance ``__deepcopy__`` (:class:`woodfisher.state.DeepcopyDetached`),
  so ``copy.deepcopy`` and ``AveragedModel`` work after a forward pass too.
- :func:`recalibrate_bn`: after pruning, the BatchNorm running statistics no longer match
  the activations; this re-estimates them with ``num_batches`` forward passes (no
  gradients, BatchNorm layers in train mode with a cumulative average, every other module
  in eval mode so dropout is off), then restores every module's own train/eval flag.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from .batches import check_loader, loader_errors, to_batch
from .buffers import buffers_kept
from .distributed.fsdp import refuse_held_masks
from .masks import is_int
from .precision import prepare_batch
from .progress import phase
from .state import Snapshot, caller_modes_off, eval_mode, install_deepcopy, remove_deepcopy
from .targets import PruneTarget, check_module, resolve_targets, unwrap_model

__all__ = ["attach_masks", "make_permanent", "recalibrate_bn"]

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _move(module: nn.Module, key: str, index: int) -> None:
    """Put ``module._parameters[key]`` at position ``index`` (registration order = named_parameters order)."""
    items = list(module._parameters.items())
    pos = [k for k, _ in items].index(key)
    items.insert(index, items.pop(pos))
    module._parameters.clear()
    module._parameters.update(items)


def _hold(module: nn.Module, attr: str, keep: torch.Tensor) -> None:
    """custom_from_mask on ``module.attr``, the Parameter left at its place as ``attr_orig``."""
    index = list(module._parameters).index(attr)
    torch_prune.custom_from_mask(module, attr, keep)
    _move(module, attr + "_orig", index)
    install_deepcopy(module)  # copy.deepcopy / AveragedModel work after a forward pass too


def _release(module: nn.Module, attr: str) -> None:
    """torch.nn.utils.prune.remove, the Parameter put back at the place of ``attr_orig``."""
    index = list(module._parameters).index(attr + "_orig")
    torch_prune.remove(module, attr)
    _move(module, attr, index)
    remove_deepcopy(module)


class _RefreshFrom:
    """Forward pre-hook of a module that reads ``child.<attr>`` without calling ``child`` (an
    ``nn.MultiheadAttention`` reads ``out_proj.weight``): recomputes ``<attr> = <attr>_orig * <attr>_mask``
    before each of its forwards, as ``child``'s own pre-hook would. An object (not a closure), so
    ``copy.deepcopy`` of the model points the copy's hook at the copy's ``child``."""

    def __init__(self, child: nn.Module, attr: str):
        self.child, self.attr = child, attr

    def __call__(self, module, args):
        child, attr = self.child, self.attr
        if hasattr(child, attr + "_mask"):
            setattr(child, attr, getattr(child, attr + "_orig") * getattr(child, attr + "_mask"))


def _readers(model: Optional[nn.Module]) -> Dict[int, nn.Module]:
    """{id(child): module that reads the child's weight without calling it} (MHA out_proj)."""
    if model is None:
        return {}
    return {id(m.out_proj): m for m in unwrap_model(model)[0].modules() if isinstance(m, nn.MultiheadAttention)}


def _checked(targets: List[PruneTarget], masks: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Every mask checked (a tensor of the weight's shape holding only 0 / 1) before anything is touched."""
    out = {}
    for target in targets:
        keep = masks[target.name]
        if not isinstance(keep, torch.Tensor) or tuple(keep.shape) != tuple(target.shape):
            got = tuple(keep.shape) if isinstance(keep, torch.Tensor) else type(keep).__name__
            raise ValueError(
                f"masks[{target.name!r}] must be a tensor of the weight's shape {tuple(target.shape)}, got {got}"
            )
        if keep.is_meta or (keep.dtype != torch.bool and (keep.is_complex() or not bool(((keep == 0) | (keep == 1))
                                                                                          .all()))):
            raise ValueError(f"masks[{target.name!r}] must be a bool keep-mask (or hold only 0 and 1), got a "
                             f"{'meta' if keep.is_meta else keep.dtype} tensor with other values")
        out[target.name] = keep.to(device=target.param.device, dtype=torch.bool)
    return out


def hold_target_masks(targets: List[PruneTarget], masks: Dict[str, torch.Tensor],
                      model: Optional[nn.Module] = None) -> None:
    """:func:`attach_masks` on resolved targets of ``model``; all or nothing (a failure undoes what was
    attached)."""
    refuse_held_masks(model, "masks")
    with caller_modes_off():  # masks made under inference_mode would break the next training step
        _hold_checked(targets, _checked(targets, masks), model)


def _hold_checked(targets: List[PruneTarget], masks: Dict[str, torch.Tensor], model: Optional[nn.Module]) -> None:
    readers = _readers(model)
    snapshot = Snapshot(targets)
    attached: List[Tuple[nn.Module, str]] = []
    hooks = []
    try:
        for target in targets:
            keep = masks[target.name]
            if target.reparam is None:
                with torch.no_grad():
                    target.param.mul_(keep)
                for module, attr in target._holders():
                    _hold(module, attr, keep)
                    attached.append((module, attr))
                    if id(module) in readers:
                        hooks.append(readers[id(module)].register_forward_pre_hook(_RefreshFrom(module, attr)))
            else:  # already under a mask: update it
                target.write(target.effective_weight() * keep, keep)
    except BaseException:
        for handle in hooks:
            handle.remove()
        for module, attr in reversed(attached):
            _release(module, attr)
        snapshot.restore()
        raise


def attach_masks(model: nn.Module, masks: Dict[str, torch.Tensor]) -> nn.Module:
    """Hold ``masks`` on ``model`` with torch.nn.utils.prune so fine-tuning cannot revive pruned weights.

    Args:
        model: the network (wrappers seen through).
        masks: {weight name as :func:`woodfisher.prune_one_shot` reports it (e.g. ``"fc1.weight"``,
            ``"module.fc1.weight"``, ``"attn.in_proj_weight"``; the wrapper's prefix may be left out):
            bool keep-mask of the weight's shape} (``PruneResult.masks``).
    Returns:
        ``model``; weights are zeroed where the mask is False.
    Raises:
        ValueError: an unknown name, two names of one weight, a mask of the wrong shape or with
            values other than 0 / 1 (all checked first: nothing is changed).
    """
    if not isinstance(masks, dict) or not masks:
        raise ValueError("masks must be a non-empty dict {weight name: bool keep-mask}")
    targets, given = [], {}  # given: target name -> the caller's key (with or without the wrapper's prefix)
    for raw in masks:
        found = resolve_targets(model, [raw], arg="masks")
        if len(found) != 1 or found[0].name in given:
            named = [raw] if len(found) != 1 else [given[found[0].name], raw]
            raise ValueError(f"masks: {named} name the same weight as another entry (or a module holding "
                             f"several weights); give one entry per weight, as PruneResult.masks does")
        given[found[0].name] = raw
        targets.append(found[0])
    hold_target_masks(targets, {name: masks[raw] for name, raw in given.items()}, model)
    return model


def make_permanent(model: nn.Module) -> nn.Module:
    """Remove every mask reparametrisation of ``model`` (pruned entries stay 0).

    Each ``torch.nn.utils.prune`` ``<attr>_orig`` Parameter becomes ``<attr>`` again, at its place in
    ``named_parameters()``; any parameter name (``in_proj_weight`` too) and tied weights are handled.
    A ``torch.nn.utils.parametrize`` chain made only of masks (``torch.ao.pruning``'s ``FakeSparsity``:
    every parametrization has a ``mask``) is folded too: ``<attr>.parametrizations.<attr>.original``
    becomes ``<attr>`` holding the masked values (the same Parameter object, registered last among the
    module's parameters). Other parametrizations (``weight_norm``, ``spectral_norm``) are left alone.

    Args:
        model: the network (wrappers seen through); modified in place.
    Returns:
        ``model``.
    Raises:
        ValueError: ``model`` not an ``nn.Module``; an ``<attr>_mask`` whose shape differs from its
            ``<attr>_orig`` (checked for every module first: nothing is changed).
    """
    check_module(model)
    with caller_modes_off():  # under inference_mode the weights would become inference tensors
        _make_permanent(model)
    return model


def _make_permanent(model: nn.Module) -> None:
    modules = list(unwrap_model(model)[0].modules())
    for mname, module in unwrap_model(model)[0].named_modules():
        for key, orig in module._parameters.items():
            mask = module._buffers.get(key[:-5] + "_mask") if key.endswith("_orig") else None
            if mask is not None and mask.shape != orig.shape:
                where = f"{mname}." if mname else ""
                raise ValueError(f"model: {where}{key[:-5]}_mask has shape {tuple(mask.shape)}, "
                                 f"{where}{key} has {tuple(orig.shape)}")
    for module in modules:
        for key in [k for k, h in module._forward_pre_hooks.items() if isinstance(h, _RefreshFrom)]:
            del module._forward_pre_hooks[key]
    for module in modules:
        names = [getattr(h, "_tensor_name", None) for h in list(module._forward_pre_hooks.values())]
        for attr in names:
            if attr is not None and attr + "_orig" in module._parameters:
                _release(module, attr)
    for module in modules:
        attrs = _mask_parametrizations(module)
        if attrs:
            _own_class(module)
        for attr in attrs:
            parametrize.remove_parametrizations(module, attr, leave_parametrized=True)


def _own_class(module: nn.Module) -> None:
    """Give ``module`` a private copy of its ``Parametrized<Cls>`` class: ``copy.deepcopy`` shares that class
    between a module and its copies, and ``remove_parametrizations`` deletes the property from the class,
    which would break every other copy (the caller's model when an export folds a copy)."""
    cls = type(module)
    body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, body)


def _mask_parametrizations(module: nn.Module) -> List[str]:
    """Attributes of ``module`` reparametrised by ``torch.nn.utils.parametrize`` with masks only."""
    if not parametrize.is_parametrized(module):
        return []
    return [attr for attr, chain in module.parametrizations.items() if all(hasattr(f, "mask") for f in chain)]


def _bn_layers(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BN_TYPES) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, num_batches: int = 50, *,
                   batch_adapter: Optional[Callable] = None) -> int:
    """Re-estimate the BatchNorm running statistics of a pruned ``model`` on ``num_batches`` batches.

    The running mean and variance of every BatchNorm layer (``track_running_stats=True``)
    are reset and set to the cumulative average over the batches (``momentum=None``); the
    other modules run in eval mode (no dropout), nothing gets gradients, and every
    module's train/eval flag and each layer's momentum are restored afterwards.

    Args:
        model: the network (wrappers seen through; modified: its BN buffers only).
        loader: batches in any format the batch adapter reads (see :mod:`woodfisher.batches`);
            only the inputs are used.
        num_batches: batches to use (int >= 1); fewer when the loader ends earlier.
        batch_adapter: loader item -> :class:`woodfisher.Batch` (None: the default reading).
    Returns:
        the number of samples seen (0 when the model has no BatchNorm layer: nothing is run).
    Raises:
        ValueError: ``model`` not an ``nn.Module``, ``loader`` not iterable, a bad ``num_batches``, an
            empty loader, or a batch the model fails on (naming the loader and the batch's shapes); the
            statistics are then left as they were, as after any failure.
    """
    check_module(model)
    check_loader(loader)
    if not is_int(num_batches) or num_batches < 1:
        raise ValueError(f"num_batches must be an int >= 1, got {num_batches!r}")
    inner = unwrap_model(model)[0]
    bns = _bn_layers(inner)
    if not bns:
        return 0
    saved = [(m, m.momentum, {k: v.clone() for k, v in m.named_buffers(recurse=False)}) for m in bns]
    # the model's device and dtype (the running statistics' when no parameter is floating: affine=False BN only)
    param = next(t for t in (*inner.parameters(), *inner.buffers()) if t.is_floating_point())
    seen = 0
    try:
        with eval_mode(inner), buffers_kept(inner, exclude=bns), \
                phase("BN recalibration", total=num_batches, unit="batch") as bar:
            for m in bns:
                m.train()
                m.reset_running_stats()
                m.momentum = None
            for i, item in enumerate(loader):
                if i == num_batches:
                    break
                batch = prepare_batch(to_batch(item, batch_adapter), param.device, param.dtype)
                with loader_errors(batch):  # the model's error on the loader's item: a ValueError naming it
                    inner(*batch.args, **batch.kwargs)
                seen += batch.size
                bar.update(1)
        if seen == 0:
            raise ValueError("loader yielded no batch: cannot recalibrate the BatchNorm statistics")
    except BaseException:
        for m, _, buffers in saved:
            for k, v in buffers.items():
                getattr(m, k).copy_(v)
        raise
    finally:
        for m, momentum, _ in saved:
            m.momentum = momentum
    return seen
