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
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator, List, Optional, Tuple

import torch
from torch import nn

from .targets import PruneTarget, unwrap_model

__all__ = ["eval_mode", "Snapshot", "clone_model", "derived_weights_kept"]


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
    """
    with derived_weights_kept(model):
        for module, attr, value in _derived(model):
            setattr(module, attr, value.detach())
        return copy.deepcopy(model)
