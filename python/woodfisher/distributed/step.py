"""Phase two across ranks: statistic on owned blocks, distributed masks, OBS update, all-gather.

The same arithmetic as :class:`woodfisher.methods.woodfisher.WoodFisher` (paper Eqs. 10-11,
WoodTaylor Eqs. 21-23), each rank on the blocks it owns:

1. ``rho = obs_saliency(F^-1, w, g)`` of the owned blocks, divided by ``flops ** beta``
   (FLOPs-aware), float64, ``-inf`` where already pruned: exactly the values the
   single-process step ranks;
2. keep-masks by :func:`woodfisher.distributed.select.select_sharded`, equal to
   :func:`woodfisher.masks.select_masks` of the whole model (same k-th value, same ties);
3. ``obs_update`` of the owned blocks (``joint_update=True``: :func:`woodfisher.structured.joint_update`;
   zeroing only with ``obs_update=False``);
4. the new blocks and masks of every rank are all-gathered, so every rank writes the same
   weights (the caller, :func:`woodfisher.prune_with`, writes them).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

import woodfisher_kernels as wk

from ..structured import joint_update, parse_pattern
from .consistent import check_same_call
from .group import all_gather_flat, local_phase
from .group_step import sharded_group_step
from .select import select_sharded

__all__ = ["sharded_step"]


def _owned_entries(t, start: int, stop: int) -> Tuple[torch.Tensor, int]:
    """(row-major indices in the weight of the real entries of blocks [start, stop), their count)."""
    c = t.block_size
    lo, hi = start * c, min(stop * c, t.numel)
    order = t.canonical(torch.arange(t.numel, device=t.param.device).view(t.shape))  # canonical -> storage
    return order[lo:hi], max(0, hi - lo)


def _scores(ctx, t, inv, w, lg, start, stop):
    """(float64 scores of the owned real entries, their storage indices, the owned keep-flags)."""
    cfg, curv = ctx.config, ctx.curvature
    index, n = _owned_entries(t, start, stop)
    keep = ctx.keep[t.name].reshape(-1)[index]
    if n == 0:
        return torch.zeros(0, dtype=torch.float64, device=index.device), index, keep
    rho = wk.obs_saliency(inv, w, lg, backend=cfg.backend, check_finite=False).reshape(-1)[:n]
    if curv.flops:
        rho = rho / curv.flops[t.name] ** cfg.beta
    return rho.to(torch.float64).masked_fill(~keep, float("-inf")), index, keep


def _gather(targets, plan, group, new_own: Dict[str, torch.Tensor], keep_own: Dict[str, torch.Tensor], dtype):
    """All ranks' new blocks and keep-flags -> {name: weight-shaped} on every rank (collective)."""
    all_w = all_gather_flat(torch.cat([new_own[target.name].reshape(-1) for target in targets]), group)
    all_k = all_gather_flat(torch.cat([keep_own[target.name].reshape(-1) for target in targets]).to(torch.uint8), group)
    parts_w = {target.name: [] for target in targets}
    parts_k = {target.name: [] for target in targets}
    for r in range(plan.world):
        offset = 0
        for target in targets:
            size = plan.owned(target.name, r) * target.block_size
            parts_w[target.name].append(all_w[r][offset:offset + size])
            parts_k[target.name].append(all_k[r][offset:offset + size])
            offset += size
    new = {
        target.name: target.unblock(
            torch.cat(parts_w[target.name]).view(target.num_blocks, target.block_size).to(dtype)
        )
        for target in targets
    }
    keep = {
        target.name: target.unblock(torch.cat(parts_k[target.name]).view(target.num_blocks, target.block_size)).bool()
        for target in targets
    }
    return new, keep


def sharded_step(ctx) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """One pruning step of a sharded curvature (collective): ({name: new weights}, {name: keep-mask})."""
    curv, cfg = ctx.curvature, ctx.config
    plan, group = curv.shard.plan, curv.shard.group
    check_same_call(group, None, ctx.targets, sparsity=ctx.sparsity, mode=ctx.mode, min_density=cfg.min_density,
                    obs_update=cfg.obs_update, joint_update=cfg.joint_update, beta=cfg.beta, pattern=cfg.pattern,
                    group_exact=cfg.group_exact)
    dtype = ctx._dtype()
    parsed = parse_pattern(cfg.pattern)
    if parsed is not None:  # N:M or rows: woodfisher.distributed.group_step
        new_own, keep_own = sharded_group_step(ctx, parsed, plan, group, dtype)
        return _gather(ctx.targets, plan, group, new_own, keep_own, dtype)
    lg_all = curv.loss_grad or {}
    owned: List[tuple] = []
    with ctx.timed("select"):
        with local_phase(group):  # local: a NaN statistic must stop every rank before the collectives
            for t in ctx.targets:
                start, stop = plan.range(t.name)
                w = t.blocks(t.effective_weight().to(dtype))[start:stop]
                lg = lg_all.get(t.name)
                score, index, prior = _scores(ctx, t, curv.inverses[t.name], w, lg, start, stop)
                if torch.isnan(score).any():
                    raise ValueError(f"scores for {t.name!r} contain NaN")
                owned.append((t, w, lg, score, index, prior))
        flags = select_sharded([o[3] for o in owned], [o[4] for o in owned], [t.numel for t in ctx.targets],
                               ctx.sparsity, ctx.mode, cfg.min_density, group)
    new_own, keep_own = {}, {}
    with ctx.timed("update"):
        with local_phase(group):
            for (t, w, lg, _, _, prior), flag in zip(owned, flags):
                kept = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
                kept[:flag.numel()] = flag & prior     # the real entries come first, the padding last
                kept = kept.view_as(w)
                keep_own[t.name] = kept
                if w.shape[0] == 0 or not cfg.obs_update:
                    new_own[t.name] = w * kept
                else:  # padding is "pruned" as in the single-process step: its weights are 0 and decoupled
                    new_own[t.name] = joint_update(curv.inverses[t.name], w, ~kept) if cfg.joint_update else \
                        wk.obs_update(curv.inverses[t.name], w, ~kept, lg, backend=cfg.backend, check_finite=False)
        return _gather(ctx.targets, plan, group, new_own, keep_own, dtype)
