"""The :class:`Batch` container: one loader item as the model and the loss see it (``args``, ``kwargs``, ``target``).

How loader items become batches (adapters, checks, messages) is :mod:`woodfisher.batches`; which dim of a leaf
holds the samples is :mod:`woodfisher.batch_dims`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from .batch_dims import BatchDimError, same_leaf, unbatched_message

__all__ = ["Batch"]


@dataclass
class Batch:
    """One batch as the model and the loss see it.

    Attributes:
        args: positional inputs of ``model(*args, **kwargs)``.
        kwargs: keyword inputs.
        target: the loss target, or None (the model computes its loss, or unlabelled data).
    """

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    target: Any = None

    def _leaves(self):
        return pytree.tree_flatten((self.args, self.kwargs, self.target))

    @property
    def size(self) -> int:
        """Samples in the batch: the leading dim of the first tensor input."""
        first = self.args[0] if self.args else None
        if isinstance(first, torch.Tensor) and first.dim() >= 1:  # the common case, without a tree walk
            return int(first.shape[0])
        for leaf in pytree.tree_leaves((self.args, self.kwargs)):
            if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1:
                return int(leaf.shape[0])
        raise ValueError("a batch must hold at least one input tensor with a batch dimension")

    def batched(self) -> Any:
        """Which leaves carry the batch dimension.

        Returns:
            Pytree of (args, kwargs, target) with True where a leaf is a tensor whose dim 0 is :attr:`size`.
        """
        n = self.size
        return pytree.tree_map(lambda x: isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == n,
                               (self.args, self.kwargs, self.target))

    def map_batched(self, fn: Callable[[torch.Tensor], Any]) -> "Batch":
        """Apply ``fn`` to every batched leaf (others are kept).

        Args:
            fn: tensor (n, ...) -> tensor.
        Returns:
            A new :class:`Batch`.
        """
        flags = pytree.tree_leaves(self.batched())
        leaves, spec = self._leaves()
        out = [fn(x) if f else x for x, f in zip(leaves, flags)]
        args, kwargs, target = pytree.tree_unflatten(out, spec)
        return Batch(tuple(args), dict(kwargs), target)

    def to(self, device) -> "Batch":
        """Move every tensor leaf to ``device``.

        Args:
            device: a ``torch.device`` or its name.
        Returns:
            A new :class:`Batch`.
        """
        leaves, spec = self._leaves()
        out = [x.to(device) if isinstance(x, torch.Tensor) else x for x in leaves]
        args, kwargs, target = pytree.tree_unflatten(out, spec)
        return Batch(tuple(args), dict(kwargs), target)

    def take(self, start: int, stop: int) -> "Batch":
        """Samples ``start:stop`` of every batched leaf.

        Args:
            start, stop: sample indices (Python slice semantics).
        Returns:
            A new :class:`Batch` of ``stop - start`` samples (fewer at the end).
        """
        return self.map_batched(lambda x: x[start:stop])

    @staticmethod
    def cat(batches: "list[Batch]") -> "Batch":
        """Concatenate batches of the same structure along the batch dim.

        Args:
            batches: non-empty list of :class:`Batch` with the same pytree structure and per-sample shapes.
        Returns:
            One :class:`Batch` (the only one when the list has one).
        Raises:
            ValueError: batches of different structures or per-sample shapes.
        """
        if len(batches) == 1:
            return batches[0]
        first_leaves, spec = batches[0]._leaves()
        flags = pytree.tree_leaves(batches[0].batched())
        columns = [[x] for x in first_leaves]
        for b in batches[1:]:
            leaves, other = b._leaves()
            if other != spec:
                raise ValueError("consecutive batches have different structures; cannot group their samples")
            for col, x in zip(columns, leaves):
                col.append(x)
        out = []
        for index, (col, batched) in enumerate(zip(columns, flags)):
            if not batched:
                if any(not same_leaf(x, col[0]) for x in col[1:]):
                    raise BatchDimError(unbatched_message(batches[0], index))
                out.append(col[0])
                continue
            if any(x.shape[1:] != col[0].shape[1:] for x in col):
                raise ValueError(f"consecutive batches hold samples of different shapes "
                                 f"({[tuple(x.shape[1:]) for x in col]}); a Fisher gradient over several samples "
                                 "(fisher_batch_size > 1) needs them in one batch: use fisher_batch_size "
                                 "dividing the loader's batch size, or pad the samples")
            out.append(torch.cat(col))
        args, kwargs, target = pytree.tree_unflatten(out, spec)
        return Batch(tuple(args), dict(kwargs), target)

    def without_target(self) -> "Batch":
        """The same inputs with the target (and a dict's ``labels``) removed.

        Returns:
            A new :class:`Batch` with ``target=None``.
        """
        kwargs = {k: v for k, v in self.kwargs.items() if k != "labels"}
        return Batch(self.args, kwargs, None)
