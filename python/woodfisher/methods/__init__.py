"""Pruning methods: one module each, one line each in :data:`METHODS`.

The registry is what the option validation (:class:`woodfisher.PruneConfig`), the CLI's
``--method`` choices and the docs read. To add a method, write a module with a
:class:`~woodfisher.methods.base.PruningMethod` (or, for a score-only baseline, a
:class:`~woodfisher.methods.base.ScoreMethod` with ``scores(ctx)``) and add one line below.
"""
from .base import PruningMethod, ScoreMethod, StepContext
from .kfac import KFAC
from .magnitude import GlobalMagnitude, Magnitude
from .woodfisher import DiagFisher, WoodFisher

METHODS = {m.name: m for m in (
    WoodFisher(),
    Magnitude(),
    GlobalMagnitude(),
    DiagFisher(),
    KFAC(),
)}

__all__ = ["METHODS", "PruningMethod", "ScoreMethod", "StepContext"]
