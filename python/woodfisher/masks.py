"""Mask selection shared by every criterion (WoodFisher, baselines, pruning at init).

Scores are dicts ``{param_name: Tensor}`` of the parameters' shapes; higher score =
more important. Masks are bool tensors of the same shapes, True = keep.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

Scores = Dict[str, torch.Tensor]


def check_sparsity(sparsity: float) -> float:
    """Sparsity must lie in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    return float(sparsity)


def check_min_density(min_density, sparsity: float = 0.0) -> float:
    """``min_density`` must lie in [0, 1] and be keepable at ``sparsity`` (min_density <= 1 - sparsity)."""
    if isinstance(min_density, bool) or not isinstance(min_density, (int, float)) \
            or not 0.0 <= float(min_density) <= 1.0:
        raise ValueError(f"min_density must lie in [0, 1], got {min_density!r}")
    if float(min_density) > 1.0 - float(sparsity) + 1e-12:
        raise ValueError(f"min_density={min_density} cannot be kept at sparsity={sparsity}: every weight would "
                         f"keep more than the {1.0 - float(sparsity):g} of its entries the sparsity allows")
    return float(min_density)


def _keep_top(score: torch.Tensor, num_keep: int) -> torch.Tensor:
    flat = score.flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if num_keep > 0:
        keep[torch.topk(flat, num_keep, sorted=False).indices] = True
    return keep.view_as(score)


def select_masks(scores: Scores, sparsity: float, mode: str = "global",
                 min_density: float = 0.0, pruned: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Keep-masks reaching ``sparsity`` over all scored parameters.

    Args:
        scores: {name: (shape) scores}; NaN scores are refused.
        sparsity: target fraction of zeros in [0, 1), counted over all entries.
        mode: "global" (one threshold across layers, the paper's joint mode) or
            "layerwise" (every layer at ``sparsity``, the independent mode).
        min_density: every layer keeps at least this fraction (guards layer collapse).
        pruned: {name: bool keep-mask} of weights already pruned; they stay pruned.
    Returns:
        {name: bool keep-mask}.
    """
    sparsity = check_sparsity(sparsity)
    if mode not in ("global", "layerwise"):
        raise ValueError(f"mode must be 'global' or 'layerwise', got {mode!r}")
    check_min_density(min_density)
    if not scores:
        raise ValueError("scores is empty: no prunable parameter")
    prepared = {}
    for name, s in scores.items():
        if torch.isnan(s).any():
            raise ValueError(f"scores for {name!r} contain NaN")
        s = s.detach().to(torch.float64)
        if pruned is not None and name in pruned:
            s = s.masked_fill(~pruned[name].to(s.device), float("-inf"))
        prepared[name] = s
    floors = {n: int(round(min_density * s.numel())) for n, s in prepared.items()}
    if mode == "layerwise":
        return {n: _keep_top(s, max(floors[n], s.numel() - int(round(sparsity * s.numel()))))
                for n, s in prepared.items()}
    total = sum(s.numel() for s in prepared.values())
    num_keep = total - int(round(sparsity * total))
    # Reserve each layer's floor first, then rank the rest globally.
    masks = {n: _keep_top(s, floors[n]) for n, s in prepared.items()}
    rest = torch.cat([s.flatten().masked_fill(masks[n].flatten(), float("-inf"))
                      for n, s in prepared.items()])
    extra = max(0, num_keep - sum(int(m.sum()) for m in masks.values()))
    chosen = _keep_top(rest, extra)
    offset = 0
    for n, s in prepared.items():
        masks[n] = masks[n] | chosen[offset:offset + s.numel()].view_as(s)
        offset += s.numel()
    return masks


def sparsity_of(masks: Dict[str, torch.Tensor]) -> float:
    """Overall fraction of pruned entries."""
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / max(total, 1)


def select_kept_masks(scores: Scores, sparsity: float, mode: str, min_density: float,
                      keep: Dict[str, torch.Tensor], flops: Optional[Dict[str, float]] = None,
                      beta: float = 0.0) -> Dict[str, torch.Tensor]:
    """:func:`select_masks` for a pruning step: scores divided by ``flops[name] ** beta``
    (the FLOPs-aware statistic, when ``flops`` is given), and entries outside the
    previous keep-masks ``keep`` stay pruned."""
    if flops:
        scores = {n: s / flops[n] ** beta for n, s in scores.items()}
    masks = select_masks(scores, sparsity, mode, min_density, pruned=keep)
    return {n: masks[n] & keep[n] for n in masks}
