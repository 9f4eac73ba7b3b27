"""Distributed WoodFisher over a ``torch.distributed`` process group (NCCL on GPUs, gloo on CPUs).

Under an initialised process group with more than one rank (option ``group``: "auto" by
default, or a ProcessGroup), :func:`woodfisher.prune_one_shot`, :func:`woodfisher.estimate_curvature`
and :func:`woodfisher.prune_with` run as one collective call on every rank of the group:

- each rank computes its share of the m gradients from its own loader (data parallel);
- the Fisher blocks are sharded: every rank owns a contiguous range of the blocks of every
  weight, balanced by inverse memory (:mod:`.sharding`); gradient slices are routed to their
  owner with ``all_to_all`` (:mod:`.collect`), so each rank builds and holds about
  1/world of the inverses (:mod:`.estimate`);
- the masks are chosen by an exact distributed k-th value (:mod:`.select`): identical to the
  single-process masks, ties included, global or layerwise;
- the OBS update runs on owned blocks and the new weights are all-gathered (:mod:`.step`),
  so every rank ends with the same model.

Plain, DDP-wrapped and FSDP-wrapped models (:func:`full_parameters`) are accepted. A rank
that fails makes every rank raise (:func:`.group.agree`) instead of hanging.
"""
from .fsdp import full_parameters
from .group import active_group, agree
from .select import select_sharded
from .sharding import ShardPlan, plan_shards

__all__ = ["active_group", "agree", "full_parameters", "plan_shards", "select_sharded", "ShardPlan"]
