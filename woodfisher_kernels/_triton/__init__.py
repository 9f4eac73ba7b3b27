"""Triton backend: registers its ops when triton is importable.

Ops (all float32, contiguous inputs, validated by :mod:`woodfisher_kernels.ops`):

- ``woodbury_update_`` / ``fisher_inverse``: fused blockwise Sherman-Morrison /
  Woodbury updates (:mod:`.woodbury`), one launch, grid over blocks.
- ``obs_saliency`` / ``obs_update``: fused diagonal + OBS statistic and the OBS /
  WoodTaylor update (:mod:`.obs`), one launch each.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before
triton is first imported).
"""
try:
    import triton  # noqa: F401
except ImportError:  # the package works without triton (torch / cuda backends)
    triton = None

if triton is not None:
    from .._dispatch import register
    from . import obs, woodbury

    register("woodbury_update_", "triton", woodbury.woodbury_update_)
    register("fisher_inverse", "triton", woodbury.fisher_inverse)
    register("obs_saliency", "triton", obs.obs_saliency)
    register("obs_update", "triton", obs.obs_update)
