"""Helpers for tests and benchmarks: one backend's implementation, and float64 references.

Public and stable, so test suites and benchmark scripts never import private modules:

- :func:`implementation` (op, backend) -> the backend's own function (no validation,
  no failure handling), :func:`backends` (op) -> the backends available here;
- :func:`dense_fisher`, :func:`dense_inverse`: float64 ``F = damp I + G^T G / N`` and
  its ``torch.linalg.inv`` (good while kappa stays below ~1e8: a dense float64
  inverse is itself off by eps64 * kappa and by up to 100% at kappa ~ 1e16);
- :func:`svd_inverse`: float64 reference built from the SVD of the gradients, accurate
  at any kappa (no cancellation; see its docstring), with the exact kappa;
- :func:`diag_error`, :func:`spectral_error`: the per-block relative errors that the
  stated bound (:func:`woodfisher_kernels.error_bound`) is about;
- :func:`precision_cases`, :func:`synthetic_grads`, :func:`build_inverse`: the precision
  table (tests/test_precision_table.py, benchmarks/precision_table.py) and its three
  ways of building an inverse (one-shot, streaming, low-rank).

Shapes: B blocks of size c, m gradients per block.
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterator, NamedTuple, Optional, Tuple

import torch

from . import _dispatch
from .ops import fisher_inverse, lowrank_inverse, woodbury_update_

#: Backends with their own low-rank factor (the others build the low-rank form with torch).
LOWRANK_BACKENDS = ("torch", "cpu")

__all__ = ["LOWRANK_BACKENDS", "implementation", "backends",
            "dense_fisher", "dense_inverse", "SvdReference", "svd_inverse",
           "diag_error", "spectral_error", "precision_cases", "synthetic_grads", "build_inverse", "FORMS"]

FORMS = ("build", "stream", "lowrank")


def backends(op: str) -> Tuple[str, ...]:
    """Backends with an implementation of ``op`` in this process.

    Args:
        op: one of ``_dispatch.OPS`` ("woodbury_update_", "fisher_inverse", "obs_saliency",
            "obs_update", "lowrank_factor").
    Returns:
        Tuple of names among "cuda", "triton", "cpu", "torch".
    Raises:
        ValueError: an unknown ``op``.
    """
    if op not in _dispatch.OPS:
        raise ValueError(f"op must be one of {_dispatch.OPS}, got {op!r}")
    return _dispatch.available(op)


def implementation(op: str, backend: str) -> Callable:
    """The raw implementation of ``op`` in ``backend``, with the signature of :mod:`woodfisher_kernels.reference`.

    Inputs must be contiguous and valid (float32 for cuda / triton): nothing is checked.

    Args:
        op: "fisher_inverse" | "woodbury_update_" | "obs_saliency" | "obs_update" | "lowrank_factor".
        backend: "cuda" | "triton" | "cpu" | "torch".
    Returns:
        The callable.
    Raises:
        ValueError: an unknown ``op``, or a backend without an implementation here.
    """
    found = _dispatch.implementations(op) if op in _dispatch.OPS else {}
    if op not in _dispatch.OPS or backend not in found:
        raise ValueError(f"no implementation of op={op!r} for backend={backend!r} here "
                         f"(ops: {_dispatch.OPS}; backends available: {tuple(found)})")
    return found[backend]


def _samples(grads: torch.Tensor, num_samples: Optional[float]) -> float:
    return float(grads.shape[1] if num_samples is None else num_samples)


def dense_fisher(grads: torch.Tensor, damp: float, num_samples: Optional[float] = None) -> torch.Tensor:
    """float64 ``F = damp I + G^T G / N`` per block (the damped empirical Fisher, WoodFisher paper Sec. 3.2).

    Args:
        grads: (B, m, c), any float dtype and device. damp: lambda > 0. num_samples: N (default m).
    Returns:
        (B, c, c) float64.
    """
    g = grads.double()
    eye = torch.eye(g.shape[-1], dtype=torch.float64, device=g.device)
    return damp * eye + g.transpose(1, 2) @ g / _samples(grads, num_samples)


def dense_inverse(grads: torch.Tensor, damp: float, num_samples: Optional[float] = None) -> torch.Tensor:
    """float64 ``torch.linalg.inv`` of :func:`dense_fisher` (relative error ~eps64 * kappa).

    Args:
        grads: (B, m, c). damp: lambda > 0. num_samples: N (default m).
    Returns:
        (B, c, c) float64.
    """
    return torch.linalg.inv(dense_fisher(grads, damp, num_samples))


class SvdReference(NamedTuple):
    """float64 reference of the blockwise inverse: inverse (B, c, c), diag (B, c), kappa (B,)."""

    inverse: torch.Tensor
    diag: torch.Tensor
    kappa: torch.Tensor


def svd_inverse(grads: torch.Tensor, damp: float, num_samples: Optional[float] = None) -> SvdReference:
    """Reference ``(damp I + G^T G / N)^-1`` from the full SVD ``G = U S V^T`` in float64.

    ``F^-1 = V diag(1 / (damp + s_i^2 / N)) V^T`` with V square (c x c; s_i = 0 beyond
    min(m, c)): a sum of positive terms, so the diagonal ``sum_i V_qi^2 / (damp + s_i^2 / N)``
    has no cancellation and stays accurate where a dense inverse or the Woodbury form
    ``(I - A^T A) / damp`` lose digits; ``kappa = s_max^2 / (N damp)`` exactly.
    Cost O(c^3 + m c^2) per block: for tests, not for large blocks.

    Args:
        grads: (B, m, c), any float dtype and device. damp: lambda > 0. num_samples: N (default m).
    Returns:
        :class:`SvdReference`: inverse (B, c, c), diag (B, c), kappa (B,), all float64.
    """
    g = grads.double()
    num_blocks, m, c = g.shape
    _, s, vh = torch.linalg.svd(g, full_matrices=True)
    s2 = torch.zeros(num_blocks, c, dtype=torch.float64, device=g.device)
    s2[:, :s.shape[1]] = s.square()
    n = _samples(grads, num_samples)
    scale = 1.0 / (damp + s2 / n)                                   # (B, c) eigenvalues of F^-1
    v = vh.transpose(1, 2)
    inverse = (v * scale.unsqueeze(1)) @ vh
    diag = (v.square() * scale.unsqueeze(1)).sum(-1)
    return SvdReference(inverse, diag, s2[:, 0] / (n * damp))


def diag_error(inv: torch.Tensor, ref_diag: torch.Tensor) -> torch.Tensor:
    """Largest relative error of the diagonal per block.

    Args:
        inv: (B, c, c) inverses or their diagonal (B, c). ref_diag: (B, c) float64 reference.
    Returns:
        (B,) float64.
    """
    d = torch.diagonal(inv, dim1=1, dim2=2) if inv.dim() == 3 else inv
    return ((d.double() - ref_diag) / ref_diag).abs().amax(dim=1)


def spectral_error(inv: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Relative error in the spectral norm per block: ``||inv - ref||_2 / ||ref||_2``.

    Args:
        inv: (B, c, c). ref: (B, c, c) float64 reference.
    Returns:
        (B,) float64.
    """
    return torch.linalg.matrix_norm(inv.double() - ref, 2) / torch.linalg.matrix_norm(ref, 2)


def precision_cases(block_sizes=(64, 257), damps=(1e-8, 1e-5, 1e-1), scales=(1e-6, 1.0, 1e6)
                    ) -> Iterator[Tuple[int, int, float, float, bool]]:
    """The precision table: every (c, m, damp, scale, rank1) with m in {c // 2, 2c + 1}.

    Args:
        block_sizes: values of c. damps: values of lambda. scales: gradient scales.
    Returns:
        Iterator (generator) of ``(c, m, damp, scale, rank1)`` tuples, Gaussian and rank-1.
    """
    for c, half, damp, scale, rank1 in itertools.product(block_sizes, (True, False), damps, scales, (False, True)):
        yield c, (c // 2 if half else 2 * c + 1), damp, scale, rank1


def synthetic_grads(num_blocks: int, m: int, c: int, scale: float = 1.0, rank1: bool = False,
                    seed: int = 0) -> torch.Tensor:
    """Deterministic gradients: i.i.d. Gaussian, or rank-1 ``a_i v^T`` per block, times ``scale``.

    Args:
        num_blocks: B. m: gradients per block. c: block size. scale: multiplier.
        rank1: rank-1 blocks instead of Gaussian. seed: base seed (combined with m and c).
    Returns:
        (B, m, c) float32 on the CPU.
    """
    gen = torch.Generator().manual_seed(seed + 7 * c + m)
    if rank1:
        g = torch.randn(num_blocks, m, 1, generator=gen, dtype=torch.float64) * \
            torch.randn(num_blocks, 1, c, generator=gen, dtype=torch.float64)
    else:
        g = torch.randn(num_blocks, m, c, generator=gen, dtype=torch.float64)
    return (g * scale).float()


def build_inverse(form: str, grads: torch.Tensor, damp: float, backend: str = "auto", *,
                  on_failure: str = "recompute", stream_chunk: int = 64) -> torch.Tensor:
    """Dense inverse ``(damp I + G^T G / m)^-1`` by one of the three paths.

    Args:
        form: "build" (:func:`fisher_inverse`), "stream" (:func:`woodbury_update_` from I/damp,
            ``stream_chunk`` gradients at a time, N = m) or "lowrank" (:func:`lowrank_inverse`).
        grads: (B, m, c). damp: lambda > 0. backend: as the op takes it.
        on_failure: "recompute" | "raise". stream_chunk: gradients per update for "stream".
    Returns:
        (B, c, c), dtype of ``grads``.
    Raises:
        ValueError: an unknown ``form``, or any ValueError of the op used.
    """
    b, m, c = grads.shape
    if form == "build":
        return fisher_inverse(grads, damp, backend=backend, on_failure=on_failure)
    if form == "lowrank":
        return lowrank_inverse(grads, damp, on_failure=on_failure, backend=backend).dense()
    if form != "stream":
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    inv = torch.eye(c, device=grads.device, dtype=grads.dtype).div(damp).expand(b, c, c).contiguous()
    for start in range(0, m, stream_chunk):
        woodbury_update_(inv, grads[:, start:start + stream_chunk].contiguous(), m, backend=backend,
                         on_failure=on_failure)
    return inv
