"""CPU offload of the Fisher inverses for one accelerator, chosen by ``memory_budget``.

When neither keeping the gradients nor streaming them into dense inverses fits the device
budget, the gradients and the dense block inverses are kept in host memory (pinned when the
model is on CUDA, so copies are asynchronous) and streamed through the kernels one chunk of
blocks at a time, for every phase:

- build: gradient slices of a chunk -> device -> ``fisher_inverse`` -> host;
- statistic and OBS update: inverse chunk -> device -> ``obs_saliency`` / ``obs_update``;
- low-rank layers (m < c) keep only their gradients on the host and rebuild the factors of
  a chunk on the device when needed (``4 m^2 c + m^3 / 3`` flops per block, less than a copy
  of dense blocks would cost).

Chunk sizes are chosen so that one chunk's working set plus the gradients of one loader
batch fit ``memory_budget`` (:class:`OffloadPlan`, printed with ``progress=True``). On a
GPU this path is taken automatically when the budget requires it; ``inverse_form="offload"``
forces it on any device (on a CPU it exercises the same code, device and host being the same
memory; :class:`woodfisher.memory.TensorMemoryMeter` then measures the device part).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional, Tuple

import torch

import woodfisher_kernels as wk

from .conditioning import refine_dense
from .damping import FisherStats, resolve_damp
from .memory import host_allocations

__all__ = ["OffloadPlan", "OffloadedInverse", "plan_offload", "offload_fits", "estimate_offloaded"]


def _per_block(form: str, m: int, c: int, itemsize: int) -> int:
    """Device bytes to build, score or update one block (inputs, output and temporaries)."""
    if form == "lowrank":  # gradients + factors, float64 Gram / Cholesky / solve temporaries
        return itemsize * (2 * m * c + 8 * c) + 8 * (2 * m * c + 2 * m * m)
    k = min(m, max(c, 16))  # the torch reference's rank-k chunk
    return itemsize * (2 * m * c + 2 * c * c + 2 * c * k + 2 * k * k + 8 * c)


def _form(t, m: int, inverse_form: str) -> str:
    return inverse_form if inverse_form in ("sequential", "lowrank") else wk.choose_form(m, t.block_size)


def offload_fits(targets, num_grads: int, itemsize: int, budget: int, inverse_form: str = "auto") -> bool:
    """Whether one block of every weight fits ``budget`` bytes on the device (the least offload needs)."""
    return all(_per_block(_form(target, num_grads, inverse_form), num_grads, target.block_size, itemsize) <= budget
               for target in targets)


@dataclass
class OffloadPlan:
    """What lives where, and how many blocks go through the device at once.

    Attributes:
        device / host: where the kernels run / where gradients and inverses are kept.
        pinned: host memory is page-locked (CUDA). budget: device bytes allowed.
        reserve: device bytes kept for collecting one loader batch of gradients and for the
            model-sized vectors of the statistic, selection and update.
        layers: {name: {form, blocks, chunk, per_block (device bytes), host_grads, host_inverse (bytes)}}.
    """

    device: str
    host: str
    pinned: bool
    budget: int
    reserve: int
    layers: Dict[str, dict] = field(default_factory=dict)

    @property
    def host_bytes(self) -> int:
        return sum(v["host_grads"] + v["host_inverse"] for v in self.layers.values())

    @property
    def device_bytes(self) -> int:
        """Planned device peak: the reserve plus the largest chunk's working set."""
        return self.reserve + max(v["chunk"] * v["per_block"] for v in self.layers.values())

    def describe(self) -> str:
        """A table of the plan (bytes)."""
        host = f"{self.host} ({'pinned' if self.pinned else 'pageable'})"
        lines = [f"offload plan: device {self.device} budget {self.budget:,} B, planned peak {self.device_bytes:,} B "
                 f"(reserve {self.reserve:,} B for one loader batch of gradients and model-sized vectors, "
                 f"+ one chunk); host {host} {self.host_bytes:,} B",
                 f"{'weight':32s} {'form':10s} {'blocks':>7s} {'chunk':>6s} {'device/chunk':>14s} "
                 f"{'host grads':>12s} {'host inverse':>13s}"]
        for name, v in self.layers.items():
            lines.append(f"{name[:32]:32s} {v['form']:10s} {v['blocks']:7d} {v['chunk']:6d} "
                         f"{v['chunk'] * v['per_block']:14,d} {v['host_grads']:12,d} {v['host_inverse']:13,d}")
        return "\n".join(lines)


def plan_offload(targets, num_grads: int, itemsize: int, budget: int, batch_groups: int,
                 inverse_form: str = "auto") -> OffloadPlan:
    """Chunk sizes for ``budget`` device bytes.

    Args:
        targets: the pruned weights. num_grads: m. itemsize: bytes per entry.
        budget: device bytes. batch_groups: gradients one loader batch yields (reserved).
        inverse_form: "auto" (choose_form per weight), "sequential" or "lowrank".
    Raises:
        ValueError: the budget does not hold one loader batch of gradients plus one block.
    """
    device = targets[0].param.device
    numel = sum(target.numel for target in targets)
    # collecting one loader batch holds ~6 copies of its gradients (vmap output, masked, concatenated,
    # blocked, ...); the step holds model-sized vectors (weights, new weights, float64 scores and masks)
    reserve = 6 * batch_groups * numel * itemsize + numel * (4 * itemsize + 3 * 8)
    plan = OffloadPlan(str(device), "cpu", device.type == "cuda", int(budget), reserve)
    for target in targets:
        form = _form(target, num_grads, inverse_form)
        per = _per_block(form, num_grads, target.block_size, itemsize)
        chunk = (budget - reserve) // per
        if chunk < 1:
            raise ValueError(f"memory_budget={budget} bytes is too small to offload: the gradients of one loader "
                             f"batch and model-sized vectors ({reserve} B) plus one block of {target.name!r} ({per} B) "
                             "must fit; use smaller loader batches, a smaller block_size or fewer num_grads")
        c, b = target.block_size, target.num_blocks
        plan.layers[target.name] = dict(form=form, blocks=b, chunk=int(min(chunk, b)), per_block=per,
                                   host_grads=b * num_grads * c * itemsize,
                                   host_inverse=b * c * c * itemsize if form == "sequential" else 0)
    return plan


class OffloadedInverse:
    """Blockwise inverse kept on the host, streamed through the kernels chunk by chunk.

    Accepted by :class:`woodfisher.methods.woodfisher.WoodFisher` in place of a (B, c, c)
    tensor: :meth:`saliency` and :meth:`update` take and return device tensors (B, c).
    ``plan`` is the :class:`OffloadPlan` it was built with.
    """

    def __init__(self, form: str, host_inverse: Optional[torch.Tensor], host_grads: Optional[torch.Tensor],
                 damp: float, count: int, chunk: int, device: torch.device, num_blocks: int, block_size: int,
                 plan: Optional[OffloadPlan] = None):
        self.form, self.host_inverse, self.host_grads, self.plan = form, host_inverse, host_grads, plan
        self.damp, self.count, self.chunk, self.device = float(damp), int(count), int(chunk), device
        self.shape = torch.Size((num_blocks, block_size, block_size))

    def chunks(self) -> Iterator[Tuple[int, int, object]]:
        """(start, stop, inverse of blocks [start, stop) on the device) for every chunk."""
        for start in range(0, self.shape[0], self.chunk):
            stop = min(start + self.chunk, self.shape[0])
            if self.form == "lowrank":
                g = self.host_grads[start:stop].to(self.device, non_blocking=True)
                yield start, stop, wk.lowrank_inverse(g, self.damp, self.count, check_finite=False)
            else:
                yield start, stop, self.host_inverse[start:stop].to(self.device, non_blocking=True)

    def saliency(self, weights: torch.Tensor, loss_grad: Optional[torch.Tensor] = None,
                 backend: str = "auto") -> torch.Tensor:
        """:func:`woodfisher_kernels.obs_saliency` of every block, chunk by chunk: (B, c)."""
        return torch.cat([wk.obs_saliency(inv, weights[a:b], None if loss_grad is None else loss_grad[a:b],
                                          backend=backend, check_finite=False) for a, b, inv in self.chunks()])

    def update(self, weights: torch.Tensor, prune_mask: torch.Tensor, loss_grad: Optional[torch.Tensor] = None,
               backend: str = "auto") -> torch.Tensor:
        """:func:`woodfisher_kernels.obs_update` of every block, chunk by chunk: new weights (B, c)."""
        return torch.cat([wk.obs_update(inv, weights[a:b], prune_mask[a:b],
                                        None if loss_grad is None else loss_grad[a:b], backend=backend,
                                        check_finite=False) for a, b, inv in self.chunks()])


def _host_empty(shape, dtype, pinned: bool) -> torch.Tensor:
    with host_allocations():
        return torch.empty(shape, dtype=dtype, pin_memory=pinned)


def estimate_offloaded(collector, targets, config, curv, batch_groups: int) -> None:
    """Fill ``curv``: gradients into host memory, dense inverses built chunk by chunk into host memory.

    Conditioning as in memory (:func:`woodfisher.conditioning.refine_dense`): the Frobenius bound
    of every block is taken while its chunk is on the device; the blocks it does not certify
    are estimated, and those with ``eps32 * kappa > 1e-3`` recomputed in float64, from the
    host gradients moved through the device (chunks of ``REFINE_BYTES``); ``curv.kappa`` and
    ``curv.refined`` hold the same values as the in-memory path on the same gradients.
    Low-rank layers (rebuilt on use) are not checked, as in memory.
    """
    if config.pattern is not None:
        raise ValueError(f"pattern={config.pattern!r} needs the inverses on the device; raise memory_budget")
    t0 = time.perf_counter()
    m, dtype = config.num_grads, collector.dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    plan = plan_offload(targets, m, itemsize, config.memory_budget, batch_groups, config.inverse_form)
    if config.progress:
        print(plan.describe(), file=sys.stderr)
    grads = {
        target.name: _host_empty((target.num_blocks, m, target.block_size), dtype, plan.pinned) for target in targets
    }
    stats = FisherStats.live(curv.keep)
    for chunk in collector.chunks(max(1, batch_groups)):
        k = next(iter(chunk.values())).shape[0]
        # one row at a time in float64, not in place: .double() of a float64 row is the row itself
        stats.sum_sq += sum(float(row.double().square().sum()) for g in chunk.values() for row in g)
        for target in targets:
            grads[target.name][:, stats.count : stats.count + k].copy_(
                target.grad_blocks(chunk[target.name]), non_blocking=True
            )
        stats.count += k
        del chunk   # released before the next chunk is computed (the plan counts one chunk on the device)
    curv.timings["gradients"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    curv.stats, count = stats, stats.count
    curv.damp = resolve_damp(config.damp, stats)
    device = targets[0].param.device
    for target in targets:
        spec = plan.layers[target.name]
        host_grads = grads.pop(target.name)[:, :count]
        inv = None
        if spec["form"] == "sequential":
            inv = _host_empty((target.num_blocks, target.block_size, target.block_size), dtype, plan.pinned)
            check = dtype == torch.float32 and target.num_blocks > 0
            upper = []  # Frobenius bounds of kappa, taken while each chunk is on the device
            for start in range(0, target.num_blocks, spec["chunk"]):
                g = host_grads[start:start + spec["chunk"]].to(device, non_blocking=True)
                inv[start:start + g.shape[0]].copy_(wk.fisher_inverse(g, curv.damp, count, backend=config.backend,
                                                                      check_finite=False), non_blocking=True)
                if check:
                    upper.append(wk.condition_estimate(g, curv.damp, count, upper=True))
            if check:  # as in memory: flagged blocks recomputed in float64 from the host gradients
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # the chunks' copies into ``inv`` are done
                kappa, fixed = refine_dense(host_grads, inv, curv.damp, count, upper=torch.cat(upper), device=device)
                if kappa is not None:
                    curv.kappa[target.name] = kappa
                if fixed:
                    curv.refined[target.name] = fixed
            host_grads = None
        curv.inverses[target.name] = OffloadedInverse(spec["form"], inv, host_grads, curv.damp, count, spec["chunk"],
                                                 device, target.num_blocks, target.block_size, plan)
        curv.forms[target.name] = "offload-" + spec["form"]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    curv.timings["inverse"] += time.perf_counter() - t0
