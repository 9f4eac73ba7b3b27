"""woodfisher_kernels: blockwise inverse-Fisher kernels for WoodFisher / OBS pruning.

Public ops (B blocks of size c, k or m gradients, G groups of size q):

- :func:`fisher_inverse` (B, m, c) -> (B, c, c) from I/damp, one fused launch
- :func:`woodbury_update_` in place on (B, c, c) with (B, k, c)
- :func:`lowrank_inverse`, :class:`LowRankInverse`, :func:`choose_form`,
  :func:`blockwise_inverse` (automatic choice of form)
- :func:`obs_saliency` (saliency, paper Eq. 11 / 23), :func:`obs_update` (OBS update, Eq. 10 / 21)
- :func:`gather_rows`, :func:`gather_subblocks`, :func:`group_obs_saliency`,
  :func:`group_obs_update` (group OBS, N:M)
- :func:`inverse_diagonal`; blocking helpers :func:`to_blocks`, :func:`from_blocks`
- :func:`condition_estimate` (kappa of every block) and :func:`error_bound` (the stated
  float32 accuracy as a function of kappa, see :mod:`woodfisher_kernels._numerics`)

The tensor ops are torch.library custom ops (namespace ``woodfisher_ops``, see
:mod:`woodfisher_kernels._library`): they work under ``torch.compile``.
:mod:`woodfisher_kernels.testing` gives tests and benchmarks specific implementations and
float64 references.

Every op takes ``backend="auto" | "cuda" | "triton" | "cpu" | "torch"`` where a fast kernel exists.
"""
from ._dispatch import available as available_backends
from ._numerics import error_bound
from .blocking import from_blocks, num_blocks, to_blocks, valid_mask
from .lowrank import LowRankInverse, choose_form
from .ops import (
    blockwise_inverse,
    condition_estimate,
    fisher_inverse,
    gather_rows,
    gather_subblocks,
    group_obs_saliency,
    group_obs_update,
    inverse_diagonal,
    lowrank_inverse,
    obs_saliency,
    obs_update,
    woodbury_update_,
)
from .sizes import parse_bytes

__version__ = "0.1.0"

__all__ = [
    "available_backends", "blockwise_inverse", "choose_form", "condition_estimate", "error_bound",
    "fisher_inverse", "from_blocks",
    "gather_rows", "gather_subblocks", "group_obs_saliency", "group_obs_update",
    "inverse_diagonal", "LowRankInverse", "lowrank_inverse", "num_blocks", "obs_saliency",
    "obs_update", "parse_bytes", "to_blocks", "valid_mask", "woodbury_update_",
]
