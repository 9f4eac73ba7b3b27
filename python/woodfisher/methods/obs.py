"""The OBS statistic, update and inverse diagonal of a blockwise inverse in any form it is held in.

A blockwise curvature's inverses (``Curvature.inverses``) are dense ``(B, c, c)`` tensors, a
:class:`woodfisher_kernels.LowRankInverse`, or an :class:`woodfisher.offload.OffloadedInverse` (host memory,
streamed through the device chunk by chunk, ``inverse_form="offload"``), which the kernel ops do not take
directly. These helpers take all three; :class:`~woodfisher.methods.base.StepContext` exposes them per weight
(``ctx.obs_saliency``, ``ctx.obs_update``, ``ctx.inverse_diagonal``) for methods of one's own.
"""
from __future__ import annotations

from typing import Optional

import torch

import woodfisher_kernels as wk

from .. import structured as st
from ..offload import OffloadedInverse

__all__ = ["saliency_of", "update_of", "diagonal_of"]


def saliency_of(inv, w: torch.Tensor, lg: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    """:func:`woodfisher_kernels.obs_saliency` (WoodFisher paper, Eq. 11; Eq. 23 with ``lg``) of (B, c) blocked
    weights ``w`` for an inverse of any form: (B, c), loss units."""
    if isinstance(inv, OffloadedInverse):
        return inv.saliency(w, lg, backend)
    return wk.obs_saliency(inv, w, lg, backend=backend, check_finite=False)


def update_of(inv, w: torch.Tensor, prune: torch.Tensor, lg: Optional[torch.Tensor], backend: str,
              joint: bool = False) -> torch.Tensor:
    """:func:`woodfisher_kernels.obs_update` (Eq. 10 summed over the pruned set; ``joint``: the joint optimum
    of each block's pruned set, :func:`woodfisher.structured.joint_update`) of (B, c) blocked weights ``w`` and
    (B, c) bool ``prune`` for an inverse of any form: new (B, c) weights, pruned entries 0."""
    if joint and isinstance(inv, OffloadedInverse):
        return torch.cat([st.joint_update(part, w[a:b], prune[a:b]) for a, b, part in inv.chunks()])
    if joint:
        return st.joint_update(inv, w, prune)
    if isinstance(inv, OffloadedInverse):
        return inv.update(w, prune, lg, backend)
    return wk.obs_update(inv, w, prune, lg, backend=backend, check_finite=False)


def diagonal_of(inv) -> torch.Tensor:
    """``[F^-1]_qq`` of every block (:func:`woodfisher_kernels.inverse_diagonal`) for an inverse of any form:
    (B, c)."""
    if isinstance(inv, OffloadedInverse):
        return torch.cat([wk.inverse_diagonal(part) for _, _, part in inv.chunks()])
    return wk.inverse_diagonal(inv)
