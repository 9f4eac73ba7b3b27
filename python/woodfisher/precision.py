"""The dtype gradients and Fisher statistics are computed in, and the model and batches cast to it.

Half-precision models (float16 / bfloat16) are differentiated in float32: the parameters,
buffers and floating inputs are upcast for the computation (:func:`compute_state`,
:func:`prepare_batch`), so the statistics never underflow; floating inputs of another dtype
than the model's are cast to it too (float32 data for a float64 model). A half-precision model
that fails in float32 but runs in its own dtype (a forward that casts to ``torch.bfloat16``
itself) is differentiated in its own dtype instead (:func:`native_state`), its gradients upcast
to float32 as they are collected, with one warning. Used by every method that differentiates
the model (:mod:`woodfisher.gradients`, :mod:`woodfisher.kfac`, :mod:`woodfisher.flops`, ...).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.func import functional_call

from .batches import Batch, describe
from .diagnostics import warn_at_caller

__all__ = ["HALF", "compute_dtype", "compute_state", "prepare_batch", "native_state", "half_dtype"]

#: Dtypes computed in float32.
HALF = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: float32 for half-precision weights, else the weights' dtype."""
    return torch.float32 if dtype in HALF else dtype


def compute_state(module: nn.Module, dtype: torch.dtype):
    """({name: parameter}, {name: buffer}) of ``module`` for ``torch.func.functional_call``: detached,
    floating ones in ``dtype`` (the same storage where the dtype already matches)."""
    def cast(v):
        v = v.detach()
        return v.to(dtype) if v.is_floating_point() else v

    return ({k: cast(v) for k, v in module.named_parameters()}, {k: cast(v) for k, v in module.named_buffers()})


def prepare_batch(batch: Batch, device, dtype: torch.dtype) -> Batch:
    """``batch`` on ``device`` with its floating tensors in ``dtype`` (the model's compute dtype).

    Raises:
        ValueError: naming the loader, for tensors without data (meta device).
    """
    leaves = [x for x in batch._leaves()[0] if isinstance(x, torch.Tensor)]
    if any(x.is_meta for x in leaves):
        raise ValueError(f"loader yields tensors on the meta device (no data): {describe(batch)}")
    batch = batch.to(device)
    leaves, spec = batch._leaves()
    if any(isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype for x in leaves):
        batch = batch.map_batched(lambda x: x.to(dtype) if x.is_floating_point() else x)
    return batch


def native_state(inner: nn.Module, native: Optional[torch.dtype], batch: Batch, err: Exception, warn: bool = True):
    """(params, buffers, batch) of ``inner`` in its own half dtype ``native``, for a model that failed with ``err``
    when run in float32 (:func:`compute_state`) but runs in ``native`` on the first sample of ``batch`` (a forward
    that casts to ``torch.bfloat16`` itself); None when ``native`` is None or the model fails there too (the
    caller raises ``err``). Said once, at the caller's line: the statistics then come from half-precision
    gradients, upcast to float32 by the caller.

    Args:
        inner: the unwrapped model. native: its half dtype, or None (no fallback). batch: the batch it failed on.
        err: the float32 error (quoted in the warning). warn: False where the dtype changes no result (FLOPs).
    """
    if native is None:
        return None
    params, buffers = compute_state(inner, native)
    batch = prepare_batch(batch, next(iter(params.values())).device, native)
    one = batch.take(0, 1)
    try:
        with torch.no_grad():
            functional_call(inner, (params, buffers), one.args, one.kwargs)
    except Exception:  # noqa: BLE001 - not a dtype problem: the caller reports the original error
        return None
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    if warn:
        warn_at_caller(f"the {str(native).replace('torch.', '')} model fails when run in float32 ({reason}), so its "
                       "gradients are computed in its own dtype and upcast to float32 (less precise Fisher "
                       "statistics); a forward that casts to the parameters' dtype (x.to(self.weight.dtype)) "
                       "instead of a fixed one keeps the float32 computation")
    return params, buffers, batch


def half_dtype(param: torch.Tensor) -> Optional[torch.dtype]:
    """The parameter's dtype when it is computed in another one (float16 / bfloat16), else None."""
    return param.dtype if compute_dtype(param.dtype) != param.dtype else None
