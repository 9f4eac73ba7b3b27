"""Phase one across ranks: data-parallel gradients -> the inverses of the blocks each rank owns.

Called by :func:`woodfisher.estimate_curvature` (and so by :func:`woodfisher.prune_one_shot`)
when a process group with more than one rank is active (option ``group``). The result is an
ordinary :class:`woodfisher.curvature.Curvature` whose ``inverses`` hold only this rank's
blocks (``inverses[name]`` is ``(owned blocks, c, c)``, a LowRankInverse of them, or
``(owned, 1, 1)`` for the diagonal Fisher) and whose ``shard`` says which
(:class:`Shard`); :func:`woodfisher.prune_with` then runs the sharded step
(:mod:`woodfisher.distributed.step`).

The damp is resolved from Fisher statistics summed over ranks; WoodTaylor's mean loss
gradient is summed over ranks too. Supported: methods "woodfisher" and "diag_fisher",
global or layerwise masks, min_density, beta, WoodTaylor, sampled Fisher (rank r draws with
seed ``seed + r``), N:M and rows patterns (:mod:`.group_step`). Refused with a ValueError: "kfac".
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

import woodfisher_kernels as wk

from ..conditioning import refine_dense
from ..damping import FisherStats, resolve_damp
from ..diagnostics import warn_at_caller
from ..gradients import GradientCollector, LoaderExhausted, compute_dtype
from .collect import route_gradients
from .group import all_reduce_, local_phase, mark_agreed, share
from .sharding import ShardPlan, block_cost, plan_shards

__all__ = ["Shard", "estimate_sharded", "check_sharded", "plan_for", "invert_sharded", "shard_bytes",
           "check_shard_budget"]

#: At most this many gradients per rank and exchange round (a rank holds a few copies of one
#: round's full gradients while it cuts them into blocks: the rounds are sized to ~1/4 of its share).
CHUNK = 64


@dataclass
class Shard:
    """Which blocks this rank's curvature holds: the plan, the process group and each weight's inverse form."""

    plan: ShardPlan
    group: Any
    forms: Optional[Dict[str, str]] = None


def check_sharded(config) -> None:
    """Refuse what the sharded path does not do (ValueError naming the option)."""
    if config.method_impl.curvature not in ("blockwise", "diagonal"):
        raise ValueError(f"method={config.method!r} has no distributed implementation; with a process group "
                         "use method='woodfisher' or 'diag_fisher' (or a magnitude method), or pass group=None "
                         "to prune on each process independently (woodfisher prune: run it without torchrun)")


def _form(t, m: int, config, kind: str) -> str:
    if kind == "diagonal":
        return "diagonal"
    if config.inverse_form in ("sequential", "lowrank"):
        return config.inverse_form
    return wk.choose_form(m, t.block_size)


def plan_for(targets, config, world: int, rank: int):
    """({name: form}, :class:`ShardPlan`) of ``targets`` for ``world`` ranks."""
    kind = config.method_impl.curvature
    m = config.num_grads
    forms = {target.name: _form(target, m, config, kind) for target in targets}
    costs = {target.name: block_cost(forms[target.name], target.block_size, m) for target in targets}
    return forms, plan_shards(
        [(target.name, target.num_blocks, target.block_size) for target in targets], costs, world, rank
    )


def shard_bytes(plan: ShardPlan, targets, m: int, itemsize: int) -> int:
    """Bytes this rank holds in a sharded step of ``m`` gradients: its gradient slices (m x its coordinates),
    the inverses of its blocks and a buffer of a few chunks of full gradients."""
    chunk = min(CHUNK, -(-share(m, plan.world, 0) // 4))
    return itemsize * (m * plan.coordinates() + plan.load() + 3 * chunk * sum(target.numel for target in targets))


def check_shard_budget(plan: ShardPlan, targets, m: int, itemsize: int, budget) -> None:
    """ValueError naming ``memory_budget`` when this rank's shard (:func:`shard_bytes`) exceeds it."""
    if budget is None:
        return
    chunk = min(CHUNK, -(-share(m, plan.world, 0) // 4))
    need = shard_bytes(plan, targets, m, itemsize)
    if need > budget:
        raise ValueError(f"memory_budget={budget} bytes is too small for this rank's shard: it needs {need} "
                         f"(gradient slices, inverses of its blocks and a buffer of {chunk} gradients); "
                         "use more ranks, a smaller block_size or fewer num_grads")


def _inverse(g: torch.Tensor, form: str, damp: float, count: int, backend: str):
    """Inverse of owned blocks g (n, m, c) in ``form``; an empty (0, c, c) tensor for n = 0."""
    n, _, c = g.shape
    if form == "diagonal":
        return (1.0 / (damp + g.square().sum(1) / count)).view(n, 1, 1)
    if n == 0:
        return g.new_zeros(0, c, c)
    return wk.blockwise_inverse(g, damp, count, form=form, backend=backend)


def _rank_chunks(collector, k: int, config, world: int, rank: int):
    """``collector.chunks(k)``, a loader that runs out reported against the call's ``num_grads`` (the total over
    the ranks), not this rank's share of it."""
    m, fbs = config.num_grads, config.fisher_batch_size
    try:
        yield from collector.chunks(k)
    except LoaderExhausted as exc:
        detail = f"rank {rank}'s loader gave {exc.got} of the {exc.needed} gradients asked of it"
        error = LoaderExhausted(f"num_grads={m} over {world} ranks asks rank {rank} for {exc.needed} gradients "
                                f"({exc.needed * fbs} samples at fisher_batch_size={fbs}; with num_steps > 1, "
                                "num_grads here is one step's part), but its loader ran out after "
                                f"{exc.got} gradients; give every rank its share of the data (a DistributedSampler "
                                f"splits a dataset evenly) or pass num_grads <= {exc.got * world}",
                                exc.needed * world, exc.got * world)
        error.detail = detail  # for the message of a call of several steps (woodfisher.engine)
        raise error from exc
    except ValueError as exc:
        if collector.count or "no gradient could be computed" not in str(exc):
            raise
        raise ValueError(f"loader: rank {rank}'s loader gave no gradient (empty, or fewer than fisher_batch_size="
                         f"{fbs} samples), but num_grads={m} over {world} ranks asks it for "
                         f"{collector.num_grads}: every rank of the group must read its share of the data (a "
                         "DistributedSampler gives each rank one), or pass group=None to prune on each process "
                         "alone") from exc


def estimate_sharded(model, loader, targets, config, curv, group):
    """Fill ``curv`` (a Curvature with layouts and keep-masks) with this rank's share (collective)."""
    try:
        check_sharded(config)
    except ValueError as exc:  # the same options on every rank (check_same_call): every rank raises it
        raise mark_agreed(exc) from None
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    m = config.num_grads
    dtype = compute_dtype(targets[0].param.dtype)
    forms, plan = plan_for(targets, config, world, rank)
    with local_phase(group):
        check_shard_budget(plan, targets, m, torch.empty((), dtype=dtype).element_size(), config.memory_budget)
    shares = [share(m, world, r) for r in range(world)]
    t0 = time.perf_counter()
    collector = GradientCollector(model, loader, targets, want_loss_grad=config.woodtaylor, keep_masks=curv.keep,
                                  loss_fn=config.loss_fn, num_grads=max(1, shares[rank]),
                                  fisher_batch_size=config.fisher_batch_size, sampled_fisher=config.sampled_fisher,
                                  seed=config.seed + rank, progress=config.progress and rank == 0,
                                  batch_adapter=config.batch_adapter, per_sample=config.per_sample_grads)
    chunk = max(1, min(CHUNK, -(-max(shares) // 4)))
    chunks = _rank_chunks(collector, chunk, config, world, rank) if shares[rank] else None
    owned, per_rank = route_gradients(chunks, targets, plan, shares, chunk, group, dtype, targets[0].param.device)
    count = sum(per_rank)
    _warn_same_samples(owned, per_rank, group)
    curv.timings["gradients"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    sum_sq = torch.tensor([sum(float(g.double().square().sum()) for g in owned.values())], dtype=torch.float64)
    curv.stats = FisherStats.live(curv.keep, float(all_reduce_(sum_sq, group)), count)
    curv.damp = resolve_damp(config.damp, curv.stats)
    curv.shard = Shard(plan, group, forms)
    invert_sharded(curv, owned, count, config.backend)
    if curv.kind == "blockwise":  # kept for Curvature.with_damp: this rank's slices, m * D / world entries
        curv.grads = owned
    if config.woodtaylor:
        curv.loss_grad = _loss_grad(collector, targets, plan, group, count, dtype)
    curv.timings["inverse"] += time.perf_counter() - t0
    return curv


def _warn_same_samples(owned, per_rank, group) -> None:
    """Collective: warn (rank 0) when every rank computed exactly the gradients of rank 0, i.e. every rank read
    the same samples: the Fisher then holds ``count / world`` distinct gradients, each ``world`` times."""
    world = len(per_rank)
    same = len(set(per_rank)) == 1 and per_rank[0] > 0
    if same:
        n = per_rank[0]
        for g in owned.values():  # (owned blocks, m, c), rank-major: rank r's gradients at [r n, (r + 1) n)
            if g.shape[0] and not all(torch.equal(g[:, r * n:(r + 1) * n], g[:, :n]) for r in range(1, world)):
                same = False
                break
    flag = all_reduce_(torch.tensor([int(same)], dtype=torch.int64), group, dist.ReduceOp.MIN)
    if int(flag) and dist.get_rank(group) == 0:
        warn_at_caller(f"every rank of the process group read the same samples: the Fisher holds {per_rank[0]} "
                       f"distinct gradients, each {world} times, not num_grads={sum(per_rank)}; give each rank its "
                       "share of the data (torch.utils.data.DistributedSampler, or a loader that reads every "
                       "WORLD_SIZE-th sample)")


def invert_sharded(curv, owned, count: int, backend: str) -> None:
    """Collective: ``curv.inverses`` / ``forms`` / ``kappa`` / ``refined`` of this rank's blocks ``owned``
    ({name: (owned blocks, m, c)} gradients) at ``curv.damp``, on every rank of ``curv.shard.group``
    (phase one, and :meth:`woodfisher.curvature.Curvature.with_damp` of a sharded curvature)."""
    plan, group, forms = curv.shard.plan, curv.shard.group, curv.shard.forms
    with local_phase(group):
        curv.inverses = {n: _inverse(owned[n], forms[n], curv.damp, count, backend) for n in plan.names}
    curv.forms = {n: ("lowrank" if isinstance(v, wk.LowRankInverse) else forms[n]) for n, v in curv.inverses.items()}
    curv.kappa, curv.refined = {}, {}
    _conditioning(owned, curv, forms, count, plan, group)
    _lowrank_refined(curv, forms, plan, group)


def _conditioning(owned, curv, forms, count: int, plan: ShardPlan, group) -> None:
    """``curv.kappa`` / ``curv.refined`` of the dense float32 layers, the same on every rank (collective).

    Each rank runs :func:`woodfisher.conditioning.refine_dense` on its own blocks (estimates,
    float64 recompute of the flagged ones); the block of a layer's largest Frobenius bound,
    which the single process estimates even when certified, is found across ranks (the
    largest bound, then the first block holding it) and estimated by its owner. The per-layer
    results are reduced (kappa: max, refined: sum), so every rank holds the single-process
    values on the same gradients (a block's estimate does not depend on the other blocks).
    """
    names = [n for n in plan.names if forms[n] == "sequential" and owned[n].dtype == torch.float32]
    if not names:
        return
    empty = torch.zeros(0, dtype=torch.float64)
    with local_phase(group):
        upper = {n: wk.condition_estimate(owned[n], curv.damp, count, upper=True).cpu() if plan.owned(n) else empty
                 for n in names}
    top = all_reduce_(torch.tensor([float(upper[n].max()) if upper[n].numel() else -1.0 for n in names],
                                   dtype=torch.float64), group, dist.ReduceOp.MAX)
    nowhere = sum(plan.num_blocks.values())
    first = all_reduce_(torch.tensor([plan.range(n)[0] + int(upper[n].argmax())
                                      if upper[n].numel() and float(upper[n].max()) == float(t) else nowhere
                                      for n, t in zip(names, top)], dtype=torch.int64), group, dist.ReduceOp.MIN)
    kappa = torch.full((len(names),), -1.0, dtype=torch.float64)   # -1: no block of the layer left in float32
    refined = torch.zeros(len(names), dtype=torch.int64)
    with local_phase(group):
        for i, name in enumerate(names):
            lo, hi = plan.range(name)
            if lo == hi:
                continue
            largest = int(first[i]) - lo if lo <= int(first[i]) < hi else None
            left, refined[i] = refine_dense(owned[name], curv.inverses[name], curv.damp, count, upper=upper[name],
                                            largest=largest)
            kappa[i] = -1.0 if left is None else left
    all_reduce_(kappa, group, dist.ReduceOp.MAX)
    all_reduce_(refined, group)
    curv.kappa = {n: float(k) for n, k in zip(names, kappa) if k >= 0}
    curv.refined = {n: int(r) for n, r in zip(names, refined) if r}


def _lowrank_refined(curv, forms, plan: ShardPlan, group) -> None:
    """``curv.refined`` of the low-rank layers: blocks whose factor each rank's
    :class:`woodfisher_kernels.LowRankInverse` keeps in float64 (``refined``), summed over the ranks
    (collective; the single-process count on the same gradients)."""
    names = [n for n in plan.names if forms[n] == "lowrank"]
    if not names:
        return
    counts = torch.tensor([getattr(curv.inverses[n], "refined", 0) for n in names], dtype=torch.int64)
    all_reduce_(counts, group)
    curv.refined.update({n: int(r) for n, r in zip(names, counts) if r})


def _loss_grad(collector, targets, plan, group, count, dtype):
    """{name: (owned blocks, c)} mean loss gradient over all ranks' gradients (WoodTaylor)."""
    device = targets[0].param.device
    local = collector.loss_grad or {}
    flat = torch.cat([(local[target.name] * collector.count if target.name in local else
                       torch.zeros(target.numel, dtype=dtype, device=device)).reshape(-1) for target in targets])
    flat = all_reduce_(flat, group) / count
    out, offset = {}, 0
    for target in targets:
        out[target.name] = target.blocks(flat[offset:offset + target.numel])[slice(*plan.range(target.name))]
        offset += target.numel
    return out
