"""Mask selection over scores spread across ranks, equal to the single-process one.

:func:`woodfisher.masks.select_masks` keeps, in each selection, the ``k`` entries with the
largest score, ties broken toward the lower flat index (layer after layer, each weight
flattened row-major; see ``masks._keep_top``). Here every rank holds the scores of the
blocks it owns, so the k-th value is found without gathering the scores: a radix select on
the 128-bit key (score, inverted index), most significant byte first. Each round, every
rank counts its candidates per byte value (256 bins per segment), one ``all_reduce`` sums
the counts, and every rank narrows its candidates to the bin that holds the k-th key. Eight
rounds fix the score; the index bytes only matter for entries whose scores tie exactly,
and a segment stops as soon as its boundary bin holds exactly the entries still needed.

Scores are float64 (as in ``select_masks``); ``-0.0`` counts as ``0.0`` and ``-inf`` ties
with ``-inf``, as ``==`` does. The keys are IEEE-754 bit patterns made order-preserving:
for a negative double the 63 low bits are flipped, then the sign bit is flipped for all.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from ..masks import check_min_density, check_sparsity, density_floor
from .group import all_reduce_

__all__ = ["order_keys", "top_entries", "select_sharded"]

_SIGN = -(2 ** 63)       # int64 with only the sign bit set
_LOW63 = 2 ** 63 - 1     # int64 with every bit but the sign


def order_keys(values: torch.Tensor) -> torch.Tensor:
    """float64 -> int64 bit patterns whose unsigned order is the numeric order of ``values``."""
    bits = (values.to(torch.float64) + 0.0).view(torch.int64)  # + 0.0 maps -0.0 to +0.0
    signed = torch.where(bits < 0, bits ^ _LOW63, bits)
    return signed ^ _SIGN


def top_entries(values: torch.Tensor, index: torch.Tensor, segment: torch.Tensor, need: Sequence[int],
                bound: int, reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Keep, in every segment, the ``need[s]`` entries of largest (value, then lowest index).

    Args:
        values: (N,) float64, this rank's entries (no NaN).
        index: (N,) int64 in [0, bound), unique within a segment across all ranks.
        segment: (N,) int64 segment id in [0, len(need)).
        need: entries to keep per segment (<= the segment's size over all ranks).
        bound: exclusive upper bound of ``index``.
        reduce: sums a tensor over ranks in place (identity for one process).
    Returns:
        (N,) bool: which of this rank's entries are kept.
    """
    num_seg = len(need)
    rem = torch.tensor(list(need), dtype=torch.int64, device=values.device)
    keep = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    cand = torch.arange(values.numel(), device=values.device)
    index_bytes = max(1, (max(bound - 1, 0).bit_length() + 7) // 8)
    keys = [(order_keys(values), shift) for shift in range(56, -8, -8)]
    inverted = bound - 1 - index.to(torch.int64)
    keys += [(inverted, shift) for shift in range(8 * index_bytes - 8, -8, -8)]
    for key, shift in keys:
        if not bool((rem > 0).any()):
            break
        digit = (key[cand] >> shift) & 255
        seg = segment[cand]
        hist = torch.bincount(seg * 256 + digit, minlength=num_seg * 256).view(num_seg, 256)
        hist = reduce(hist)
        at_least = hist.flip(1).cumsum(1).flip(1)                  # entries with digit >= b
        bucket = (at_least >= rem.unsqueeze(1)).sum(1) - 1          # the bin holding the k-th key
        bucket = bucket.clamp(0, 255)
        above = torch.where(bucket < 255, at_least.gather(1, (bucket + 1).clamp(max=255).unsqueeze(1)).squeeze(1),
                            torch.zeros_like(rem))
        in_bin = hist.gather(1, bucket.unsqueeze(1)).squeeze(1)
        active = rem > 0
        left = rem - above
        whole = active & (in_bin == left)                           # the whole bin is needed: done
        b, act, all_bin = bucket[seg], active[seg], whole[seg]
        keep[cand[act & ((digit > b) | ((digit == b) & all_bin))]] = True
        cand = cand[act & (digit == b) & ~all_bin]
        rem = torch.where(active & ~whole, left, torch.zeros_like(rem))
    if cand.numel():  # only if the keys ran out (duplicate indices): keep what is left
        keep[cand[rem[segment[cand]] > 0]] = True
    return keep


def select_sharded(scores: List[torch.Tensor], index: List[torch.Tensor], numels: List[int], sparsity: float,
                   mode: str, min_density: float, group=None,
                   reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> List[torch.Tensor]:
    """:func:`woodfisher.masks.select_masks` over scores spread across ranks (collective).

    Args:
        scores: per weight, this rank's (n_l,) float64 scores (pruned entries already -inf).
        index: per weight, the (n_l,) flat row-major indices of those entries in the weight.
        numels: per weight, its number of entries (all ranks together).
        sparsity, mode, min_density: as in ``select_masks``.
        group: the process group (None: one process). reduce: override of the sum over ranks.
    Returns:
        per weight, (n_l,) bool keep-flags of this rank's entries.
    Raises:
        ValueError: bad sparsity / mode / min_density, or NaN scores (on this rank).
    """
    sparsity = check_sparsity(sparsity)
    if mode not in ("global", "layerwise"):
        raise ValueError(f"mode must be 'global' or 'layerwise', got {mode!r}")
    check_min_density(min_density)
    for n, s in enumerate(scores):
        if torch.isnan(s).any():
            raise ValueError(f"scores of weight {n} contain NaN")
    if reduce is None:
        reduce = (lambda t: t) if group is None else (lambda t: all_reduce_(t, group))
    device = scores[0].device if scores else torch.device("cpu")
    sizes = [s.numel() for s in scores]
    values = torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64, device=device)
    layer = torch.cat([torch.full((n,), i, dtype=torch.int64, device=device) for i, n in enumerate(sizes)]) \
        if scores else torch.zeros(0, dtype=torch.int64, device=device)
    local = torch.cat(index) if scores else torch.zeros(0, dtype=torch.int64, device=device)
    floors = [density_floor(min_density, n) for n in numels]
    if any(floors):  # a floor counts live entries only (pruned ones are -inf), as in select_masks
        live = torch.tensor([int((s > float("-inf")).sum()) for s in scores] if scores else [0] * len(numels),
                            dtype=torch.int64, device=device)
        floors = [min(f, int(n)) for f, n in zip(floors, reduce(live).tolist())]
    if mode == "layerwise":
        need = [max(f, n - int(round(sparsity * n))) for f, n in zip(floors, numels)]
        return list(top_entries(values, local, layer, need, max(numels), reduce).split(sizes))
    total = sum(numels)
    num_keep = total - int(round(sparsity * total))
    floor = top_entries(values, local, layer, floors, max(numels), reduce) if any(floors) \
        else torch.zeros_like(values, dtype=torch.bool)
    offsets = torch.tensor([0] + numels[:-1], device=device).cumsum(0)
    chosen = top_entries(values.masked_fill(floor, float("-inf")), offsets[layer] + local,
                         torch.zeros_like(layer), [max(0, num_keep - sum(floors))], total, reduce)
    return list((floor | chosen).split(sizes))
