"""Which dim of a batch's tensors holds its samples: dim 0, checked (:mod:`woodfisher.batches`).

Per-sample gradients split every input and the target along dim 0, the batch dim read from the
first input (:attr:`woodfisher.Batch.size`); a tensor whose dim 0 is not the batch size is passed
whole to every sample (a shared input). These helpers refuse what that reading would get wrong
silently (a target that cannot be split, a "shared" tensor that differs between loader items),
name the tensors in messages, and recognise the lengths of padded sequences in ``(x, lengths, y)``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["BatchDimError", "BATCH_DIM_FIX", "check_batch_dims", "describe_leaf", "lengths_like", "leaf_label",
           "same_leaf", "unbatched_message", "unsplit_inputs"]

#: What to do about a tensor that does not hold its samples on dim 0 (the end of the messages below).
BATCH_DIM_FIX = ("every per-sample tensor must hold its samples on dim 0, the batch dim read from the first input "
                 "(dim 0 of a time-major (T, B, C) sequence or of an RNN's (layers, B, H) initial state is not): "
                 "give the model batch-first tensors (e.g. a wrapper whose forward transposes them back)")


class BatchDimError(ValueError):
    """A batch whose samples are not on dim 0 (raised as it is through the loader-error wrapping: the message
    already names the tensor or layer and the fix)."""


def _is_tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


def describe_leaf(x) -> str:
    """``"float32(8, 10, 5)"`` for a tensor, the type name otherwise."""
    if _is_tensor(x):
        return f"{str(x.dtype).replace('torch.', '')}{tuple(x.shape)}"
    return type(x).__name__


def _first_input(batch) -> Any:
    return next((leaf for leaf in pytree.tree_leaves((batch.args, batch.kwargs))
                 if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1), None)


def same_leaf(x, first) -> bool:
    """Whether a leaf of a later loader item equals the first item's (a leaf shared by every sample)."""
    if x is first:
        return True
    if _is_tensor(x) and _is_tensor(first):
        return x.shape == first.shape and x.dtype == first.dtype and bool(torch.equal(x, first.to(x.device)))
    try:
        return bool(x == first)
    except Exception:  # noqa: BLE001 - objects without a plain equality: not provably the same
        return False


def leaf_label(batch: Any, index: int) -> str:
    """``"args[1] float32(1, 8, 12)"``: where leaf ``index`` of ``(args, kwargs, target)`` is, and its shape."""
    paths = pytree.tree_flatten_with_path((batch.args, batch.kwargs, batch.target))[0]
    path, leaf = paths[index]
    where = ("args", "kwargs", "target")[path[0].idx]
    rest = "".join(str(k) for k in path[1:])
    shape = f" {describe_leaf(leaf)}" if _is_tensor(leaf) else ""
    return f"{where}{rest}{shape}"


def unbatched_message(first: Any, index: int) -> str:
    """Why :meth:`woodfisher.Batch.cat` refuses leaf ``index`` of the first item ``first``: not batched, and not the
    same in every loader item."""
    return (f"loader: {leaf_label(first, index)} has no dim 0 of the batch size ({first.size} samples, dim 0 of "
            f"the first input), so it would be passed whole to every sample, but it differs between loader items "
            f"(a per-sample tensor whose batch dim is not dim 0, or a target that cannot be split per sample, "
            f"such as CTC targets concatenated over the batch: pad them to (B, S)); {BATCH_DIM_FIX}")


def check_batch_dims(batch: Any) -> None:
    """Refuse a batch whose target cannot be split into its samples along dim 0.

    Per-sample gradients take sample i of every input and of the target at index i of dim 0; a target
    tensor (or a tensor inside a target tuple / dict) with another leading size would give every sample
    the whole batch's target, silently (a time-major ``(T, B, C)`` input with a ``(B,)`` target reads
    the T time steps as the samples).

    Args:
        batch: one loader item as a :class:`woodfisher.Batch`.
    Raises:
        BatchDimError (a ValueError): naming the loader, the tensor and the batch size read from the inputs.
    """
    if batch.target is None:
        return
    n = batch.size
    target = batch.target
    if isinstance(target, torch.Tensor) and (target.dim() == 0 or target.shape[0] == n):  # without a tree walk
        return
    leaves = pytree.tree_leaves(target)
    if all(not _is_tensor(t) or t.dim() == 0 or t.shape[0] == n for t in leaves):
        return
    bad = next(t for t in leaves if _is_tensor(t) and t.dim() >= 1 and t.shape[0] != n)
    first = _first_input(batch)
    raise BatchDimError(f"loader: the target holds {describe_leaf(bad)}, whose dim 0 is not the batch size {n} "
                        f"(dim 0 of the first input {describe_leaf(first)}), so it cannot be split into per-sample "
                        f"targets; {BATCH_DIM_FIX}; CTC targets concatenated over the batch: pad them to (B, S) and "
                        f"pass their lengths beside them")


def unsplit_inputs(batch: Any) -> list:
    """The input tensors of ``batch`` (not the target) that are not split into its samples, for messages."""
    flags = pytree.tree_leaves(batch.batched())
    leaves = batch._leaves()[0]
    inputs = len(pytree.tree_leaves((batch.args, batch.kwargs)))
    return [leaf_label(batch, i) for i, (leaf, flag) in enumerate(zip(leaves, flags))
            if i < inputs and not flag and _is_tensor(leaf) and leaf.dim() >= 1]


def lengths_like(y: torch.Tensor, first: torch.Tensor) -> bool:
    """Whether integer ``y`` (B,) reads as the lengths of the padded sequences ``first``: all >= 1, the longest
    equal to one of its non-batch dims (padding to the longest in the batch)."""
    if y.is_floating_point() or y.dtype == torch.bool or y.dim() != 1 or not y.numel() or first.dim() < 2:
        return False
    return int(y.min()) >= 1 and int(y.max()) in tuple(first.shape[1:])
