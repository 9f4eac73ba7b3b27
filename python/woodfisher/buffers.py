"""The model's buffers left as they were by a pass that only reads the model.

A forward pass may write buffers whatever the module's train/eval flag: a custom layer's call counter or running
average, QAT observers (``torch.ao.quantization``), caches. The passes a pruning call makes over the caller's data
(gradients of the Fisher, K-FAC factors, a FLOPs probe, the probe of :mod:`woodfisher.weight_transform`) are not the
caller's training, so they run inside :func:`buffers_kept`, which puts every buffer back afterwards: the same tensor
object under the same name, with the values it held (a buffer written in place, replaced by assignment, or resized).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn

__all__ = ["buffers_kept"]


@contextlib.contextmanager
def buffers_kept(model: nn.Module, exclude: Iterable[nn.Module] = ()) -> Iterator[None]:
    """Every buffer of ``model`` (and its submodules) as it was on entry, on exit (also when the body raises).

    Args:
        model: any ``nn.Module``. Costs one copy of each buffer for the duration of the block.
        exclude: submodules whose own buffers the block may change (BatchNorm layers being recalibrated).
    """
    skip = {id(m) for m in exclude}
    saved = [(owner, name, buf, buf.detach().clone()) for owner in model.modules() if id(owner) not in skip
             for name, buf in owner._buffers.items() if buf is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for owner, name, buf, value in saved:  # every one: fused ops (QAT observers) write without a version bump
                if buf.shape != value.shape:
                    buf.resize_(value.shape)
                buf.copy_(value)
                owner._buffers[name] = buf
