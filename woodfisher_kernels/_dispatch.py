"""Backend selection: one table of ops, one table of backends.

``OPS`` lists the ops that have fast implementations; ``BACKENDS`` maps a backend name
to the module that implements them. A backend module has no import-time side effects
and exposes:

- ``IMPLS``: ``{op name: callable}`` with the signature of the torch reference
  (:mod:`woodfisher_kernels.reference`);
- ``available() -> bool``: whether it can run in this process (cheap after the first call);
- ``max_block_size(op) -> int | None`` (optional): largest block size c it handles on the
  current device (None = no limit).

Backend modules are imported lazily, on the first call that needs them. ``auto`` ranks the
available backends with the cost model of :mod:`._cost` for CUDA float32 tensors, uses the
fused C kernel (``cpu``, when built) for CPU float32 tensors within its block-size limit,
and torch otherwise. Triton also runs on CPU tensors under ``TRITON_INTERPRET=1``
(used by the CPU test suite).
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Callable, Dict, Optional

import torch

from . import _cost

OPS = ("woodbury_update_", "fisher_inverse", "obs_saliency", "obs_update", "lowrank_factor")
BACKENDS: Dict[str, str] = {  # name -> module, in order of preference
    "cuda": "woodfisher_kernels._cuda",
    "triton": "woodfisher_kernels._triton",
    "cpu": "woodfisher_kernels._cpu",
    "torch": "woodfisher_kernels.reference",
}
CHOICES = ("auto",) + tuple(BACKENDS)
_MODULES: Dict[str, Optional[ModuleType]] = {}


def backend_module(name: str) -> Optional[ModuleType]:
    """The module of backend ``name`` when it can run here, else None (imported once)."""
    if name not in _MODULES:
        module = importlib.import_module(BACKENDS[name])
        usable = getattr(module, "available", lambda: True)()
        _MODULES[name] = module if usable else None
    return _MODULES[name]


def implementations(op: str) -> Dict[str, Callable]:
    """{backend: implementation of ``op``} for the backends available in this process."""
    out = {}
    for name in BACKENDS:
        module = backend_module(name)
        if module is not None and op in module.IMPLS:
            out[name] = module.IMPLS[op]
    return out


def max_block_size(op: str, backend: str) -> Optional[int]:
    """Largest block size ``backend`` handles for ``op`` here (None = no limit)."""
    module = backend_module(backend)
    limit = getattr(module, "max_block_size", None) if module is not None else None
    return None if limit is None else limit(op)


def _fits(op: str, backend: str, x: torch.Tensor) -> bool:
    limit = max_block_size(op, backend)
    return limit is None or x.shape[-1] <= limit


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(op: str) -> tuple:
    """Backends that have an implementation of ``op`` in this process.

    Args:
        op: "woodbury_update_" | "fisher_inverse" | "obs_saliency" | "obs_update" |
            "lowrank_factor" (an unknown name has no backend).
    Returns:
        Tuple of backend names ("cuda", "triton", "cpu", "torch"), in order of preference.
    """
    return tuple(implementations(op))


def select(op: str, backend: str, x: torch.Tensor, num_grads: Optional[int] = None) -> Callable:
    """Return the implementation of ``op`` for ``backend`` on tensors like ``x``.

    ``x`` is the (B, c, c) inverse or the (B, m, c) gradients; ``num_grads`` is the k of
    an update (for the cost model). Raises ``ValueError`` (naming ``backend``) when the
    request cannot be honoured.
    """
    if backend not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {backend!r}")
    if backend == "auto":
        if x.is_cuda and x.dtype == torch.float32:
            impls = implementations(op)
            fitting = [name for name in impls if _fits(op, name, x)]
            ranked = _cost.rank(op, tuple(x.shape), num_grads, x.device, fitting)
            if ranked:
                return impls[ranked[0]]
        elif x.device.type == "cpu" and x.dtype == torch.float32:
            cpu = backend_module("cpu")            # only the CPU backends are imported (not Triton: ~1 s)
            if cpu is not None and op in cpu.IMPLS and _fits(op, "cpu", x):
                return cpu.IMPLS[op]
        return backend_module("torch").IMPLS[op]
    impls = implementations(op)
    if backend not in impls:
        raise ValueError(
            f"backend={backend!r} is not available for {op} in this installation "
            f"(available: {tuple(impls)})"
        )
    if backend in ("cuda", "triton", "cpu"):
        if x.dtype != torch.float32:
            raise ValueError(f"backend={backend!r} supports float32 only, got {x.dtype}")
        if backend == "cpu" and x.device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got device {x.device}")
        if backend == "cuda" and not x.is_cuda:
            raise ValueError(f"backend='cuda' needs CUDA tensors, got device {x.device}")
        if backend == "triton" and not x.is_cuda and not triton_interpret():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got device {x.device}"
            )
    if not _fits(op, backend, x):
        raise ValueError(f"backend={backend!r} handles block sizes up to "
                         f"{max_block_size(op, backend)}, got {x.shape[-1]}")
    return impls[backend]
