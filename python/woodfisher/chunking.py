"""Chunks of samples for the gradient collector: how many samples one ``vmap`` call takes, and the loader's
items buffered and concatenated into them (:class:`woodfisher.gradients.GradientCollector`).

A chunk holds as many samples as a memory budget for its gradients allows (:func:`chunk_samples`), whatever
the loader's batch size; items of the same structure are concatenated along their batch dimension, with a
fast path for plain batches (positional tensors and a tensor target: a batch-1 loader yields many).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch.utils import _pytree as pytree

from .batches import Batch

__all__ = ["CHUNK_BYTES", "MAX_CHUNK_SAMPLES", "chunk_samples", "plain_size", "batch_size", "signature", "cat_batches"]

#: Default memory (bytes) for the gradients of one chunk. Every chunk is one ``vmap`` call whose operator count
#: does not depend on its samples (1.7k operators for ResNet-20, 256 samples): a ResNet-20-sized model's 256
#: gradients come in 251 + 5. One call (512 MiB) halves the operators, but on the CPU it was 5% faster on
#: ResNet-20 and 14% slower on a MobileNet-like net (larger working set; paired runs, idle host), so the CPU
#: keeps 256 MiB; ``benchmarks/step_cpu.py`` times one chunk beside it for a GPU, where launches dominate.
CHUNK_BYTES = 256 * 2 ** 20
#: At most this many samples per chunk (bounds the activations a ``vmap`` call keeps, and the buffered inputs).
MAX_CHUNK_SAMPLES = 256


def chunk_samples(numel: int, itemsize: int, fisher_batch_size: int, chunk_bytes: int = CHUNK_BYTES,
                  max_samples: int = MAX_CHUNK_SAMPLES) -> int:
    """Samples per chunk: whole groups of ``fisher_batch_size``, as many as ``chunk_bytes`` holds.

    Args:
        numel: entries of all pruned weights (one gradient is ``numel * itemsize`` bytes).
        itemsize: bytes per entry of the compute dtype.
        fisher_batch_size: samples per gradient (a chunk holds whole groups).
        chunk_bytes: memory for the chunk's gradients, one per group.
        max_samples: cap on the samples of a chunk (at least one group is always taken).
    Returns:
        a multiple of ``fisher_batch_size``, >= ``fisher_batch_size``.
    """
    groups = max(1, int(chunk_bytes) // max(1, numel * itemsize))
    groups = max(1, min(groups, max_samples // fisher_batch_size))
    return groups * fisher_batch_size


def plain_size(batch: Batch) -> Optional[int]:
    """Samples of a plain batch (positional tensors and a tensor target or None, one batch dim), else None."""
    if batch.kwargs or not batch.args or not all(isinstance(a, torch.Tensor) and a.dim() >= 1 for a in batch.args):
        return None
    n = batch.args[0].shape[0]
    if any(a.shape[0] != n for a in batch.args):
        return None
    t = batch.target
    if t is not None and not (isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == n):
        return None
    return n


def batch_size(batch: Batch, n: Optional[int] = None) -> int:
    """Samples of ``batch`` (``n``: its :func:`plain_size` count when already known)."""
    n = plain_size(batch) if n is None else n
    return batch.size if n is None else n


def signature(batch: Batch, plain: Optional[bool] = None):
    """Structure and per-sample shapes of a batch: batches with equal signatures can be concatenated
    (``plain``: whether :func:`plain_size` counts it, when already known)."""
    if plain if plain is not None else plain_size(batch) is not None:  # fast path (no pytree walk): batch-1 items
        t = batch.target
        return ("plain", tuple((a.shape[1:], a.dtype) for a in batch.args),
                None if t is None else (t.shape[1:], t.dtype))
    leaves, spec = pytree.tree_flatten((batch.args, batch.kwargs, batch.target))
    flags = pytree.tree_leaves(batch.batched())
    return spec, tuple(tuple(x.shape[1:]) if f else None for x, f in zip(leaves, flags))


def cat_batches(batches: List[Batch], uniform: Optional[bool] = None) -> Batch:
    """:meth:`Batch.cat`, with a fast path for plain batches of equal signatures (``uniform``: whether they
    are, when the caller already knows)."""
    if uniform is None:
        uniform = all(plain_size(b) is not None for b in batches) and len({signature(b) for b in batches}) == 1
    if len(batches) > 1 and uniform:
        args = tuple(torch.cat([b.args[i] for b in batches]) for i in range(len(batches[0].args)))
        target = None if batches[0].target is None else torch.cat([b.target for b in batches])
        return Batch(args, {}, target)
    return Batch.cat(batches)
