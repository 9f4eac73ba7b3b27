"""Whether a Linear / Conv subclass computes with a transform of its weight.

A subclass with a ``forward`` of its own may compute with something other than ``self.weight``: timm's
``StdConv2d`` / HuggingFace BiT's ``WeightStandardizedConv2d`` standardize every filter, fake-quantized layers round
it. A zero written to such a weight is not a zero of the weight the layer computes with, and the OBS maths on
``weight`` does not hold. Other subclasses override ``forward`` and use the weight as it is (HuggingFace's
``FalconLinear``: ``x @ weight.T + bias``): those are ordinary layers.

:func:`transforms_weight` tells them apart by one probe: the subclass's ``forward`` and the base class's on two
random inputs (a fixed seed), without the module's own hooks and without gradients; the module's buffers (which
a forward may update: QAT observers) are restored after. Outputs that differ (beyond round-off: relative 1e-3),
a non-tensor output, or a forward that fails on the probe count as a transform. A transform ``T`` with
``T(W) x = W x`` on two random inputs ``x`` while ``T(W) != W`` has probability zero. The answer is cached per
module (one probe per module and process).

:func:`refuse_recomputed` is the ValueError for a module named in ``modules=`` whose weight is recomputed from other
parameters on every forward (weight_norm / spectral_norm, as a parametrization or as the older forward pre-hook).
"""
from __future__ import annotations

import weakref
from typing import Optional, Tuple, Type

import torch
from torch import nn
from torch.nn.utils import parametrize

from .buffers import buffers_kept

__all__ = ["transforms_weight", "base_type", "refuse_recomputed"]

_CACHE: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def base_type(module: nn.Module, types: Tuple[Type[nn.Module], ...]) -> Optional[Type[nn.Module]]:
    """The type of ``types`` that ``module``'s class (before parametrizations) derives from, or None."""
    cls = parametrize.type_before_parametrizations(module)
    return next((t for t in types if issubclass(cls, t)), None)


def transforms_weight(module: nn.Module, types: Tuple[Type[nn.Module], ...]) -> bool:
    """Whether ``module``, a strict subclass of one of ``types`` (``nn.Linear`` / ``nn.Conv1d/2d/3d``) with a
    ``forward`` of its own, computes something other than its base class's forward on its current weight
    (the module docstring). False for the base classes themselves and subclasses keeping their forward."""
    cls = parametrize.type_before_parametrizations(module)
    base = base_type(module, types)
    if base is None or cls is base or cls.forward is base.forward:
        return False
    if module not in _CACHE:
        _CACHE[module] = not _same_as_base(module, cls, base)
    return _CACHE[module]


def _same_as_base(module: nn.Module, cls: Type[nn.Module], base: Type[nn.Module]) -> bool:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.is_meta:
        return False
    if base is nn.Linear:
        shape = (2, weight.shape[-1])
    else:  # the smallest input every kernel position fits, plus two
        shape = (2, module.in_channels, *((k - 1) * d + 3 for k, d in zip(module.kernel_size, module.dilation)))
    probe = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    # a forward may update (and resize) buffers, e.g. QAT observers: every one put back as it was after the probe
    try:
        devices = [weight.device] if weight.device.type == "cuda" else []
        with buffers_kept(module), torch.no_grad(), torch.random.fork_rng(devices=devices):  # the caller's RNG kept
            got, want = cls.forward(module, probe), base.forward(module, probe)
    except Exception:  # noqa: BLE001 - a forward that needs more than one input tensor: not a plain layer
        return False
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return False
    got, want = got.double(), want.double()
    return bool(torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()) + 1e-12))


def refuse_recomputed(module: Optional[nn.Module], raw: str, arg: str) -> None:
    """ValueError naming ``arg`` and ``raw`` (the name given) when ``module``'s weight is recomputed from other
    parameters on every forward, so a zero written to it would not last: a ``torch.nn.utils.parametrize`` chain
    that is not made of masks (weight_norm / spectral_norm parametrizations), or the hook-based
    ``torch.nn.utils.weight_norm`` (``weight_g`` / ``weight_v``; a module under ``torch.nn.utils.prune`` or the
    hook-based spectral_norm is resolved to its ``weight_orig`` before this is asked). None: nothing to check."""
    if module is None:
        return
    if parametrize.is_parametrized(module):
        if not all(hasattr(f, "mask") for chain in module.parametrizations.values() for f in chain):
            raise ValueError(f"{arg}: {raw!r} is reparametrised by torch.nn.utils.parametrize without a 'mask' "
                             f"({', '.join(module.parametrizations)} recomputed on every forward, e.g. by "
                             "weight_norm): a pruned zero would not last; remove the parametrization first "
                             "(torch.nn.utils.parametrize.remove_parametrizations(module, 'weight'))")
        return
    if "weight" in module._parameters or "weight" in module._buffers or \
            not isinstance(getattr(module, "weight", None), torch.Tensor):
        return
    own = [name for name in module._parameters if name.startswith("weight")]
    if own:  # else a plain tensor attribute computed from nothing of its own: not this hook
        raise ValueError(f"{arg}: {raw!r}: the weight of this {type(module).__name__} is recomputed from {own} on "
                         "every forward by a forward pre-hook (torch.nn.utils.weight_norm), so a zero written to it "
                         "would not last; remove the hook first: torch.nn.utils.remove_weight_norm(module)")
