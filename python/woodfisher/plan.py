"""Memory planning of a pruning step: keep the gradients, stream them, or offload the inverses.

:func:`plan_memory` decides before any gradient is computed, from the shapes alone
(:func:`keep_step_bytes`), whether a step fits the memory budget (or the memory the device has
available) with its gradients kept, and otherwise how it streams or offloads
(:mod:`woodfisher.streaming`, :mod:`woodfisher.offload`); a step that cannot fit is a ValueError
up front, not an out-of-memory kill minutes in.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .chunking import chunk_samples, spread_total
from .conditioning import refine_bytes
from .diagnostics import warn_at_caller
from .memory import available_bytes
from .offload import offload_fits
from .precision import compute_dtype
from .targets import PruneTarget

__all__ = ["plan_memory", "keep_step_bytes", "stream_step_bytes", "stat_itemsize"]


def plan_memory(targets: List[PruneTarget], num_grads: int, itemsize: int,
                memory_budget: Optional[int], auto_damp: bool = False,
                inverse_form: str = "auto", fisher_batch_size: int = 1) -> Tuple[str, Optional[int]]:
    """("keep", None) to keep all gradients, ("stream", k) to stream k at a time, or ("offload", None).

    Keeping costs (:func:`keep_step_bytes`) the ``m * D`` kept gradient entries plus the larger of
    two phases: while they are collected, the chunk of gradients the collector is computing
    (:func:`woodfisher.chunking.chunk_samples`, up to :data:`woodfisher.chunking.CHUNK_BYTES`);
    while they are inverted, each weight's cheaper inverse form plus, for float32 gradients of
    weights whose blocks may be built dense, the float64 chunk of blocks recomputed when their
    float32 inverse is not accurate enough (:func:`woodfisher.conditioning.refine_bytes`, up to
    :data:`woodfisher.conditioning.REFINE_BYTES`).
    Streaming (:func:`stream_step_bytes`) costs the dense ``B c^2`` inverses (float64 Gram blocks with
    ``auto_damp``) plus a buffer of k gradients and the blocked copy of one weight's share of them (and,
    with ``auto_damp``, the float64 Cholesky factor and inverse of one weight's blocks); offloading
    (:mod:`woodfisher.offload`: forced by ``inverse_form="offload"``, else only for weights on an
    accelerator) costs one chunk of blocks on the device. ``memory_budget=None``: the memory the device has available
    (:func:`woodfisher.memory.available_bytes`) is the budget; a step that must then stream or
    offload says so in a warning. Not counted: the model's weights and the activations of the
    samples in flight (``vmap`` over a chunk of samples holds every sample's activations: for a
    language model, ``seq x vocab`` logits per sample and their gradient).

    Args:
        targets: the pruned weights (block sizes set). num_grads: m, gradients of the step.
        itemsize: bytes per entry of gradients and inverses (:func:`stat_itemsize`).
        memory_budget: bytes, or None (the device's available memory).
        auto_damp: ``damp="auto"`` (a stream sums float64 Gram blocks). inverse_form: the config's.
        fisher_batch_size: samples per gradient (sets the collector's chunk).
    Raises:
        ValueError: naming ``memory_budget`` (or the options to change) when nothing fits the budget:
            before any gradient is computed, instead of the OS killing the process mid-run.
    """
    if inverse_form == "offload":
        if memory_budget is not None and not offload_fits(targets, num_grads, itemsize, memory_budget):
            raise ValueError(f"memory_budget={memory_budget} bytes cannot hold one block of every weight on the "
                             "device, even offloaded; use a smaller block_size or fewer num_grads")
        return "offload", None
    d = sum(target.numel for target in targets)
    m = num_grads
    stream_min = stream_step_bytes(targets, 1, itemsize, auto_damp)
    keep_bytes = keep_step_bytes(targets, m, itemsize, fisher_batch_size, inverse_form)
    budget = memory_budget
    if memory_budget is None:  # the device's available memory is the budget, for the step to fit
        device = targets[0].param.device
        budget = available_bytes(device)
        if budget is None:
            return "keep", None
    if keep_bytes <= budget:
        return "keep", None
    plan = None
    if stream_min <= budget:
        plan = ("stream", _stream_k(targets, m, itemsize, auto_damp, budget))
    elif targets[0].param.device.type != "cpu" and offload_fits(targets, m, itemsize, budget):
        plan = ("offload", None)
    if memory_budget is not None:
        if plan is not None:
            return plan
        fits = _what_fits(targets, m, itemsize, memory_budget, fisher_batch_size, inverse_form, auto_damp)
        raise ValueError(f"memory_budget={memory_budget} bytes ({_gib(memory_budget)}) is too small: keeping the "
                         f"gradients needs {keep_bytes} ({_gib(keep_bytes)}), streaming needs at least {stream_min} "
                         f"({_gib(stream_min)}); "
                         f"{fits}"
                         ", or "
                         "a smaller block_size (or inverse_form='offload': inverses in host "
                         "memory, streamed through the device in chunks; automatic for weights on a GPU)")
    need = (f"a step of {m} gradients of {d:,} pruned weights needs {keep_bytes / 2**30:.2f} GiB kept (gradients, "
            f"block inverses and their working chunks), more than the {budget / 2**30:.2f} GiB available on {device}")
    if plan is not None:
        warn_at_caller(f"{need}: the gradients are streamed instead ({'k = ' + str(plan[1]) if plan[1] else plan[0]}"
                       "; slower, same result); pass memory_budget=<bytes> to choose, or fewer gradients per step "
                       "(a smaller num_grads, or more num_steps)")
        return plan
    raise ValueError(f"{need}, and streaming needs at least {stream_min / 2**30:.2f} GiB: "
                     f"{_what_fits(targets, m, itemsize, budget, fisher_batch_size, inverse_form, auto_damp)} "
                     "(a smaller num_grads, or more num_steps: num_grads is the total over "
                     "the steps), a smaller block_size, or memory_budget=<bytes> (at or above the need, the check "
                     "is yours)")


def _stream_k(targets, m: int, itemsize: int, auto_damp: bool, budget: int) -> int:
    """The most gradients per streamed chunk (1 to m) within ``budget`` (:func:`stream_step_bytes`)."""
    acc, per_grad, _ = _stream_parts(targets, itemsize, auto_damp)
    return max(1, min(m, (budget - acc) // per_grad))


def _gib(nbytes: int) -> str:
    """``nbytes`` in the largest binary unit that leaves a number >= 1 (GiB, MiB or KiB)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes / 2**10:.1f} KiB" if nbytes >= 2**10 else f"{nbytes} B"


def _what_fits(targets, m: int, itemsize: int, budget: int, fisher_batch_size: int, inverse_form: str,
               auto_damp: bool) -> str:
    """What would fit ``budget`` with these blocks: the most gradients per step kept, else the damp to fix."""
    lo, hi = 0, m   # keep_step_bytes grows with the number of gradients: the largest count that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if keep_step_bytes(targets, mid, itemsize, fisher_batch_size, inverse_form) <= budget:
            lo = mid
        else:
            hi = mid - 1
    if lo:
        return f"at most {lo} gradients per step fit with these blocks: pass fewer gradients per step"
    if auto_damp and stream_step_bytes(targets, 1, itemsize, False) <= budget:
        return ("with a fixed damp (damp=<number>, float32 inverses streamed instead of float64 Gram blocks) "
                "streaming would fit; or pass fewer gradients per step")
    return "not even one gradient per step fits with these blocks: pass fewer gradients per step"


def stream_step_bytes(targets: List[PruneTarget], k: int, itemsize: int, auto_damp: bool = False) -> int:
    """Peak bytes of a step that streams its gradients ``k`` at a time (plan "stream" of :func:`plan_memory`).

    The dense ``B c^2`` inverses (float64 Gram blocks with ``auto_damp``, :mod:`woodfisher.streaming`) plus the
    larger of: the chunk of ``k`` gradients with the blocked copy (and its float64 copy with ``auto_damp``) of one
    weight's share; with ``auto_damp``, one weight's float64 Cholesky factor and inverse and its float32 result.

    Args:
        targets: the pruned weights (block sizes set). k: gradients per chunk. itemsize: bytes per entry.
        auto_damp: ``damp="auto"``.
    Returns:
        Bytes (int).
    """
    acc, per_grad, final = _stream_parts(targets, itemsize, auto_damp)
    return acc + max(k * per_grad, final)


def _stream_parts(targets, itemsize: int, auto_damp: bool) -> Tuple[int, int, int]:
    """(bytes of the accumulated blocks, bytes per gradient of a chunk, bytes of the last inversion's buffers)."""
    d = sum(target.numel for target in targets)
    width = max((target.num_blocks * target.block_size for target in targets), default=0)  # padded numel
    dense = [target.num_blocks * target.block_size ** 2 for target in targets]
    acc = sum(dense) * (8 if auto_damp else itemsize)
    per_grad = d * itemsize + width * (itemsize + (8 if auto_damp else 0))
    final = max(dense, default=0) * (2 * 8 + itemsize) if auto_damp else 0
    return acc, per_grad, final


def keep_step_bytes(targets: List[PruneTarget], num_grads: int, itemsize: int, fisher_batch_size: int = 1,
                    inverse_form: str = "auto") -> int:
    """Peak bytes of a step that keeps its gradients (plan "keep" of :func:`plan_memory`).

    ``m D`` kept gradients + the larger of the collection phase (the collector's chunk of gradients,
    :func:`woodfisher.chunking.chunk_samples`) and the inversion phase (each weight's cheaper inverse
    form, summed, + the largest float64 refinement chunk, :func:`woodfisher.conditioning.refine_bytes`,
    of a float32 weight whose blocks may be built dense: ``c^2 <= m c + m^2``, or ``inverse_form="sequential"``).

    Args:
        targets: the pruned weights (block sizes set). num_grads: m. itemsize: bytes per entry.
        fisher_batch_size: samples per gradient. inverse_form: the config's.
    Returns:
        Bytes (int).
    """
    d, m = sum(target.numel for target in targets), num_grads
    grads = m * d * itemsize
    total = spread_total(m, fisher_batch_size, targets[0].param.device)
    chunk = min(m, chunk_samples(d, itemsize, fisher_batch_size, total=total) // fisher_batch_size) * d * itemsize
    seq = sum(target.num_blocks * target.block_size ** 2 for target in targets) * itemsize
    low = sum(target.num_blocks * (m * target.block_size + m * m) for target in targets) * itemsize
    dense = [target for target in targets if inverse_form == "sequential" or (
        inverse_form != "lowrank" and target.block_size ** 2 <= m * target.block_size + m * m)]
    refine = max((refine_bytes(target.num_blocks, m, target.block_size) for target in dense), default=0) \
        if itemsize == torch.float32.itemsize else 0  # only dense float32 blocks are recomputed in float64
    return grads + max(chunk, min(seq, low) + refine)


def stat_itemsize(targets: List[PruneTarget]) -> int:
    """Bytes per entry of gradients and inverses (float32 for half-precision weights)."""
    return torch.empty((), dtype=compute_dtype(targets[0].param.dtype)).element_size()
