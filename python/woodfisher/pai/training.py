"""Training a model pruned at initialization with its masks held fixed.

Masks follow the torch.nn.utils.prune convention (:func:`woodfisher.attach_masks`,
re-exported here with :func:`woodfisher.make_permanent`): ``weight`` becomes
``weight_orig * weight_mask`` (a buffer) in a forward pre-hook, so pruned weights stay
exactly zero whatever the optimizer does to ``weight_orig``; ``make_permanent`` removes
the hooks.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn

from ..batches import to_batch
from ..config import check_int
from ..finetune import attach_masks, make_permanent  # noqa: F401  (re-exported: torch prune convention)
from ..losses import check_loss_fn, compute_loss
from ..progress import progress_bar
from ..state import eval_mode
from .warmup import as_in_training


def train(model: nn.Module, loader: Iterable, *, epochs: float = 1.0, max_steps: Optional[int] = None,
          lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4, nesterov: bool = True,
          loss_fn: Optional[Callable] = None, progress: bool = True,
          batch_adapter: Optional[Callable] = None) -> dict:
    """SGD (momentum, cosine learning rate to 0) for ``epochs`` passes or ``max_steps`` steps.

    Args:
        loader: batches (see :mod:`woodfisher.batches`); without a length (a generator) pass max_steps.
        epochs: passes over the loader, may be fractional; max_steps caps the step count (training also
            stops when a single-pass loader is spent).
        loss_fn: ``loss_fn(predictions, targets)`` (default: the package's default loss).
    The model trains in the modes of training (a BatchNorm the caller froze inside a model in
    train mode stays frozen, see :mod:`woodfisher.pai.warmup`); every module's train/eval flag
    is restored afterwards.
    Returns:
        {"steps", "seconds", "final_loss" (mean over the last 50 steps)}.
    Raises:
        ValueError: epochs <= 0, max_steps < 1, a loader without length and no max_steps, a bad loss_fn.
    """
    check_loss_fn(loss_fn)
    if not epochs > 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    sized = hasattr(loader, "__len__")
    if max_steps is None and not sized:
        raise ValueError("loader has no length, so epochs cannot be counted: pass max_steps")
    total = int(math.ceil(epochs * len(loader))) if sized else None
    if max_steps is not None:
        total = check_int("max_steps", max_steps) if total is None else min(total, check_int("max_steps", max_steps))
    device = next(model.parameters()).device
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum,
                          weight_decay=weight_decay, nesterov=nesterov and momentum > 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    step, recent, t0 = 0, [], time.perf_counter()
    bar = progress_bar(total, "train", "step", enabled=progress)
    ctx = eval_mode(model)
    with ctx:
        as_in_training(ctx)
        while step < total:
            start = step
            for item in loader:
                batch = to_batch(item, batch_adapter).to(device)
                loss = compute_loss(model(*batch.args, **batch.kwargs), batch.target, loss_fn)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                recent = (recent + [loss.item()])[-50:]
                step += 1
                bar.update(1)
                if step >= total:
                    break
            if step == start:  # the loader yielded nothing (a spent single-pass loader): stop
                break
    bar.close()
    return {"steps": step, "seconds": time.perf_counter() - t0, "final_loss": sum(recent) / max(len(recent), 1)}
