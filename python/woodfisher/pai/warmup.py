"""BatchNorm statistics warm-up before scoring, and the train/eval flags used for scoring.

At initialisation BatchNorm running statistics are (mean 0, var 1), so a model scored
in eval mode sees activations that grow or vanish with depth; data-dependent criteria
then misjudge whole layers (layer collapse). The warm-up runs a few forward passes in
train mode without gradients so that the running statistics match the data.

"Train mode" here means the modes the caller's training would use: a model already in
train mode keeps every submodule's own flag (a BatchNorm the caller froze in eval mode
stays frozen, and is neither warmed up nor updated); a model in eval mode is switched to
train mode as a whole. Every flag is restored afterwards (:class:`woodfisher.state.eval_mode`).
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Iterable, Iterator, List, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..batches import peek, to_batch
from ..config import check_int
from ..state import eval_mode
from ..targets import unwrap_model

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def batchnorm_modules(model: nn.Module) -> List[nn.Module]:
    """BatchNorm layers that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, BN_TYPES) and m.track_running_stats]


def as_in_training(ctx: eval_mode) -> None:
    """Inside ``with ctx`` (an :class:`eval_mode` of the model): put every module in the mode the
    caller's training would use (see the module docstring)."""
    flags = ctx.flags
    if flags[0][1]:  # the model itself was training: its submodules' own flags
        for m, flag in flags:
            m.training = flag
    else:
        ctx.model.train()


@torch.no_grad()
def warmup_batchnorm(model: nn.Module, loader: Iterable, num_batches: int, *, cumulative: bool = True,
                     progress: bool = False, batch_adapter: Optional[Callable] = None) -> int:
    """Update BatchNorm running statistics with ``num_batches`` train-mode forward passes.

    Args:
        loader: batches (see :mod:`woodfisher.batches`); a single-pass loader loses the
            batches read here (:func:`woodfisher.pai.prune_at_init` replays them).
        cumulative: reset the statistics and average them equally over the warm-up
            batches (momentum=None for the duration); False keeps each layer's momentum,
            as plain train-mode passes would.
    Returns:
        the number of samples seen (0 when no BatchNorm would be in train mode: nothing is
        run). Parameters and every module's train/eval flag are left unchanged.
    Raises:
        ValueError: ``num_batches`` < 1, an empty loader.
    """
    check_int("warmup_batches", num_batches)
    first, loader = peek(loader)
    if first is None:
        raise ValueError("loader is empty: it yielded no batch")
    inner = unwrap_model(model)[0]
    ctx = eval_mode(inner)
    with ctx:
        as_in_training(ctx)
        bns = [m for m in batchnorm_modules(inner) if m.training]
        if not bns:
            return 0
        device = next(inner.parameters()).device
        momenta = [m.momentum for m in bns]
        if cumulative:
            for m in bns:
                m.reset_running_stats()
                m.momentum = None
        seen = 0
        try:
            for item in tqdm(itertools.islice(loader, num_batches), desc="bn warm-up", disable=not progress,
                             leave=False):
                batch = to_batch(item, batch_adapter).to(device)
                inner(*batch.args, **batch.kwargs)
                seen += batch.size
        finally:
            for m, mom in zip(bns, momenta):
                m.momentum = mom
    return seen


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
    """Restore every BatchNorm buffer on exit (train-mode scoring passes update them)."""
    saved = batchnorm_state(model)
    try:
        yield
    finally:
        restore_batchnorm_state(saved)
