"""Plumbing shared by the pruning-at-initialization modules.

Parameters are addressed by their ``named_parameters`` names (e.g. ``"fc1.weight"``);
every per-parameter result is a dict ``{name: Tensor of that parameter's shape}``.
"""
from __future__ import annotations

import itertools
from typing import Callable, Dict, Iterable, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import prunable_weights

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
BN_TYPES = (nn.modules.batchnorm._BatchNorm,)

Batch = Tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def prunable_parameters(model: nn.Module, names: Optional[Sequence[str]] = None) -> Dict[str, nn.Parameter]:
    """The parameters to score: by default the ``weight`` of every Linear / Conv layer.

    Args:
        names: explicit parameter names (``"layer1.0.conv1.weight"``) or module names
            (``"layer1.0.conv1"``, meaning its weight).
    Returns:
        {name: Parameter}, in the model's registration order.
    """
    params = dict(model.named_parameters())
    if names is None:
        out = {n: params[n] for n in prunable_weights(model) if n in params}
        if not out:
            raise ValueError("model has no Linear/Conv weight to prune; pass params=[...]")
        return out
    if isinstance(names, str) or len(names) == 0:
        raise ValueError(f"params must be a non-empty list of names, got {names!r}")
    out = {}
    for n in names:
        key = n if n in params else f"{n}.weight"
        if key not in params:
            raise ValueError(f"params: {n!r} is neither a parameter nor a module with a weight")
        out[key] = params[key]
    return out


def resolve_loss(loss_fn: Optional[LossFn]) -> LossFn:
    """Mean cross-entropy by default (also right for log-softmax outputs, since
    log_softmax is idempotent)."""
    if loss_fn is None:
        return F.cross_entropy
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable, got {loss_fn!r}")
    return loss_fn


def check_loader(loader: Iterable) -> Batch:
    """First (inputs, targets) batch of ``loader``; ValueError when empty or malformed."""
    if loader is None:
        raise ValueError("loader is required for this criterion")
    first = next(iter(loader), None)
    if first is None:
        raise ValueError("loader is empty: it yielded no batch")
    if not isinstance(first, (tuple, list)) or len(first) < 2:
        raise ValueError("loader must yield (inputs, targets) batches")
    if first[0].shape[0] == 0:
        raise ValueError("loader yielded an empty batch")
    return first[0], first[1]


def batches(loader: Iterable, num_batches: Optional[int], device) -> Iterator[Batch]:
    """(inputs, targets) on ``device`` for the first ``num_batches`` batches (all if None)."""
    for x, y, *_ in itertools.islice(loader, num_batches):
        yield x.to(device), y.to(device)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, BN_TYPES) for m in model.modules())


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def zeros_like_dict(params: Dict[str, torch.Tensor], dtype=None) -> Dict[str, torch.Tensor]:
    return {n: torch.zeros_like(p, dtype=dtype or p.dtype) for n, p in params.items()}


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value
