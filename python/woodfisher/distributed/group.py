"""The process group a pruning call runs over, and the few collectives it needs.

Pruning is distributed with ``torch.distributed``, the engine data-parallel training already
uses: NCCL for CUDA tensors, gloo for CPU tensors. Nothing here chooses a backend: the
caller initialises the process group (``torchrun`` + ``init_process_group``, or the CLI,
which picks NCCL when the model is on a GPU and gloo otherwise) and every collective runs on
the device that backend works on (:func:`comm_device`), so one code path serves both.

Failures: a rank that fails in a local phase (a NaN gradient, an empty loader, a bad option)
must not leave the others waiting in a collective. :func:`agree` is called after each
local phase: every rank learns whether any rank failed and all of them raise (a ValueError
when the failing rank raised one, else a RuntimeError), naming the rank and its message.
A rank that dies outright is reported by the backend (gloo: "connection closed by peer")
or, at the latest, when the group's ``timeout`` (``init_process_group(timeout=...)``) expires.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, List, Optional

import torch
import torch.distributed as dist

__all__ = ["active_group", "shows_progress", "check_group", "describe_group", "comm_device", "agree", "agreed",
           "mark_agreed", "local_phase", "all_gather_flat", "all_reduce_", "share"]


def check_group(value: Any) -> Any:
    """``group`` must be "auto", None or a ``torch.distributed.ProcessGroup``; ValueError otherwise (one
    naming the rank for the ``GroupMember.NON_GROUP_MEMBER`` that ``new_group`` returns outside the group)."""
    if value is None or (isinstance(value, str) and value == "auto"):
        return value
    if dist.is_available() and isinstance(value, dist.ProcessGroup):
        return value
    if dist.is_available() and value is dist.GroupMember.NON_GROUP_MEMBER and dist.is_initialized():
        raise ValueError(f"group: this process (rank {dist.get_rank()} of the default group) is not a member of the "
                         "group passed (torch.distributed.new_group returns GroupMember.NON_GROUP_MEMBER, "
                         f"{value!r}, on the ranks it leaves out): prune only on the group's ranks, or pass "
                         "group=None to prune on this process alone")
    raise ValueError(f"group must be 'auto', None or a torch.distributed.ProcessGroup, got {value!r}")


def describe_group(value: Any) -> Any:
    """A JSON-friendly description of a ``group`` option (for reports)."""
    if value is None or isinstance(value, str):
        return value
    return f"ProcessGroup(size={dist.get_world_size(value)})"


def active_group(value: Any) -> Optional["dist.ProcessGroup"]:
    """The group a call is distributed over, or None for a single-process call.

    ``"auto"``: the default group when ``torch.distributed`` is initialised with more than
    one process; a ProcessGroup: that group when it has more than one process; None: never.
    """
    if value is None or not dist.is_available() or not dist.is_initialized():
        return None
    group = dist.group.WORLD if isinstance(value, str) else value
    return group if dist.get_world_size(group) > 1 else None


def shows_progress(value: Any) -> bool:
    """Whether this process shows the progress of a call with ``group=value``: always for a single-process
    call, only on the group's rank 0 for a collective one (one display under ``torchrun``, not one per rank)."""
    group = active_group(value)
    return group is None or dist.get_rank(group) == 0


def comm_device(group) -> torch.device:
    """Where collective buffers must live: the current CUDA device for NCCL, else the CPU."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def share(total: int, world: int, rank: int) -> int:
    """Rank ``rank``'s part of ``total`` items split as evenly as possible (lower ranks first)."""
    return total // world + (1 if rank < total % world else 0)


def agree(group, error: Optional[BaseException]) -> None:
    """Collective: raise on every rank if ``error`` is not None on any rank.

    The failing rank re-raises its own exception, its message prefixed with "rank r of world: " (unless
    every rank failed with the same message);
    the others raise ValueError (when the first failing rank raised a ValueError) or RuntimeError
    naming that rank and its message.
    """
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=comm_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if not int(flag.item()):
        return
    mine = None if error is None else (isinstance(error, ValueError), f"{type(error).__name__}: {error}")
    every: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    if error is not None:  # the same failure on every rank (the same bad option): no rank to single out
        same = all(e is not None and e[1] == every[0][1] for e in every)
        raise _named(error, None if same else dist.get_rank(group), len(every))
    rank, (is_value, message) = next((r, e) for r, e in enumerate(every) if e is not None)
    raise _named((ValueError if is_value else RuntimeError)(f"rank {rank} failed, so this rank stops too: {message}"),
                 None, len(every))


def _named(error: BaseException, rank: Optional[int], world: int) -> BaseException:
    """``error`` marked as agreed by every rank (:func:`agreed`), its message prefixed by the rank that raised it
    (``rank``; None: a message that names it already); the type is kept."""
    prefix = f"rank {rank} of {world}: "
    if rank is not None and error.args and isinstance(error.args[0], str) and not error.args[0].startswith(prefix):
        error.args = (prefix + error.args[0],) + tuple(error.args[1:])
    return mark_agreed(error)


def mark_agreed(error: BaseException) -> BaseException:
    """``error``, marked as raised on every rank of the group at once (:func:`agreed` is then True)."""
    error._woodfisher_agreed = True
    return error


def agreed(error: BaseException) -> bool:
    """True for an exception :func:`agree` raised: every rank of the group raises too."""
    return getattr(error, "_woodfisher_agreed", False)


@contextmanager
def local_phase(group):
    """``with local_phase(group): ...`` runs local work, then :func:`agree` (collective).

    Every rank must enter it the same number of times.
    """
    error = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised by agree, on every rank
        error = exc
    agree(group, error)


def all_reduce_(tensor: torch.Tensor, group, op=None) -> torch.Tensor:
    """In-place all-reduce (sum by default) through the group's device; returns ``tensor``."""
    dev = comm_device(group)
    buf = tensor.to(dev)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM if op is None else op, group=group)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def all_gather_flat(flat: torch.Tensor, group) -> List[torch.Tensor]:
    """Every rank's 1-D tensor (sizes may differ), in rank order, on ``flat``'s device.

    gloo's all_gather needs equal sizes: pieces are padded to the largest.
    """
    dev = comm_device(group)
    world = dist.get_world_size(group)
    sizes = torch.zeros(world, dtype=torch.int64, device=dev)
    sizes[dist.get_rank(group)] = flat.numel()
    dist.all_reduce(sizes, group=group)
    width = int(sizes.max())
    mine = torch.zeros(width, dtype=flat.dtype, device=dev)
    mine[:flat.numel()] = flat.to(dev)
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    return [o[:int(n)].to(flat.device) for o, n in zip(out, sizes)]
