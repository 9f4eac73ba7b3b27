"""What the model's own modules do differently while ``vmap`` computes per-sample gradients (each for the block).

- :func:`batch_norm_as_affine`: a BatchNorm in eval mode is an affine map per channel, ``x * scale + shift`` with
  ``scale = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean * scale`` (ATen's own eval-mode
  form). ``native_batch_norm``'s batching rule copies the statistics and parameters for every sample (17 operators
  per layer and ``vmap`` call); written as plain operators the layer takes 7, and with ``scale`` and ``shift``
  computed before the call for all layers at once (a few foreach kernels) 3 (a multiply and an add, and the
  multiply of the backward pass). ResNet-20's 256 per-sample gradients in one call dispatch 209 kernels against 151
  for the model's own batched forward+backward (``benchmarks/step_cpu.py``'s count; 828 in two calls before the
  rewrite), which is what a launch-bound GPU pays for;
- :func:`batched_rnn_states`: recurrent layers called without an initial state get zeros batched like their input;
- :func:`time_major_guard`: a time-major layer fed time on dim 0 is refused (the samples would be time steps);
- :func:`no_mha_fast_path`: PyTorch's fused inference path of ``nn.TransformerEncoder`` stays off.

The gradients are those of the model as it is: tests/test_vmap_modules.py compares them with a float64 autograd
loop over single samples.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .batch_dims import BATCH_DIM_FIX, BatchDimError

__all__ = ["batch_norm_as_affine", "batched_rnn_states", "time_major_guard", "no_mha_fast_path"]

_BN_FORWARD = nn.modules.batchnorm._BatchNorm.forward
_BN_STATE = ("running_mean", "running_var", "weight", "bias")


def _affine_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, folded=None) -> torch.Tensor:
    """A BatchNorm's eval-mode output with plain operators; its own forward where it normalizes with batch
    statistics (training, or no running statistics).

    ``folded``: (the layer's running_mean, running_var, weight, bias, scale, shift) computed before the call
    (:func:`_fold`); used when the layer's tensors are still those (a weight being differentiated is another
    tensor under ``torch.func.grad``: then the scale is computed here, inside the transform).
    """
    if self.training or self.running_mean is None or self.running_var is None:
        return _BN_FORWARD(self, x)
    self._check_input_dim(x)
    shape = (1, -1) + (1,) * (x.dim() - 2)  # channels on dim 1
    if folded is not None and all(getattr(self, key) is t for key, t in zip(_BN_STATE, folded)):
        y = x * folded[4].reshape(shape) + folded[5].reshape(shape)
        return y.to(x.dtype)
    scale = torch.rsqrt(self.running_var + self.eps)
    if self.weight is not None:
        scale = scale * self.weight
    y = (x - self.running_mean.reshape(shape)) * scale.reshape(shape)
    if self.bias is not None:
        y = y + self.bias.reshape(shape)
    return y.to(x.dtype)  # a half input over float32 statistics stays half, as native_batch_norm returns it


def _fold(layers: List[Tuple[str, nn.modules.batchnorm._BatchNorm]], state: Dict[str, torch.Tensor]) -> Dict:
    """{layer: (running_mean, running_var, weight, bias, scale, shift)} of the eval-mode layers whose statistics
    ``state`` (full name -> tensor, as the block passes them to ``functional_call``) holds: ``scale = weight /
    sqrt(running_var + eps)``, ``shift = bias - running_mean * scale``, for all layers in a few foreach kernels."""
    found = []
    for prefix, m in layers:
        held = [state.get(prefix + key) if getattr(m, key) is not None else None for key in _BN_STATE]
        if not m.training and held[0] is not None and held[1] is not None \
                and all((h is None) == (getattr(m, key) is None) for h, key in zip(held, _BN_STATE)):
            found.append((m, held))
    if not found:
        return {}
    with torch.no_grad():
        scales = torch._foreach_add([held[1] for _, held in found], [float(m.eps) for m, _ in found])
        torch._foreach_rsqrt_(scales)
        scaled = [i for i, (_, held) in enumerate(found) if held[2] is not None]
        if scaled:
            torch._foreach_mul_([scales[i] for i in scaled], [found[i][1][2] for i in scaled])
        shifts = torch._foreach_mul([held[0] for _, held in found], scales)
        torch._foreach_neg_(shifts)
        biased = [i for i, (_, held) in enumerate(found) if held[3] is not None]
        if biased:
            torch._foreach_add_([shifts[i] for i in biased], [found[i][1][3] for i in biased])
    return {m: (*held, scale, shift) for (m, held), scale, shift in zip(found, scales, shifts)}


@contextlib.contextmanager
def batch_norm_as_affine(model: nn.Module, state: Optional[Dict[str, torch.Tensor]] = None):
    """For the block, every ``nn.BatchNorm1d/2d/3d`` of ``model`` (not a subclass with its own forward, not one whose
    forward the caller replaced) computes its eval-mode output with plain operators (:func:`_affine_forward`).

    Args:
        model: the network.
        state: {full name: tensor} of the parameters and buffers the block calls ``model`` with
            (``torch.func.functional_call``); None = the model's own. The layers' per-channel scale and shift are
            computed from them once, before the block, for all layers together (:func:`_fold`).
    """
    layers = [(prefix + "." if prefix else "", m) for prefix, m in model.named_modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and type(m).forward is _BN_FORWARD and "forward" not in vars(m)]
    if state is None:
        state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    folded = _fold(layers, state)
    for _, m in layers:
        m.forward = functools.partial(_affine_forward, m, folded=folded.get(m))
    try:
        yield
    finally:
        for _, m in layers:
            vars(m).pop("forward", None)


@contextlib.contextmanager
def no_mha_fast_path():
    """PyTorch's fused inference path of ``nn.TransformerEncoder`` / ``nn.MultiheadAttention`` off for the block.

    In eval mode with a ``src_key_padding_mask`` the encoder turns its input into a nested tensor when no
    parameter it sees requires grad, which is the case under ``torch.func.grad``; ``vmap`` has no batching rule
    for that conversion, so every sample went through the one-at-a-time loop. Without the fast path the same
    layers run their plain operators (the values the loop's autograd pass computes).
    """
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _zero_state(module: nn.RNNBase, args, kwargs):
    """Forward pre-hook: the zero initial state a recurrent layer would create, made from its input so that it is
    batched under ``vmap`` (``torch.zeros_like`` keeps the vmap level). ``nn.GRU`` / ``nn.RNN`` write their output
    state into the unbatched zeros they create themselves, which ``vmap`` refuses; the values are the same zeros."""
    given = args[1] if len(args) > 1 else kwargs.get("hx")
    if given is not None or len(args) > 2 or not args or not isinstance(args[0], torch.Tensor) \
            or args[0].dim() not in (2, 3):  # a state given, or a PackedSequence (never batched by vmap)
        return None
    inp = args[0]
    layers = module.num_layers * (2 if module.bidirectional else 1)
    lead = (layers,) if inp.dim() == 2 else (layers, inp.shape[0 if module.batch_first else 1])
    zero = torch.zeros_like(inp.reshape(-1)[:1]).reshape((1,) * len(lead) + (1,))
    out = getattr(module, "proj_size", 0) or module.hidden_size
    state = zero.expand(*lead, out).clone()
    if isinstance(module, nn.LSTM):
        state = (state, zero.expand(*lead, module.hidden_size).clone())
    return (inp, state), {k: v for k, v in kwargs.items() if k != "hx"}


@contextlib.contextmanager
def batched_rnn_states(model: nn.Module):
    """For the block, every ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` of ``model`` called without an initial state gets
    zeros batched like its input (:func:`_zero_state`): GRU / RNN models then run under ``vmap`` instead of the
    one-at-a-time loop (tests/test_rnn_vmap.py)."""
    handles = [m.register_forward_pre_hook(_zero_state, with_kwargs=True) for m in model.modules()
               if isinstance(m, nn.RNNBase)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _time_major_shape(module: nn.Module, args, kwargs) -> tuple:
    """(steps, sequences) a time-major recurrent / attention layer reads from its first input (a 3-D ``(T, N, C)``
    input), or (0, 0) where it has none (batch-first, unbatched, a PackedSequence)."""
    x = args[0] if args else kwargs.get("input", kwargs.get("query"))
    if getattr(module, "batch_first", True) or not isinstance(x, torch.Tensor) or x.dim() != 3:
        return 0, 0
    return int(x.shape[0]), int(x.shape[1])


@contextlib.contextmanager
def time_major_guard(model: nn.Module, group: int):
    """For the block (per-sample calls of ``group`` samples each), refuse a time-major layer (``nn.RNN`` /
    ``nn.LSTM`` / ``nn.GRU`` / ``nn.MultiheadAttention`` with ``batch_first=False``) that receives more than
    ``group`` sequences of at most ``group`` steps: the loader's tensors then hold time on dim 0, which the
    pruner read as the samples (each "sample" ``group`` time steps of the whole batch, silently). Longer
    sequences pass: a model may cut one sample into several chunks (chunked attention).

    Raises:
        BatchDimError (a ValueError): naming the layer, the batch it got and what to do.
    """
    names = {m: n for n, m in model.named_modules()}

    def check(module, args, kwargs):
        steps, got = _time_major_shape(module, args, kwargs)
        if got > group and steps <= group:
            raise BatchDimError(f"loader: {names.get(module, '?')!r} ({type(module).__name__}, batch_first=False) "
                                f"got {got} sequences of {steps} step(s) in a call of {group} sample(s): the "
                                f"loader's tensors hold time steps on dim 0, which the pruner reads as the samples; "
                                f"{BATCH_DIM_FIX}")
        return None
    handles = [m.register_forward_pre_hook(check, with_kwargs=True) for m in model.modules()
               if isinstance(m, (nn.RNNBase, nn.MultiheadAttention)) and not getattr(m, "batch_first", True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
