"""Diagonal curvature estimators in linear time and memory.

* :func:`hutchinson_diagonal`: diag(H) ~ E_z[z * (H z)] with Rademacher probes z
  (unbiased since E[z z^T] = I); H z by double backward or torch.func (jvp of grad).
* :func:`fisher_diagonal`: the empirical Fisher diagonal, mean over samples of the
  squared per-sample loss gradient (torch.func.vmap of per-sample grads).
* :func:`hessian_gradient_product`: H g for GraSP.

All estimates refer to the mean loss over the samples seen: a batch of b samples out of
N weighs b / N. Every function returns / takes dicts {param_name: (param shape)}.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence

import torch
import torch.nn as nn
from torch.func import functional_call, grad, jvp, vmap
from tqdm.auto import tqdm

from ._common import (
    BN_TYPES,
    LossFn,
    batches,
    check_positive_int,
    model_device,
    prunable_parameters,
    resolve_loss,
    zeros_like_dict,
)

HVP_METHODS = ("autograd", "func")


@dataclass
class DiagonalEstimate:
    """diag: {name: (shape) diagonal estimate}; grad: {name: (shape) mean loss gradient}."""
    diag: Dict[str, torch.Tensor]
    grad: Dict[str, torch.Tensor]
    num_samples: int
    num_probes: int


def rademacher(shape, generator: Optional[torch.Generator] = None, device=None,
               dtype=torch.float32) -> torch.Tensor:
    """Tensor of i.i.d. +-1 entries (drawn on the CPU generator, then moved)."""
    z = torch.randint(0, 2, tuple(shape), generator=generator, dtype=torch.int8)
    return (2 * z - 1).to(device=device, dtype=dtype)


def _setup(model, params, loss_fn):
    named = prunable_parameters(model, params)
    return named, resolve_loss(loss_fn), model_device(model)


def _check_seen(n: int):
    if n == 0:
        raise ValueError("loader is empty: it yielded no batch")


def hutchinson_diagonal(model: nn.Module, loader: Iterable, *, params: Optional[Sequence[str]] = None,
                        loss_fn: Optional[LossFn] = None, num_probes: int = 1,
                        num_batches: Optional[int] = None, hvp: str = "autograd",
                        generator: Optional[torch.Generator] = None, probe_batch: int = 8,
                        progress: bool = False) -> DiagonalEstimate:
    """Hutchinson estimate of diag(H) of the mean loss, ``num_probes`` probes per batch.

    Args:
        loader: yields (inputs, targets); the model is used in its current mode.
        num_probes: Rademacher probes per batch (>= 1); the error falls like 1/sqrt(probes).
        hvp: "autograd" (double backward) or "func" (torch.func forward-over-reverse).
        probe_batch: probes per vectorised Hessian-vector product (vmap over probes;
            memory grows with it, results do not depend on it beyond rounding).
    Returns:
        DiagonalEstimate with diag {name: (shape)} and the mean gradient {name: (shape)}.
    """
    check_positive_int(num_probes, "num_probes")
    check_positive_int(probe_batch, "probe_batch")
    if hvp not in HVP_METHODS:
        raise ValueError(f"hvp must be one of {HVP_METHODS}, got {hvp!r}")
    named, loss_fn, device = _setup(model, params, loss_fn)
    names, plist = list(named), list(named.values())
    diag_sum, grad_sum = zeros_like_dict(named), zeros_like_dict(named)
    seen = 0
    for x, y in tqdm(batches(loader, num_batches, device), desc="hutchinson", disable=not progress, leave=False):
        b = x.shape[0]
        zhz = [torch.zeros_like(p) for p in plist]
        g, hvp_fn = _hvp_closure(model, names, plist, loss_fn, x, y, hvp)
        for start in range(0, num_probes, probe_batch):
            k = min(probe_batch, num_probes - start)
            zs = [rademacher((k, *p.shape), generator, device, p.dtype) for p in plist]
            for acc, z, hz in zip(zhz, zs, hvp_fn(zs)):
                acc += (z * hz).sum(0)
        for i, n in enumerate(names):
            diag_sum[n] += (b / num_probes) * zhz[i]
            grad_sum[n] += b * g[i]
        seen += b
    _check_seen(seen)
    return DiagonalEstimate({n: d / seen for n, d in diag_sum.items()},
                            {n: g / seen for n, g in grad_sum.items()}, seen, num_probes)


def _hvp_closure(model, names, plist, loss_fn, x, y, hvp):
    """Mean-loss gradient on (x, y) and a function mapping probes to Hessian-vector products.

    The returned function takes a list over params of (k, *shape) probes and returns the
    list of H z, (k, *shape) each; the gradient graph is built once per batch.
    """
    if hvp == "autograd":
        g = torch.autograd.grad(loss_fn(model(x), y), plist, create_graph=True)

        def hvp_fn(zs):
            if zs[0].shape[0] == 1:
                hz = torch.autograd.grad(g, plist, grad_outputs=[z[0] for z in zs], retain_graph=True)
                return [h.unsqueeze(0) for h in hz]
            return list(torch.autograd.grad(g, plist, grad_outputs=zs, retain_graph=True, is_grads_batched=True))

        return [t.detach() for t in g], hvp_fn

    def loss_of(*ps):
        return loss_fn(functional_call(model, dict(zip(names, ps)), (x,)), y)

    grad_fn = grad(loss_of, argnums=tuple(range(len(plist))))
    primals = tuple(p.detach() for p in plist)
    g = grad_fn(*primals)
    return [t.detach() for t in g], lambda zs: list(vmap(lambda *t: jvp(grad_fn, primals, t)[1])(*zs))


def _per_sample_grads(model, names, plist, loss_fn, x, y, chunk_size):
    """Per-sample gradients, a list over params of (b, *shape)."""
    bn_train = model.training and any(isinstance(m, BN_TYPES) for m in model.modules())
    if bn_train:  # batch statistics make vmap ill-defined: a plain loop, one sample per pass
        rows = []
        for i in range(x.shape[0]):
            loss = loss_fn(model(x[i:i + 1]), y[i:i + 1])
            rows.append(torch.autograd.grad(loss, plist))
        return [torch.stack([r[j] for r in rows]) for j in range(len(plist))]

    def sample_loss(ps, xi, yi):
        out = functional_call(model, dict(zip(names, ps)), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    primals = tuple(p.detach() for p in plist)
    return list(vmap(grad(sample_loss), in_dims=(None, 0, 0), chunk_size=chunk_size)(primals, x, y))


def fisher_diagonal(model: nn.Module, loader: Iterable, *, params: Optional[Sequence[str]] = None,
                    loss_fn: Optional[LossFn] = None, num_batches: Optional[int] = None,
                    chunk_size: Optional[int] = 64, progress: bool = False) -> DiagonalEstimate:
    """Empirical Fisher diagonal (1/N) sum_i (grad loss_i)^2 over every sample seen.

    Per-sample gradients come from torch.func.vmap (``chunk_size`` samples at a time);
    a model in train mode with BatchNorm falls back to a per-sample loop.
    Returns:
        DiagonalEstimate with diag {name: (shape)} and the mean gradient.
    """
    named, loss_fn, device = _setup(model, params, loss_fn)
    names, plist = list(named), list(named.values())
    diag_sum, grad_sum = zeros_like_dict(named), zeros_like_dict(named)
    seen = 0
    for x, y in tqdm(batches(loader, num_batches, device), desc="fisher", disable=not progress, leave=False):
        gs = _per_sample_grads(model, names, plist, loss_fn, x, y, chunk_size)
        for n, g in zip(names, gs):
            diag_sum[n] += (g * g).sum(0)
            grad_sum[n] += g.sum(0)
        seen += x.shape[0]
    _check_seen(seen)
    return DiagonalEstimate({n: d / seen for n, d in diag_sum.items()},
                            {n: g / seen for n, g in grad_sum.items()}, seen, 0)


def loss_gradient(model: nn.Module, loader: Iterable, *, params: Optional[Sequence[str]] = None,
                  loss_fn: Optional[LossFn] = None, num_batches: Optional[int] = None,
                  progress: bool = False) -> Dict[str, torch.Tensor]:
    """Gradient of the mean loss over the samples seen: {name: (shape)}."""
    named, loss_fn, device = _setup(model, params, loss_fn)
    plist = list(named.values())
    total, seen = zeros_like_dict(named), 0
    for x, y in tqdm(batches(loader, num_batches, device), desc="gradient", disable=not progress, leave=False):
        g = torch.autograd.grad(loss_fn(model(x), y), plist)
        for n, gi in zip(named, g):
            total[n] += x.shape[0] * gi
        seen += x.shape[0]
    _check_seen(seen)
    return {n: t / seen for n, t in total.items()}


def hessian_gradient_product(model: nn.Module, loader: Iterable, vector: Dict[str, torch.Tensor], *,
                             params: Optional[Sequence[str]] = None, loss_fn: Optional[LossFn] = None,
                             num_batches: Optional[int] = None, progress: bool = False) -> Dict[str, torch.Tensor]:
    """H v of the mean loss for a fixed ``vector`` {name: (shape)} (GraSP uses v = g)."""
    named, loss_fn, device = _setup(model, params, loss_fn)
    plist = list(named.values())
    v = [vector[n].detach() for n in named]
    total, seen = zeros_like_dict(named), 0
    for x, y in tqdm(batches(loader, num_batches, device), desc="hessian-grad", disable=not progress, leave=False):
        g = torch.autograd.grad(loss_fn(model(x), y), plist, create_graph=True)
        hv = torch.autograd.grad(g, plist, grad_outputs=v)
        for n, h in zip(named, hv):
            total[n] += x.shape[0] * h
        seen += x.shape[0]
    _check_seen(seen)
    return {n: t / seen for n, t in total.items()}
