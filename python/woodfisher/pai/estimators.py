"""Diagonal curvature estimators in linear time and memory.

* :func:`hutchinson_diagonal`: diag(H) ~ E_z[z * (H z)] with Rademacher probes z
  (Hutchinson 1990; unbiased since E[z z^T] = I); H z by double backward or torch.func
  (jvp of grad, Pearlmutter 1994).
* :func:`fisher_diagonal`: the empirical Fisher diagonal (1/N) sum_i (grad loss_i)^2, from
  the package's per-sample gradients (:class:`woodfisher.gradients.GradientCollector`) and
  its one Fisher-diagonal sum (:func:`woodfisher.diagonal.empirical_fisher_diagonal`),
  shared with ``method="diag_fisher"``.
* :func:`loss_gradient` and :func:`hessian_gradient_product` (H g for GraSP).

All estimates refer to the mean loss over the samples seen: a batch of b samples out of
N weighs b / N. Weights are the package's prune targets (:func:`woodfisher.targets.resolve_targets`:
wrappers seen through, names as the caller's model names them, tied weights once,
``torch.nn.utils.prune`` / parametrize storage); results are dicts {name: (weight shape)}.
Batches go through the batch adapter (:mod:`woodfisher.batches`). Half-precision models
(float16 / bfloat16) are differentiated in float32 (:func:`woodfisher.precision.compute_dtype`):
results are float32. Hessian-vector products run attention through the math kernel of
``scaled_dot_product_attention`` (the fused kernels have no double backward).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..batches import Batch, to_batch
from ..config import check_int
from ..diagonal import empirical_fisher_diagonal
from ..gradients import GradientCollector
from ..losses import compute_loss
from ..per_sample import check_batch_statistics
from ..precision import compute_dtype, native_state
from ..progress import progress_bar
from ..recompute import checkpointing_off
from ..targets import PruneTarget, resolve_targets, unwrap_model

HVP_METHODS = ("autograd", "func")
Params = Optional[Sequence]  # parameter / module names, or PruneTargets


@dataclass
class DiagonalEstimate:
    """A diagonal curvature estimate and the mean loss gradient (the inputs of the PaI criteria).

    Attributes:
        diag: {weight name: (weight shape) estimate of diag(H) or of the empirical Fisher diagonal}.
        grad: {weight name: (weight shape) gradient of the mean loss}.
        num_samples: samples seen.
        num_probes: Rademacher probes per batch (0 for the Fisher diagonal).
    """
    diag: Dict[str, torch.Tensor]
    grad: Dict[str, torch.Tensor]
    num_samples: int
    num_probes: int


def rademacher(shape, generator: Optional[torch.Generator] = None, device=None,
               dtype=torch.float32) -> torch.Tensor:
    """Tensor of i.i.d. +-1 entries (Hutchinson probes; drawn on the CPU generator, then moved).

    Args:
        shape: the tensor's shape. generator: a CPU ``torch.Generator`` or None.
        device, dtype: of the result.
    Returns:
        Tensor of ``shape`` with entries -1 or +1.
    """
    z = torch.randint(0, 2, tuple(shape), generator=generator, dtype=torch.int8)
    return (2 * z - 1).to(device=device, dtype=dtype)


def pai_targets(model: nn.Module, params: Params, exclude: Optional[Sequence[str]] = None) -> List[PruneTarget]:
    """The scored weights: ``params`` names (module or parameter names; None = the default
    targets) resolved by :func:`woodfisher.targets.resolve_targets`, or PruneTargets as they are; less ``exclude``."""
    if params is not None and not isinstance(params, str) and len(params) \
            and all(isinstance(p, PruneTarget) for p in params):
        if exclude is None:
            return list(params)
        params = [p.name for p in params]
    try:
        targets = resolve_targets(model, params)
    except ValueError as err:
        raise ValueError(f"params={params!r}: {err}") from None
    return targets if exclude is None else resolve_targets(model, params, exclude=exclude)  # errors name exclude


def check_num_batches(num_batches: Optional[int]) -> None:
    if num_batches is not None:
        check_int("num_batches", num_batches)


def math_attention():
    """Context: scaled_dot_product_attention through its math kernel (double-differentiable)."""
    return sdpa_kernel(SDPBackend.MATH)


class BatchLoss:
    """The mean loss of one batch as a function of the target weights.

    Calls the unwrapped model with :func:`torch.func.functional_call`, its parameters and
    buffers upcast to the compute dtype (float32 for half-precision models); the model's
    train/eval flags are used as they are. ``weights``: the targets' storage tensors,
    detached, in the compute dtype.
    """

    def __init__(self, model: nn.Module, targets: List[PruneTarget], loss_fn: Optional[Callable] = None,
                 batch_adapter: Optional[Callable] = None):
        self.inner = unwrap_model(model)[0]
        self.targets, self.keys = targets, [target.key for target in targets]
        self.loss_fn, self.adapter = loss_fn, batch_adapter
        self.model_dtype = targets[0].param.dtype
        self.dtype = compute_dtype(self.model_dtype)
        params = {k: self._cast(v) for k, v in self.inner.named_parameters()}
        self.buffers = {k: self._cast(v) for k, v in self.inner.named_buffers()}
        self.weights = [params.pop(k) for k in self.keys]
        self.fixed = params
        self.device = self.weights[0].device
        self._probed = False

    def _cast(self, v: torch.Tensor) -> torch.Tensor:
        return v.detach().to(self.dtype) if v.is_floating_point() else v.detach()

    def batches(self, loader: Iterable, num_batches: Optional[int]) -> Iterator[Batch]:
        """The first ``num_batches`` loader items (all if None) as Batches on the device, floats upcast (or in the
        model's own dtype, for a half model that fails in float32: :func:`woodfisher.precision.native_state`)."""
        for item in itertools.islice(loader, num_batches):
            batch = to_batch(item, self.adapter).to(self.device)
            if batch.size == 0:
                raise ValueError("loader yielded an empty batch")
            if self.dtype != self.model_dtype:
                self._check_runs(batch)  # may switch self.dtype to the model's own
                batch = batch.map_batched(lambda x: x.to(self.dtype) if x.is_floating_point() else x)
            yield batch

    def _check_runs(self, batch: Batch) -> None:
        """Once: run the first sample in the compute dtype; where only the model's own dtype runs, switch to it."""
        if self._probed:
            return
        self._probed = True
        one = batch.take(0, 1).map_batched(lambda x: x.to(self.dtype) if x.is_floating_point() else x)
        try:
            with torch.no_grad():
                self(self.weights, one)
        except RuntimeError as err:
            state = native_state(self.inner, self.model_dtype, one, err)
            if state is not None:
                self.dtype = self.model_dtype
                params = {k: self._cast(v) for k, v in self.inner.named_parameters()}
                self.buffers = {k: self._cast(v) for k, v in self.inner.named_buffers()}
                self.weights = [params.pop(k) for k in self.keys]
                self.fixed = params

    def __call__(self, weights: Sequence[torch.Tensor], batch: Batch) -> torch.Tensor:
        state = {**self.fixed, **dict(zip(self.keys, weights))}
        with checkpointing_off(self.inner):  # no recomputation to run in the backward: autograd.grad works
            out = functional_call(self.inner, (state, self.buffers), tuple(batch.args), dict(batch.kwargs))
        return compute_loss(out, batch.target, self.loss_fn)

    def leaves(self) -> List[torch.Tensor]:
        """Fresh leaf copies of ``weights`` that require grad."""
        return [w.detach().requires_grad_(True) for w in self.weights]

    def named(self, tensors: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {t.name: v.reshape(t.shape) for t, v in zip(self.targets, tensors)}


def tracked(items: Iterable, desc: str, unit: str, enabled: bool, total: Optional[int] = None) -> Iterator:
    """``items``, counted by a phase of the active progress display (:mod:`woodfisher.progress`),
    else by a bar of its own when ``enabled``."""
    bar = progress_bar(total, desc, unit, enabled=enabled)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()


def batch_mean(f: BatchLoss, loader: Iterable, num_batches: Optional[int], fn, desc: str,
               progress: bool) -> tuple:
    """(sample-weighted mean over the batches of the tensors ``fn(batch)`` returns, samples seen)."""
    total, seen = None, 0
    for batch in tracked(f.batches(loader, num_batches), desc, "batch", progress):
        b = batch.size
        parts = fn(batch)
        total = [b * p for p in parts] if total is None else [t + b * p for t, p in zip(total, parts)]
        seen += b
    if seen == 0:
        raise ValueError("loader is empty: it yielded no batch")
    return [t / seen for t in total], seen


def hutchinson_diagonal(model: nn.Module, loader: Iterable, *, params: Params = None,
                        loss_fn: Optional[Callable] = None, num_probes: int = 1,
                        num_batches: Optional[int] = None, hvp: str = "autograd",
                        generator: Optional[torch.Generator] = None, probe_batch: int = 8,
                        progress: bool = False, batch_adapter: Optional[Callable] = None) -> DiagonalEstimate:
    """Hutchinson estimate of diag(H) of the mean loss, ``num_probes`` probes per batch.

    Args:
        loader: batches (see :mod:`woodfisher.batches`); the model is used in its current mode.
        num_probes: Rademacher probes per batch (>= 1); the error falls like 1/sqrt(probes).
        hvp: "autograd" (double backward) or "func" (torch.func forward-over-reverse).
        probe_batch: probes per vectorised Hessian-vector product (vmap over probes;
            memory grows with it, results do not depend on it beyond rounding).
    Returns:
        DiagonalEstimate with diag {name: (shape)} and the mean gradient {name: (shape)}.
    Raises:
        ValueError: bad arguments, an empty loader.
    """
    check_int("num_probes", num_probes)
    check_int("probe_batch", probe_batch)
    check_num_batches(num_batches)
    if hvp not in HVP_METHODS:
        raise ValueError(f"hvp must be one of {HVP_METHODS}, got {hvp!r}")
    f = BatchLoss(model, pai_targets(model, params), loss_fn, batch_adapter)
    n = len(f.weights)

    def one_batch(batch):
        g, hvp_fn = _hvp_closure(f, batch, hvp)
        zhz = [torch.zeros_like(w) for w in f.weights]
        for start in range(0, num_probes, probe_batch):
            k = min(probe_batch, num_probes - start)
            zs = [rademacher((k, *w.shape), generator, f.device, w.dtype) for w in f.weights]
            for acc, z, hz in zip(zhz, zs, hvp_fn(zs)):
                acc += (z * hz).sum(0)
        return [d / num_probes for d in zhz] + g

    with math_attention():
        means, seen = batch_mean(f, loader, num_batches, one_batch, "hutchinson", progress)
    return DiagonalEstimate(f.named(means[:n]), f.named(means[n:]), seen, num_probes)


def _hvp_closure(f: BatchLoss, batch: Batch, hvp: str):
    """Mean-loss gradient on ``batch`` and a function mapping probes to Hessian-vector products.

    The returned function takes a list over weights of (k, *shape) probes and returns the
    list of H z, (k, *shape) each; the gradient graph is built once per batch.
    """
    if hvp == "autograd":
        ws = f.leaves()
        with torch.enable_grad():
            g = torch.autograd.grad(f(ws, batch), ws, create_graph=True)

        def hvp_fn(zs):
            if zs[0].shape[0] == 1:
                hz = torch.autograd.grad(g, ws, grad_outputs=[z[0] for z in zs], retain_graph=True)
                return [h.unsqueeze(0) for h in hz]
            return list(torch.autograd.grad(g, ws, grad_outputs=zs, retain_graph=True, is_grads_batched=True))

        return [t.detach() for t in g], hvp_fn

    grad_fn = grad(lambda *ps: f(ps, batch), argnums=tuple(range(len(f.weights))))
    primals = tuple(f.weights)
    g = grad_fn(*primals)
    return [t.detach() for t in g], lambda zs: list(vmap(lambda *t: jvp(grad_fn, primals, t)[1])(*zs))


def fisher_diagonal(model: nn.Module, loader: Iterable, *, params: Params = None,
                    loss_fn: Optional[Callable] = None, num_batches: Optional[int] = None,
                    chunk_size: int = 64, progress: bool = False,
                    batch_adapter: Optional[Callable] = None) -> DiagonalEstimate:
    """Empirical Fisher diagonal (1/N) sum_i (grad loss_i)^2 over every sample seen.

    The diagonal of the (undamped) empirical Fisher of the WoodFisher paper, Sec. 2.
    Per-sample gradients come from :class:`woodfisher.gradients.GradientCollector`, which
    takes them in eval mode whatever the model's mode (BatchNorm batch statistics would
    couple the samples; every module's flag is restored), in float32 for half models.

    Args:
        model: the network. loader: batches (see :mod:`woodfisher.batches`).
        params: module or parameter names (None = the default targets) or PruneTargets.
        loss_fn: (outputs, target) -> mean loss, or None for the default loss.
        num_batches: batches to read (None = all). chunk_size: gradients summed at a time (memory only).
        progress: show progress. batch_adapter: loader item -> :class:`woodfisher.Batch`.
    Returns:
        DiagonalEstimate with diag {name: (shape)} and the mean gradient {name: (shape)}.
    Raises:
        ValueError: an empty loader, NaN / Inf gradients (naming the weight), bad arguments, a BatchNorm without
            running statistics (per-sample gradients undefined: :func:`woodfisher.per_sample.check_batch_statistics`).
    """
    check_int("chunk_size", chunk_size)
    check_num_batches(num_batches)
    targets = pai_targets(model, params)
    check_batch_statistics(unwrap_model(model)[0], 1, "use a criterion of batched gradients (hutchinson, snip, grasp)")
    if num_batches is not None:
        loader = itertools.islice(loader, num_batches)
    collector = GradientCollector(model, loader, targets, loss_fn=loss_fn, num_grads=None, want_loss_grad=True,
                                  progress=progress, desc="fisher", batch_adapter=batch_adapter)
    fd = empirical_fisher_diagonal(collector, chunk_size)
    diag, mean = fd.diag, collector.loss_grad
    return DiagonalEstimate(
        {target.name: diag[target.name].reshape(target.shape) for target in targets},
        {target.name: mean[target.name].reshape(target.shape) for target in targets},
        collector.samples,
        0,
    )


def loss_gradient(model: nn.Module, loader: Iterable, *, params: Params = None,
                  loss_fn: Optional[Callable] = None, num_batches: Optional[int] = None,
                  progress: bool = False, batch_adapter: Optional[Callable] = None) -> Dict[str, torch.Tensor]:
    """Gradient of the mean loss over the samples seen (SNIP's and GraSP's g).

    Args:
        model: the network (used in its current mode). loader: batches.
        params, loss_fn, num_batches, progress, batch_adapter: as in :func:`fisher_diagonal`.
    Returns:
        {weight name: (weight shape)}.
    Raises:
        ValueError: ``num_batches`` not an int >= 1, bad ``params`` names, an empty loader.
    """
    check_num_batches(num_batches)
    f = BatchLoss(model, pai_targets(model, params), loss_fn, batch_adapter)

    def one_batch(batch):
        ws = f.leaves()
        with torch.enable_grad():
            return list(torch.autograd.grad(f(ws, batch), ws))

    return f.named(batch_mean(f, loader, num_batches, one_batch, "gradient", progress)[0])


def hessian_gradient_product(model: nn.Module, loader: Iterable, vector: Dict[str, torch.Tensor], *,
                             params: Params = None, loss_fn: Optional[Callable] = None,
                             num_batches: Optional[int] = None, progress: bool = False,
                             batch_adapter: Optional[Callable] = None) -> Dict[str, torch.Tensor]:
    """``H v`` of the mean loss for a fixed ``vector`` (GraSP, Wang et al. 2020, uses v = g).

    Args:
        model: the network (used in its current mode). loader: batches.
        vector: {weight name: (weight shape)} v, one entry per scored weight.
        params, loss_fn, num_batches, progress, batch_adapter: as in :func:`fisher_diagonal`.
    Returns:
        {weight name: (weight shape)} H v.
    Raises:
        ValueError: ``num_batches`` not an int >= 1, bad ``params`` names, an empty loader.
    """
    check_num_batches(num_batches)
    f = BatchLoss(model, pai_targets(model, params), loss_fn, batch_adapter)
    v = [vector[t.name].detach().to(f.dtype).reshape(w.shape) for t, w in zip(f.targets, f.weights)]

    def one_batch(batch):
        ws = f.leaves()
        with torch.enable_grad():
            g = torch.autograd.grad(f(ws, batch), ws, create_graph=True)
            return list(torch.autograd.grad(g, ws, grad_outputs=v))

    with math_attention():
        return f.named(batch_mean(f, loader, num_batches, one_batch, "hessian-grad", progress)[0])
