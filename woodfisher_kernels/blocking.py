"""Cutting flat parameter vectors into fixed-size blocks, zero-padding the last one."""
from __future__ import annotations

import torch


def num_blocks(numel: int, block_size: int) -> int:
    """Blocks needed for ``numel`` entries: ceil(numel / block_size)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return -(-int(numel) // int(block_size))


def to_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(..., d) -> (..., B, c) with B = ceil(d / c); the padding is zeros.

    Zero-padded gradient entries keep padded coordinates decoupled from real ones
    in ``damp I + G^T G / N``, so padding never changes the real entries' inverse.
    """
    nb = num_blocks(x.shape[-1], block_size)
    pad = nb * block_size - x.shape[-1]
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], nb, block_size)


def from_blocks(xb: torch.Tensor, numel: int) -> torch.Tensor:
    """(..., B, c) -> (..., numel), dropping the padding."""
    return xb.reshape(*xb.shape[:-2], -1)[..., :numel]


def valid_mask(numel: int, block_size: int, device=None) -> torch.Tensor:
    """(B, c) bool: True on real entries, False on padding (never prune those)."""
    nb = num_blocks(numel, block_size)
    return (torch.arange(nb * block_size, device=device) < numel).view(nb, block_size)
