"""BatchNorm statistics warm-up before scoring, and the train/eval flags used for scoring.

At initialisation BatchNorm running statistics are (mean 0, var 1), so a model scored
in eval mode sees activations that grow or vanish with depth; data-dependent criteria
then misjudge whole layers (layer collapse). The warm-up re-estimates the running
statistics on a few batches: it is the package's :func:`woodfisher.recalibrate_bn`
(cumulative average, BatchNorm layers in train mode, every other module in eval mode,
no gradients, every flag restored).

"Train mode" for scoring (``prune_at_init(train_mode=True)``) means the modes the
caller's training would use: a model already in train mode keeps every submodule's own
flag (a BatchNorm the caller froze in eval mode stays frozen); a model in eval mode is
switched to train mode as a whole. Every flag is restored afterwards
(:class:`woodfisher.state.eval_mode`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.nn as nn

from ..config import check_int
from ..finetune import _bn_layers as batchnorm_modules
from ..finetune import recalibrate_bn
from ..state import eval_mode

__all__ = ["as_in_training", "batchnorm_modules", "batchnorm_state", "preserved_batchnorm_state",
           "restore_batchnorm_state", "warmup_batchnorm"]


def as_in_training(ctx: eval_mode) -> None:
    """Inside ``with ctx`` (an :class:`eval_mode` of the model): put every module in the mode the
    caller's training would use (see the module docstring)."""
    flags = ctx.flags
    if flags[0][1]:  # the model itself was training: its submodules' own flags
        for m, flag in flags:
            m.training = flag
    else:
        ctx.model.train()


def warmup_batchnorm(model: nn.Module, loader: Iterable, num_batches: int, *,
                     batch_adapter: Optional[Callable] = None) -> int:
    """Re-estimate the BatchNorm running statistics on the first ``num_batches`` batches of ``loader``.

    :func:`woodfisher.recalibrate_bn`; a single-pass loader loses the batches read here, and one more
    (:func:`woodfisher.pai.prune_at_init` hands it a list of them).

    Args:
        model: the network (its BN buffers are modified). loader: batches (inputs only used).
        num_batches: batches to use (int >= 1). batch_adapter: loader item -> :class:`woodfisher.Batch`.
    Returns:
        the number of samples seen (0 when the model has no BatchNorm: nothing is run).
    Raises:
        ValueError: ``num_batches`` < 1, an empty loader (the statistics are then left as they were).
    """
    check_int("warmup_batches", num_batches)
    return recalibrate_bn(model, loader, num_batches, batch_adapter=batch_adapter)


def batchnorm_state(model: nn.Module) -> list:
    """Copies of every BatchNorm buffer (running statistics, batch counters)."""
    return [(m, {k: v.clone() for k, v in m.named_buffers(recurse=False)}) for m in batchnorm_modules(model)]


@torch.no_grad()
def restore_batchnorm_state(saved: list) -> None:
    """Write back what :func:`batchnorm_state` saved."""
    for m, buffers in saved:
        for k, v in buffers.items():
            getattr(m, k).copy_(v)


@contextlib.contextmanager
def preserved_batchnorm_state(model: nn.Module) -> Iterator[None]:
    """Context manager restoring every BatchNorm buffer on exit (train-mode scoring passes update them).

    Args:
        model: the network.
    Yields:
        None; on exit (also after an exception) the running statistics and batch counters are restored.
    """
    saved = batchnorm_state(model)
    try:
        yield
    finally:
        restore_batchnorm_state(saved)
