"""Data-parallel gradient collection, each gradient slice routed to the rank that owns its block.

Every rank computes its share of the m gradients (:func:`woodfisher.distributed.group.share`)
from its own loader, as in data-parallel training (give each rank its part of the data, e.g.
with a ``DistributedSampler``). The global gradient order is rank-major: rank 0's gradients,
then rank 1's, ... (so a single process reading the ranks' batches one after the other sees
the same m gradients in the same order).

Gradients travel in rounds of at most ``chunk`` gradients per rank: each rank cuts its chunk
into the blocks of every weight (canonical order, zero padding, :meth:`PruneTarget.grad_blocks`)
and one ``all_to_all_single`` sends every rank the slices of the blocks it owns
(:class:`woodfisher.distributed.sharding.ShardPlan`). A rank therefore never holds more than
``chunk`` full gradients plus the m slices of its own blocks (``m * D / world`` entries).
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from .group import all_reduce_, comm_device, local_phase
from .sharding import ShardPlan

__all__ = ["route_gradients"]


def _send_buffer(chunk: Optional[Dict[str, torch.Tensor]], targets, plan: ShardPlan, dtype, device) -> torch.Tensor:
    """This rank's chunk as one flat buffer: for each destination rank, each weight's owned blocks (n, k, c)."""
    if chunk is None:
        return torch.zeros(0, dtype=dtype, device=device)
    blocks = {target.name: target.grad_blocks(chunk[target.name]) for target in targets}   # (B, k, c)
    pieces = [blocks[target.name][slice(*plan.range(target.name, r))].reshape(-1)
              for r in range(plan.world) for target in targets]
    return torch.cat(pieces).to(device)


def route_gradients(chunks: Optional[Iterator[Dict[str, torch.Tensor]]], targets, plan: ShardPlan,
                    shares: List[int], chunk_size: int, group, dtype: torch.dtype,
                    device) -> Tuple[Dict[str, torch.Tensor], List[int]]:
    """Collective: gradients of all ranks -> this rank's owned block slices.

    Args:
        chunks: this rank's gradient chunks ({name: (k, numel)}, k <= ``chunk_size``), or
            None when it computes none.
        targets: the pruned weights (same order on every rank). plan: block ownership.
        shares: gradients each rank is asked for (the rounds are ``ceil(max(shares) / chunk_size)``;
            a rank whose loader ran out sends nothing in the later rounds).
        chunk_size: gradients per rank and round. group: the process group.
        dtype, device: of the gradients.
    Returns:
        ({name: (owned blocks, m, c)} in the rank-major gradient order, gradients per rank).
    Raises:
        ValueError / RuntimeError on every rank when a rank fails to produce its gradients.
    """
    comm = comm_device(group)
    own = plan.coordinates()
    starts = [sum(shares[:r]) for r in range(plan.world)]
    owned = {
        target.name: torch.zeros(plan.owned(target.name), sum(shares), target.block_size, dtype=dtype, device=device)
        for target in targets
    }
    per_rank = [0] * plan.world
    for _ in range(-(-max(shares) // chunk_size)):
        chunk = None
        with local_phase(group):
            if chunks is not None:
                chunk = next(chunks, None)
        rows = 0 if chunk is None else next(iter(chunk.values())).shape[0]
        counts = torch.zeros(plan.world, dtype=torch.int64)
        counts[plan.rank] = rows
        counts = all_reduce_(counts, group).tolist()
        send = _send_buffer(chunk, targets, plan, dtype, comm)
        chunk = None  # only the send buffer of this round's full gradients stays alive
        recv = torch.empty(sum(counts) * own, dtype=dtype, device=comm)
        dist.all_to_all_single(recv, send, [k * own for k in counts],
                               [rows * plan.coordinates(r) for r in range(plan.world)], group=group)
        offset = 0
        for src, k in enumerate(counts):
            at = starts[src] + per_rank[src]
            for target in targets:
                n = plan.owned(target.name) * k * target.block_size
                owned[target.name][:, at : at + k] = recv[offset : offset + n].view(
                    plan.owned(target.name), k, target.block_size
                )
                offset += n
            per_rank[src] += k
    with local_phase(group):  # run the collector to its end (it sets count and loss_grad there)
        if chunks is not None and next(chunks, None) is not None:
            raise RuntimeError("the gradient collector produced more gradients than its share")
    if per_rank != list(shares):  # a loader ran out: close the gaps, keeping the rank-major order
        rows = torch.cat([torch.arange(s, s + k) for s, k in zip(starts, per_rank)]).to(device)
        owned = {n: g.index_select(1, rows) for n, g in owned.items()}
    return owned, per_rank
