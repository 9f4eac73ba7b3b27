"""K-FAC OBS pruning baseline (Linear and Conv2d layers, whole-layer Kronecker blocks).

For a Linear layer ``s = W a`` with W of shape (out, in), one sample's weight gradient
is ``g a^T`` (g = dL/ds). Flattening W row-major, ``vec_row(g a^T) = g (x) a`` (Kronecker
product, out-factor first), so the Fisher block is

    F = E[(g g^T) (x) (a a^T)]  ~  S (x) A,    S = E[g g^T] (out x out), A = E[a a^T] (in x in).

The order matters: ``A (x) S`` is the Fisher of the *column-major* flattening, the
mistake the WoodFisher paper's reviewers pointed out. With one sample the
factorisation is exact (tested against the dense Fisher).

Conv2d uses the standard unfolding (KFC, Grosse & Martens 2016): a are the
``in * kh * kw`` input patches at each of the T output positions (``F.unfold``, the
same order as the row-major flattening of the (out, in, kh, kw) weight), g the output
gradients at those positions, ``A = E_{n,t}[a a^T]`` and ``S = T * E_{n,t}[g g^T]``.
Conv1d/Conv3d and grouped or non-zero-padded convolutions are refused.

Damping (factored Tikhonov with the pi correction of Martens & Grosse 2015):
``A + pi sqrt(lambda) I`` and ``S + sqrt(lambda)/pi I`` with
``pi = sqrt((tr A / in) / (tr S / out))``. The inverse is ``S^-1 (x) A^-1``: its diagonal
is ``outer(diag S^-1, diag A^-1)`` and ``F^-1 vec_row(V) = vec_row(S^-1 V A^-1)``.
Already-pruned weights cannot be masked inside Kronecker factors; they are kept at
exactly zero after every update instead.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .damping import auto_damp
from .fisher import eval_mode, split_batch
from .layout import PrunableLayer
from .masks import select_kept_masks

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


@dataclass
class KFACFactors:
    """Kronecker factors of one layer (float64): A (in', in'), S (out, out), samples used."""

    A: torch.Tensor
    S: torch.Tensor
    samples: int


def check_kfac_layer(layer: PrunableLayer) -> None:
    """Refuse layers the K-FAC baseline does not model, naming them."""
    m = layer.module
    if isinstance(m, nn.Linear):
        return
    if isinstance(m, nn.Conv2d):
        if m.groups != 1 or isinstance(m.padding, str) or m.padding_mode != "zeros":
            raise ValueError(f"method='kfac' supports Conv2d with groups=1, numeric zero padding only; "
                             f"layer {layer.name!r} is {m}")
        return
    raise ValueError(f"method='kfac' supports Linear and Conv2d layers only; layer {layer.name!r} "
                     f"is a {type(m).__name__}")


def _patches(layer: PrunableLayer, x: torch.Tensor) -> torch.Tensor:
    """Inputs -> (rows, in') with one row per (sample, position)."""
    m = layer.module
    if isinstance(m, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _out_grads(layer: PrunableLayer, g: torch.Tensor) -> torch.Tensor:
    """Output gradients -> (rows, out), rows in the order of :func:`_patches`."""
    if isinstance(layer.module, nn.Linear):
        return g.reshape(-1, g.shape[-1])
    return g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])


def kfac_factors(model: nn.Module, loader, layers: List[PrunableLayer], *,
                 loss_fn: Optional[Callable] = None, num_samples: int = 128,
                 sampled_fisher: bool = False, seed: int = 0,
                 progress: bool = True) -> Dict[str, KFACFactors]:
    """Estimate A and S of every layer from ``num_samples`` samples (model in eval mode).

    The per-sample output gradient is recovered from the mean loss as
    ``batch_size * dL/ds``. With ``sampled_fisher`` the targets are drawn from
    ``softmax(outputs)``. Returns {param_name: KFACFactors}.
    """
    for layer in layers:
        check_kfac_layer(layer)
    loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(int(seed))
    sums = {l.param_name: [0.0, 0.0, 0] for l in layers}
    seen: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(layer):
        def fn(module, inputs, output):
            seen[layer.param_name] = (inputs[0].detach(), output)
        return fn

    handles = [l.module.register_forward_hook(hook(l)) for l in layers]
    left = int(num_samples)
    bar = tqdm(total=left, desc="K-FAC factors", unit="sample", leave=False) \
        if (tqdm is not None and progress) else None
    try:
        with eval_mode(model), torch.enable_grad():
            for batch in loader:
                if left <= 0:
                    break
                x, y = split_batch(batch)
                x, y = x[:left].to(device), y[:left].to(device)
                n = x.shape[0]
                seen.clear()
                out = model(x)
                if sampled_fisher:
                    probs = torch.softmax(out.detach().double(), dim=1).cpu()
                    y = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(device)
                loss = loss_fn(out, y)
                outs = [seen[l.param_name][1] for l in layers]
                grads = torch.autograd.grad(loss, outs, allow_unused=True)
                for l, g in zip(layers, grads):
                    a = _patches(l, seen[l.param_name][0]).double()
                    if g is None:
                        g = torch.zeros_like(outs[layers.index(l)])
                    go = _out_grads(l, g.detach()).double() * n
                    positions = a.shape[0] // n
                    if not (torch.isfinite(a).all() and torch.isfinite(go).all()):
                        raise ValueError(f"activations or gradients of layer {l.name!r} contain NaN or Inf")
                    acc = sums[l.param_name]
                    acc[0] = acc[0] + a.T @ a / positions
                    acc[1] = acc[1] + go.T @ go
                    acc[2] += n
                left -= n
                if bar is not None:
                    bar.update(n)
    finally:
        for h in handles:
            h.remove()
        if bar is not None:
            bar.close()
    total = int(num_samples) - left
    if total <= 0:
        raise ValueError("loader yielded no samples (empty data loader?)")
    return {k: KFACFactors(A=v[0] / v[2], S=v[1] / v[2], samples=v[2]) for k, v in sums.items()}


def kfac_inverse(factors: KFACFactors, damp: float, pi: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """(S_d^-1 (out, out), A_d^-1 (in', in')) of the damped factors, float64."""
    a, s = factors.A, factors.S
    ta, ts = float(torch.trace(a)) / a.shape[0], float(torch.trace(s)) / s.shape[0]
    p = math.sqrt(ta / ts) if (pi and ta > 0 and ts > 0) else 1.0
    root = math.sqrt(damp)
    a_d = a + p * root * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    s_d = s + root / p * torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
    return torch.linalg.inv(s_d), torch.linalg.inv(a_d)


def kfac_saliency(weight2d: torch.Tensor, s_inv: torch.Tensor, a_inv: torch.Tensor) -> torch.Tensor:
    """rho (out, in') = W^2 / (2 diag(S^-1 (x) A^-1)) with the diagonal as an outer product."""
    diag = torch.outer(torch.diagonal(s_inv), torch.diagonal(a_inv))
    return weight2d.double().square() / (2.0 * diag)


def kfac_update(weight2d: torch.Tensor, prune2d: torch.Tensor, s_inv: torch.Tensor,
                a_inv: torch.Tensor) -> torch.Tensor:
    """OBS update with the simultaneous-removal approximation, from the factors.

    ``v = W / diag`` on the pruned set, ``dW = -S^-1 V A^-1`` (``= -F^-1 vec_row(V)``),
    pruned entries exactly 0. Returns the new (out, in') weights in float64.
    """
    w = weight2d.double()
    diag = torch.outer(torch.diagonal(s_inv), torch.diagonal(a_inv))
    v = torch.where(prune2d, w / diag, torch.zeros_like(w))
    return (w - s_inv @ v @ a_inv).masked_fill(prune2d, 0.0)


def kfac_step(model, loader, layers, a, target, keep, fpp, timings):
    """One K-FAC OBS step of :func:`woodfisher.prune_one_shot` (whole layers).

    ``a`` holds prune_one_shot's arguments; uses ``num_grads * fisher_batch_size``
    samples. Returns (new weights, keep-masks, damp) as {param_name: tensor}.
    """
    t0 = time.perf_counter()
    factors = kfac_factors(model, loader, layers, loss_fn=a["loss_fn"],
                           num_samples=a["num_grads"] * a["fisher_batch_size"],
                           sampled_fisher=a["sampled_fisher"], seed=a["seed"], progress=a["progress"])
    timings["gradients"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    damp = a["damp"]
    if damp == "auto":  # mean diagonal of S (x) A is mean(diag S) * mean(diag A)
        numel = sum(l.numel for l in layers)
        total = sum(float(torch.diagonal(f.S).sum() * torch.diagonal(f.A).sum()) for f in factors.values())
        damp = auto_damp(total, 1, numel)
    invs = {n: kfac_inverse(f, damp) for n, f in factors.items()}
    timings["inverse"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    w2 = {l.param_name: l.effective_weight().reshape(l.shape[0], -1) for l in layers}
    scores = {}
    for l in layers:
        n = l.param_name
        scores[n] = kfac_saliency(w2[n], *invs[n]).reshape(l.shape)
    masks = select_kept_masks(scores, target, a["mode"], a["min_density"], keep, fpp, a["beta"])
    timings["select"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    new = {}
    for l in layers:
        n = l.param_name
        if a["obs_update"]:
            prune = ~masks[n].reshape(l.shape[0], -1)
            new[n] = kfac_update(w2[n], prune, *invs[n]).reshape(l.shape)
        else:
            new[n] = l.effective_weight() * masks[n]
    timings["update"] += time.perf_counter() - t0
    return new, masks, damp
