"""Measuring tensor memory: a CPU stand-in for ``torch.cuda.max_memory_allocated``; the memory a device has free.

:class:`TensorMemoryMeter` is a ``TorchDispatchMode`` that sees every tensor an op returns
while it is active, counts the bytes of each new storage until the last tensor that
references it (views included) is garbage, and keeps the peak. Storages created outside the
meter (the model's weights, the data) are never counted, nor are allocations declared as
host memory with :func:`host_allocations` (the pinned host store of
:mod:`woodfisher.offload`), so on a CPU-only machine the meter measures what would live on
the accelerator. On CUDA, ``torch.cuda.max_memory_allocated`` is the authoritative figure.
"""
from __future__ import annotations

import os
import weakref
from contextlib import contextmanager
from typing import Dict, List, Optional

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from woodfisher_kernels.sizes import parse_bytes  # the one parser of sizes ("4GiB"), re-exported

__all__ = ["TensorMemoryMeter", "host_allocations", "available_bytes", "is_out_of_memory", "note_out_of_memory",
           "note_activations_too_large",
           "parse_bytes"]

_HOST_DEPTH = [0]


def available_bytes(device) -> Optional[int]:
    """Bytes ``device`` can still allocate now, or None where unknown.

    CUDA: the free memory ``torch.cuda.mem_get_info`` reports; CPU: ``MemAvailable`` of ``/proc/meminfo``
    (Linux: free memory plus reclaimable caches), else the free physical pages ``os.sysconf`` reports.

    Args:
        device: a ``torch.device`` or its name ("cpu", "cuda:0", ...).
    Returns:
        Bytes (int), or None for other device types or where the OS does not tell.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure: ``MemoryError``, ``torch.OutOfMemoryError`` (CUDA) or the CPU
    allocator's ``RuntimeError`` ("DefaultCPUAllocator: can't allocate memory").

    Args:
        err: any exception.
    Returns:
        bool.
    """
    if isinstance(err, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    return isinstance(err, RuntimeError) and ("can't allocate memory" in str(err) or "out of memory" in str(err))


def note_out_of_memory(err: BaseException, where: str) -> None:
    """Add to an allocation failure (:func:`is_out_of_memory`) a note saying where it happened, that the model is
    unchanged, and what to change; the exception keeps its type (code that catches it still does). Python < 3.11
    (no ``add_note``): nothing is added.

    Args:
        err: the exception being raised. where: e.g. ``"step 2/4"``.
    """
    if not is_out_of_memory(err) or not hasattr(err, "add_note"):
        return
    if any(note.startswith(_ACTIVATIONS) for note in getattr(err, "__notes__", ())):  # the advice is said there
        err.add_note(f"woodfisher: out of memory in {where}; the model is unchanged (weights restored)")
        return
    err.add_note(f"woodfisher: out of memory in {where}; the model is unchanged (weights restored). The memory "
                 "plan (woodfisher.plan.plan_memory) counts gradients, inverses and their working buffers but not "
                 "the model's activations for the samples in flight, nor other programs' memory: pass "
                 "memory_budget=<bytes> below the free memory (the gradients are then streamed), fewer gradients "
                 "per step (a smaller num_grads, or more num_steps) or a smaller block_size")


_ACTIVATIONS = "woodfisher: the per-sample gradients of a single"


def note_activations_too_large(err: BaseException, samples: int) -> None:
    """Add to an allocation failure of the per-sample gradients of one gradient's ``samples`` (the smallest chunk
    the collector can compute) a note that no option of the memory plan helps: one sample's activations do not fit.

    Args:
        err: the exception being raised. samples: the samples of one gradient (``fisher_batch_size``).
    """
    if not is_out_of_memory(err) or not hasattr(err, "add_note"):
        return
    fewer = f"; fisher_batch_size=1 (now {samples}) computes one sample at a time" if samples > 1 else ""
    err.add_note(f"{_ACTIVATIONS} gradient ({samples} sample(s)) ran out of memory, the smallest chunk the "
                 "collector computes: the model's forward and backward on one gradient's samples do not fit, "
                 "and memory_budget, num_grads or block_size do not change that; use smaller inputs, free memory "
                 f"held elsewhere, or a device with more memory{fewer}")


@contextmanager
def host_allocations():
    """Context: tensors created inside are host memory (not counted by a :class:`TensorMemoryMeter`).

    Yields:
        None; nesting is allowed.
    """
    _HOST_DEPTH[0] += 1
    try:
        yield
    finally:
        _HOST_DEPTH[0] -= 1


def _storage_ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, meta, subclasses)
        return 0


class TensorMemoryMeter(TorchDispatchMode):
    """``with TensorMemoryMeter() as meter: ...`` then ``meter.peak`` (bytes).

    Attributes:
        peak: largest number of bytes of counted storages alive at once.
        current: bytes of counted storages alive now.
    """

    def __init__(self):
        super().__init__()
        self.live: Dict[int, List[int]] = {}   # storage pointer -> [bytes, tensors referencing it]
        self.current = 0
        self.peak = 0

    def _release(self, ptr: int) -> None:
        rec = self.live.get(ptr)
        if rec is None:
            return
        rec[1] -= 1
        if rec[1] == 0:
            self.current -= rec[0]
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            ptr = _storage_ptr(t)
            if ptr == 0:
                continue
            rec = self.live.get(ptr)
            if rec is None:
                if _HOST_DEPTH[0]:
                    continue
                inputs = {_storage_ptr(a) for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
                if ptr in inputs:  # a view or in-place result of a storage made outside the meter
                    continue
                rec = self.live[ptr] = [t.untyped_storage().nbytes(), 0]
                self.current += rec[0]
                self.peak = max(self.peak, self.current)
            rec[1] += 1
            weakref.finalize(t, self._release, ptr)
        return out
