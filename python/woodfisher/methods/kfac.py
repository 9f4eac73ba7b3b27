"""K-FAC OBS baseline (Linear, HF Conv1D, Conv1d/2d/3d; whole-layer Kronecker blocks: :mod:`woodfisher.kfac`)."""
from __future__ import annotations

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
        refused = {}
        for target in targets:
            try:
                check_kfac_layer(target)
            except ValueError as err:
                refused.setdefault(target.name, err)
        if refused:  # the first reason, every weight concerned, and the call that prunes the others
            first = next(iter(refused.values()))
            others = [target.name for target in targets if target.name not in refused]
            fix = f"; modules={others!r} prunes the others" if 0 < len(others) <= 6 else (
                f"; modules= naming the other {len(others)} weight(s) prunes those" if others else "")
            raise ValueError(f"{first} (weights it cannot model: {list(refused)}){fix}") from None

    def step(self, ctx):
        invs = ctx.curvature.inverses
        with ctx.timed("select"):
            # canonical (out, in') matrices: HF Conv1D weights are stored transposed
            w2 = {
                target.name: target.canonical(target.effective_weight()).reshape(target.out_features, -1)
                for target in ctx.targets
            }
            scores = {target.name: target.from_canonical(kfac_saliency(w2[target.name], *invs[target.name]).flatten())
                      for target in ctx.targets}
            masks = ctx.select(scores)
        new = {}
        with ctx.timed("update"):
            for target in ctx.targets:
                n = target.name
                if ctx.config.obs_update:
                    prune = ~target.canonical(masks[n]).reshape(target.out_features, -1)
                    new[n] = target.from_canonical(kfac_update(w2[n], prune, *invs[n]).flatten())
                else:
                    new[n] = target.effective_weight() * masks[n]
        return new, masks
