"""Every rank of a collective pruning call must make the same call: same options, same weights.

A rank whose model has another architecture, other weights, or whose call passes another
option (``sparsity=0.5`` on one rank, ``0.6`` on another; another ``seed``, ``block_size``,
``num_grads``, ...) would otherwise send collectives of other sizes (gloo aborts the process:
"Received data size doesn't match expected size") or silently agree on a model none of the
ranks asked for. :func:`check_same_call` compares a small fingerprint of the call across the
ranks before the first collective that depends on it, and raises the same ValueError on every
rank, naming the argument and the ranks that differ, before anything is modified.

Options that may differ per rank (they do not change the result): ``progress``, ``group``,
``memory_budget`` (a per-rank budget), ``backend`` (the rank's device), and the callables
``loss_fn`` / ``batch_adapter`` (not comparable; pass the same ones).
"""
from __future__ import annotations

import contextvars
import dataclasses
from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .group import active_group, agree, agreed, all_reduce_, local_phase, mark_agreed

__all__ = ["check_same_call", "check_same_numbers", "collective_entry", "entry_checks_passed", "entry_group",
           "PER_RANK_OPTIONS"]

#: True once this rank's current call has reached :func:`check_same_call` (its first collective).
_joined: contextvars.ContextVar = contextvars.ContextVar("woodfisher_joined", default=True)
#: The group of the public call this rank is in (:func:`collective_entry`), or None.
_entry: contextvars.ContextVar = contextvars.ContextVar("woodfisher_entry", default=None)

#: PruneConfig fields that may differ between the ranks of one call.
PER_RANK_OPTIONS = frozenset({"progress", "group", "memory_budget", "backend", "loss_fn", "batch_adapter"})


_WORDS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_SLICE = 1 << 24  # words per int64 temporary (128 MiB)


def _word_sums(t: torch.Tensor) -> Tuple[int, ...]:
    """(sum of x, sum of x * x, sum of x * (i mod 65521 + 1), i the word's position) over the tensor's bytes read
    as integers of its item size (a bool tensor as bytes packed 8 to a 64-bit word), modulo 2**64: computed where
    the tensor lives, one read and no host copy, exact and equal on every device whatever the reduction order
    (integer addition wraps). Two different tensors, or one with its entries moved, agree on all three with
    negligible probability."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = torch.nn.functional.pad(flat.to(torch.uint8), (0, -flat.numel() % 8)).view(torch.int64)
    words = flat.view(_WORDS[flat.element_size()])
    sums = torch.zeros(3, dtype=torch.int64, device=flat.device)
    for start in range(0, words.numel(), _SLICE):
        part = words[start:start + _SLICE].to(torch.int64)
        where = torch.arange(start, start + part.numel(), device=part.device) % 65521 + 1
        sums += torch.stack([part.sum(), (part * part).sum(), (part * where).sum()])
    return tuple(int(v) for v in sums.tolist())


def _weights_digest(target) -> str:
    """A digest of a pruned weight's exact bytes and of its keep-mask, computed on the weight's device
    (:func:`_word_sums`; a sha256 of a host copy took seconds per call on a large model)."""
    return f"{_word_sums(target.param)} mask {_word_sums(target.keep_mask().bool())}"


def _fingerprint(config, targets, extra: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    if config is not None:
        for field in dataclasses.fields(config):
            if field.name not in PER_RANK_OPTIONS:
                out[field.name] = repr(getattr(config, field.name))
    out.update({k: repr(v) for k, v in (extra or {}).items()})
    out["model: the pruned weights (name, shape, dtype)"] = repr([(t.name, tuple(t.shape), str(t.param.dtype))
                                                                   for t in targets])
    out.update({f"model: the values of weight {t.name!r}": _weights_digest(t) for t in targets})
    return out


def _describe(key: str, values: List[Any]) -> str:
    ranks = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
    if key.startswith("model"):
        return (f"model differs between the ranks ({key[len('model: '):]}; {ranks}): every rank must "
                "prune the same model (same architecture, the same weights: load the same checkpoint, or "
                "broadcast rank 0's state_dict, as DDP does)")
    return (f"{key} differs between the ranks ({ranks}): every rank of a collective pruning call must pass the "
            "same options (only progress, memory_budget, backend, loss_fn, batch_adapter may differ)")


def check_same_call(group, config, targets, **extra: Any) -> None:
    """Collective: ValueError on every rank unless every rank's call matches rank 0's.

    Args:
        group: the process group. config: the call's :class:`woodfisher.config.PruneConfig` (None:
            only ``extra`` and the model). targets: the pruned weights (:class:`PruneTarget`).
        extra: further values that must agree (e.g. ``sparsity=`` and ``mode=`` of a ``prune_with``).
    Raises:
        ValueError: naming the first argument that differs and every rank's value, on every rank.
    """
    _joined.set(True)
    mine = None
    with local_phase(group):
        mine = _fingerprint(config, targets, extra)
    every: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    for key, value in every[0].items():
        values = [fp.get(key) for fp in every]
        if any(v != value for v in values):
            raise mark_agreed(ValueError(_describe(key, values)))
    extra_keys = [k for fp in every for k in fp if k not in every[0]]
    if extra_keys:
        raise mark_agreed(ValueError(_describe(extra_keys[0], [fp.get(extra_keys[0]) for fp in every])))


@contextmanager
def collective_entry(group):
    """Context of a public call that is collective over ``group`` (None: a no-op).

    A check that fails on one rank before that rank reached :func:`check_same_call` (a bad
    option, a missing loader, a model that cannot be pruned, on that rank only) would leave
    the other ranks waiting in it until the group's timeout; here the failing rank joins them
    (:func:`woodfisher.distributed.group.agree`), so every rank raises at once, naming it.
    """
    if group is None:
        yield
        return
    token, entry = _joined.set(False), _entry.set(group)
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised on this rank by agree, on the others too
        if not _joined.get() and not agreed(exc):
            _joined.set(True)
            agree(group, exc)
        raise
    finally:
        _joined.reset(token)
        _entry.reset(entry)


def entry_checks_passed() -> None:
    """Collective, inside :func:`collective_entry` before its first collective: every rank's checks passed.

    Called before a collective that is not :func:`check_same_call` (FSDP's ``summon_full_params``): a
    rank refused by an earlier check joins the others here, and every rank raises. A no-op outside
    a collective call or once :func:`check_same_call` ran.
    """
    group = _entry.get()
    if group is not None and not _joined.get():
        agree(group, None)


def entry_group(config, options: Dict[str, Any]):
    """The process group a public call with ``config`` and keyword ``options`` would run over, or None.

    Read before the options are validated (a bad value: None, and the call's own check refuses it).
    """
    value = options.get("group", "auto" if config is None else getattr(config, "group", "auto"))
    try:
        return active_group(value)
    except Exception:  # noqa: BLE001 - not a group: the option's own check names it
        return None


def check_same_numbers(group, what: str, **values: Optional[float]) -> None:
    """Collective (one all-reduce): ValueError on every rank naming the first of ``values`` that differs.

    For decisions each rank takes alone before a collective call (``GradualPruner.step``: whether this
    step prunes): a rank that decided otherwise would leave the others waiting in that call. None counts as -1.
    """
    keys = list(values)
    numbers = [-1.0 if values[k] is None else float(values[k]) for k in keys]
    both = all_reduce_(torch.tensor(numbers + [-x for x in numbers], dtype=torch.float64), group, dist.ReduceOp.MAX)
    for i, key in enumerate(keys):
        low, high = -float(both[len(keys) + i]), float(both[i])
        if low != high:
            raise mark_agreed(ValueError(f"{key} differs between the ranks (from {low:g} to {high:g}): {what}"))
