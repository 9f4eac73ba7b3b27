"""What every export format shares: a private copy of the model with the masks folded in,
and the choice of the layers that a format converts.

Masks are ``{"<module>.weight": bool keep-mask}`` (the ``PruneResult.masks`` convention);
a module held by ``torch.nn.utils.prune`` (``weight_orig`` * ``weight_mask``) or by a
``torch.ao.pruning`` mask parametrization is folded too. The caller's model is never modified:
everything happens on ``copy.deepcopy``.
"""
from __future__ import annotations

import copy
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple, Type

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..diagnostics import warn_at_caller
from ..gradual import make_permanent
from ..state import detached_memo
from ..targets import is_hf_conv1d, unwrap_model

Masks = Optional[Dict[str, torch.Tensor]]


def _no_fused_fast_path(module: nn.Module, args):
    """No-op forward pre-hook: its presence turns off the fused fast path of
    ``nn.TransformerEncoderLayer`` (``torch._transformer_encoder_layer_fwd``), which reads
    ``linear1.weight`` / ``linear2.weight`` directly and cannot take a sparse weight."""
    return None


def _module_of(model: nn.Module, pname: str, arg: str) -> nn.Module:
    mname = pname[: -len(".weight")] if pname.endswith(".weight") else None
    modules = dict(model.named_modules())
    if mname is None or mname not in modules or not isinstance(getattr(modules[mname], "weight", None),
                                                               torch.Tensor):
        raise ValueError(f"{arg}: {pname!r} is not the weight of a module of {type(model).__name__} "
                         f"(expected '<module>.weight')")
    return modules[mname]


def to_dense(model: nn.Module, masks: Masks = None) -> nn.Module:
    """The dense export (today's ``pruned.pt`` format): a copy with exact zeros and no masks left.

    Args:
        model: the pruned model (plain weights with zeros, or held by ``torch.nn.utils.prune`` or a
            ``torch.ao.pruning`` mask parametrization).
        masks: optional ``{"<module>.weight": bool keep-mask of the weight's shape}``; the copy's
            weights are multiplied by them (entries outside a mask become exact zeros). Masks only
            zero entries: WoodFisher's OBS update also changed the kept weights, so export the
            pruned model itself (or its ``pruned.pt``), not the dense weights plus its masks.
    Returns:
        a new model (``copy.deepcopy``), every ``weight_orig``/``weight_mask`` pair and mask
        parametrization folded into a plain ``weight`` (:func:`woodfisher.make_permanent`); same
        dtype, device and training mode as ``model``. A ``torch.compile`` / ``nn.DataParallel`` /
        ``DistributedDataParallel`` wrapper is left out (the copy is the model it wraps; mask names
        may keep the wrapper's prefix, ``"module.fc1.weight"``). Its ``state_dict()`` has the keys
        of the unpruned, unwrapped architecture.
    Raises:
        ValueError naming ``masks`` for a value that is not a dict, a key that is no module weight,
        a non-bool mask or a shape mismatch (checked before anything is copied).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if masks is not None and not isinstance(masks, dict):
        raise ValueError(f"masks must be a dict {{'<module>.weight': bool keep-mask}} or None, "
                         f"got {type(masks).__name__}")
    model, masks = _unwrapped(model, masks)
    for pname, keep in (masks or {}).items():
        module = _module_of(model, pname, "masks")
        weight = getattr(module, "weight_orig", module.weight)
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != weight.shape:
            got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
            raise ValueError(f"masks[{pname!r}] must be a bool tensor of shape {tuple(weight.shape)}, got {got}")
    out = make_permanent(_copy(model))
    with torch.no_grad():
        for pname, keep in (masks or {}).items():
            weight = _module_of(out, pname, "masks").weight
            weight.mul_(keep.to(device=weight.device, dtype=weight.dtype))
    return out


def _unwrapped(model: nn.Module, masks: Masks) -> Tuple[nn.Module, Masks]:
    """The model a compile / DataParallel / DDP wrapper holds, and the masks renamed to its names (an export is
    for deployment: the wrapper is a training-time runtime that torch.export / ONNX cannot take)."""
    inner, prefix = _wrapper(model)
    if not prefix:
        return model, masks
    return inner, None if masks is None else dict(zip(unwrapped_names(model, list(masks)), masks.values()))


def _wrapper(model: nn.Module) -> Tuple[nn.Module, str]:
    inner, prefix = unwrap_model(model)
    if "_fsdp_wrapped_module." in prefix:  # FSDP weights are sharded: not unwrapped here
        return model, ""
    return inner, prefix


def unwrapped_names(model: nn.Module, names):
    """``names`` of ``model``'s modules / weights as the exported (unwrapped) copy names them: a
    ``torch.compile`` / DataParallel / DDP prefix (``"module."``) dropped; other values as they are."""
    prefix = _wrapper(model)[1]
    if not prefix or names is None or isinstance(names, str):
        return names
    return [name[len(prefix):] if isinstance(name, str) and name.startswith(prefix) else name for name in names]


def _copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also copies modules held by ``torch.nn.utils.prune``: their ``weight``
    attribute (``weight_orig * weight_mask``, a non-leaf tensor that deepcopy refuses) is copied detached."""
    return copy.deepcopy(model, detached_memo(model))


def sparsity(weight: torch.Tensor) -> float:
    """Fraction of exact zeros of a dense tensor."""
    return 1.0 - int(torch.count_nonzero(weight)) / max(weight.numel(), 1)


def attention_children(model: nn.Module) -> Set[str]:
    """Names of the submodules of every ``nn.MultiheadAttention`` of ``model`` (``attn.out_proj``): attention reads
    their weights directly, so no export swaps them."""
    return {f"{parent}.{child}" if parent else child
            for parent, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)
            for child, _ in module.named_children()}


def select_layers(model: nn.Module, names: Optional[Sequence[str]], types: Tuple[Type[nn.Module], ...],
                  min_sparsity: float, conv1d: bool = False) -> List[Tuple[str, nn.Module]]:
    """``[(module name, module)]`` to convert.

    ``names`` (module or ``"<module>.weight"`` names) must each be a module of ``types`` that is
    called through its own ``forward``; ``None`` picks every such module whose weight has at
    least ``min_sparsity`` exact zeros. HuggingFace's ``Conv1D`` (GPT-2) counts as an
    ``nn.Linear`` when ``types`` holds ``nn.Linear`` and ``conv1d`` is True. Linear layers inside
    ``nn.MultiheadAttention`` are never picked: attention reads their weights directly, never calling them.
    """
    if not 0.0 <= float(min_sparsity) <= 1.0:
        raise ValueError(f"min_sparsity must lie in [0, 1], got {min_sparsity!r}")
    inside_attention = attention_children(model)
    modules = dict(model.named_modules())

    def attention_of(name: str) -> Optional[str]:
        """The nn.MultiheadAttention that ``name`` is, or whose parameter it is (``attn.in_proj_weight``)."""
        owner = name if name in modules else name.rpartition(".")[0]
        return owner if isinstance(modules.get(owner), nn.MultiheadAttention) else None

    def fits(module: nn.Module) -> bool:
        return type(module) in types or (conv1d and nn.Linear in types and is_hf_conv1d(module))

    if names is None:
        return [(name, module) for name, module in modules.items() if fits(module)
                and name not in inside_attention and sparsity(module.weight) >= min_sparsity]
    if isinstance(names, str):
        raise ValueError(f"names must be a list of module names, got the string {names!r}")
    chosen = []
    kinds = " or ".join(kind.__name__ for kind in types)
    for name in _unique(entry[: -len(".weight")] if entry.endswith(".weight") else entry for entry in names):
        if name in inside_attention or attention_of(name) is not None:  # its projections, or the attention itself
            raise ValueError(f"names: {name!r} belongs to an nn.MultiheadAttention, which reads its weight "
                             f"directly; it cannot be swapped")
        if name in modules and parametrize.type_before_parametrizations(modules[name]) in types \
                and not fits(modules[name]):
            raise ValueError(f"names: {name!r} is a {kinds} whose weight is recomputed by a torch.nn.utils.parametrize "
                             f"parametrization that is not a mask (e.g. weight_norm); remove it first: "
                             f"torch.nn.utils.parametrize.remove_parametrizations(module, 'weight')")
        if name not in modules or not fits(modules[name]):
            raise ValueError(f"names: {name!r} is not a {kinds} module of {type(model).__name__}")
        chosen.append((name, modules[name]))
    return chosen


def dense_attention(model: nn.Module, min_sparsity: float) -> List[str]:
    """``["attn (in_proj_weight 80.0% zeros, out_proj.weight 93.8% zeros)", ...]``: the ``nn.MultiheadAttention``
    modules of ``model`` with a projection weight holding at least ``min_sparsity`` exact zeros (> 0 when
    ``min_sparsity`` is 0), which no export swaps (attention reads those weights directly)."""
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.MultiheadAttention):
            continue
        weights = {key: sparsity(p) for key, p in module.named_parameters() if p.dim() >= 2}
        if any(value >= min_sparsity and value > 0 for value in weights.values()):
            out.append(f"{name} (" + ", ".join(f"{key} {100 * value:.1f}% zeros" for key, value in weights.items())
                       + ")")
    return out


def warn_dense_attention(model: nn.Module, min_sparsity: float, export: str) -> None:
    """One warning at the caller's line naming the sparse ``nn.MultiheadAttention`` modules that ``export``
    leaves dense (:func:`dense_attention`)."""
    left = dense_attention(model, min_sparsity)
    if left:
        warn_at_caller(f"{export}: the nn.MultiheadAttention modules {left[:4]}{' and more' if len(left) > 4 else ''} "
                       "stay dense: attention reads its projection weights directly (F.multi_head_attention_forward), "
                       "not through a swappable layer, so their zeros are exact but computed densely; an attention "
                       "built from nn.Linear layers (q/k/v/out projections called as modules) is converted")


def _unique(items: Iterable[str]) -> List[str]:
    return list(dict.fromkeys(items))


def swap(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule ``name`` (with the fast-path guard hook)."""
    new.register_forward_pre_hook(_no_fused_fast_path)
    model.set_submodule(name, new)
