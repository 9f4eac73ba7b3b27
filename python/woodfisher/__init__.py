"""woodfisher: WoodFisher pruning (OBS with a blockwise inverse empirical Fisher) for PyTorch.

Main entry points:

- :func:`prune_one_shot` -> :class:`PruneResult`: one-shot pruning with WoodFisher or a
  baseline (the registry :data:`woodfisher.methods.METHODS`), joint or layerwise,
  multi-step, WoodTaylor, FLOPs-aware, N:M and row patterns; options are the fields of
  :class:`PruneConfig`.
- :func:`estimate_curvature` + :func:`prune_with`: the same in two phases (one gradient
  collection for a whole sweep of sparsities).
- :class:`GradualPruner`, :func:`polynomial_sparsity`: gradual pruning on a schedule,
  masks kept with ``torch.nn.utils.prune``.
- Fine-tuning after one-shot pruning: ``prune_one_shot(..., keep_masks=True)`` or
  :func:`attach_masks` (masks held with ``torch.nn.utils.prune``), :func:`make_permanent`,
  :func:`recalibrate_bn` (BatchNorm statistics of the pruned model), :func:`clone_model`
  (a deep copy that also works while masks are attached, where ``copy.deepcopy`` fails).
- :class:`FisherHook`: the Fisher fed from the training loop (running block inverses from
  the optimizer's gradients, :mod:`.hooks`), for gradual pruning without extra data passes.
- Under a ``torch.distributed`` process group the pruning calls are collective and the
  blocks are sharded across ranks (:mod:`.distributed`); inverses too large for a GPU are
  offloaded to host memory (:mod:`.offload`).
- :func:`select_masks`: the shared mask selection; :func:`search_damp`, :func:`auto_damp`.
- :class:`Batch`: what a ``batch_adapter`` returns for loaders of any format.

The pipeline of a step: targets (:mod:`.targets`) -> batches (:mod:`.batches`) ->
gradients (:mod:`.gradients`) -> curvature (:mod:`.curvature`) -> statistic, masks and
update (:mod:`.methods`, :mod:`.masks`) -> writing (:mod:`.engine`). The block inverses,
OBS statistics and updates are computed by the public ops of :mod:`woodfisher_kernels`.
"""
from . import export as export  # deployment: dense / CSR / BSR / 2:4 / ONNX exports
from .batches import Batch
from .budget import estimate_memory
from .config import PruneConfig
from .curvature import Curvature
from .damping import auto_damp
from .finetune import attach_masks, make_permanent, recalibrate_bn
from .flops import layer_flops_per_param
from .gradients import GradientCollector
from .gradual import GradualPruner, polynomial_sparsity
from .hooks import FisherHook
from .masks import check_sparsity, select_masks, sparsity_of
from .methods import METHODS, register_method
from .pruner import estimate_curvature, prune_one_shot, prune_with
from .result import PruneResult
from .state import clone_model
from .targets import PruneTarget, resolve_targets
from .tuning import search_damp

#: Former names, kept working.
PrunableLayer = PruneTarget
resolve_layers = resolve_targets

__all__ = [
    "auto_damp", "Batch", "check_sparsity", "Curvature", "estimate_curvature", "FisherHook", "GradientCollector",
    "GradualPruner", "make_permanent", "METHODS", "polynomial_sparsity", "PrunableLayer", "prune_one_shot",
    "prune_with", "PruneConfig", "PruneResult", "PruneTarget", "resolve_layers", "resolve_targets",
    "search_damp", "select_masks", "sparsity_of", "layer_flops_per_param", "attach_masks", "recalibrate_bn",
    "clone_model", "estimate_memory", "register_method",
]

