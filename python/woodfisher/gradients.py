"""Gradients of the pruned weights for the empirical (or sampled) Fisher.

Each of the ``num_grads`` gradients ("fisher subsample size", m) is the gradient of the
mean loss over ``fisher_batch_size`` samples ("fisher mini-batch size"). They are computed
with ``torch.func`` (``functional_call`` + ``vmap`` + ``grad``), vmapped over groups of
samples, so ``fisher_batch_size=1`` gives exact per-sample gradients in one batched call
per loader batch; models or losses that ``vmap`` cannot trace fall back to a plain
autograd loop over the groups (same numbers, slower).

Batches go through the batch adapter (:mod:`woodfisher.batches`), so tuples, dicts
(HuggingFace) and bare tensors work, and the loss is the model's own ``outputs.loss`` when
it computes one. Gradients are taken with respect to the pruned Parameters themselves
(:mod:`woodfisher.targets`), so tied weights get the sum over every use and weights read
without calling their module (``nn.MultiheadAttention.in_proj_weight``) get their real
gradient.

The model is put in eval mode while gradients are collected (every submodule's own flag
restored afterwards): BatchNorm then uses its running statistics, so every sample's
gradient depends on that sample only, and dropout is off. Half-precision models
(float16 / bfloat16) are differentiated in float32: the parameters, buffers and floating
inputs are upcast for the computation, so the statistics never underflow.

Already-pruned weights (keep-mask False) get their gradient entries zeroed, so they stay
decoupled from the rest of the Fisher and are never revived.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Iterator, List, Optional

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils import _pytree as pytree

from .batches import Batch, compute_loss, logits_of, sample_targets, to_batch
from .progress import progress_bar
from .state import eval_mode
from .targets import PruneTarget, unwrap_model

__all__ = ["GradientCollector", "compute_dtype"]

HALF = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: float32 for half-precision weights, else the weights' dtype."""
    return torch.float32 if dtype in HALF else dtype


class GradientCollector:
    """Computes m masked gradients of the pruned weights, chunk by chunk.

    Args:
        model: the network (not modified; wrappers are seen through).
        loader: iterable of batches (read through ``batch_adapter``).
        targets: the pruned weights (:func:`woodfisher.targets.resolve_targets`).
        loss_fn: ``loss_fn(predictions, targets)`` -> mean loss (None: see :mod:`woodfisher.batches`).
        num_grads: m >= 1, or None for every sample the loader yields (it must end).
        fisher_batch_size: samples averaged per gradient (>= 1).
        sampled_fisher: draw targets from the model's predictive distribution
            ``softmax(predictions)`` over the last dim instead of using the loader's (the
            paper's Sec. 6.3; unlabelled batches need no dummy targets).
        seed: seeds the target sampling.
        keep_masks: {target name: bool keep-mask}; gradients are zeroed where False.
        want_loss_grad: also compute the mean loss gradient (WoodTaylor): the mean of the
            m gradients, or, with ``sampled_fisher``, of extra gradients taken with the
            loader's targets.
        progress: show a progress bar (rate and ETA): a phase of the active
            :mod:`woodfisher.progress` display, else a tqdm bar of its own.
        batch_adapter: loader item -> :class:`woodfisher.Batch` (None: the default reading).

    After :meth:`chunks` is exhausted: ``count`` (gradients produced), ``samples``
    (samples used) and ``loss_grad`` ({name: (numel,)} or None). Gradients are flat
    (k, numel) in the weight's storage order, in :attr:`dtype`.
    """

    def __init__(self, model: nn.Module, loader, targets: List[PruneTarget], *,
                 loss_fn: Optional[Callable] = None, num_grads: Optional[int] = 128,
                 fisher_batch_size: int = 1, sampled_fisher: bool = False, seed: int = 0,
                 keep_masks: Optional[Dict[str, torch.Tensor]] = None,
                 want_loss_grad: bool = False, progress: bool = True,
                 desc: str = "Fisher gradients", batch_adapter: Optional[Callable] = None):
        self.model, self.loader, self.targets = model, loader, targets
        self.inner = unwrap_model(model)[0]
        self.loss_fn = loss_fn
        self.num_grads = None if num_grads is None else int(num_grads)
        self.fbs = int(fisher_batch_size)
        self.sampled, self.seed = bool(sampled_fisher), seed
        self.keep = keep_masks or {}
        self.want_loss_grad, self.progress, self.desc = want_loss_grad, progress, desc
        self.adapter = batch_adapter
        self.dtype = compute_dtype(targets[0].param.dtype)
        self.count, self.samples, self.loss_grad = 0, 0, None
        self._use_vmap = True

    # ---- data -------------------------------------------------------------------
    def _cast(self, batch: Batch, device) -> Batch:
        batch = batch.to(device)
        if self.dtype != self.targets[0].param.dtype:
            batch = batch.map_batched(lambda x: x.to(self.dtype) if x.is_floating_point() else x)
        return batch

    def _groups(self, device) -> Iterator[Batch]:
        """Yields batches of G groups, every batched leaf shaped (G, fbs, ...), until num_grads groups."""
        left = float("inf") if self.num_grads is None else self.num_grads
        pending: Optional[Batch] = None
        for item in self.loader:
            batch = self._cast(to_batch(item, self.adapter), device)
            if batch.target is None and not self.sampled and "labels" not in batch.kwargs:
                compute_loss(None, None, self.loss_fn)  # raises: no targets and no model loss
            pending = batch if pending is None else Batch.cat([pending, batch])
            have = pending.size
            take = min(have // self.fbs, left)
            if take:
                n = take * self.fbs
                head = pending.take(0, n)
                yield head.map_batched(lambda x: x.reshape(take, self.fbs, *x.shape[1:]))
                pending = pending.take(n, have) if n < have else None
                left -= take
            if left == 0:
                return

    # ---- gradients --------------------------------------------------------------
    def _group_grads(self, params, buffers, groups: Batch) -> Dict[str, torch.Tensor]:
        """{key: (G, *shape)} gradients of the mean loss of each group."""
        model, loss_fn = self.inner, self.loss_fn
        keys = [t.key for t in self.targets]
        fixed = {k: v for k, v in params.items() if k not in keys}

        def group_loss(sub, args, kwargs, target):
            out = functional_call(model, ({**fixed, **sub}, buffers), tuple(args), dict(kwargs))
            return compute_loss(out, target, loss_fn)

        sub = {k: params[k] for k in keys}
        inputs = (groups.args, groups.kwargs, groups.target)
        if self._use_vmap:
            dims = pytree.tree_map(lambda f: 0 if f else None, groups.batched())
            try:
                return vmap(grad(group_loss), in_dims=(None, *dims), randomness="different")(sub, *inputs)
            except Exception:  # noqa: BLE001 - untraceable model/loss: use the autograd loop
                self._use_vmap = False
        out = {k: [] for k in keys}
        for g in range(groups.size):
            one = groups.map_batched(lambda x, g=g: x[g])
            s = {k: v.detach().requires_grad_(True) for k, v in sub.items()}
            with torch.enable_grad():
                gs = torch.autograd.grad(group_loss(s, one.args, one.kwargs, one.target), [s[k] for k in keys],
                                         allow_unused=True)
            for k, gk in zip(keys, gs):
                out[k].append(torch.zeros_like(s[k]) if gk is None else gk)
        return {k: torch.stack(v) for k, v in out.items()}

    def _sampled(self, params, buffers, groups: Batch, gen) -> Batch:
        """The groups with targets drawn from the model's predictions (dict ``labels`` dropped)."""
        bare = groups.without_target()
        count = groups.size
        flat = bare.map_batched(lambda x: x.reshape(-1, *x.shape[2:]))
        with torch.no_grad():
            out = functional_call(self.inner, (params, buffers), flat.args, flat.kwargs)
        labels = sample_targets(logits_of(out), gen)
        return Batch(bare.args, bare.kwargs, labels.reshape(count, self.fbs, *labels.shape[1:]))

    def _masked(self, grads: Dict[str, torch.Tensor], count: int) -> Dict[str, torch.Tensor]:
        flat = {}
        for t in self.targets:
            g = grads[t.key].reshape(count, t.numel)
            keep = self.keep.get(t.name)
            if keep is not None:
                g = g * keep.reshape(1, -1).to(g.dtype)
            if not bool(torch.isfinite(g).all()):
                raise ValueError(f"gradients of layer {t.label!r} contain NaN or Inf; "
                                 "check the model, the data and the loss")
            flat[t.name] = g.detach()
        return flat

    def _pieces(self) -> Iterator[Dict[str, torch.Tensor]]:
        """{name: (G, numel)} per loader step, masked and checked."""
        def cast(v):
            return v.detach().to(self.dtype) if v.is_floating_point() else v.detach()

        params = {k: cast(v) for k, v in self.inner.named_parameters()}
        buffers = {k: cast(v) for k, v in self.inner.named_buffers()}
        device = next(iter(params.values())).device
        gen = torch.Generator().manual_seed(int(self.seed))
        loss_sum = None
        bar = progress_bar(self.num_grads, self.desc, "grad", enabled=self.progress)
        try:
            with eval_mode(self.model):
                for groups in self._groups(device):
                    count = groups.size
                    labelled = self._sampled(params, buffers, groups, gen) if self.sampled else groups
                    piece = self._masked(self._group_grads(params, buffers, labelled), count)
                    if self.want_loss_grad:
                        lg = piece if not self.sampled else \
                            self._masked(self._group_grads(params, buffers, groups), count)
                        part = {k: v.sum(0) for k, v in lg.items()}
                        loss_sum = part if loss_sum is None else {k: loss_sum[k] + part[k] for k in part}
                    self.count += count
                    self.samples += count * self.fbs
                    bar.update(count)
                    yield piece
        finally:
            bar.close()
        if self.count == 0:
            raise ValueError(f"loader yielded fewer than fisher_batch_size={self.fbs} samples: "
                             "no gradient could be computed (empty data loader?)")
        if self.num_grads is not None and self.count < self.num_grads:
            warnings.warn(f"loader ran out after {self.count} of num_grads={self.num_grads} gradients "
                          f"({self.samples} samples); kept gradients are averaged over {self.count}, while "
                          f"streamed ones keep the normaliser num_grads (their Fisher term is scaled "
                          f"by {self.count}/{self.num_grads})", stacklevel=3)
        if loss_sum is not None:
            self.loss_grad = {k: v / self.count for k, v in loss_sum.items()}

    def chunks(self, k: int) -> Iterator[Dict[str, torch.Tensor]]:
        """Yields {name: (k_i, numel)} with k_i = k except maybe the last."""
        pending: List[Dict[str, torch.Tensor]] = []
        have = 0
        for piece in self._pieces():
            pending.append(piece)
            have += next(iter(piece.values())).shape[0]
            while have >= k:
                cat = {n: torch.cat([p[n] for p in pending]) for n in piece}
                yield {n: v[:k] for n, v in cat.items()}
                rest = {n: v[k:] for n, v in cat.items()}
                have -= k
                pending = [rest] if have else []
        if have:
            yield {n: torch.cat([p[n] for p in pending]) for n in pending[0]}

    def collect(self) -> Dict[str, torch.Tensor]:
        """All gradients at once: {name: (m, numel)}."""
        parts = list(self._pieces())
        return {n: torch.cat([p[n] for p in parts]) for n in parts[0]}
