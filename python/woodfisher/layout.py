"""How a weight is cut into Fisher blocks: the canonical layout shared by every pruned weight.

Blocks: a weight is laid out in *canonical* (out, in, *kernel) order (``Conv1D`` weights
are transposed), flattened row-major (``numel``) and cut into blocks of ``c``
consecutive entries with :func:`woodfisher_kernels.to_blocks`; a block never spans two
targets and the zero padding of the last block is never pruned. Rows (output channels)
are contiguous, which the "rows" and N:M patterns rely on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import woodfisher_kernels as wk

__all__ = ["BlockLayout", "Layout"]


class BlockLayout:
    """How a weight of ``shape`` / ``kind`` is cut into blocks of ``block_size`` (mixin).

    Subclasses provide ``shape``, ``kind`` and ``block_size``.
    """

    shape: torch.Size
    kind: str
    block_size: int

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def num_blocks(self) -> int:
        return wk.num_blocks(self.numel, self.block_size)

    @property
    def out_features(self) -> int:
        """Rows (output channels / features) of the canonical layout."""
        return self.shape[1] if self.kind == "conv1d_hf" else self.shape[0]

    @property
    def row_length(self) -> int:
        """Entries per output row / filter: ``numel // out``."""
        return self.numel // self.out_features

    def canonical(self, x: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:
        """Weight-shaped ``x`` (with ``batch_dims`` leading dims) -> canonical (out, in, ...) order, flat."""
        lead = x.shape[:batch_dims]
        x = x.reshape(*lead, *self.shape)
        if self.kind == "conv1d_hf":
            x = x.transpose(-1, -2)
        return x.reshape(*lead, self.numel)

    def from_canonical(self, flat: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`canonical` for one weight: (numel,) -> weight shape."""
        if self.kind == "conv1d_hf":
            return flat.reshape(self.shape[1], self.shape[0]).T
        return flat.reshape(self.shape)

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Weight-shaped tensor -> (B, c) in canonical order, zero (False) padded."""
        flat = self.canonical(x)
        if flat.dtype == torch.bool:
            return wk.to_blocks(flat.to(torch.uint8), self.block_size).bool()
        return wk.to_blocks(flat, self.block_size)

    def grad_blocks(self, grads: torch.Tensor) -> torch.Tensor:
        """Gradients (m, *shape) or (m, numel) -> (B, m, c) contiguous, the layout of the kernel ops."""
        flat = self.canonical(grads, batch_dims=1)
        return wk.to_blocks(flat, self.block_size).transpose(0, 1).contiguous()

    def unblock(self, xb: torch.Tensor) -> torch.Tensor:
        """(B, c) -> weight shape, dropping the padding."""
        return self.from_canonical(wk.from_blocks(xb, self.numel))


@dataclass(frozen=True)
class Layout(BlockLayout):
    """The layout of one weight without the weight: name, shape, kind, block size."""

    name: str
    shape: torch.Size
    kind: str
    block_size: int
