"""Gradient collection for the empirical (or sampled) Fisher.

Each of the ``num_grads`` gradients ("fisher subsample size", m) is the gradient of
the mean loss over ``fisher_batch_size`` samples ("fisher mini-batch size"). They are
computed with ``torch.func`` (``functional_call`` + ``vmap`` + ``grad``), vmapped over
groups of samples, so ``fisher_batch_size=1`` gives exact per-sample gradients in one
batched call per loader batch; models or losses that ``vmap`` cannot trace fall back to
a plain autograd loop over the groups (same numbers, slower).

The model is put in eval mode while gradients are collected: BatchNorm then uses its
running statistics, so every sample's gradient depends on that sample only (in train
mode the batch statistics couple the samples of a batch, per-sample gradients are not
defined, and ``vmap`` refuses the in-place running-stat update); dropout is off, so
the gradients are those of the deterministic network that is pruned. The previous
train/eval flag of every module is restored afterwards.

Already-pruned weights (keep-mask False) get their gradient entries zeroed before
the Fisher, so they stay decoupled from the rest and are never revived.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from .layout import PrunableLayer

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is a dependency, this only guards odd installs
    tqdm = None


def split_batch(batch):
    """(inputs, targets) from a loader item; refuses anything else with a ValueError."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError("loader must yield (inputs, targets) batches, got "
                     f"{type(batch).__name__}")


class eval_mode:
    """Context manager: module in eval mode, every submodule's flag restored on exit."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        for m, flag in self.flags:
            m.training = flag
        return False


class GradientCollector:
    """Computes m masked gradients of the prunable weights, chunk by chunk.

    Args:
        model: the network (not modified).
        loader: iterable of ``(inputs, targets)`` batches.
        layers: the prunable layers (:func:`woodfisher.layout.resolve_layers`).
        loss_fn: ``loss_fn(outputs, targets)`` -> mean loss (default cross-entropy).
        num_grads: m >= 1.
        fisher_batch_size: samples averaged per gradient (>= 1).
        sampled_fisher: draw targets from the model's predictive distribution
            ``softmax(outputs)`` (outputs (N, K) of logits or log-probabilities) instead
            of using the loader's labels (the paper's Sec. 6.3, for unlabelled data).
        seed: seeds the label sampling.
        keep_masks: {param_name: bool keep-mask}; gradients are zeroed where False.
        want_loss_grad: also compute the mean loss gradient (WoodTaylor): the mean of
            the m gradients, or, with ``sampled_fisher``, of extra gradients taken with
            the loader's labels.
        progress: show a tqdm bar (rate and ETA).

    After :meth:`chunks` is exhausted: ``count`` (gradients produced), ``samples``
    (samples used) and ``loss_grad`` ({param_name: (numel,)} or None).
    """

    def __init__(self, model: nn.Module, loader, layers: List[PrunableLayer], *,
                 loss_fn: Optional[Callable] = None, num_grads: int = 128,
                 fisher_batch_size: int = 1, sampled_fisher: bool = False, seed: int = 0,
                 keep_masks: Optional[Dict[str, torch.Tensor]] = None,
                 want_loss_grad: bool = False, progress: bool = True,
                 desc: str = "Fisher gradients"):
        self.model, self.loader, self.layers = model, loader, layers
        self.loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
        self.num_grads, self.fbs = int(num_grads), int(fisher_batch_size)
        self.sampled, self.seed = bool(sampled_fisher), seed
        self.keep = keep_masks or {}
        self.want_loss_grad, self.progress, self.desc = want_loss_grad, progress, desc
        self.count, self.samples, self.loss_grad = 0, 0, None
        self._use_vmap = True

    # ---- data -------------------------------------------------------------------
    def _groups(self, device) -> Iterator:
        """Yields (x (G, fbs, ...), y (G, fbs, ...)) until num_grads groups were made."""
        left = self.num_grads
        bx = by = None
        for batch in self.loader:
            x, y = split_batch(batch)
            x, y = x.to(device), y.to(device)
            bx = x if bx is None else torch.cat([bx, x])
            by = y if by is None else torch.cat([by, y])
            take = min(bx.shape[0] // self.fbs, left)
            if take:
                n = take * self.fbs
                yield (bx[:n].reshape(take, self.fbs, *bx.shape[1:]),
                       by[:n].reshape(take, self.fbs, *by.shape[1:]))
                bx, by, left = bx[n:], by[n:], left - take
            if left == 0:
                return

    # ---- gradients --------------------------------------------------------------
    def _group_grads(self, params, buffers, xg, yg) -> Dict[str, torch.Tensor]:
        """{key: (G, *shape)} gradients of the mean loss of each group."""
        model, loss_fn = self.model, self.loss_fn
        keys = [layer.key for layer in self.layers]
        fixed = {k: v for k, v in params.items() if k not in keys}

        def group_loss(sub, x, y):
            out = functional_call(model, ({**fixed, **sub}, buffers), (x,))
            return loss_fn(out, y)

        sub = {k: params[k] for k in keys}
        if self._use_vmap:
            try:
                return vmap(grad(group_loss), in_dims=(None, 0, 0), randomness="different")(sub, xg, yg)
            except Exception:  # noqa: BLE001 - untraceable model/loss: use the autograd loop
                self._use_vmap = False
        out = {k: [] for k in keys}
        for x, y in zip(xg, yg):
            s = {k: v.detach().requires_grad_(True) for k, v in sub.items()}
            with torch.enable_grad():
                gs = torch.autograd.grad(group_loss(s, x, y), [s[k] for k in keys], allow_unused=True)
            for k, g in zip(keys, gs):
                out[k].append(torch.zeros_like(s[k]) if g is None else g)
        return {k: torch.stack(v) for k, v in out.items()}

    def _sample_labels(self, params, buffers, xg, gen) -> torch.Tensor:
        with torch.no_grad():
            flat = xg.reshape(-1, *xg.shape[2:])
            out = functional_call(self.model, (params, buffers), (flat,))
        if out.dim() != 2:
            raise ValueError("sampled_fisher needs classification outputs of shape (N, classes), "
                             f"got {tuple(out.shape)}")
        probs = torch.softmax(out.detach().double(), dim=1)
        labels = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(1).to(out.device)
        return labels.reshape(xg.shape[0], xg.shape[1])

    def _masked(self, grads: Dict[str, torch.Tensor], count: int) -> Dict[str, torch.Tensor]:
        flat = {}
        for layer in self.layers:
            g = grads[layer.key].reshape(count, layer.numel)
            keep = self.keep.get(layer.param_name)
            if keep is not None:
                g = g * keep.reshape(1, -1).to(g.dtype)
            if not bool(torch.isfinite(g).all()):
                raise ValueError(f"gradients of layer {layer.name!r} contain NaN or Inf; "
                                 "check the model, the data and the loss")
            flat[layer.param_name] = g.detach()
        return flat

    def _pieces(self) -> Iterator[Dict[str, torch.Tensor]]:
        """{param_name: (G, numel)} per loader step, masked and checked."""
        params = {k: v.detach() for k, v in self.model.named_parameters()}
        buffers = {k: v.detach() for k, v in self.model.named_buffers()}
        device = next(iter(params.values())).device
        gen = torch.Generator().manual_seed(int(self.seed))
        loss_sum = None
        bar = None
        if tqdm is not None and self.progress:
            bar = tqdm(total=self.num_grads, desc=self.desc, unit="grad", leave=False)
        try:
            with eval_mode(self.model):
                for xg, yg in self._groups(device):
                    count = xg.shape[0]
                    labels = self._sample_labels(params, buffers, xg, gen) if self.sampled else yg
                    piece = self._masked(self._group_grads(params, buffers, xg, labels), count)
                    if self.want_loss_grad:
                        lg = piece if not self.sampled else \
                            self._masked(self._group_grads(params, buffers, xg, yg), count)
                        part = {k: v.sum(0) for k, v in lg.items()}
                        loss_sum = part if loss_sum is None else {k: loss_sum[k] + part[k] for k in part}
                    self.count += count
                    self.samples += count * self.fbs
                    if bar is not None:
                        bar.update(count)
                    yield piece
        finally:
            if bar is not None:
                bar.close()
        if self.count == 0:
            raise ValueError(f"loader yielded fewer than fisher_batch_size={self.fbs} samples: "
                             "no gradient could be computed (empty data loader?)")
        if self.count < self.num_grads:
            warnings.warn(f"loader ran out after {self.count} of num_grads={self.num_grads} gradients "
                          f"({self.samples} samples); kept gradients are averaged over {self.count}, while "
                          f"streamed ones keep the normaliser num_grads (their Fisher term is scaled "
                          f"by {self.count}/{self.num_grads})", stacklevel=3)
        if loss_sum is not None:
            self.loss_grad = {k: v / self.count for k, v in loss_sum.items()}

    def chunks(self, k: int) -> Iterator[Dict[str, torch.Tensor]]:
        """Yields {param_name: (k_i, numel)} with k_i = k except maybe the last."""
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
        """All gradients at once: {param_name: (m, numel)}."""
        parts = list(self._pieces())
        return {n: torch.cat([p[n] for p in parts]) for n in parts[0]}
