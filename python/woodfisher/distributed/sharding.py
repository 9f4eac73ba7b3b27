"""Which rank owns which Fisher blocks: a contiguous range of every weight, balanced by cost.

Every weight (layer) of B blocks is split into ``world`` contiguous ranges, rank 0 first,
so a rank owns ``B // world`` or more blocks of every weight it can; the blocks left over
(``B % world`` per weight) are dealt, most expensive first, to the rank with the smallest
load so far (lowest rank on ties), the classic longest-processing-time rule. The cost of a
block is the memory of its inverse: ``c^2`` entries for a dense block (so the balance is by
``c^2``), ``m c + m^2`` for a low-rank one. Since every rank gets the same base share, the
most loaded rank holds at most ``total / world`` plus one block (the bound of the
longest-processing-time rule), and a rank may own nothing (more ranks than blocks).

The plan is a pure function of the layouts, forms and world size: every rank computes the
same plan without communicating.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

__all__ = ["ShardPlan", "plan_shards", "block_cost"]


def block_cost(form: str, block_size: int, num_grads: int) -> int:
    """Entries of one block's inverse: ``c^2`` (dense) or ``m c + m^2`` (low-rank factors)."""
    if form == "lowrank":
        return num_grads * block_size + num_grads * num_grads
    return block_size * block_size


@dataclass(frozen=True)
class ShardPlan:
    """Block ownership of every weight.

    Attributes:
        world: number of ranks. rank: this rank.
        names: weight names in order. block_size / num_blocks: per weight.
        counts: {name: blocks owned by each rank, rank order} (contiguous ranges, rank 0 first).
        cost: {name: entries of one block's inverse} (see :func:`block_cost`).
    """

    world: int
    rank: int
    names: Tuple[str, ...]
    block_size: Dict[str, int]
    num_blocks: Dict[str, int]
    counts: Dict[str, Tuple[int, ...]]
    cost: Dict[str, int]

    def range(self, name: str, rank: int = None) -> Tuple[int, int]:
        """``[start, stop)`` block range of ``name`` owned by ``rank`` (default: this rank)."""
        r = self.rank if rank is None else rank
        counts = self.counts[name]
        start = sum(counts[:r])
        return start, start + counts[r]

    def owned(self, name: str, rank: int = None) -> int:
        """Blocks of ``name`` owned by ``rank`` (default: this rank)."""
        return self.counts[name][self.rank if rank is None else rank]

    def load(self, rank: int = None) -> int:
        """Inverse entries held by ``rank`` (default: this rank)."""
        return sum(self.owned(n, rank) * self.cost[n] for n in self.names)

    @property
    def total(self) -> int:
        """Inverse entries of all ranks together."""
        return sum(self.num_blocks[n] * self.cost[n] for n in self.names)

    @property
    def max_block(self) -> int:
        """Entries of the largest block."""
        return max(self.cost.values())

    def coordinates(self, rank: int = None) -> int:
        """Padded gradient coordinates ``sum n_blocks * c`` owned by ``rank``."""
        return sum(self.owned(n, rank) * self.block_size[n] for n in self.names)


def plan_shards(layers: Sequence[Tuple[str, int, int]], costs: Dict[str, int], world: int,
                rank: int) -> ShardPlan:
    """Balanced contiguous block ranges.

    Args:
        layers: (name, num_blocks, block_size) per weight, in order.
        costs: {name: entries of one block's inverse}.
        world: ranks (>= 1). rank: this rank, in [0, world).
    Returns:
        :class:`ShardPlan`.
    Raises:
        ValueError: world < 1 or rank outside [0, world).
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need world >= 1 and 0 <= rank < world, got world={world}, rank={rank}")
    counts: Dict[str, List[int]] = {n: [b // world] * world for n, b, _ in layers}
    extras = [(costs[n], i, n) for i, (n, b, _) in enumerate(layers) for _ in range(b % world)]
    extras.sort(key=lambda e: (-e[0], e[1]))
    load = [0] * world
    for cost, _, name in extras:
        r = min(range(world), key=lambda j: (load[j], j))
        load[r] += cost
        counts[name][r] += 1
    return ShardPlan(world, rank, tuple(n for n, _, _ in layers), {n: c for n, _, c in layers},
                     {n: b for n, b, _ in layers}, {n: tuple(v) for n, v in counts.items()},
                     {n: costs[n] for n, _, _ in layers})
