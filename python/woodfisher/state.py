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

from .targets import PruneTarget, check_module, unwrap_model

__all__ = ["eval_mode", "Snapshot", "clone_model", "derived_weights_kept", "fingerprint", "changed_weights",
           "FINGERPRINT_CHUNK", "FINGERPRINT_RTOL"]

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
    """Restore the ``torch.nn.utils.prune``-derived weights on exit.

    Forward passes with substituted parameters (``torch.func.functional_call``) leave the
    derived ``weight`` attribute computed from the substitutes (a non-leaf tensor, which
    ``copy.deepcopy`` refuses, and stale values); passes that do not write weights run
    inside this context so the model keeps the tensors it had.
    """
    saved = _derived(model)
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``, also under ``torch.nn.utils.prune`` masks.

    The derived ``weight`` of a pruned module (recomputed from ``weight_orig * weight_mask``
    by a forward pre-hook) is a non-leaf tensor after a forward pass with gradients; it is
    detached for the copy and put back on the original afterwards.

    Args:
        model: any ``nn.Module`` (masked or not); left as it was.
    Returns:
        An independent deep copy (masks, hooks and buffers included).
    Raises:
        ValueError: ``model`` not an ``nn.Module``.
    """
    check_module(model)
    with derived_weights_kept(model):
        for module, attr, value in _derived(model):
            setattr(module, attr, value.detach())
        return copy.deepcopy(model)


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
