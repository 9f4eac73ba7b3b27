"""WoodFisher: OBS with the blockwise inverse empirical Fisher (paper Secs. 3-4).

Statistic ``rho_q = w_q^2 / (2 [F^-1]_qq)`` (Eq. 11; WoodTaylor ``(w_q - h_q)^2 / ...`` with
``h = F^-1 g``, Eqs. 21-23), masks by :meth:`StepContext.select` (joint = "global",
independent = "layerwise"), then the OBS update ``dw = -F^-1 v``, ``v_q = w_q / [F^-1]_qq``
for every pruned q at once (Eq. 10 summed over the pruned set, the pruning direction of Sec. 4.3), or with
``joint_update=True`` the joint optimum of each block's pruned set (Sec. 4.2), pruned entries exactly 0.
Group patterns ("N:M", "rows") use the group statistic and update of :mod:`woodfisher.structured`.

:class:`DiagFisher` is the same method with a diagonal Fisher (blocks of size 1).
"""
from __future__ import annotations

import torch

from .. import structured as st
from ..distributed.step import sharded_step
from .base import PruningMethod
from .obs import saliency_of, update_of


class WoodFisher(PruningMethod):
    name = "woodfisher"
    curvature = "blockwise"
    patterns = ("nm", "rows")
    woodtaylor = True
    joint_update = True
    summary = "OBS with the blockwise inverse empirical Fisher (WoodFisher)"

    def step(self, ctx):
        if ctx.curvature.shard is not None:  # blocks spread across ranks (woodfisher.distributed)
            return sharded_step(ctx)
        curv, cfg = ctx.curvature, ctx.config
        invs, lg = curv.inverses, curv.loss_grad or {}
        parsed = st.parse_pattern(cfg.pattern)
        if parsed is not None:
            return self._group_step(ctx, parsed, invs)
        with ctx.timed("select"):
            w = ctx.blocked_weights()
            scores = {
                target.name: target.unblock(
                    saliency_of(invs[target.name], w[target.name], lg.get(target.name), cfg.backend)
                )
                for target in ctx.targets
            }
            masks = ctx.select(scores)
        new = {}
        with ctx.timed("update", total=len(ctx.targets)) as bar:
            for target in ctx.targets:
                n = target.name
                if cfg.obs_update:
                    prune = ~target.blocks(masks[n])
                    new[n] = target.unblock(update_of(invs[n], w[n], prune, lg.get(n), cfg.backend, cfg.joint_update))
                else:
                    new[n] = target.effective_weight() * masks[n]
                bar.update(1)
        return new, masks

    def _group_step(self, ctx, parsed, invs):
        """N:M or rows: the groups of every weight chosen ("selection", counted per weight: the N:M search over
        all subsets of each run is the long part), then their group OBS updates ("update", per weight)."""
        cfg, keep = ctx.config, dict(ctx.keep)
        exact = cfg.group_exact
        chosen = {}
        with ctx.timed("select", total=len(ctx.targets)) as bar:
            w = ctx.blocked_weights()
            rows = None
            if parsed[0] == "rows":
                scores = {target.name: st.row_saliency(invs[target.name], w[target.name], target, exact)
                          for target in ctx.targets}
                if ctx.curvature.flops:
                    scores = {n: s / ctx.curvature.flops[n] ** cfg.beta for n, s in scores.items()}
                rows = st.select_rows(
                    scores, {target.name: target.row_length for target in ctx.targets}, ctx.sparsity, ctx.mode,
                    cfg.min_density,
                )
            for target in ctx.targets:
                n = target.name
                if parsed[0] == "nm":
                    groups = st.nm_choose(invs[n], w[n], target, parsed[1], parsed[2], exact=exact)
                    chosen[n] = (groups, groups.new_ones(groups.shape[:2], dtype=torch.bool))
                else:
                    chosen[n] = st.rows_to_groups(target, rows[n], w[n].device)
                bar.update(1)
        new = {}
        with ctx.timed("update", total=len(ctx.targets)) as bar:
            for target in ctx.targets:
                n = target.name
                groups, flags = chosen.pop(n)
                prune = st.groups_to_mask(groups, flags, target.block_size)
                new[n] = (target.unblock(st.group_update(invs[n], w[n], groups, flags, target.block_size, exact))
                          if cfg.obs_update else target.unblock(w[n].masked_fill(prune, 0.0)))
                keep[n] = keep[n] & ~target.unblock(prune)
                bar.update(1)
        return new, keep


class DiagFisher(WoodFisher):
    name = "diag_fisher"
    curvature = "diagonal"
    patterns = ()
    summary = "OBS with a diagonal empirical Fisher (OBD-style; the update only zeroes)"

    def block_size(self, config):
        return 1
