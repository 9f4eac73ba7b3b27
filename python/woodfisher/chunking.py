"""Chunks of samples for the gradient collector: how many samples one ``vmap`` call takes, and the loader's
items buffered and concatenated into them (:class:`woodfisher.gradients.GradientCollector`).

A chunk holds as many samples as a memory budget for its gradients allows (:func:`chunk_samples`), whatever
the loader's batch size; items of the same structure are concatenated along their batch dimension, with a
fast path for plain batches (positional tensors and a tensor target: a batch-1 loader yields many).
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterable, Iterator, List, Optional

import torch
from torch.utils import _pytree as pytree

from .batches import Batch, to_batch
from .precision import prepare_batch

__all__ = ["CHUNK_BYTES", "MAX_CHUNK_SAMPLES", "SampleChunks", "fitted_chunks", "fitted_chunk", "remember_chunk",
           "vmap_refused", "remember_vmap_refused",
           "chunk_samples", "spread_total", "plain_size", "batch_size", "signature", "cat_batches"]

#: Default memory (bytes) for the gradients of one chunk. Every chunk is one ``vmap`` call whose operator count
#: does not depend on its samples (209 kernels for ResNet-20): off the CPU a ResNet-20-sized model's 256 gradients
#: are one call (251 fit, the other 5 are spread: :func:`spread_total`). A larger budget only helps models
#: whose gradients are larger; on the CPU one 512 MiB call was 5% faster on ResNet-20 and 14% slower on a
#: MobileNet-like net (larger working set; paired runs, idle host), so the CPU keeps 256 MiB;
#: ``benchmarks/step_cpu.py`` times one chunk beside it for a GPU, where launches dominate.
CHUNK_BYTES = 256 * 2 ** 20
#: At most this many samples per chunk (bounds the activations a ``vmap`` call keeps, and the buffered inputs).
MAX_CHUNK_SAMPLES = 256


def chunk_samples(numel: int, itemsize: int, fisher_batch_size: int, chunk_bytes: int = CHUNK_BYTES,
                  max_samples: int = MAX_CHUNK_SAMPLES, total: Optional[int] = None) -> int:
    """Samples per chunk: whole groups of ``fisher_batch_size``, as many as ``chunk_bytes`` holds.

    Args:
        numel: entries of all pruned weights (one gradient is ``numel * itemsize`` bytes).
        itemsize: bytes per entry of the compute dtype.
        fisher_batch_size: samples per gradient (a chunk holds whole groups).
        chunk_bytes: memory for the chunk's gradients, one per group.
        max_samples: cap on the samples of a chunk (at least one group is always taken).
        total: the samples of the whole pass, when known and ``chunk_bytes`` is a soft budget (the default one,
            not a memory plan's) on a device where launches dominate (:func:`spread_total`): a last chunk of at
            most 1/8 of the others is spread over them instead (each then up to 12.5% over ``chunk_bytes``,
            never over ``max_samples``), saving a ``vmap`` call whose operators cost what a full one's do
            (ResNet-20's 256 gradients: one call of 256, 209 kernels, not 251 + 5, 452 kernels).
    Returns:
        a multiple of ``fisher_batch_size``, >= ``fisher_batch_size``.
    """
    groups = max(1, int(chunk_bytes) // max(1, numel * itemsize))
    groups = max(1, min(groups, max_samples // fisher_batch_size))
    if total is not None:
        total_groups = -(-int(total) // fisher_batch_size)
        calls = -(-total_groups // groups)
        if calls > 1 and total_groups * 8 <= (calls - 1) * groups * 9:
            spread = -(-total_groups // (calls - 1))
            if spread * fisher_batch_size <= max_samples:
                groups = spread
    return groups * fisher_batch_size


def spread_total(num_grads: Optional[int], fisher_batch_size: int, device: torch.device) -> Optional[int]:
    """The ``total`` of :func:`chunk_samples` for a pass of ``num_grads`` groups on ``device``: None (no spreading)
    on the CPU, where the call's cost is not its launches and one larger call can be slower (a MobileNet-like
    net's 256 samples in one call took 2.1 s, 248 + 8 took 1.6 s; ResNet-20 5% faster in one call), or when the
    length of the pass is unknown."""
    if num_grads is None or torch.device(device).type == "cpu":
        return None
    return int(num_grads) * int(fisher_batch_size)


#: Samples per call that fitted after a chunk ran out of memory, inside :func:`fitted_chunks` (else None).
_FITTED: ContextVar[Optional[dict]] = ContextVar("woodfisher_fitted_chunks", default=None)


@contextmanager
def fitted_chunks(sizes: Optional[dict] = None):
    """Context: once a collector inside lowers its chunk after running out of memory, the later collectors
    inside (the steps of one ``prune_one_shot`` call) start at that size instead of running out again.

    Args:
        sizes: the dict that keeps the sizes ({fisher_batch_size: samples}), for an owner that outlives the
            context (:class:`woodfisher.GradualPruner` keeps one across its pruning steps); None: the sizes of
            an enclosing :func:`fitted_chunks` when there is one (a ``prune_one_shot`` call inside a
            GradualPruner step), else a fresh dict.
    Yields:
        None; a fresh dict is forgotten at the exit (a dict passed in keeps what was recorded).
    """
    if sizes is None:
        sizes = _FITTED.get()
    token = _FITTED.set({} if sizes is None else sizes)
    try:
        yield
    finally:
        _FITTED.reset(token)


def fitted_chunk(chunk: int, fisher_batch_size: int) -> int:
    """``chunk`` samples, or fewer: the size :func:`remember_chunk` recorded inside :func:`fitted_chunks`."""
    sizes = _FITTED.get()
    return chunk if sizes is None else min(chunk, sizes.get(fisher_batch_size, chunk))


def vmap_refused() -> bool:
    """Whether a collector earlier inside :func:`fitted_chunks` (an earlier step of the same call) found that
    ``vmap`` cannot run the model and said so: the later ones go straight to the per-sample loop, without a
    second attempt or a second warning."""
    sizes = _FITTED.get()
    return bool(sizes and sizes.get("vmap refused"))


def remember_vmap_refused() -> None:
    """Record, inside :func:`fitted_chunks`, that ``vmap`` cannot run the model (:func:`vmap_refused`)."""
    sizes = _FITTED.get()
    if sizes is not None:
        sizes["vmap refused"] = True


def remember_chunk(samples: int, fisher_batch_size: int) -> None:
    """Record that chunks of ``samples`` (whole groups of ``fisher_batch_size``) are the most that fit, for the
    later collectors inside :func:`fitted_chunks` (outside it: nothing)."""
    sizes = _FITTED.get()
    if sizes is not None:
        sizes[fisher_batch_size] = min(samples, sizes.get(fisher_batch_size, samples))


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


class SampleChunks:
    """The loader's items as flat batches of whole groups, at most :attr:`chunk` samples each, until ``num_grads``
    groups (:class:`woodfisher.gradients.GradientCollector`).

    Consecutive loader items are concatenated; an item whose samples have another shape (e.g. sequences padded
    to another length) starts a new chunk, unless a group is still incomplete (then :meth:`Batch.cat` says why it
    cannot be completed). :attr:`sources` holds the (loader index, item as a Batch) the last chunk yielded may
    hold samples of, for messages. :attr:`chunk` may be lowered while chunks are drawn (a chunk that ran out of
    memory); the items already concatenated are then cut at the new size by the caller (:meth:`split`).

    Args:
        loader: iterable of batches in any format the ``adapter`` takes (:func:`woodfisher.batches.to_batch`).
        adapter: the batch adapter or None. fisher_batch_size: samples per group.
        num_grads: groups to draw (None: until the loader ends). chunk: samples per chunk (whole groups).
        check: called on each item as a Batch (raises on an unusable one), or None.
    """

    def __init__(self, loader: Iterable, adapter: Optional[Callable], fisher_batch_size: int,
                 num_grads: Optional[int], chunk: int, check: Optional[Callable[[Batch], None]] = None):
        self.loader, self.adapter, self.fbs, self.num_grads = loader, adapter, fisher_batch_size, num_grads
        self.chunk, self.check = chunk, check
        self.sources: List[tuple] = []

    def __call__(self, device, dtype) -> Iterator[Batch]:
        """Yields the chunks on ``device``, floating inputs in ``dtype`` (:func:`.prepare_batch`)."""
        left = float("inf") if self.num_grads is None else self.num_grads * self.fbs
        pending: List[Batch] = []
        have, sig, uniform = 0, None, True  # uniform: every pending batch plain, with signature sig
        self.sources = []
        for index, item in enumerate(self.loader):
            batch = to_batch(item, self.adapter)
            if self.check is not None:
                self.check(batch)
            n = plain_size(batch)          # once per item: batch-1 loaders yield many
            this = signature(batch, n is not None)
            if pending and have % self.fbs == 0 and this != sig:
                for piece in self.split(cat_batches(pending, uniform), min(have, left)):
                    left -= piece.size
                    yield prepare_batch(piece, device, dtype)
                pending, have, self.sources = [], 0, []
                if left == 0:
                    return
            if not pending:
                sig, uniform = this, True
            uniform = uniform and n is not None and this == sig
            pending.append(batch)
            self.sources.append((index, batch))
            size = batch_size(batch, n)
            have += size
            if have >= min(self.chunk, left):
                cat = cat_batches(pending, uniform)
                full = min(have // self.chunk * self.chunk, left) if have < left else left
                for piece in self.split(cat, full):
                    left -= piece.size
                    yield prepare_batch(piece, device, dtype)
                pending = [cat.take(full, have)] if full < have else []
                uniform = uniform and bool(pending)  # the rest of a uniform concatenation is plain, same signature
                have -= full
                self.sources = self.sources[-1:] if pending and have <= size else \
                    (self.sources if pending else [])
            if left == 0:
                return
        whole = min(have // self.fbs * self.fbs, left)
        if whole:
            for piece in self.split(cat_batches(pending, uniform), whole):
                yield prepare_batch(piece, device, dtype)

    def split(self, batch: Batch, n: int) -> Iterator[Batch]:
        """The first ``n`` samples of ``batch`` (rounded down to whole groups) in chunks of :attr:`chunk`."""
        n = n // self.fbs * self.fbs
        for start in range(0, n, self.chunk):
            yield batch.take(start, min(start + self.chunk, n))
