"""The ValueError for a model in which no weight can be pruned: which parameters could be named instead, and why the
ones that look prunable are not (QAT fake quantization or weight standardization in the forward, a parametrization
that is not a mask, converted int8 layers)."""
from __future__ import annotations

from typing import Dict

from torch import nn

from .model_entries import mask_reparam_ok, own_forward

__all__ = ["no_targets_error", "refused_when_named"]


def refused_when_named(info: dict) -> bool:
    """Whether a parameter entry (:func:`woodfisher.model_entries.param_entries`) is refused when named: a Linear /
    Conv weight its forward transforms (:func:`~woodfisher.model_entries.own_forward`), or one under a
    parametrization that is not a mask."""
    return (info["attr"] == "weight" and own_forward(info["module"])) or not mask_reparam_ok(info)


def no_targets_error(entries: Dict[str, dict], inner: nn.Module) -> ValueError:
    """The ValueError (naming ``modules``) for a model with no prunable weight.

    Args:
        entries: the model's parameter entries. inner: the unwrapped model.
    Returns:
        the error, listing up to 5 floating parameters of >= 2 dims that can be named, and the ones that cannot.
    """
    floating = [name for name, info in entries.items()
                if info["param"].is_floating_point() and info["param"].dim() >= 2]
    refused = [name for name in floating if refused_when_named(entries[name])]  # naming these would fail too
    candidates = [name for name in floating if name not in refused][:5]
    hint = (f"; its floating parameters of >= 2 dims can be named: modules={candidates}" if candidates else
            "; it has no other floating parameter of >= 2 dims" if refused else
            "; it has no floating parameter of >= 2 dims either")
    if refused:
        hint += (f"; {refused[:4]}{' and more' if len(refused) > 4 else ''} cannot be pruned: a forward that "
                 "transforms the weight (QAT fake quantization, weight standardization) or a parametrization that "
                 "is not a mask; prune the float model before torch.ao.quantization.prepare_qat")
    if any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in inner.modules()):
        hint += ("; its quantized layers (torch.ao.nn.quantized: packed integer weights) cannot be pruned: "
                 "prune the float model before quantizing it")
    return ValueError("modules: the model has no prunable module (Linear / Conv1d/2d/3d or a named weight)" + hint)
