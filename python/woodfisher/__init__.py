"""woodfisher: WoodFisher pruning (OBS with a blockwise inverse empirical Fisher) for PyTorch.

Main entry points:

- :func:`prune_one_shot` -> :class:`PruneResult`: one-shot pruning with WoodFisher or a
  baseline ("magnitude", "global_magnitude", "diag_fisher", "kfac"), joint or
  layerwise, multi-step, WoodTaylor, FLOPs-aware, N:M and row patterns.
- :class:`GradualPruner`, :func:`polynomial_sparsity`: gradual pruning on a schedule,
  masks kept with ``torch.nn.utils.prune``; :func:`make_permanent`.
- :func:`select_masks`: the shared mask selection; :func:`search_damp`, :func:`auto_damp`.

The numerical work goes through the public ops of :mod:`woodfisher_kernels` only.
"""
from .damping import auto_damp, search_damp
from .fisher import GradientCollector
from .gradual import GradualPruner, make_permanent, polynomial_sparsity
from .layout import PrunableLayer, resolve_layers
from .masks import check_sparsity, select_masks, sparsity_of
from .pruner import PruneResult, layer_flops_per_param, prune_one_shot

__all__ = [
    "auto_damp", "check_sparsity", "GradientCollector", "GradualPruner",
    "layer_flops_per_param", "make_permanent", "polynomial_sparsity", "PrunableLayer", "prune_one_shot", "PruneResult",
    "resolve_layers", "search_damp", "select_masks", "sparsity_of",
]
