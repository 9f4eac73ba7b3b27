"""Cost model behind ``backend="auto"`` on CUDA float32 tensors.

:func:`rank` orders the candidate backends of an op for one call, best first, and drops
any predicted to be more than 2x slower than the best available one.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

PREFERENCE = ("cuda", "triton", "torch")


def rank(op: str, shape: Tuple[int, ...], num_grads: Optional[int], device: torch.device,
         candidates: Sequence[str]) -> List[str]:
    """Candidate backends for ``op`` on ``shape`` ((B, c, c) inverse or (B, m, c) gradients), best first.

    ``num_grads`` is the k of an update (None when ``shape`` holds it). For now the fixed
    preference cuda > triton > torch.
    """
    return [name for name in PREFERENCE if name in candidates]
