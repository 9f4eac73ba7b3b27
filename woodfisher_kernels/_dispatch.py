"""Backend registry and selection: ``"auto" | "cuda" | "triton" | "torch"``.

Backends register implementations with :func:`register`; public ops look them up
with :func:`select`. ``auto`` picks the CUDA extension for CUDA float32 tensors
when it is built, else Triton on CUDA, else torch. Triton also runs on CPU
tensors under ``TRITON_INTERPRET=1`` (used by the CPU test suite).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional

import torch

BACKENDS = ("auto", "cuda", "triton", "torch")
_REGISTRY: Dict[str, Dict[str, Callable]] = {}
_LIMITS: Dict[tuple, Callable[[], int]] = {}
_LOADED = False


def register(op: str, backend: str, fn: Callable, max_block_size: Optional[Callable[[], int]] = None) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op``.

    ``max_block_size`` (optional) returns the largest block size c the implementation
    handles on the current device; ``auto`` skips it for larger blocks.
    """
    _REGISTRY.setdefault(op, {})[backend] = fn
    if max_block_size is not None:
        _LIMITS[(op, backend)] = max_block_size


def _fits(op: str, backend: str, x: torch.Tensor) -> bool:
    limit = _LIMITS.get((op, backend))
    return limit is None or x.shape[-1] <= limit()


def _load_backends() -> None:
    """Import optional backends once; each registers what it can run."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from . import _cuda, _triton  # noqa: F401  (import for registration side effects)


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(op: str) -> tuple:
    """Backends that have an implementation of ``op`` in this process."""
    _load_backends()
    return tuple(b for b in ("cuda", "triton", "torch") if b in _REGISTRY.get(op, {}))


def select(op: str, backend: str, x: torch.Tensor) -> Callable:
    """Return the implementation of ``op`` for ``backend`` on tensors like ``x``.

    Raises ``ValueError`` (naming ``backend``) when the request cannot be honoured.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _load_backends()
    impls = _REGISTRY.get(op, {})
    if backend == "auto":
        if x.is_cuda and x.dtype == torch.float32:
            for name in ("cuda", "triton"):
                if name in impls and _fits(op, name, x):
                    return impls[name]
        return impls["torch"]
    if backend not in impls:
        raise ValueError(
            f"backend={backend!r} is not available for {op} in this installation "
            f"(available: {available(op)})"
        )
    if backend in ("cuda", "triton"):
        if x.dtype != torch.float32:
            raise ValueError(f"backend={backend!r} supports float32 only, got {x.dtype}")
        if backend == "cuda" and not x.is_cuda:
            raise ValueError(f"backend='cuda' needs CUDA tensors, got device {x.device}")
        if backend == "triton" and not x.is_cuda and not triton_interpret():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got device {x.device}"
            )
    if not _fits(op, backend, x):
        raise ValueError(f"backend={backend!r} handles block sizes up to "
                         f"{_LIMITS[(op, backend)]()}, got {x.shape[-1]}")
    return impls[backend]
