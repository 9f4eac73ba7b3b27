"""Saliency criteria for pruning at initialization (higher score = keep).

Second-order (OBD-style, built on a diagonal curvature estimate ``d`` of H or F):
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
"""
from __future__ import annotations

import copy
from typing import Dict, Iterable, Optional, Sequence

import torch
import torch.nn as nn

from . import estimators as est
from ._common import PRUNABLE_TYPES, LossFn, model_device, prunable_parameters

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


def synflow_scores(model: nn.Module, input_shape: Sequence[int], *, params: Optional[Sequence[str]] = None,
                   masks: Optional[Dict[str, torch.Tensor]] = None, _linearized: Optional[nn.Module] = None) -> Scores:
    """SynFlow scores |w * dR/dw| of a sign-linearised float64 copy of ``model``.

    The copy takes |.| of every floating parameter and buffer, runs in eval mode on an
    all-ones input of shape (1, *input_shape); R is the sum of the output of the last
    Linear/Conv layer executed (the logits, so a final (log-)softmax is ignored).
    ``masks`` {name: bool keep} zero pruned weights first. Returns {name: (shape)} float32.
    """
    names = list(prunable_parameters(model, params))
    net = _linearized if _linearized is not None else linearize(model)
    net_params = dict(net.named_parameters())
    if masks:
        with torch.no_grad():
            for n, m in masks.items():
                net_params[n].mul_(m.to(net_params[n].device))
    outputs = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out))
             for m in net.modules() if isinstance(m, PRUNABLE_TYPES)]
    try:
        x = torch.ones((1, *input_shape), dtype=torch.float64, device=model_device(net))
        net(x)
    finally:
        for h in hooks:
            h.remove()
    plist = [net_params[n] for n in names]
    grads = torch.autograd.grad(outputs[-1].sum(), plist)
    return {n: (g * p).abs().detach().float() for n, g, p in zip(names, grads, plist)}


def linearize(model: nn.Module) -> nn.Module:
    """float64 eval-mode copy with |.| applied to every floating parameter and buffer."""
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for t in list(net.parameters()) + list(net.buffers()):
            if t.is_floating_point():
                t.abs_()
    return net


def compute_scores(model: nn.Module, loader: Optional[Iterable], criterion: str, *,
                   params: Optional[Sequence[str]] = None, loss_fn: Optional[LossFn] = None,
                   num_probes: int = 1, num_batches: Optional[int] = None, hvp: str = "autograd",
                   generator: Optional[torch.Generator] = None, input_shape: Optional[Sequence[int]] = None,
                   progress: bool = False) -> Scores:
    """One-shot scores {name: (shape)} for ``criterion`` (synflow: one iteration).

    The model is used in its current train/eval mode; callers set it (prune_at_init
    scores in eval mode so that warmed-up BatchNorm statistics are used).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    named = prunable_parameters(model, params)
    names = list(named)
    w = {n: p.detach() for n, p in named.items()}
    kw = dict(params=names, loss_fn=loss_fn, num_batches=num_batches, progress=progress)
    if criterion == "magnitude":
        return {n: t.abs() for n, t in w.items()}
    if criterion == "random":
        return {n: torch.rand(t.shape, generator=generator).to(t.device) for n, t in w.items()}
    if criterion == "synflow":
        if input_shape is None:
            raise ValueError("synflow needs input_shape (or a loader to read it from)")
        return synflow_scores(model, input_shape, params=names)
    if criterion == "snip":
        g = est.loss_gradient(model, loader, **kw)
        return {n: (g[n] * w[n]).abs() for n in names}
    if criterion == "grasp":
        g = est.loss_gradient(model, loader, **kw)
        hg = est.hessian_gradient_product(model, loader, g, **kw)
        return {n: w[n] * hg[n] for n in names}
    if criterion.startswith("fisher"):
        d = est.fisher_diagonal(model, loader, **kw)
    else:
        d = est.hutchinson_diagonal(model, loader, num_probes=num_probes, hvp=hvp, generator=generator, **kw)
    if criterion.endswith("taylor"):
        return {n: taylor2_saliency(w[n], d.grad[n], d.diag[n]) for n in names}
    return {n: obd_saliency(w[n], d.diag[n], absolute=(criterion == "hutchinson")) for n in names}
