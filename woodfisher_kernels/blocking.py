"""Cutting flat parameter vectors into fixed-size blocks, zero-padding the last one."""
from __future__ import annotations

import torch

from ._checks import check_int


def num_blocks(numel: int, block_size: int) -> int:
    """Blocks needed for ``numel`` entries: ceil(numel / block_size).

    Args:
        numel: number of entries d. block_size: c (>= 1).
    Returns:
        B, an int.
    Raises:
        ValueError: ``numel`` not an integer >= 0 or ``block_size`` not an integer >= 1
            (Python, numpy or one-element integer tensors; floats and bools are refused).
    """
    numel, block_size = check_int("numel", numel, 0), check_int("block_size", block_size, 1)
    return -(-numel // block_size)


def to_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cut the last dimension into blocks of ``block_size``, zero-padding the last block.

    Zero-padded gradient entries keep padded coordinates decoupled from real ones
    in ``damp I + G^T G / N``, so padding never changes the real entries' inverse
    (the block-wise approximation of the WoodFisher paper, Sec. 3.2).

    Args:
        x: (..., d) tensor, any dtype and device.
        block_size: c (>= 1).
    Returns:
        (..., B, c) with B = ceil(d / c) (a view of a contiguous ``x`` when c divides d).
    Raises:
        ValueError: ``x`` not a tensor with at least one dimension, or ``block_size`` not an
            integer >= 1 (from :func:`num_blocks`).
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor with at least one dimension (..., d), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    block_size = check_int("block_size", block_size, 1)
    nb = num_blocks(x.shape[-1], block_size)
    pad = nb * block_size - x.shape[-1]
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], nb, block_size)


def from_blocks(xb: torch.Tensor, numel: int) -> torch.Tensor:
    """Undo :func:`to_blocks`, dropping the padding.

    Args:
        xb: (..., B, c) tensor. numel: the original d (<= B c).
    Returns:
        (..., numel).
    Raises:
        ValueError: ``xb`` not a tensor with at least two dimensions, or ``numel`` not an
            integer in [0, B c].
    """
    if not isinstance(xb, torch.Tensor) or xb.dim() < 2:
        raise ValueError(f"xb must be a blocked tensor (..., B, c), got "
                         f"{tuple(xb.shape) if isinstance(xb, torch.Tensor) else type(xb).__name__}")
    total = xb.shape[-2] * xb.shape[-1]
    numel = check_int("numel", numel, 0)
    if numel > total:
        raise ValueError(f"numel must be <= B * c = {total} for xb of shape {tuple(xb.shape)}, got {numel}")
    return xb.reshape(*xb.shape[:-2], -1)[..., :numel]


def valid_mask(numel: int, block_size: int, device=None) -> torch.Tensor:
    """Which blocked entries are real (never prune the padding).

    Args:
        numel: d. block_size: c (>= 1). device: of the result.
    Returns:
        (B, c) bool: True on real entries, False on padding.
    Raises:
        ValueError: ``numel`` not an integer >= 0 or ``block_size`` not an integer >= 1
            (from :func:`num_blocks`).
    """
    nb = num_blocks(numel, block_size)
    numel, block_size = int(numel), int(block_size)
    return (torch.arange(nb * block_size, device=device) < numel).view(nb, block_size)
