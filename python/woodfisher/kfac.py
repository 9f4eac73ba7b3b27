"""K-FAC OBS pruning baseline (Linear, HF Conv1D and Conv1d/2d/3d layers, whole-layer Kronecker blocks).

For a Linear layer ``s = W a`` with W of shape (out, in), one sample's weight gradient
is ``g a^T`` (g = dL/ds). Flattening W row-major, ``vec_row(g a^T) = g (x) a`` (Kronecker
product, out-factor first), so the Fisher block is

    F = E[(g g^T) (x) (a a^T)]  ~  S (x) A,    S = E[g g^T] (out x out), A = E[a a^T] (in x in).

The order matters: ``A (x) S`` is the Fisher of the *column-major* flattening, the
mistake the WoodFisher paper's reviewers pointed out. With one sample the
factorisation is exact (tested against the dense Fisher).

HuggingFace's ``Conv1D`` (GPT-2) is a Linear layer with its weight stored transposed,
``(in, out)``: its factors are the Linear ones, for the canonical ``(out, in)`` weight.
Sequence inputs ``(N, T, in)`` give one row per position, as the conv positions below.

The model is run unwrapped (``torch.compile`` / DataParallel wrappers are not called) with
``torch.func.functional_call`` on detached copies of the pruned weights, so frozen weights
(``requires_grad=False``) work and the caller's parameters receive no gradient.

Convolutions (1-, 2- and 3-D) use the standard unfolding (KFC, Grosse & Martens 2016): a are the
``in * prod(kernel)`` input patches at each of the T output positions (the same order as the row-major
flattening of the (out, in, *kernel) weight), g the output gradients at those positions,
``A = E_{n,t}[a a^T]`` and ``S = T * E_{n,t}[g g^T]``.
Grouped or non-zero-padded convolutions, weights shared by several modules
(tied) and weights whose module forward never runs (``nn.MultiheadAttention`` reads
``out_proj.weight`` directly) are refused with a ValueError naming the weight.

Damping (factored Tikhonov with the pi correction of Martens & Grosse 2015):
``A + pi sqrt(lambda) I`` and ``S + sqrt(lambda)/pi I`` with
``pi = sqrt((tr A / in) / (tr S / out))``. The inverse is ``S^-1 (x) A^-1``: its diagonal
is ``outer(diag S^-1, diag A^-1)`` and ``F^-1 vec_row(V) = vec_row(S^-1 V A^-1)``.
Already-pruned weights cannot be masked inside Kronecker factors; they are kept at
exactly zero after every update instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .batches import check_labelled, loader_errors, to_batch
from .losses import compute_loss, logits_of, sample_targets
from .precision import compute_dtype, compute_state, half_dtype, native_state, prepare_batch
from .progress import progress_bar
from .recompute import checkpointing_off
from .state import eval_mode
from .targets import PruneTarget, unwrap_model

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class KFACFactors:
    """Kronecker factors of one layer (float64): A (in', in'), S (out, out), samples used."""

    A: torch.Tensor
    S: torch.Tensor
    samples: int


def check_kfac_layer(layer: PruneTarget) -> None:
    """Refuse weights the K-FAC baseline does not model, naming them."""
    m = layer.module
    if layer.attr != "weight" or layer.kind not in ("linear", "conv", "conv1d_hf"):
        raise ValueError(f"method='kfac' supports the weights of Linear, HF Conv1D and Conv1d/2d/3d modules only; "
                         f"{layer.label!r} is not one")
    if len(layer.owners) > 1:
        raise ValueError(f"method='kfac' models one layer per weight; {layer.label!r} is shared by modules "
                         f"{list(layer.owners)} (tied weights): use method='woodfisher'")
    if isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear):  # nn.MultiheadAttention's out_proj
        raise ValueError(f"method='kfac' needs the inputs and outputs of a module call; {layer.label!r} is the "
                         "out_proj of an nn.MultiheadAttention, which reads the weight without calling the module")
    if isinstance(m, nn.Linear) or layer.kind == "conv1d_hf":
        return
    if isinstance(m, _CONVS):
        if m.groups != 1 or isinstance(m.padding, str) or m.padding_mode != "zeros":
            raise ValueError(f"method='kfac' supports Conv1d/2d/3d with groups=1, numeric zero padding only; "
                             f"layer {layer.label!r} is {m}")
        return
    raise ValueError(f"method='kfac' supports Linear and Conv1d/2d/3d layers only; layer {layer.label!r} "
                     f"is a {type(m).__name__}")


def _batched(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A conv's input or output gradient with its batch dim (an unbatched call: one sample)."""
    return t.unsqueeze(0) if t.dim() == len(m.kernel_size) + 1 else t


def _patches(layer: PruneTarget, x: torch.Tensor) -> torch.Tensor:
    """Inputs -> (rows, in') with one row per (sample, position).

    A conv's rows are its receptive fields, ``in * prod(kernel)`` entries in the order of the row-major flattening of
    its (out, in, *kernel) weight, at each output position in row-major order (the unfolding of KFC, Grosse & Martens
    2016, for any number of spatial dims: zero padding, then one strided window per dim, every ``dilation``-th entry).
    """
    m = layer.module
    if not isinstance(m, _CONVS):  # Linear, HF Conv1D: one row per position of the last dim
        return x.reshape(-1, x.shape[-1])
    x, nd = _batched(m, x), len(m.kernel_size)
    x = F.pad(x, [p for pad in reversed(m.padding) for p in (pad, pad)])
    for i, (k, s, d) in enumerate(zip(m.kernel_size, m.stride, m.dilation)):
        x = x.unfold(2 + i, (k - 1) * d + 1, s)[..., ::d]  # (N, C, positions..., kernel...)
    x = x.permute(0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))  # (N, positions..., C, kernel...)
    return x.reshape(-1, m.in_channels * math.prod(m.kernel_size))


def _out_grads(layer: PruneTarget, g: torch.Tensor) -> torch.Tensor:
    """Output gradients -> (rows, out), rows in the order of :func:`_patches`."""
    if not isinstance(layer.module, _CONVS):
        return g.reshape(-1, g.shape[-1])
    g = _batched(layer.module, g)
    return g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])


def kfac_factors(model: nn.Module, loader, layers: List[PruneTarget], *,
                 loss_fn: Optional[Callable] = None, num_samples: int = 128,
                 sampled_fisher: bool = False, seed: int = 0,
                 progress: bool = True, batch_adapter: Optional[Callable] = None) -> Dict[str, KFACFactors]:
    """Estimate A and S of every layer from ``num_samples`` samples (model in eval mode).

    The per-sample output gradient is recovered from the mean loss as
    ``batch_size * dL/ds``. With ``sampled_fisher`` the targets are drawn from
    ``softmax(outputs)``. Half-precision models run in float32 (as the gradients of the
    other methods do). Returns {weight name: KFACFactors}.

    Raises:
        ValueError: an unsupported weight (:func:`check_kfac_layer`), a layer whose forward
            never ran, NaN/Inf activations or gradients, a batch the model fails on (naming the
            loader), or an empty loader.
    """
    for layer in layers:
        check_kfac_layer(layer)
    inner = unwrap_model(model)[0]
    dtype = compute_dtype(layers[0].param.dtype)
    params, buffers = compute_state(inner, dtype)  # detached; float32 copies for half-precision models
    native = half_dtype(layers[0].param)  # its own dtype, should it fail in float32 (native_state)
    device = layers[0].param.device
    gen = torch.Generator().manual_seed(int(seed))
    sums = {layer.name: [0.0, 0.0, 0] for layer in layers}
    seen: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(layer):
        def fn(module, inputs, output):
            seen[layer.name] = (inputs[0].detach(), output)
        return fn

    handles = [layer.module.register_forward_hook(hook(layer)) for layer in layers]
    left = int(num_samples)
    bar = progress_bar(left, "K-FAC factors", "sample", enabled=progress)
    try:
        # activation checkpointing off: the reentrant variant refuses autograd.grad (woodfisher.recompute)
        with eval_mode(model), torch.enable_grad(), checkpointing_off(inner):
            for item in loader:
                if left <= 0:
                    break
                batch = prepare_batch(to_batch(item, batch_adapter), device, dtype)
                batch = batch.take(0, min(left, batch.size))
                n = batch.size
                if n == 0:  # an empty batch adds nothing
                    continue
                if sampled_fisher:
                    batch = batch.without_target()
                else:
                    check_labelled(batch, loss_fn)
                seen.clear()
                # the unwrapped module on the weights as leaves of their own: outputs get gradients even
                # when the caller froze the weights, and the caller's tensors get none
                leaves = {layer.key: params[layer.key].detach().requires_grad_(True) for layer in layers}
                with loader_errors(batch):
                    try:
                        out = functional_call(inner, ({**params, **leaves}, buffers), batch.args, batch.kwargs)
                    except RuntimeError as err:
                        state, native = native_state(inner, native, batch, err), None
                        if state is None:
                            raise
                        params, buffers, batch = state
                        dtype = params[layers[0].key].dtype  # later batches in it too
                        leaves = {layer.key: params[layer.key].detach().requires_grad_(True) for layer in layers}
                        seen.clear()
                        out = functional_call(inner, ({**params, **leaves}, buffers), batch.args, batch.kwargs)
                    target = sample_targets(logits_of(out), gen) if sampled_fisher else batch.target
                    loss = compute_loss(out, target, loss_fn)
                missing = [layer.name for layer in layers if layer.name not in seen]
                if missing:
                    raise ValueError(f"method='kfac': the forward of the modules of {missing} never ran (the "
                                     "model reads these weights directly); K-FAC needs their inputs and outputs")
                outs = [seen[layer.name][1] for layer in layers]
                with loader_errors(batch):
                    grads = torch.autograd.grad(loss, outs, allow_unused=True)
                for layer, out_l, g in zip(layers, outs, grads):
                    a = _patches(layer, seen[layer.name][0]).double()
                    if g is None:
                        g = torch.zeros_like(out_l)
                    go = _out_grads(layer, g.detach()).double() * n
                    positions = a.shape[0] // n
                    if not (torch.isfinite(a).all() and torch.isfinite(go).all()):
                        raise ValueError(f"activations or gradients of layer {layer.label!r} contain NaN or Inf")
                    acc = sums[layer.name]
                    acc[0] = acc[0] + a.T @ a / positions
                    acc[1] = acc[1] + go.T @ go
                    acc[2] += n
                left -= n
                bar.update(n)
    finally:
        for h in handles:
            h.remove()
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
