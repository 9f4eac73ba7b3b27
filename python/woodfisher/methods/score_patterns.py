"""Group patterns for score-only methods: N:M and rows masks from per-entry scores (higher = keep).

A :class:`~woodfisher.methods.base.ScoreMethod` that lists "nm" or "rows" in ``patterns`` gets its masks here
when the call passes ``pattern=``: the unstructured selection would ignore the pattern.

- "N:M": in every run of M consecutive entries of a block (the layout of :func:`woodfisher.structured.nm_choose`)
  the M - N lowest scores are pruned; entries pruned before the step score -inf, so they go first.
- "rows": a row's (output channel's) cost is the sum of the scores of its live entries; rows are taken cheapest
  first within the target by :func:`woodfisher.structured.select_rows` (the rule of every method's rows
  pattern: layerwise / global, ``min_density``, divided by ``flops ** beta`` when ``beta > 0``).
"""
from __future__ import annotations

from typing import Dict

import torch

from .. import structured as st

__all__ = ["pattern_keep"]


def _nm_keep(ctx, scores: Dict[str, torch.Tensor], n: int, m: int) -> Dict[str, torch.Tensor]:
    keep = {}
    for target in ctx.targets:
        name = target.name
        live = scores[name].to(torch.float64).masked_fill(~ctx.keep[name], float("-inf"))
        blocked = target.blocks(live)                                          # (B, c), padding scores 0
        runs = st.consecutive_groups(target, m, blocked.device)               # (B, G, m)
        run_scores = torch.gather(blocked, 1, runs.flatten(1)).view(runs.shape)
        groups = torch.gather(runs, 2, torch.argsort(run_scores, dim=2, stable=True)[..., : m - n])
        flags = torch.ones(groups.shape[:2], dtype=torch.bool, device=groups.device)
        keep[name] = ctx.keep[name] & ~target.unblock(st.groups_to_mask(groups, flags, target.block_size))
    return keep


def _rows_keep(ctx, scores: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    cfg = ctx.config
    cost = {}
    for target in ctx.targets:
        live = scores[target.name].to(torch.float64) * ctx.keep[target.name]
        cost[target.name] = target.canonical(live).view(target.out_features, -1).sum(1)
    if ctx.curvature is not None and ctx.curvature.flops:
        cost = {n: c / ctx.curvature.flops[n] ** cfg.beta for n, c in cost.items()}
    rows = st.select_rows(cost, {t.name: t.row_length for t in ctx.targets}, ctx.sparsity, ctx.mode,
                          cfg.min_density)
    keep = {}
    for target in ctx.targets:
        pruned = rows[target.name].view(-1, 1).expand(target.out_features, target.row_length)
        keep[target.name] = ctx.keep[target.name] & ~target.from_canonical(pruned.reshape(-1))
    return keep


def pattern_keep(ctx, scores: Dict[str, torch.Tensor], parsed) -> Dict[str, torch.Tensor]:
    """Keep-masks of ``parsed`` (:func:`woodfisher.structured.parse_pattern`) from checked ``scores``.

    Args:
        ctx: the step's :class:`~woodfisher.methods.base.StepContext`.
        scores: {weight name: scores of the weight's shape} (higher = keep), as
            :func:`woodfisher.methods.outputs.check_scores` returns them.
        parsed: ("nm", N, M) or ("rows", ...).
    Returns:
        {weight name: bool keep-mask}; entries pruned before the step stay pruned.
    """
    if parsed[0] == "nm":
        return _nm_keep(ctx, scores, parsed[1], parsed[2])
    return _rows_keep(ctx, scores)
