"""FSDP-wrapped models: prune the full parameters, then let FSDP re-shard them.

``FullyShardedDataParallel`` (FSDP1) keeps 1/world of every parameter on each rank. Pruning
needs the full weights (gradients, statistic, update), so :func:`full_parameters` gathers
them for the duration of a call with ``FSDP.summon_full_params(writeback=True)``; pruned
weights are written into the full parameters and FSDP scatters them back to the shards on
exit. Inside it the wrapped module is called directly (:func:`woodfisher.targets.unwrap_model`
sees through the FSDP root), so the gradient passes run no FSDP collectives.

Limits: the FSDP root must wrap the whole model without nested FSDP units and with
``use_orig_params=True`` (names and shapes of the original parameters); the per-module
``fully_shard`` (FSDP2, DTensor parameters) is refused with a ValueError: gather its weights
first (``torch.distributed.checkpoint``) or prune before sharding.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

from torch import nn

from .consistent import entry_checks_passed

__all__ = ["full_parameters", "is_fsdp", "refuse_held_masks"]


def is_fsdp(module: nn.Module) -> bool:
    """True for a ``torch.distributed.fsdp.FullyShardedDataParallel`` instance (no import needed)."""
    return type(module).__name__ == "FullyShardedDataParallel" and hasattr(module, "_fsdp_wrapped_module")


def refuse_held_masks(model, what: str) -> None:
    """ValueError naming ``what`` when ``model`` is FSDP-wrapped: masks held by ``torch.nn.utils.prune`` replace
    the weights FSDP flattened into its shards, and the next forward fails on the shard's shape."""
    if isinstance(model, nn.Module) and is_fsdp(model):
        raise ValueError(f"{what}: masks held by torch.nn.utils.prune cannot live on a FullyShardedDataParallel "
                         "model (they replace the weights FSDP keeps in its flat shards: the next forward fails); "
                         "prune with keep_masks=False and zero the pruned entries again after each optimizer step, "
                         "or prune and hold the masks on the model before wrapping it")


def _check(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":
            raise ValueError(f"model: parameter {name!r} is a DTensor (FSDP2 fully_shard or tensor parallel); "
                             "woodfisher prunes full weights: gather them first (torch.distributed.checkpoint) "
                             "or prune before sharding")
    if is_fsdp(model):
        nested = [n for n, m in model.named_modules() if n and is_fsdp(m)]
        if nested:
            raise ValueError(f"model: nested FSDP units {nested[:3]} are not supported; wrap the whole model in one "
                             "FullyShardedDataParallel root (no auto_wrap_policy) to prune it")
        if not getattr(model, "_use_orig_params", True):
            raise ValueError("model: FullyShardedDataParallel must be built with use_orig_params=True to be pruned")


@contextmanager
def full_parameters(model: nn.Module):
    """Context: the full parameters of an FSDP model, written back to the shards on exit (collective).

    A no-op for models that are not FSDP-wrapped (plain, DataParallel, DDP) and for
    anything that is not a module (the pruning call refuses it).

    Raises:
        ValueError: FSDP2 / DTensor parameters, nested FSDP units, or ``use_orig_params=False``.
    """
    if not isinstance(model, nn.Module):  # refused with a ValueError by the call's own checks
        yield model
        return
    _check(model)
    if not is_fsdp(model):
        with nullcontext():
            yield model
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    entry_checks_passed()  # every rank's checks so far passed, before summon_full_params' all-gather
    with FSDP.summon_full_params(model, writeback=True):
        yield model
