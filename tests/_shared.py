"""Helpers shared by the kernel-library tests: float64 references and tolerances."""
from __future__ import annotations

import pytest
import torch

import woodfisher_kernels as wk
from woodfisher_kernels.testing import dense_fisher, dense_inverse  # noqa: F401  (re-exported for the tests)

EPS32 = torch.finfo(torch.float32).eps


def inverse_tolerance(fisher64: torch.Tensor, dtype) -> float:
    """Relative max-entry tolerance for an inverse computed in ``dtype``.

    A backward-stable inversion has relative error O(cond(F) * eps); the factor 64
    covers the accumulation over up to a few hundred rank-one steps (measured
    errors are below 6 eps * cond for the torch backend). float64 gets the same rule.
    """
    eps = EPS32 if dtype == torch.float32 else torch.finfo(torch.float64).eps
    # F is symmetric positive definite: cond_2 = lambda_max / lambda_min. On the CPU, since a
    # batched SVD / eigensolver on CUDA loops over the blocks (~20 s for 1000 blocks on an H200).
    ev = torch.linalg.eigvalsh(fisher64.detach().double().cpu())
    lo, hi = ev[..., 0], ev[..., -1]
    cond = torch.where(lo > 0, hi / lo, torch.full_like(lo, float("inf"))).max().item()
    return 64.0 * eps * max(cond, 1.0)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref|, per block, worst block."""
    x, ref = x.double(), ref.double()
    dims = tuple(range(1, ref.dim()))
    num = (x - ref).abs().amax(dim=dims)
    den = ref.abs().amax(dim=dims).clamp_min(torch.finfo(torch.float64).tiny)
    return (num / den).max().item()


def backend_params():
    """(backend, device) pairs to test on this machine: torch always; the fused C kernel
    when it is built; triton when it is registered (interpreted on CPU); cuda and
    torch-on-GPU when a GPU is present."""
    avail = wk.available_backends("fisher_inverse")
    pairs = [("torch", "cpu")]
    if "cpu" in avail:
        pairs.append(("cpu", "cpu"))
    if "triton" in avail:
        pairs.append(("triton", "cuda" if torch.cuda.is_available() else "cpu"))
    if torch.cuda.is_available():
        pairs.append(("torch", "cuda"))
        if "cuda" in avail:
            pairs.append(("cuda", "cuda"))
    return pairs


def device_marks(device: str) -> list:
    """``gpu`` for parameters that run on a CUDA device, so ``pytest -m gpu`` selects them."""
    return [pytest.mark.gpu] if device == "cuda" else []


def marked_backend_params():
    """:func:`backend_params` as pytest params, the CUDA-device ones marked ``gpu``."""
    return [pytest.param(b, d, marks=device_marks(d), id=f"{b}-{d}") for b, d in backend_params()]


def is_interpreted(backend: str, device: str) -> bool:
    return backend == "triton" and device == "cpu"
