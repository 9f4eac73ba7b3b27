"""prune_at_init: score a freshly initialised model and prune it before training."""
from __future__ import annotations

import itertools
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

from ..batches import check_loader, is_single_pass, peek, to_batch
from ..buffers import buffers_kept
from ..config import check_int
from ..losses import check_loss_fn
from ..masks import check_collapse_density, check_min_density, check_sparsity, select_kept_masks, sparsity_of
from ..option_checks import check_names
from ..progress import display, phase
from ..result import PruneResult, layer_rows
from ..state import Snapshot, eval_mode
from ..targets import PruneTarget, unwrap_model
from .criteria import CRITERIA, DATA_FREE, compute_scores, linearize, synflow_scores
from .estimators import HVP_METHODS, Params, check_num_batches, pai_targets, tracked
from .warmup import (
    as_in_training,
    batchnorm_modules,
    batchnorm_state,
    restore_batchnorm_state,
    warmup_batchnorm,
)


@dataclass(repr=False)  # PruneResult's summary, not a dump of every mask
class PaIResult(PruneResult):
    """woodfisher's PruneResult (masks, layers, sparsity, damp=None, config, timings) plus ``collapsed``.

    Attributes:
        collapsed: names of layers left with no weight or a density below ``collapse_density``.
        timings: seconds for warmup, scoring, masking.
        (the others: as :class:`woodfisher.PruneResult`).
    """
    collapsed: List[str] = field(default_factory=list)


if hasattr(torch.serialization, "add_safe_globals"):  # torch >= 2.4
    torch.serialization.add_safe_globals([PaIResult])  # torch.load(weights_only=True) of a saved result


def collapsed_layers(layers: List[dict], collapse_density: float) -> List[str]:
    """Layers with no weight left or a density below ``collapse_density``."""
    return [r["name"] for r in layers if r["nnz"] == 0 or r["nnz"] / r["numel"] < collapse_density]


def _check_args(sparsity, criterion, mode, num_probes, num_batches, warmup_batches, min_density, hvp,
                synflow_iterations, train_mode, collapse_density, loss_fn):
    check_sparsity(sparsity)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if mode not in ("global", "layerwise"):
        raise ValueError(f"mode must be 'global' or 'layerwise', got {mode!r}")
    check_int("num_probes", num_probes)
    check_num_batches(num_batches)
    check_int("warmup_batches", warmup_batches, low=0)
    check_int("synflow_iterations", synflow_iterations)
    check_min_density(min_density, sparsity)
    if hvp not in HVP_METHODS:
        raise ValueError(f"hvp must be one of {HVP_METHODS}, got {hvp!r}")
    if not isinstance(train_mode, bool):
        raise ValueError(f"train_mode must be True or False, got {train_mode!r}")
    check_collapse_density(collapse_density)
    check_loss_fn(loss_fn)


def prune_at_init(model: nn.Module, loader: Optional[Iterable] = None, *, sparsity: float,
                  criterion: str = "hutchinson", mode: str = "global", loss_fn: Optional[Callable] = None,
                  params: Params = None, num_probes: int = 8, num_batches: Optional[int] = None,
                  warmup_batches: int = 10, min_density: float = 0.0, synflow_iterations: int = 100,
                  hvp: str = "autograd", train_mode: bool = False, input_shape: Optional[Sequence[int]] = None,
                  collapse_density: float = 1e-3, seed: int = 0, progress: bool = True,
                  batch_adapter: Optional[Callable] = None, modules: Params = None,
                  exclude: Optional[Sequence[str]] = None) -> PaIResult:
    """Prune ``model`` before training; its pruned weights are set to exactly 0 in place.

    The weights are the package's prune targets (:func:`woodfisher.targets.resolve_targets`):
    wrapped models (DataParallel, DDP, torch.compile) are seen through and masks are keyed
    as the caller's ``state_dict`` names the weights (``"module.fc.weight"``); tied weights
    are one target; a weight under ``torch.nn.utils.prune`` (or a mask parametrization) is
    scored and its mask updated. Entries already pruned (mask 0, or exact zeros) stay pruned
    and count towards ``sparsity``; the reported sparsity is the true one. Half-precision
    models are scored with float32 statistics. Every module's train/eval flag and, apart
    from the warm-up, every BatchNorm buffer are left as they were; a call that fails
    restores the weights and BatchNorm buffers.

    Args:
        loader: batches (see :mod:`woodfisher.batches`; tuples, dicts, any format through
            ``batch_adapter``); needed by data-dependent criteria and the warm-up (synflow only
            reads the input structure from its first batch, or takes ``input_shape``).
            Single-pass loaders (generators) are fine: no batch is lost to a peek or the warm-up.
        sparsity: target fraction of zeros over the scored weights, in [0, 1).
        criterion: one of CRITERIA (see :mod:`woodfisher.pai.criteria`).
        mode: "global" (one threshold) or "layerwise" (each layer at ``sparsity``).
        loss_fn: ``loss_fn(predictions, targets)`` (default: :func:`woodfisher.losses.default_loss`,
            or the model's ``outputs.loss``).
        params: names of the weights / modules to prune (default: the package's default targets).
        modules: the same as ``params``, under the name every other pruning call and the CLI give it
            (``modules=`` of :func:`woodfisher.prune_one_shot`); pass one of the two.
        exclude: names, module names or shell-style patterns of weights left out of those (``exclude=`` of
            :func:`woodfisher.prune_one_shot`: :func:`woodfisher.target_lookup.remove_excluded`).
        num_probes: Hutchinson probes per batch; num_batches: scoring batches (None = all).
        warmup_batches: BatchNorm warm-up passes before scoring (0 = off; no-op without BN).
        min_density: each layer keeps at least this fraction of its weights.
        synflow_iterations: SynFlow rounds (exponential schedule to ``sparsity``).
        train_mode: score with the modes of training (batch statistics; see
            :mod:`woodfisher.pai.warmup`); default eval mode, which uses the (warmed-up) running
            statistics. BN buffers are restored after train-mode scoring. The Fisher criteria
            always take their per-sample gradients in eval mode.
        collapse_density: layers below this density are reported in ``collapsed``.
        batch_adapter: loader item -> :class:`woodfisher.Batch`.
    Returns:
        PaIResult.
    Raises:
        ValueError: bad arguments or names, no / empty loader where one is needed, before
            anything is modified.
    """
    _check_args(sparsity, criterion, mode, num_probes, num_batches, warmup_batches, min_density, hvp,
                synflow_iterations, train_mode, collapse_density, loss_fn)
    if params is not None and modules is not None:
        raise ValueError(f"params and modules name the same thing (the weights to prune); pass one of them, got "
                         f"params={params!r} and modules={modules!r}")
    exclude = check_names("exclude", exclude)
    targets = pai_targets(model, params if modules is None else modules, exclude)
    inner = unwrap_model(model)[0]
    warm = warmup_batches > 0 and bool(batchnorm_modules(inner))
    needs_data = criterion not in DATA_FREE or (criterion == "synflow" and input_shape is None)
    example = None
    if loader is not None and (needs_data or warm):  # a loader the call does not read is not touched
        check_loader(loader)
        first, loader = peek(loader)
        if first is None:
            raise ValueError("loader is empty: it yielded no batch")
        example = to_batch(first, batch_adapter)
        if example.size == 0:
            raise ValueError("loader yielded an empty batch")
    elif loader is None and needs_data:
        raise ValueError(f"loader is required for criterion={criterion!r}"
                         + (" (or pass input_shape)" if criterion == "synflow" else ""))
    if train_mode and criterion.startswith("fisher"):
        warnings.warn(f"criterion={criterion!r} takes per-sample gradients in eval mode (batch statistics "
                      "would couple the samples); train_mode=True has no effect on it", stacklevel=2)
    keep = {target.name: target.keep_mask() for target in targets}
    snapshot, bn_saved = Snapshot(targets), batchnorm_state(inner)
    timings: Dict[str, float] = {}
    with display(progress, "woodfisher pai"):
        try:
            t0 = time.perf_counter()
            warmed = 0
            if warm and loader is not None:
                warm_loader = loader
                if is_single_pass(loader):  # keep the warm-up batches for scoring too
                    warm_loader = list(itertools.islice(loader, warmup_batches))
                    loader = itertools.chain(warm_loader, loader)
                warmed = warmup_batchnorm(model, warm_loader, warmup_batches, batch_adapter=batch_adapter)
            timings["warmup"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            ctx = eval_mode(inner)
            with ctx, buffers_kept(inner):  # scoring passes leave the buffers (warm-up statistics included)
                if train_mode:
                    as_in_training(ctx)
                if criterion == "synflow":
                    masks = _iterative_synflow(model, targets, keep, input_shape, example, sparsity, mode,
                                               min_density, synflow_iterations, progress)
                else:
                    with phase("scoring"):
                        scores = compute_scores(model, loader, criterion, params=targets, loss_fn=loss_fn,
                                                num_probes=num_probes, num_batches=num_batches, hvp=hvp,
                                                generator=torch.Generator().manual_seed(seed),
                                                input_shape=input_shape, progress=progress,
                                                batch_adapter=batch_adapter)
                    timings["scoring"] = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    with phase("masking"):
                        masks = select_kept_masks(scores, sparsity, mode, min_density, keep)
            timings["scoring" if criterion == "synflow" else "masking"] = time.perf_counter() - t0
            for target in targets:
                target.write(target.param.detach(), masks[target.name])
        except BaseException:
            snapshot.restore()
            restore_batchnorm_state(bn_saved)
            raise
    config = _call_config(targets, sparsity, criterion, mode, num_probes, num_batches, warmup_batches, warmed,
                          min_density, synflow_iterations, hvp, train_mode, collapse_density, seed, loss_fn,
                          batch_adapter)
    return _result(masks, config, timings, collapse_density, progress)


def _call_config(targets: List[PruneTarget], sparsity, criterion, mode, num_probes, num_batches, warmup_batches,
                  warmed, min_density, synflow_iterations, hvp, train_mode, collapse_density, seed, loss_fn,
                  batch_adapter) -> dict:
    """The options of a call, as recorded in ``PaIResult.config`` (callables by name)."""
    def name_of(fn, default):
        return default if fn is None else getattr(fn, "__name__", type(fn).__name__)

    return dict(sparsity=sparsity, criterion=criterion, mode=mode, params=[target.name for target in targets],
                num_probes=num_probes, num_batches=num_batches, warmup_batches=warmup_batches,
                warmup_samples=warmed, min_density=min_density, synflow_iterations=synflow_iterations, hvp=hvp,
                train_mode=train_mode, collapse_density=collapse_density, seed=seed,
                loss_fn=name_of(loss_fn, "default_loss"), batch_adapter=name_of(batch_adapter, None))


def _result(masks, config, timings, collapse_density, progress) -> PaIResult:
    layers = layer_rows(masks)
    collapsed = collapsed_layers(layers, collapse_density)
    if collapsed and progress:
        warnings.warn(f"layer collapse: {collapsed} pruned to (near) 100%; consider min_density > 0", stacklevel=3)
    return PaIResult(masks=masks, layers=layers, sparsity=sparsity_of(masks), damp=None, config=config,
                     timings=timings, collapsed=collapsed)


def _iterative_synflow(model, targets, keep, input_shape, example, sparsity, mode, min_density, iterations,
                       progress) -> Dict[str, torch.Tensor]:
    """SynFlow with the exponential schedule s_k = 1 - (1 - s)^(k / n), k = 1..n (Tanaka et al. 2020, Alg. 1)."""
    net = linearize(model)
    masks = keep
    for k in tracked(range(1, iterations + 1), "synflow", "round", progress, total=iterations):
        s_k = 1.0 - (1.0 - sparsity) ** (k / iterations)
        scores = synflow_scores(model, input_shape, params=targets, masks=masks, example=example, _linearized=net)
        masks = select_kept_masks(scores, s_k, mode, min_density, masks)
    return masks
