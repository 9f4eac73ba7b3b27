"""BatchNorm statistics warm-up before scoring.

At initialisation BatchNorm running statistics are (mean 0, var 1), so a model scored
in eval mode sees activations that grow or vanish with depth; data-dependent criteria
then misjudge whole layers (layer collapse). The warm-up runs a few forward passes in
train mode without gradients so that the running statistics match the data.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ._common import BN_TYPES, batches, check_loader, check_positive_int, model_device


def batchnorm_modules(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, BN_TYPES) and m.track_running_stats]


@torch.no_grad()
def warmup_batchnorm(model: nn.Module, loader: Iterable, num_batches: int, *, cumulative: bool = True,
                     progress: bool = False) -> int:
    """Update BatchNorm running statistics with ``num_batches`` train-mode forward passes.

    Args:
        cumulative: reset the statistics and average them equally over the warm-up
            batches (momentum=None for the duration); False keeps each layer's momentum,
            as plain train-mode passes would.
    Returns:
        the number of samples seen (0 when the model has no BatchNorm: nothing is run).
        Parameters and the model's train/eval mode are left unchanged.
    """
    check_positive_int(num_batches, "warmup_batches")
    check_loader(loader)
    bns = batchnorm_modules(model)
    if not bns:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in bns]
    if cumulative:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
    model.train()
    seen = 0
    try:
        for x, _ in tqdm(batches(loader, num_batches, model_device(model)), desc="bn warm-up",
                         disable=not progress, leave=False):
            model(x)
            seen += x.shape[0]
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    return seen


@contextlib.contextmanager
def preserved_batchnorm_state(model: nn.Module) -> Iterator[None]:
    """Restore every BatchNorm buffer on exit (train-mode scoring passes update them)."""
    bns = batchnorm_modules(model)
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in bns]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buf in zip(bns, saved):
                for k, v in buf.items():
                    getattr(m, k).copy_(v)
