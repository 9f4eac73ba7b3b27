"""The notices of a pruning call about the weights as it finds them: zeros already beyond the target sparsity (never
revived), weights already below the ``min_density`` floor. Issued at the caller's line once every check has passed
(:func:`woodfisher.diagnostics.warnings_held`)."""
from __future__ import annotations

from typing import Dict

import torch

from .config import PruneConfig
from .diagnostics import warn_at_caller
from .masks import floor_shortfall, sparsity_of
from .per_weight import is_per_weight

__all__ = ["warn_below", "warn_floor"]


def warn_floor(config: PruneConfig, keep: Dict[str, torch.Tensor]) -> None:
    """Warn, at the user's line, when weights already hold fewer entries than ``min_density`` keeps (never
    revived): their floor is what they have left, and the other weights carry the sparsity."""
    short = floor_shortfall(keep, config.min_density) if config.min_density > 0 else []
    if short:
        warn_at_caller(f"min_density={config.min_density:g} cannot be kept in {short[:4]}"
                       f"{' and more' if len(short) > 4 else ''}: they already hold fewer entries (pruned before "
                       "this call, never revived), so they keep what they have and the other weights reach the "
                       "sparsity")


def warn_below(config: PruneConfig, keep: Dict[str, torch.Tensor]) -> None:
    """Warn, at the user's line, when the target sparsity is below the zeros the pruned weights already
    hold (never revived): over all of them, or layerwise, in some of them (which keep theirs)."""
    if is_per_weight(config.sparsity):
        above = [n for n, k in keep.items() if 1.0 - float(k.double().mean()) > config.sparsity[n] + 1e-6]
        if above:
            warn_at_caller(f"sparsity: {above[:4]}{' and more' if len(above) > 4 else ''} already hold more zeros "
                           "than their fractions: they keep theirs (pruning never revives weights), the other weights "
                           "are pruned to theirs")
        return
    if (config.method_impl.fixed_mode or config.mode) == "layerwise":
        above = [n for n, k in keep.items() if 1.0 - float(k.double().mean()) > config.final_sparsity + 1e-6]
        if above and len(above) < len(keep):  # all above: nothing is pruned, said below as for global masks
            warn_at_caller(f"sparsity={config.final_sparsity:g} (mode='layerwise') is below the zeros {above[:4]}"
                           f"{' and more' if len(above) > 4 else ''} already hold: they keep theirs (pruning never "
                           "revives weights), the other weights are pruned to it")
        if len(above) < len(keep):
            return
    start_sparsity = sparsity_of(keep)
    if config.final_sparsity < start_sparsity - 1e-6:
        warn_at_caller(f"sparsity={config.final_sparsity:g} is below the {start_sparsity:.4g} of zeros the pruned "
                       "weights already hold: pruning never revives weights, so the result keeps that sparsity "
                       f"(pass sparsity >= {start_sparsity:.4g} to prune further)")
