"""Input validation shared by every public op.

Every check raises ``ValueError`` naming the offending argument, and runs before
any output (or in-place target) is touched, so a refused call changes nothing.
"""
from __future__ import annotations

import math
import numbers
import operator

import torch

FLOAT_DTYPES = (torch.float32, torch.float64)


def check_tensor(name: str, x, ndim: int, dtypes=FLOAT_DTYPES, finite: bool = False) -> None:
    """Check that ``x`` is a tensor of ``ndim`` non-empty dims with an allowed dtype.

    ``finite=True`` also refuses NaN/Inf; ops call :func:`check_finite` last instead,
    after every cheap structural check.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if any(s == 0 for s in x.shape):
        raise ValueError(f"{name} has an empty dimension: shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d) for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({names}), got {x.dtype}")
    if finite:
        check_finite(name, x)


def check_finite(name: str, x: torch.Tensor) -> None:
    """Refuse NaN / Inf entries (a device sync on GPU).

    One read of ``x`` for its sum, which is finite unless an entry is not (or the sum
    overflows: only then the exact entrywise test runs), instead of the several passes
    and temporaries of ``isfinite(x).all()``.
    """
    if not x.is_floating_point() or bool(torch.isfinite(x.sum())):
        return
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def check_all_finite(enabled: bool, **tensors) -> None:
    """:func:`check_finite` on every tensor given by keyword (None skipped) when ``enabled``."""
    if enabled:
        for name, x in tensors.items():
            if x is not None:
                check_finite(name, x)


def check_same(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor, shape=None) -> None:
    """Check device, dtype and (optionally) shape of ``x`` against ``ref``."""
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")
    if x.is_floating_point() and x.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {x.dtype} but {ref_name} has dtype {ref.dtype}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def _is_number(value, kind) -> bool:
    """An instance of ``kind`` (``numbers.Real`` / ``numbers.Integral``: Python and numpy scalars), not a bool."""
    return isinstance(value, kind) and not isinstance(value, bool)


def check_positive(name: str, value) -> float:
    """Check a finite, strictly positive scalar and return it as a float."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if not _is_number(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_int(name: str, value, minimum: int = 0) -> int:
    """Check an integer >= ``minimum`` (Python, numpy or a one-element integer tensor; not a bool
    or a float) and return it as an int."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if not _is_number(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    value = operator.index(value)
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def check_choice(name: str, value, choices) -> None:
    """Check that ``value`` is one of ``choices`` (a tuple of names)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_flag(name: str, value) -> bool:
    """Check a bool flag (``"no"`` or 0 would silently read as a truth value) and return it."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_writable(name: str, x: torch.Tensor) -> None:
    """Refuse an in-place target whose entries share memory (an ``expand``-ed tensor, stride 0).

    Sufficient test: the dimensions of size > 1, sorted by stride, must each step past the
    largest offset the previous ones reach.
    """
    span = 1
    for stride, size in sorted((st, sz) for sz, st in zip(x.shape, x.stride()) if sz > 1):
        if stride < span:
            raise ValueError(f"{name} is written in place but its entries share memory (strides {x.stride()} "
                             f"for shape {tuple(x.shape)}, e.g. an expand()-ed tensor): pass {name}.clone()")
        span += stride * (size - 1)


def check_square_blocks(name: str, inv: torch.Tensor) -> None:
    """Check a (B, c, c) batch of square blocks."""
    check_tensor(name, inv, 3)
    if inv.shape[1] != inv.shape[2]:
        raise ValueError(f"{name} must hold square blocks (B, c, c), got shape {tuple(inv.shape)}")


def check_mask(name: str, mask: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Check a boolean mask with the same shape and device as ``ref``."""
    check_tensor(name, mask, ref.dim(), dtypes=(torch.bool,), finite=False)
    if mask.device != ref.device:
        raise ValueError(f"{name} is on {mask.device} but {ref_name} is on {ref.device}")
    if tuple(mask.shape) != tuple(ref.shape):
        raise ValueError(f"{name} must have shape {tuple(ref.shape)}, got {tuple(mask.shape)}")


def check_index(name: str, index: torch.Tensor, num_blocks: int, device) -> None:
    """Check a (B, G, q) int64 / int32 index tensor on ``device`` (entries: :func:`check_index_range`)."""
    check_tensor(name, index, 3, dtypes=(torch.int64, torch.int32), finite=False)
    if index.device != device:
        raise ValueError(f"{name} is on {index.device} but the blocks are on {device}")
    if index.shape[0] != num_blocks:
        raise ValueError(f"{name} must have {num_blocks} blocks in dim 0, got shape {tuple(index.shape)}")


def check_index_range(name: str, index: torch.Tensor, block_size: int) -> None:
    """Check that every entry of ``index`` lies in [0, block_size) (reads the tensor)."""
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or hi >= block_size:
        raise ValueError(f"{name} entries must lie in [0, {block_size}), got range [{lo}, {hi}]")
