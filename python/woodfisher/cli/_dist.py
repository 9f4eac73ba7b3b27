"""``woodfisher prune`` under ``torchrun``: the process group, the device and the data shard of a rank.

``torchrun --nproc-per-node N -m woodfisher prune ...`` sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``; the command then initialises the default process group with the backend
that fits the device (NCCL for ``--device cuda``, each rank on GPU ``LOCAL_RANK``; gloo for
``--device cpu``), reads every WORLD_SIZE-th training sample (rank r from sample r) and
prunes collectively (:mod:`woodfisher.distributed`); rank 0 evaluates and writes the outputs.
"""
from __future__ import annotations

import argparse
import datetime
import os
from contextlib import contextmanager
from typing import Iterator, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

__all__ = ["torchrun_group", "shard"]


@contextmanager
def torchrun_group(args: argparse.Namespace) -> Iterator[Tuple[int, int]]:
    """(rank, world size); initialises (and finally destroys) the group when launched by torchrun.

    Sets ``args.device`` to ``cuda:LOCAL_RANK`` for a CUDA run.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        yield (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        return
    cuda = str(args.device).startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def shard(dataset: Dataset, rank: int, world: int) -> Dataset:
    """Every ``world``-th sample from ``rank`` (the whole dataset for one process)."""
    if world <= 1:
        return dataset
    return Subset(dataset, range(rank, len(dataset), world))  # type: ignore[arg-type]
