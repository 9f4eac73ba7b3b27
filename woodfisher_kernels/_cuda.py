"""CUDA extension backend (available when ``woodfisher_kernels._C`` is built and loads).

The extension (csrc/, built by setup.py where torch has CUDA and nvcc exists) registers
torch ops in the ``torch.ops.woodfisher_kernels`` namespace; this module wraps them as
backend ``"cuda"`` implementations (``IMPLS``). Without the extension ``available()`` is False.

Inputs arrive validated, contiguous, float32 and on a CUDA device (see :mod:`.ops`).
Shapes: B blocks of size c, k gradients per block.
"""
from __future__ import annotations

import importlib.util
import warnings
from typing import Callable, Dict, List, Optional

import torch

# Kernel choice for the Woodbury ops (tests / benchmarks): automatic, block kept in
# shared memory (c <= limits()[0] for any k), or tiled (block in global memory / L2).
# Both apply the gradients in register-blocked rank-K chunks of up to 32.
PATHS = {"auto": 0, "shared": 1, "tiled": 2}
WOODBURY_OPS = ("woodbury_update_", "fisher_inverse")


def _load_extension() -> bool:
    """Import the compiled extension; False when it is not built or cannot load."""
    if importlib.util.find_spec(f"{__package__}._C") is None:
        return False
    try:
        from . import _C  # noqa: F401  (loading it registers the torch ops)
    except (ImportError, OSError) as exc:  # e.g. built against another torch / CUDA
        warnings.warn(f"woodfisher_kernels._C is present but failed to load ({exc}); "
                      "the 'cuda' backend is unavailable", RuntimeWarning)
        return False
    return True


AVAILABLE = _load_extension()


def _ops():
    return torch.ops.woodfisher_kernels


def woodbury_update_(inv: torch.Tensor, grads: torch.Tensor, num_samples: float,
                     path: str = "auto") -> None:
    """inv (B, c, c) <- (inv^-1 + grads^T grads / num_samples)^-1 in place; grads (B, k, c)."""
    _ops()._woodbury_update_path_(inv, grads, float(num_samples), PATHS[path])


def fisher_inverse(grads: torch.Tensor, damp: float, num_samples: float,
                   path: str = "auto") -> torch.Tensor:
    """(damp I + grads^T grads / num_samples)^-1 per block: grads (B, m, c) -> (B, c, c)."""
    return _ops()._fisher_inverse_path(grads, float(damp), float(num_samples), PATHS[path])


def obs_saliency(inv: torch.Tensor, weights: torch.Tensor,
                 loss_grad: Optional[torch.Tensor] = None) -> torch.Tensor:
    """rho (B, c) = (w - h)^2 / (2 diag(inv)), h = inv @ loss_grad (0 without it)."""
    return _ops().obs_saliency(inv, weights, loss_grad)


def obs_update(inv: torch.Tensor, weights: torch.Tensor, prune_mask: torch.Tensor,
               loss_grad: Optional[torch.Tensor] = None) -> torch.Tensor:
    """New weights (B, c) after the OBS / WoodTaylor update; pruned entries exactly 0."""
    return _ops().obs_update(inv, weights, prune_mask, loss_grad)


def limits() -> List[int]:
    """Largest block sizes c on the current device: [shared-memory Woodbury kernel (any k),
    Woodbury ops (tiled kernel), OBS ops]."""
    return list(_ops()._limits())


def available() -> bool:
    """True when the compiled extension loaded."""
    return AVAILABLE


def max_block_size(op: str = "fisher_inverse") -> int:
    """Largest block size c the CUDA kernels of ``op`` handle on the current device."""
    return limits()[1] if op in WOODBURY_OPS else limits()[2]


IMPLS: Dict[str, Callable] = {
    "woodbury_update_": woodbury_update_,
    "fisher_inverse": fisher_inverse,
    "obs_saliency": obs_saliency,
    "obs_update": obs_update,
}
