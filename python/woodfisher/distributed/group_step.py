"""Phase two across ranks with a pattern: N:M and rows on the blocks each rank owns.

The same arithmetic as the single-process group step (:meth:`woodfisher.methods.woodfisher.WoodFisher`,
:mod:`woodfisher.structured`; WoodFisher paper Sec. 4.2 / 6.1, Eqs. 12-18), each rank on its blocks:

- ``"N:M"``: a run of M weights never crosses a block (the block size is a multiple of M), so each
  rank chooses the pruned N-subset of every run of its blocks by the group OBS statistic and
  applies the group OBS update there, without any exchange;
- ``"rows"``: a block holds whole rows, so each rank scores the rows of its blocks; the row scores
  (one number per row) are all-gathered and every rank runs the single-process row selection
  (:func:`woodfisher.structured.select_rows`) on all of them, then updates its own blocks.

The new blocks and keep-flags are all-gathered as in the unstructured step
(:func:`woodfisher.distributed.step.sharded_step`), so every rank ends with the same model, the
single-process one on the same gradients.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Dict, Tuple

import torch

import woodfisher_kernels as wk

from .. import structured as st
from .group import all_gather_flat, local_phase

__all__ = ["sharded_group_step"]


def _owned(t, start: int, stop: int) -> SimpleNamespace:
    """The block layout of blocks [start, stop) of ``t`` (what :func:`woodfisher.structured.consecutive_groups`
    reads)."""
    return SimpleNamespace(block_size=t.block_size, num_blocks=stop - start)


def _row_scores(ctx, plan, group, owned) -> Dict[str, torch.Tensor]:
    """{name: (out,) float64 row statistic of the whole weight} on every rank (collective)."""
    cfg, curv = ctx.config, ctx.curvature
    local = []
    with local_phase(group):
        for t, w, start, stop in owned:
            if stop == start:
                local.append(torch.zeros(0, dtype=torch.float64, device=w.device))
                continue
            runs = st.consecutive_groups(_owned(t, start, stop), t.row_length, w.device)
            rho = wk.group_obs_saliency(curv.inverses[t.name], w, runs, exact=cfg.group_exact).reshape(-1)
            local.append(rho.to(torch.float64))
    every = all_gather_flat(torch.cat(local), group)
    scores = {}
    for t, _, _, _ in owned:
        per_block = t.block_size // t.row_length
        parts = []
        for r in range(plan.world):
            size = plan.owned(t.name, r) * per_block
            parts.append(every[r][:size])
            every[r] = every[r][size:]
        score = torch.cat(parts)[: t.out_features]
        if curv.flops:
            score = score / curv.flops[t.name] ** cfg.beta
        scores[t.name] = score
    return scores


def sharded_group_step(ctx, parsed, plan, group, dtype) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """This rank's ({name: new owned blocks}, {name: owned keep-flags}) of an N:M or rows step (collective)."""
    cfg, curv = ctx.config, ctx.curvature
    owned = []
    for t in ctx.targets:
        start, stop = plan.range(t.name)
        owned.append((t, t.blocks(t.effective_weight().to(dtype))[start:stop], start, stop))
    with ctx.timed("select"):
        rows = None
        if parsed[0] == "rows":
            scores = _row_scores(ctx, plan, group, owned)
            rows = st.select_rows(scores, {t.name: t.row_length for t, _, _, _ in owned}, ctx.sparsity, ctx.mode,
                                  cfg.min_density)
    new_own, keep_own = {}, {}
    with ctx.timed("update"), local_phase(group):
        for t, w, start, stop in owned:
            c, n = t.block_size, t.name
            prior = t.blocks(ctx.keep[n].to(dtype))[start:stop] > 0.5
            if stop == start:
                new_own[n], keep_own[n] = w, prior
                continue
            layout, inv = _owned(t, start, stop), curv.inverses[n]
            if parsed[0] == "nm":
                groups = st.nm_choose(inv, w, layout, parsed[1], parsed[2], exact=cfg.group_exact)
                flags = groups.new_ones(groups.shape[:2], dtype=torch.bool)
            else:
                per_block = c // t.row_length
                mine = torch.zeros(t.num_blocks * per_block, dtype=torch.bool, device=w.device)
                mine[: rows[n].numel()] = rows[n].to(w.device)
                groups = st.consecutive_groups(layout, t.row_length, w.device)
                flags = mine[start * per_block: stop * per_block].view(stop - start, per_block)
            prune = st.groups_to_mask(groups, flags, c)
            new_own[n] = (st.group_update(inv, w, groups, flags, c, cfg.group_exact) if cfg.obs_update
                          else w.masked_fill(prune, 0.0))
            keep_own[n] = prior & ~prune
    return new_own, keep_own
