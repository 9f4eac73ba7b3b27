"""Saliency criteria for pruning at initialization (higher score = keep).

Second-order (OBD-style, built on a diagonal curvature estimate ``d`` of H or F; LeCun et
al. 1990, "Optimal Brain Damage", Eq. 6):
    hutchinson        0.5 * w^2 * |diag H|       curvature magnitude (the default)
    obd_hutchinson    0.5 * w^2 * diag H         the signed OBD saliency; negative-curvature
                                                 weights rank lowest
    hutchinson_taylor |-g*w + 0.5 * w^2 * diag H|  |second-order Taylor change of the loss|
                                                 when w is zeroed (at init g != 0)
    fisher            0.5 * w^2 * diag F         OBD with the empirical Fisher (always >= 0)
    fisher_taylor     |-g*w + 0.5 * w^2 * diag F|
Baselines:
    snip      |g * w|                 (Lee et al. 2019, connection sensitivity)
    grasp     w * (H g)               (Wang et al. 2020: they prune the largest -w*Hg)
    synflow   |w * dR/dw|, R = 1^T f_|W|(1) (Tanaka et al. 2020, data-free, run iteratively)
    magnitude |w|
    random    uniform random scores

``w`` is the weight the model computes with (storage times any ``torch.nn.utils.prune``
mask); scores are float32 for half-precision models.
"""
from __future__ import annotations

import itertools
from typing import Callable, Dict, Iterable, Optional, Sequence

import torch
import torch.nn as nn

from ..batches import Batch, is_single_pass, peek, to_batch
from ..losses import logits_of
from ..precision import compute_dtype
from ..state import clone_model
from ..targets import PRUNABLE_TYPES, resolve_targets, unwrap_model
from . import estimators as est
from .estimators import Params, pai_targets

SECOND_ORDER = ("hutchinson", "obd_hutchinson", "hutchinson_taylor", "fisher", "fisher_taylor")
BASELINES = ("snip", "grasp", "synflow", "magnitude", "random")
CRITERIA = SECOND_ORDER + BASELINES
DATA_FREE = ("synflow", "magnitude", "random")

Scores = Dict[str, torch.Tensor]


def obd_saliency(weight: torch.Tensor, diag: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    """0.5 * w^2 * d (|d| when ``absolute``): the OBD loss increase of zeroing w."""
    return 0.5 * weight.square() * (diag.abs() if absolute else diag)


def taylor2_saliency(weight: torch.Tensor, grad: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    """|dL| for dw = -w to second order: |-g*w + 0.5 * w^2 * d|."""
    return (-grad * weight + 0.5 * weight.square() * diag).abs()


def linearize(model: nn.Module) -> nn.Module:
    """float64 eval-mode copy of the (unwrapped) model, |.| applied to every floating parameter and buffer.

    Every ``nn.Embedding`` of the copy reads an all-ones one-hot input: its output is the
    sum of its (absolute) rows at every position (SynFlow's all-ones input, for token inputs).
    """
    net = clone_model(unwrap_model(model)[0]).double().eval()
    with torch.no_grad():
        for t in list(net.parameters()) + list(net.buffers()):
            if t.is_floating_point():
                t.abs_()
    for m in net.modules():
        if isinstance(m, nn.Embedding):
            m.register_forward_pre_hook(lambda _m, args: (torch.zeros_like(args[0], dtype=torch.long), *args[1:]))
            m.register_forward_hook(lambda mod, _args, out: mod.weight.sum(0).expand_as(out).contiguous())
    return net


def synflow_input(example: Optional[Batch], input_shape: Optional[Sequence[int]]) -> Batch:
    """SynFlow's all-ones input: ``(1, *input_shape)`` float64, or one sample shaped like ``example``
    (a batch the loader yields) with every tensor input set to ones (float64 for floating ones)."""
    if input_shape is not None:
        return Batch((torch.ones((1, *input_shape), dtype=torch.float64),), {}, None)
    if example is None:
        raise ValueError("synflow needs input_shape or a loader to read the input shape from")
    one = example.take(0, 1).without_target()
    return one.map_batched(lambda x: torch.ones_like(x, dtype=torch.float64 if x.is_floating_point() else x.dtype))


def synflow_scores(model: nn.Module, input_shape: Optional[Sequence[int]] = None, *, params: Params = None,
                   masks: Optional[Dict[str, torch.Tensor]] = None, example: Optional[Batch] = None,
                   _linearized: Optional[nn.Module] = None) -> Scores:
    """SynFlow scores |w * dR/dw| of a sign-linearised float64 copy of ``model`` (:func:`linearize`).

    Source: Tanaka et al. 2020 ("Pruning neural networks without any data by iteratively
    conserving synaptic flow"). The copy runs in eval mode on an all-ones input (:func:`synflow_input`);
    R is the sum of the output of the last Linear/Conv layer executed (the logits, so a final
    (log-)softmax is ignored), or of the model's predictions when no such layer runs.

    Args:
        model: the network (not modified).
        input_shape: one sample's input shape, e.g. (3, 32, 32), when ``example`` is None.
        params: module or parameter names to score (None = the default targets) or PruneTargets.
        masks: {name: bool keep} zeroing pruned weights of the copy first (cumulative on ``_linearized``).
        example: a :class:`woodfisher.Batch` whose input structure the all-ones input copies.
    Returns:
        {name: (shape)} float32 scores.
    Raises:
        ValueError: naming ``criterion``, for a model that fails in float64 (a forward casting to a fixed dtype).
    """
    targets = pai_targets(model, params)
    net = _linearized if _linearized is not None else linearize(model)
    prefix = unwrap_model(model)[1]
    copies = {prefix + c.name: c for c in resolve_targets(net, [t.name[len(prefix):] for t in targets])}
    with torch.no_grad():
        for n, m in (masks or {}).items():
            copies[n].param.mul_(m.to(copies[n].param.device))
    plist = [copies[t.name].param.requires_grad_(True) for t in targets]
    outputs = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out))
             for m in net.modules() if isinstance(m, PRUNABLE_TYPES)]
    try:
        batch = synflow_input(example, input_shape).to(plist[0].device)
        with torch.enable_grad():
            try:
                out = net(*batch.args, **batch.kwargs)
            except RuntimeError as err:
                raise ValueError(f"criterion='synflow' runs a float64 copy of the model (products of |w| over the "
                                 f"layers overflow float32 in deep networks), and the model fails in float64 "
                                 f"({type(err).__name__}: {str(err).strip()[:200]}); a forward that casts to its "
                                 "parameters' dtype (x.to(self.weight.dtype)) instead of a fixed one runs there, "
                                 "or choose another criterion") from err
            r = (outputs[-1] if outputs else logits_of(out)).sum()
            grads = torch.autograd.grad(r, plist)
    finally:
        for h in hooks:
            h.remove()
    return {t.name: (g * copies[t.name].effective_weight()).abs().detach().float() for t, g in zip(targets, grads)}


def compute_scores(model: nn.Module, loader: Optional[Iterable], criterion: str, *, params: Params = None,
                   loss_fn: Optional[Callable] = None, num_probes: int = 1, num_batches: Optional[int] = None,
                   hvp: str = "autograd", generator: Optional[torch.Generator] = None,
                   input_shape: Optional[Sequence[int]] = None, progress: bool = False,
                   batch_adapter: Optional[Callable] = None) -> Scores:
    """One-shot scores for ``criterion`` (synflow: one iteration); higher = keep.

    The model is used in its current train/eval mode (the Fisher criteria take per-sample
    gradients in eval mode); callers set it (prune_at_init scores in eval mode so that
    warmed-up BatchNorm statistics are used). GraSP reads the loader twice: a single-pass
    loader's first ``num_batches`` batches are kept in memory for it. Formulas and sources:
    the module docstring (OBD, LeCun et al. 1990, Eq. 6, on a diagonal estimate; SNIP, GraSP, SynFlow).

    Args:
        model: the network. loader: batches, or None for a data-free criterion.
        criterion: one of :data:`CRITERIA`.
        params, loss_fn, batch_adapter: as in :func:`woodfisher.pai.fisher_diagonal`.
        num_probes: Hutchinson probes per batch. num_batches: batches to read (None = all).
        hvp: "autograd" | "func". generator: the probes' / random scores' CPU generator.
        input_shape: synflow's sample shape (when no loader gives one). progress: show progress.
    Returns:
        {weight name: (weight shape)} scores.
    Raises:
        ValueError: unknown criterion, bad names, no / empty loader for a data criterion.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    targets = pai_targets(model, params)
    dtype = compute_dtype(targets[0].param.dtype)
    w = {t.name: t.effective_weight().to(dtype) for t in targets}
    if criterion == "magnitude":
        return {n: t.abs() for n, t in w.items()}
    if criterion == "random":
        return {n: torch.rand(t.shape, generator=generator).to(t.device) for n, t in w.items()}
    if criterion == "synflow":
        example = None
        if input_shape is None and loader is not None:
            first, _ = peek(loader)
            example = None if first is None else to_batch(first, batch_adapter)
        return synflow_scores(model, input_shape, params=targets, example=example)
    if loader is None:
        raise ValueError(f"loader is required for criterion={criterion!r}")
    kw = dict(params=targets, loss_fn=loss_fn, num_batches=num_batches, progress=progress, batch_adapter=batch_adapter)
    if criterion == "snip":
        g = est.loss_gradient(model, loader, **kw)
        return {n: (g[n] * w[n]).abs() for n in w}
    if criterion == "grasp":
        if is_single_pass(loader):
            loader = list(itertools.islice(loader, num_batches))
        g = est.loss_gradient(model, loader, **kw)
        hg = est.hessian_gradient_product(model, loader, g, **kw)
        return {n: w[n] * hg[n] for n in w}
    if criterion.startswith("fisher"):
        d = est.fisher_diagonal(model, loader, **kw)
    else:
        d = est.hutchinson_diagonal(model, loader, num_probes=num_probes, hvp=hvp, generator=generator, **kw)
    if criterion.endswith("taylor"):
        return {n: taylor2_saliency(w[n], d.grad[n], d.diag[n]) for n in w}
    return {n: obd_saliency(w[n], d.diag[n], absolute=(criterion == "hutchinson")) for n in w}
