"""How a weight is cut into Fisher blocks: the canonical layout shared by every pruned weight.

Blocks: a weight is laid out in *canonical* (out, in, *kernel) order (``Conv1D`` weights
are transposed), flattened row-major (``numel``) and cut into blocks of ``c``
consecutive entries with :func:`woodfisher_kernels.to_blocks`; a block never spans two
targets and the zero padding of the last block is never pruned. Rows (output channels)
are contiguous, which the "rows" and N:M patterns rely on.

Conv weights pruned with an N:M pattern (``channels_last=True``) are laid out in
(out, *kernel, in) order instead: the N:M runs of M consecutive entries are then M
consecutive input channels at one (out, kernel position), the order of the 2:4 sparse
tensor cores (a convolution as an implicit GEMM with K = (*kernel, in), NVIDIA ASP /
cuSPARSELt). Weights, per-sample gradients and masks all go through :meth:`BlockLayout.canonical`,
so their blocks stay aligned in either order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import woodfisher_kernels as wk

__all__ = ["BlockLayout", "Layout"]


class BlockLayout:
    """How a weight of ``shape`` / ``kind`` is cut into blocks of ``block_size`` (mixin).

    Subclasses provide ``shape``, ``kind``, ``block_size`` and ``channels_last`` (conv weights in
    (out, *kernel, in) order, set for N:M patterns only; see the module docstring).
    """

    shape: torch.Size
    kind: str
    block_size: int
    channels_last: bool

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
        """Weight-shaped ``x`` (with ``batch_dims`` leading dims) -> canonical order, flat: (out, in, *kernel),
        or (out, *kernel, in) with ``channels_last``."""
        lead = x.shape[:batch_dims]
        x = x.reshape(*lead, *self.shape)
        if self.kind == "conv1d_hf":
            x = x.transpose(-1, -2)
        elif self.channels_last:
            x = x.movedim(batch_dims + 1, -1)
        return x.reshape(*lead, self.numel)

    def from_canonical(self, flat: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`canonical` for one weight: (numel,) -> weight shape."""
        if self.kind == "conv1d_hf":
            return flat.reshape(self.shape[1], self.shape[0]).T
        if self.channels_last:
            return flat.reshape(self.shape[0], *self.shape[2:], self.shape[1]).movedim(-1, 1).contiguous()
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
    """The layout of one weight without the weight: name, shape, kind, block size, order."""

    name: str
    shape: torch.Size
    kind: str
    block_size: int
    channels_last: bool = False
