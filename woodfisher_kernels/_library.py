"""The public tensor ops declared once with ``torch.library`` (namespace ``woodfisher_ops``).

Each op has a schema (inferred from the annotations below), one implementation shared by
the CPU and CUDA dispatch keys (it picks the cuda | triton | cpu | torch backend through
:mod:`._dispatch` at run time) and a fake (meta) implementation, so the ops run under
``torch.compile`` (``fullgraph=True``) and pass ``torch.library.opcheck``. The namespace
differs from the C++ extension's ``woodfisher_kernels`` (raw CUDA kernels, csrc/).

Split of the checks: :mod:`.ops` does the structural ones (types, shapes, dtypes,
devices, scalars; traceable by the compiler) before calling an op; the data-dependent
ones (NaN / Inf inputs, index ranges, failed blocks) run inside the op, still before
anything is written. Not declared as ops: :class:`.LowRankInverse` (a Python object;
its methods are plain torch code that the compiler traces or calls around), the
blocking helpers (reshapes) and ``choose_form`` (no tensors).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _checks as chk
from . import _numerics as num
from . import reference
from ._dispatch import select

DEVICES = ("cpu", "cuda")


def _op(name: str, mutates=()):
    return torch.library.custom_op(f"woodfisher_ops::{name}", mutates_args=mutates, device_types=DEVICES)


@_op("fisher_inverse")
def fisher_inverse(grads: Tensor, damp: float, num_samples: float, backend: str, on_failure: str,
                   check_finite: bool) -> Tensor:
    impl = select("fisher_inverse", backend, grads)
    return num.guarded_fisher_inverse(impl, grads, damp, num_samples, on_failure, check_finite)


@fisher_inverse.register_fake
def _(grads, damp, num_samples, backend, on_failure, check_finite):
    b, _, c = grads.shape
    return grads.new_empty(b, c, c)


@_op("woodbury_update_", mutates=("inv",))
def woodbury_update_(inv: Tensor, grads: Tensor, num_samples: float, backend: str, on_failure: str,
                     check_finite: bool) -> None:
    impl = select("woodbury_update_", backend, inv, grads.shape[1])
    num.guarded_woodbury_update_(impl, inv, grads, num_samples, on_failure, check_finite)


@woodbury_update_.register_fake
def _(inv, grads, num_samples, backend, on_failure, check_finite):
    return None


@_op("obs_saliency")
def obs_saliency(inv: Tensor, weights: Tensor, loss_grad: Optional[Tensor], backend: str,
                 check_finite: bool) -> Tensor:
    chk.check_all_finite(check_finite, inv=inv, weights=weights, loss_grad=loss_grad)
    return select("obs_saliency", backend, inv)(inv, weights, loss_grad)


@obs_saliency.register_fake
def _(inv, weights, loss_grad, backend, check_finite):
    return torch.empty_like(weights)


@_op("obs_update")
def obs_update(inv: Tensor, weights: Tensor, prune_mask: Tensor, loss_grad: Optional[Tensor], backend: str,
               check_finite: bool) -> Tensor:
    chk.check_all_finite(check_finite, inv=inv, weights=weights, loss_grad=loss_grad)
    return select("obs_update", backend, inv)(inv, weights, prune_mask, loss_grad)


@obs_update.register_fake
def _(inv, weights, prune_mask, loss_grad, backend, check_finite):
    return torch.empty_like(weights)


@_op("inverse_diagonal")
def inverse_diagonal(inv: Tensor, check_finite: bool) -> Tensor:
    chk.check_all_finite(check_finite, inv=inv)
    return torch.diagonal(inv, dim1=1, dim2=2).clone()


@inverse_diagonal.register_fake
def _(inv, check_finite):
    return inv.new_empty(inv.shape[:2])


@_op("gather_rows")
def gather_rows(inv: Tensor, index: Tensor) -> Tensor:
    chk.check_all_finite(True, inv=inv)
    chk.check_index_range("index", index, inv.shape[-1])
    return reference.gather_rows(inv, index)


@gather_rows.register_fake
def _(inv, index):
    return inv.new_empty(*index.shape, inv.shape[-1])


@_op("gather_subblocks")
def gather_subblocks(inv: Tensor, index: Tensor) -> Tensor:
    chk.check_all_finite(True, inv=inv)
    chk.check_index_range("index", index, inv.shape[-1])
    return reference.gather_subblocks(inv, index)


@gather_subblocks.register_fake
def _(inv, index):
    return inv.new_empty(*index.shape, index.shape[-1])


@_op("group_obs_saliency")
def group_obs_saliency(inv: Tensor, weights: Tensor, groups: Tensor, exact: bool) -> Tensor:
    chk.check_all_finite(True, inv=inv, weights=weights)
    chk.check_index_range("groups", groups, inv.shape[-1])
    return reference.group_obs_saliency(inv, weights, groups, exact)


@group_obs_saliency.register_fake
def _(inv, weights, groups, exact):
    return weights.new_empty(groups.shape[:2])


@_op("group_obs_update")
def group_obs_update(inv: Tensor, weights: Tensor, groups: Tensor, prune: Tensor, exact: bool) -> Tensor:
    chk.check_all_finite(True, inv=inv, weights=weights)
    chk.check_index_range("groups", groups, inv.shape[-1])
    return reference.group_obs_update(inv, weights, groups, prune, exact)


@group_obs_update.register_fake
def _(inv, weights, groups, prune, exact):
    return torch.empty_like(weights)


@_op("condition_estimate")
def condition_estimate(grads: Tensor, damp: float, num_samples: float, iters: int, upper: bool) -> Tensor:
    return num.condition_estimate(grads, damp, num_samples, iters=iters, upper=upper)


@condition_estimate.register_fake
def _(grads, damp, num_samples, iters, upper):
    return grads.new_empty(grads.shape[0], dtype=torch.float64)


OPS = {name: globals()[name] for name in (
    "fisher_inverse", "woodbury_update_", "obs_saliency", "obs_update", "inverse_diagonal", "gather_rows",
    "gather_subblocks", "group_obs_saliency", "group_obs_update", "condition_estimate")}
