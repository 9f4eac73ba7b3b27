"""Keep-masks held on a model with ``torch.nn.utils.prune``, its parameters left in place.

``torch.nn.utils.prune.custom_from_mask(module, "weight", mask)`` keeps the same Parameter
object but re-registers it as ``weight_orig`` at the *end* of the module's parameters, and
``torch.nn.utils.prune.remove`` re-registers it as ``weight`` at the end again. Either one
changes the order of ``model.parameters()``: an optimizer built before attaching the masks
and one built after (for example when resuming from a checkpoint) then list the same
tensors in different orders, and ``optimizer.load_state_dict`` pairs the saved state with
the wrong tensors. Here:

- :func:`apply_masks` attaches the masks with torch's own machinery (forward pre-hook,
  ``weight_orig`` / ``weight_mask``) and puts ``weight_orig`` back where ``weight`` was, so
  ``named_parameters()`` keeps its order and the Parameter objects are the same ones;
  weights already held (by torch.nn.utils.prune or a ``torch.nn.utils.parametrize`` mask) get
  their mask updated in place. A weight shared by several modules (tied) is masked in each.
- :func:`make_permanent` removes every prune reparametrisation, the weights keeping their
  zeros, each Parameter back at its original place (its storage updated in place).

Both validate everything before they touch the model, and :func:`apply_masks` undoes its
partial work if it fails half-way: a refused call changes nothing.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from .state import Snapshot
from .targets import PruneTarget, resolve_targets, unwrap_model

__all__ = ["apply_masks", "make_permanent", "check_masks"]


def _move(table: dict, key: str, index: int) -> None:
    """Put ``table[key]`` at position ``index``, in place (the dict object is kept)."""
    items = [(k, v) for k, v in table.items() if k != key]
    items.insert(index, (key, table[key]))
    table.clear()
    table.update(items)


def _hooks(module: nn.Module, attr: str) -> List[int]:
    """Keys of the torch.nn.utils.prune forward pre-hooks of ``module.<attr>``."""
    return [k for k, h in module._forward_pre_hooks.items()
            if isinstance(h, torch_prune.BasePruningMethod) and h._tensor_name == attr]


def _attach(module: nn.Module, attr: str, keep: torch.Tensor) -> None:
    index = list(module._parameters).index(attr)
    torch_prune.custom_from_mask(module, attr, keep)
    _move(module._parameters, attr + "_orig", index)


def _detach(module: nn.Module, attr: str, fold: bool) -> None:
    """Remove the reparametrisation of ``module.<attr>``; ``fold``: multiply the mask into the storage."""
    orig = module._parameters[attr + "_orig"]
    mask = module._buffers[attr + "_mask"]
    index = list(module._parameters).index(attr + "_orig")
    if fold:
        with torch.no_grad():
            orig.mul_(mask.to(orig.dtype))
    for key in _hooks(module, attr):
        del module._forward_pre_hooks[key]
    module.__dict__.pop(attr, None)  # the derived tensor the pre-hook sets
    del module._parameters[attr + "_orig"]
    del module._buffers[attr + "_mask"]
    module.register_parameter(attr, orig)
    _move(module._parameters, attr, index)


def _holders(model: nn.Module, param: torch.Tensor) -> List[Tuple[nn.Module, str]]:
    """Every (module, attribute) holding ``param`` directly (not yet reparametrised)."""
    out = []
    for module in unwrap_model(model)[0].modules():
        out += [(module, attr) for attr, p in module._parameters.items() if p is param and not attr.endswith("_orig")]
    return out


def _as_keep(name: str, keep, target: PruneTarget) -> torch.Tensor:
    if not isinstance(keep, torch.Tensor):
        raise ValueError(f"masks[{name!r}] must be a tensor, got {type(keep).__name__}")
    if tuple(keep.shape) != tuple(target.shape):
        raise ValueError(f"masks[{name!r}] has shape {tuple(keep.shape)}, the weight {target.name!r} has "
                         f"{tuple(target.shape)}")
    if keep.is_meta:
        raise ValueError(f"masks[{name!r}] is on the meta device (no data)")
    if keep.dtype != torch.bool:
        if keep.is_complex() or not bool(((keep == 0) | (keep == 1)).all()):
            raise ValueError(f"masks[{name!r}] must be a bool keep-mask (or hold only 0 and 1), got dtype "
                             f"{keep.dtype} with other values")
        keep = keep != 0
    return keep.to(target.param.device)


def check_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> List[Tuple[PruneTarget, torch.Tensor]]:
    """[(target, bool keep-mask on the weight's device)] for ``masks``, every entry checked.

    Raises:
        ValueError: ``masks`` not a non-empty dict, an unknown weight name, two names of one
            weight, a mask of the wrong shape or with values other than 0 / 1.
    """
    if not isinstance(masks, Mapping) or not masks:
        raise ValueError(f"masks must be a non-empty dict {{weight name: bool keep-mask}}, got {type(masks).__name__}")
    out, seen = [], {}
    for name, keep in masks.items():
        target = resolve_targets(model, [name])[0]
        if id(target.param) in seen:
            raise ValueError(f"masks: {name!r} and {seen[id(target.param)]!r} name the same weight")
        seen[id(target.param)] = name
        out.append((target, _as_keep(name, keep, target)))
    return out


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Hold ``masks`` ({weight name: bool keep-mask}) on ``model`` with torch.nn.utils.prune.

    Masked-out entries of the weights are set to 0; ``named_parameters()`` keeps its names'
    order (``"<m>.weight"`` becomes ``"<m>.weight_orig"`` in place) and its Parameter objects.

    Raises:
        ValueError: see :func:`check_masks`; nothing is changed then.
    """
    checked = check_masks(model, masks)
    snapshot = Snapshot([t for t, _ in checked])
    attached: List[Tuple[nn.Module, str]] = []
    try:
        for target, keep in checked:
            holders = [] if target.reparam == "parametrize" else _holders(model, target.param)
            for module, attr in holders:
                _attach(module, attr, keep)
                attached.append((module, attr))
        with torch.no_grad():
            for target, keep in checked:
                target.param.mul_(keep.to(target.param.dtype))
                for buf in target._mask_buffers():  # masks held before this call
                    buf.copy_(keep.to(buf.dtype))
                _refresh(model, target.param)
    except BaseException:
        for module, attr in reversed(attached):
            _detach(module, attr, fold=False)
        snapshot.restore()
        raise


def _refresh(model: nn.Module, param: torch.Tensor) -> None:
    """Recompute the derived weight of every prune-reparametrised holder of ``param`` now (the
    pre-hook does it before each forward)."""
    for module in unwrap_model(model)[0].modules():
        for attr, p in module._parameters.items():
            if p is param and attr.endswith("_orig") and attr[:-5] + "_mask" in module._buffers:
                name = attr[:-5]
                setattr(module, name, p * module._buffers[name + "_mask"])


def make_permanent(model: nn.Module) -> nn.Module:
    """Remove every ``torch.nn.utils.prune`` reparametrisation of ``model`` (pruned entries stay 0).

    Each ``<m>.<name>_orig`` Parameter becomes ``<m>.<name>`` again at the same place of
    ``named_parameters()`` (same object, storage multiplied by the mask in place).

    Returns:
        ``model``.
    Raises:
        ValueError: a ``<name>_orig`` / ``<name>_mask`` pair of different shapes; nothing is
            changed then.
    """
    found: Dict[nn.Module, List[str]] = {}
    for mname, module in model.named_modules():
        for key, orig in module._parameters.items():
            name = key[:-5] if key.endswith("_orig") else None
            if name is None or name + "_mask" not in module._buffers:
                continue
            mask = module._buffers[name + "_mask"]
            if mask.shape != orig.shape:
                raise ValueError(f"model: {mname}.{name}_mask has shape {tuple(mask.shape)}, "
                                 f"{mname}.{key} has {tuple(orig.shape)}")
            found.setdefault(module, []).append(name)
    for module, names in found.items():
        for name in names:
            _detach(module, name, fold=True)
    return model
