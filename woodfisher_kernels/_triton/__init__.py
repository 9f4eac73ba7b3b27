"""Triton backend (available when triton is importable).

Ops (all float32, contiguous inputs, validated by :mod:`woodfisher_kernels.ops`):

- ``woodbury_update_`` / ``fisher_inverse``: fused blockwise Sherman-Morrison /
  Woodbury updates (:mod:`.woodbury`), one launch, grid over blocks.
- ``obs_saliency`` / ``obs_update``: fused diagonal + OBS statistic and the OBS /
  WoodTaylor update (:mod:`.obs`), one launch each.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before
triton is first imported).
"""
from typing import Callable, Dict

try:
    import triton  # noqa: F401
except ImportError:  # the package works without triton (torch / cuda backends)
    triton = None

IMPLS: Dict[str, Callable] = {}
if triton is not None:
    from . import obs, woodbury

    IMPLS = {
        "woodbury_update_": woodbury.woodbury_update_,
        "fisher_inverse": woodbury.fisher_inverse,
        "obs_saliency": obs.obs_saliency,
        "obs_update": obs.obs_update,
    }


def available() -> bool:
    """True when triton is importable."""
    return triton is not None
