"""K-FAC OBS baseline (Linear and Conv2d weights, whole-layer Kronecker blocks; :mod:`woodfisher.kfac`)."""
from __future__ import annotations

import time

from ..kfac import check_kfac_layer, kfac_saliency, kfac_update
from .base import PruningMethod


class KFAC(PruningMethod):
    name = "kfac"
    curvature = "kfac"
    summary = "OBS with a K-FAC (Kronecker-factored) Fisher per layer"

    def block_size(self, config):
        return None

    def check_targets(self, targets, config):
        super().check_targets(targets, config)
        for t in targets:
            check_kfac_layer(t)

    def step(self, ctx):
        t0 = time.perf_counter()
        invs = ctx.curvature.inverses
        w2 = {t.name: t.effective_weight().reshape(t.shape[0], -1) for t in ctx.targets}
        scores = {t.name: kfac_saliency(w2[t.name], *invs[t.name]).reshape(t.shape) for t in ctx.targets}
        masks = ctx.select(scores)
        ctx.timings["select"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        new = {}
        for t in ctx.targets:
            n = t.name
            if ctx.config.obs_update:
                new[n] = kfac_update(w2[n], ~masks[n].reshape(t.shape[0], -1), *invs[n]).reshape(t.shape)
            else:
                new[n] = t.effective_weight() * masks[n]
        ctx.timings["update"] += time.perf_counter() - t0
        return new, masks
