"""prune_at_init: score a freshly initialised model and prune it before training."""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

from ..masks import check_sparsity, select_masks, sparsity_of
from ..result import PruneResult
from ._common import LossFn, check_loader, check_positive_int, has_batchnorm, prunable_parameters
from .criteria import CRITERIA, DATA_FREE, compute_scores, linearize, synflow_scores
from .estimators import HVP_METHODS
from .warmup import preserved_batchnorm_state, warmup_batchnorm


@dataclass
class PaIResult(PruneResult):
    """woodfisher's PruneResult (masks, layers, sparsity, damp=None, config, timings) plus
    ``collapsed``: names of layers left with no weight or a density below
    ``collapse_density``. timings: seconds for warmup, scoring, masking.
    """
    collapsed: List[str] = field(default_factory=list)


def layer_table(masks: Dict[str, torch.Tensor]) -> List[dict]:
    """[{name, shape, numel, nnz, sparsity}] of keep-masks, in order."""
    rows = []
    for n, m in masks.items():
        nnz = int(m.sum())
        rows.append(dict(name=n, shape=list(m.shape), numel=m.numel(), nnz=nnz, sparsity=1.0 - nnz / m.numel()))
    return rows


def collapsed_layers(layers: List[dict], collapse_density: float) -> List[str]:
    """Layers with no weight left or a density below ``collapse_density``."""
    return [r["name"] for r in layers if r["nnz"] == 0 or r["nnz"] / r["numel"] < collapse_density]


def _check_args(sparsity, criterion, mode, num_probes, warmup_batches, min_density, hvp,
                synflow_iterations, collapse_density):
    check_sparsity(sparsity)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if mode not in ("global", "layerwise"):
        raise ValueError(f"mode must be 'global' or 'layerwise', got {mode!r}")
    check_positive_int(num_probes, "num_probes")
    check_positive_int(warmup_batches, "warmup_batches", minimum=0)
    check_positive_int(synflow_iterations, "synflow_iterations")
    if isinstance(min_density, bool) or not isinstance(min_density, (int, float)) or not 0.0 <= min_density <= 1.0:
        raise ValueError(f"min_density must lie in [0, 1], got {min_density!r}")
    if min_density > 1.0 - sparsity + 1e-12:
        raise ValueError(f"min_density={min_density} cannot be kept at sparsity={sparsity}")
    if hvp not in HVP_METHODS:
        raise ValueError(f"hvp must be one of {HVP_METHODS}, got {hvp!r}")
    if not 0.0 <= collapse_density < 1.0:
        raise ValueError(f"collapse_density must lie in [0, 1), got {collapse_density!r}")


def prune_at_init(model: nn.Module, loader: Optional[Iterable] = None, *, sparsity: float,
                  criterion: str = "hutchinson", mode: str = "global", loss_fn: Optional[LossFn] = None,
                  params: Optional[Sequence[str]] = None, num_probes: int = 8, num_batches: Optional[int] = None,
                  warmup_batches: int = 10, min_density: float = 0.0, synflow_iterations: int = 100,
                  hvp: str = "autograd", train_mode: bool = False, input_shape: Optional[Sequence[int]] = None,
                  collapse_density: float = 1e-3, seed: int = 0, progress: bool = True) -> PaIResult:
    """Prune ``model`` before training; its pruned weights are set to exactly 0 in place.

    Args:
        loader: yields (inputs, targets); needed by data-dependent criteria and the
            warm-up (synflow only reads the input shape from it, or takes ``input_shape``).
        sparsity: target fraction of zeros over the scored weights, in [0, 1).
        criterion: one of CRITERIA (see woodfisher.pai.criteria).
        mode: "global" (one threshold) or "layerwise" (each layer at ``sparsity``).
        params: names of the parameters / modules to prune (default: every Linear/Conv weight).
        num_probes: Hutchinson probes per batch; num_batches: scoring batches (None = all).
        warmup_batches: BatchNorm warm-up passes before scoring (0 = off; no-op without BN).
        min_density: each layer keeps at least this fraction of its weights.
        synflow_iterations: SynFlow rounds (exponential schedule to ``sparsity``).
        train_mode: score in train mode (batch statistics); default eval mode, which uses the
            (warmed-up) running statistics; BN buffers are restored after train-mode scoring.
        collapse_density: layers below this density are reported in ``collapsed``.
    Returns:
        PaIResult.
    """
    _check_args(sparsity, criterion, mode, num_probes, warmup_batches, min_density, hvp,
                synflow_iterations, collapse_density)
    names = list(prunable_parameters(model, params))
    needs_data = criterion not in DATA_FREE or (criterion == "synflow" and input_shape is None)
    if loader is not None or needs_data:
        first_x, _ = check_loader(loader)
        input_shape = tuple(first_x.shape[1:]) if input_shape is None else tuple(input_shape)
    gen = torch.Generator().manual_seed(seed)
    timings = {}
    was_training = model.training

    t0 = time.perf_counter()
    warmed = 0
    if warmup_batches > 0 and loader is not None and has_batchnorm(model):
        warmed = warmup_batchnorm(model, loader, warmup_batches, progress=progress)
    timings["warmup"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model.train(train_mode)
    try:
        with preserved_batchnorm_state(model) if train_mode else contextlib.nullcontext():
            if criterion == "synflow":
                masks = _iterative_synflow(model, names, input_shape, sparsity, mode, min_density,
                                           synflow_iterations, progress)
            else:
                scores = compute_scores(model, loader, criterion, params=names, loss_fn=loss_fn,
                                        num_probes=num_probes, num_batches=num_batches, hvp=hvp,
                                        generator=gen, input_shape=input_shape, progress=progress)
                timings["scoring"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                masks = select_masks(scores, sparsity, mode=mode, min_density=min_density)
    finally:
        model.train(was_training)
    timings["scoring" if criterion == "synflow" else "masking"] = time.perf_counter() - t0

    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, m in masks.items():
            named[n].mul_(m.to(named[n].device, named[n].dtype))
    layers = layer_table(masks)
    collapsed = collapsed_layers(layers, collapse_density)
    if collapsed and progress:
        warnings.warn(f"layer collapse: {collapsed} pruned to (near) 100%; consider min_density > 0")
    config = dict(sparsity=sparsity, criterion=criterion, mode=mode, params=names, num_probes=num_probes,
                  num_batches=num_batches, warmup_batches=warmup_batches, warmup_samples=warmed,
                  min_density=min_density, synflow_iterations=synflow_iterations, hvp=hvp,
                  train_mode=train_mode, collapse_density=collapse_density, seed=seed,
                  loss_fn=getattr(loss_fn, "__name__", "cross_entropy") if loss_fn else "cross_entropy")
    return PaIResult(masks=masks, layers=layers, sparsity=sparsity_of(masks), damp=None, config=config,
                     timings=timings, collapsed=collapsed)


def _iterative_synflow(model, names, input_shape, sparsity, mode, min_density, iterations, progress):
    """SynFlow with the exponential schedule s_k = 1 - (1 - s)^(k / n), k = 1..n."""
    from tqdm.auto import tqdm

    net = linearize(model)
    masks = None
    for k in tqdm(range(1, iterations + 1), desc="synflow", disable=not progress, leave=False):
        s_k = 1.0 - (1.0 - sparsity) ** (k / iterations)
        scores = synflow_scores(model, input_shape, params=names, masks=masks, _linearized=net)
        masks = select_masks(scores, s_k, mode=mode, min_density=min_density, pruned=masks)
    return masks
