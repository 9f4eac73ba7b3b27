"""Leaving the caller's objects as they were.

- :class:`eval_mode`: the model in eval mode for a pass, then every submodule's own
  train/eval flag restored (a frozen BatchNorm inside a training model stays frozen; the
  recursive ``model.train(flag)`` would not do that).
- :class:`Snapshot`: the weights and masks of the pruned targets (and the model's buffers),
  restored exactly when a call fails half-way (a refused call changes nothing).
- :func:`clone_model`: ``copy.deepcopy`` that also works on models holding
  ``torch.nn.utils.prune`` masks (their derived ``weight`` attribute is a non-leaf tensor,
  which deepcopy refuses).
- :func:`derived_weights_kept`: those derived weights restored after passes that run the
  model on substituted parameters (gradient collection, K-FAC factors, FLOPs counting).
- :class:`DeepcopyDetached`: the ``__deepcopy__`` of a module holding a mask, so ``copy.deepcopy``
  (and what uses it: ``torch.optim.swa_utils.AveragedModel``, EMA copies) works after a forward pass.
- :func:`caller_modes_off`: the caller's ``torch.autocast`` and ``torch.inference_mode`` off for a
  pruning call made inside a training or evaluation loop.
- :func:`fingerprint` / :func:`changed_weights`: a cheap summary of weight values, to tell whether a
  model holds the weights a curvature was estimated on (or a copy of them).
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .buffers import buffers_kept
from .targets import PruneTarget, check_module, unwrap_model

__all__ = ["eval_mode", "Snapshot", "clone_model", "derived_weights_kept", "fingerprint", "changed_weights",
           "FINGERPRINT_CHUNK", "FINGERPRINT_RTOL", "detached_memo", "DeepcopyDetached", "caller_modes_off",
           "AUTOCAST_DEVICES"]

#: Entries per float64 chunk of :func:`fingerprint` (bounds its scratch memory to 8 MiB per chunk).
FINGERPRINT_CHUNK = 2 ** 20
#: Relative difference beyond which two fingerprints are of other weights: the float64 sums of the same values
#: (a copy, on another device) agree to ~1e-15; weights drawn independently differ by ~1 / sqrt(numel), one
#: step of training by far more than this.
FINGERPRINT_RTOL = 1e-10


class eval_mode:
    """Context manager: model in eval mode, every submodule's flag restored on exit."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        for m, flag in self.flags:
            m.training = flag
        return False


class Snapshot:
    """Copies of the storage and masks of ``targets`` and of every buffer of ``model`` (when
    given); :meth:`restore` writes them back bit for bit (NaN payloads included)."""

    def __init__(self, targets: List[PruneTarget], model: Optional[nn.Module] = None):
        self.saved = [(target, target.param.detach().clone(), [m.detach().clone() for m in target._mask_buffers()])
                      for target in targets]
        buffers = unwrap_model(model)[0].buffers() if model is not None else ()
        self.buffers = [(b, b.detach().clone()) for b in buffers]

    @torch.no_grad()
    def restore(self) -> None:
        for buf, value in self.buffers:
            buf.copy_(value)
        for t, weight, masks in self.saved:
            t.param.copy_(weight)
            for buf, mask in zip(t._mask_buffers(), masks):
                buf.copy_(mask)
            t.refresh()


def _derived(model: nn.Module) -> List[Tuple[nn.Module, str, torch.Tensor]]:
    """(module, attribute, tensor) of every ``torch.nn.utils.prune``-derived weight (``weight_orig * weight_mask``,
    recomputed by a forward pre-hook)."""
    out = []
    for module in model.modules():
        for hook in getattr(module, "_forward_pre_hooks", {}).values():
            attr = getattr(hook, "_tensor_name", None)
            if attr is not None and isinstance(getattr(module, attr, None), torch.Tensor):
                out.append((module, attr, getattr(module, attr)))
    return out


@contextlib.contextmanager
def derived_weights_kept(model: nn.Module) -> Iterator[None]:
    """Restore the ``torch.nn.utils.prune``-derived weights and every buffer (:func:`woodfisher.buffers.buffers_kept`)
    on exit.

    Forward passes with substituted parameters (``torch.func.functional_call``) leave the
    derived ``weight`` attribute computed from the substitutes (a non-leaf tensor, which
    ``copy.deepcopy`` refuses, and stale values); passes that do not write weights run
    inside this context so the model keeps the tensors it had.
    """
    saved = _derived(model)
    try:
        with buffers_kept(model):
            yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def detached_memo(model: nn.Module, recurse: bool = True) -> Dict[int, torch.Tensor]:
    """A ``copy.deepcopy`` memo: every non-leaf tensor attribute of ``model``'s modules (the derived
    ``weight = weight_orig * weight_mask`` of a ``torch.nn.utils.prune`` mask after a forward pass, which
    deepcopy refuses) mapped to a detached copy of it.

    Args:
        model: any ``nn.Module``. recurse: False = ``model``'s own attributes only.
    Returns:
        {id(tensor): detached clone}, to pass as ``copy.deepcopy(model, memo)``.
    """
    modules = model.modules() if recurse else (model,)
    return {id(value): value.detach().clone() for module in modules for value in vars(module).values()
            if isinstance(value, torch.Tensor) and not value.is_leaf}


class DeepcopyDetached:
    """``module.__deepcopy__`` (an instance attribute, which ``copy.deepcopy`` looks up first) of a module
    holding a mask: the module is copied with its derived weight detached, and the copy gets its own.

    Without it ``copy.deepcopy(model)`` fails once a masked module ran a forward pass with gradients
    (its ``weight`` is then a non-leaf tensor), and so does ``torch.optim.swa_utils.AveragedModel(model)``.
    """

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, memo: Optional[dict] = None) -> nn.Module:
        module, memo = self.module, ({} if memo is None else memo)
        for key, value in detached_memo(module, recurse=False).items():
            memo.setdefault(key, value)
        del module.__dict__["__deepcopy__"]  # the default copy below, not this one again
        try:
            copied = copy.deepcopy(module, memo)
        finally:
            module.__dict__["__deepcopy__"] = self
        install_deepcopy(copied)
        return copied


def install_deepcopy(module: nn.Module) -> None:
    """Give ``module`` (which holds a mask) a :class:`DeepcopyDetached` unless it has one."""
    if "__deepcopy__" not in module.__dict__:
        module.__dict__["__deepcopy__"] = DeepcopyDetached(module)


def remove_deepcopy(module: nn.Module) -> None:
    """Drop ``module``'s :class:`DeepcopyDetached` once it holds no ``torch.nn.utils.prune`` mask."""
    masked = any(key.endswith("_orig") and key[:-5] + "_mask" in module._buffers for key in module._parameters)
    if not masked and isinstance(module.__dict__.get("__deepcopy__"), DeepcopyDetached):
        del module.__dict__["__deepcopy__"]


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``, also under ``torch.nn.utils.prune`` masks.

    The derived ``weight`` of a pruned module (recomputed from ``weight_orig * weight_mask``
    by a forward pre-hook) is a non-leaf tensor after a forward pass with gradients; the copy
    gets it detached (the original is not touched). Masks attached by this package also make
    plain ``copy.deepcopy`` work (:class:`DeepcopyDetached`); this covers masks attached otherwise.

    Args:
        model: any ``nn.Module`` (masked or not); left as it was.
    Returns:
        An independent deep copy (masks, hooks and buffers included).
    Raises:
        ValueError: ``model`` not an ``nn.Module``.
    """
    check_module(model)
    return copy.deepcopy(model, detached_memo(model))


#: Device types whose ``torch.autocast`` :func:`caller_modes_off` switches off where it is on.
AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def _autocast_on(device: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device))
    except (RuntimeError, TypeError):  # a device type this torch build does not know
        return False


@contextlib.contextmanager
def caller_modes_off() -> Iterator[None]:
    """The caller's ``torch.autocast`` (every device type) and ``torch.inference_mode`` off inside.

    A pruning call made inside a training loop's ``with torch.autocast(...)`` would otherwise take its
    Fisher from low-precision forwards (other masks than the same call outside it), and one made under
    ``torch.inference_mode`` would create masks and weights as inference tensors, which autograd refuses
    at the next training step. (``torch.no_grad`` needs nothing: gradients are enabled where computed.)
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        for device in AUTOCAST_DEVICES:
            if _autocast_on(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


@torch.no_grad()
def fingerprint(targets: List[PruneTarget]) -> Dict[str, Tuple[float, float]]:
    """{weight name: (sum, sum of squares)} of each target's effective weight, accumulated in float64.

    Args:
        targets: the pruned weights.
    Returns:
        Two floats per weight (units of the weights, and their square); the same for a copy of the weights.
    """
    out = {}
    for target in targets:
        w = target.effective_weight().reshape(-1)
        total = squares = 0.0
        for start in range(0, w.numel(), FINGERPRINT_CHUNK):
            part = w[start:start + FINGERPRINT_CHUNK].double()
            total += float(part.sum())
            squares += float(part.square().sum())
        out[target.name] = (total, squares)
    return out


def changed_weights(before: Dict[str, Tuple[float, float]], now: Dict[str, Tuple[float, float]],
                    numel: Dict[str, int]) -> List[str]:
    """Names whose fingerprint (:func:`fingerprint`) differs beyond :data:`FINGERPRINT_RTOL`.

    The sums compare against ``sqrt(numel * squares)`` (their largest possible size), the squares against themselves.

    Args:
        before, now: fingerprints of the same names. numel: entries per weight.
    Returns:
        The weight names that differ (in ``before``'s order).
    """
    changed = []
    for name, (total, squares) in before.items():
        total2, squares2 = now[name]
        scale = max(squares, squares2)
        if abs(squares - squares2) > FINGERPRINT_RTOL * scale or \
                abs(total - total2) > FINGERPRINT_RTOL * math.sqrt(numel[name] * scale):
            changed.append(name)
    return changed
