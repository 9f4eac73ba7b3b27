"""The gradients of one pass, piece by piece, into the shapes their consumers take.

:class:`woodfisher.GradientCollector` yields one piece {weight name: (G, numel)} per chunk of samples, in the
chunk's size; :func:`regroup` streams them ``k`` rows at a time (the streamed and offloaded inverses) and
:func:`assemble` writes them into one buffer per weight, flat (m, numel) or in the blocks' layout (B, m, c).
Neither keeps a piece longer than its copy needs: the memory plan (:mod:`woodfisher.plan`) counts one piece in
flight besides the output.
"""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, Optional

import torch

import woodfisher_kernels as wk

from .layout import BlockLayout

__all__ = ["regroup", "assemble"]

Piece = Dict[str, torch.Tensor]


def regroup(pieces: Iterable[Piece], k: int) -> Iterator[Piece]:
    """{name: (k_i, numel)} rows of ``pieces`` ``k`` at a time (k_i = k except maybe the last)."""
    pending: List[Piece] = []
    have = 0
    for piece in pieces:  # no reference is kept across a yield but the pending rows (memory plan)
        pending.append(piece)
        have += next(iter(piece.values())).shape[0]
        del piece
        while have >= k:
            cat = pending[0] if len(pending) == 1 else {n: torch.cat([p[n] for p in pending]) for n in pending[0]}
            pending.clear()
            have -= k
            if have:
                pending.append({n: v[k:].clone() for n, v in cat.items()})
            chunk = {n: v[:k] for n, v in cat.items()}
            del cat
            yield chunk
            del chunk
    if have:
        yield {n: torch.cat([p[n] for p in pending]) for n in pending[0]}


def assemble(pieces: Iterator[Piece], targets: List[BlockLayout], num_grads: Optional[int],
             blocked: bool = False) -> Piece:
    """All rows of ``pieces`` in one tensor per weight: {name: (m, numel)}, or with ``blocked`` {name: (B, m, c)}
    (:meth:`woodfisher.layout.BlockLayout.grad_blocks` of the flat rows: canonical order, zero padded).

    ``num_grads`` (m) sizes the buffers up front; None (length unknown until the loader ends) concatenates. A
    single piece of all m rows is returned as it is (no buffer, no copy, when flat or B = 1).
    """
    by_name = {target.name: target for target in targets}

    def finished(flat: Piece) -> Piece:
        if not blocked:
            return flat
        return {name: wk.to_blocks(by_name[name].canonical(g, batch_dims=1), by_name[name].block_size)
                .transpose(0, 1).contiguous() for name, g in flat.items()}

    if num_grads is None:
        parts: Dict[str, List[torch.Tensor]] = {}
        for piece in pieces:
            for name, g in piece.items():
                parts.setdefault(name, []).append(g)
        return finished({name: torch.cat(gs) for name, gs in parts.items()})
    first = next(pieces, None)
    if first is not None and next(iter(first.values())).shape[0] == num_grads:  # one chunk: no buffer
        for _ in pieces:  # finishes the pass (statistics, warnings)
            pass
        return finished(first)
    out: Piece = {}
    piece, first, stop = first, None, 0  # no piece outlives its copy into the buffer (the memory plan counts one)
    while piece is not None:
        start = stop
        stop = start + next(iter(piece.values())).shape[0]
        for name, g in piece.items():
            target = by_name[name]
            if name not in out:
                shape = (target.num_blocks, num_grads, target.block_size) if blocked else (num_grads, target.numel)
                out[name] = g.new_empty(shape)  # every entry is written (the blocks' padding as zeros)
            if blocked:  # (G, B, c) view of the canonical gradients, written transposed
                blocks = wk.to_blocks(target.canonical(g, batch_dims=1), target.block_size)
                out[name][:, start:stop].copy_(blocks.transpose(0, 1))
            else:
                out[name][start:stop].copy_(g)
        del g
        piece = None
        piece = next(pieces, None)
    return out
