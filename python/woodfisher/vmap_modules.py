"""What the model's own modules do differently while ``vmap`` computes per-sample gradients (each for the block).

- :func:`batch_norm_as_affine`: a BatchNorm in eval mode is an affine map per channel; written as plain operators
  (``(x - running_mean) * weight / sqrt(running_var + eps) + bias``) it takes 8 operators per layer and ``vmap``
  call where ``native_batch_norm``'s batching rule takes 17 (it copies the statistics and parameters per sample):
  ResNet-20's 256 per-sample gradients (two chunks) launch 626 kernels instead of 828 and dispatch 1,113 views
  instead of 2,427 (``benchmarks/step_cpu.py``'s count), which is what a launch-bound GPU pays for;
- :func:`batched_rnn_states`: recurrent layers called without an initial state get zeros batched like their input;
- :func:`time_major_guard`: a time-major layer fed time on dim 0 is refused (the samples would be time steps);
- :func:`no_mha_fast_path`: PyTorch's fused inference path of ``nn.TransformerEncoder`` stays off.

The gradients are those of the model as it is: tests/test_vmap_modules.py compares them with a float64 autograd
loop over single samples.
"""
from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

from .batch_dims import BATCH_DIM_FIX, BatchDimError

__all__ = ["batch_norm_as_affine", "batched_rnn_states", "time_major_guard", "no_mha_fast_path"]

_BN_FORWARD = nn.modules.batchnorm._BatchNorm.forward


def _affine_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """A BatchNorm's eval-mode output with plain operators; its own forward where it normalizes with batch
    statistics (training, or no running statistics)."""
    if self.training or self.running_mean is None or self.running_var is None:
        return _BN_FORWARD(self, x)
    self._check_input_dim(x)
    scale = torch.rsqrt(self.running_var + self.eps)
    if self.weight is not None:
        scale = scale * self.weight
    shape = (1, -1) + (1,) * (x.dim() - 2)  # channels on dim 1
    y = (x - self.running_mean.reshape(shape)) * scale.reshape(shape)
    if self.bias is not None:
        y = y + self.bias.reshape(shape)
    return y.to(x.dtype)  # a half input over float32 statistics stays half, as native_batch_norm returns it


@contextlib.contextmanager
def batch_norm_as_affine(model: nn.Module):
    """For the block, every ``nn.BatchNorm1d/2d/3d`` of ``model`` (not a subclass with its own forward, not one whose
    forward the caller replaced) computes its eval-mode output with plain operators (:func:`_affine_forward`)."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and type(m).forward is _BN_FORWARD and "forward" not in vars(m)]
    for m in layers:
        m.forward = types.MethodType(_affine_forward, m)
    try:
        yield
    finally:
        for m in layers:
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
