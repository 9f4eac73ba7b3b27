"""Magnitude baselines: ``|w|``, per weight ("magnitude") or ranked across weights ("global_magnitude").

With ``pattern="N:M"`` the "magnitude" method keeps the N largest ``|w|`` of every run of M.
"""
from __future__ import annotations

from .. import structured as st
from .base import ScoreMethod


class GlobalMagnitude(ScoreMethod):
    name = "global_magnitude"
    fixed_mode = "global"
    other_mode = "magnitude"
    summary = "|w| ranked across all pruned weights"

    def scores(self, ctx):
        return {target.name: target.effective_weight().abs() for target in ctx.targets}


class Magnitude(GlobalMagnitude):
    name = "magnitude"
    fixed_mode = "layerwise"
    patterns = ("nm",)
    summary = "|w|, every weight to the target sparsity (layerwise); N:M by |w|"

    def step(self, ctx):
        parsed = st.parse_pattern(ctx.config.pattern)
        if parsed is None:
            return super().step(ctx)
        return st.nm_magnitude(ctx.targets, parsed[1], parsed[2], dict(ctx.keep))
