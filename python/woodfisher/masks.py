"""Mask selection shared by every criterion (WoodFisher, baselines, pruning at init).

Scores are dicts ``{param_name: Tensor}`` of the parameters' shapes; higher score =
more important. Masks are bool tensors of the same shapes, True = keep.

Also the one rule for *layer collapse* (:func:`collapsed`, used by every pruner and
reported in ``PruneResult.collapsed``) and for a sparsity that would keep no weight at
all (:func:`check_keeps_weights`).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, List, Mapping, Optional, Union

import torch

Scores = Dict[str, torch.Tensor]

#: A layer keeping less than this fraction of its entries counts as collapsed.
COLLAPSE_DENSITY = 1e-3


def is_real(value) -> bool:
    """A real number (int, float, numpy scalar), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value) -> bool:
    """An integer (Python or numpy: ``numbers.Integral``), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_collapse_density(collapse_density) -> float:
    """``collapse_density`` must be a real number in [0, 1); returned as a float."""
    if not is_real(collapse_density) or not 0.0 <= collapse_density < 1.0:
        raise ValueError(f"collapse_density must lie in [0, 1), got {collapse_density!r}")
    return float(collapse_density)


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """Validate a sparsity.

    Args:
        sparsity: fraction of pruned weights; a real number in [0, 1) (numpy scalars accepted).
        name: the caller's name of the argument, for the message (``"final_sparsity"``).
    Returns:
        ``sparsity`` as a float.
    Raises:
        ValueError: not a real number, or outside [0, 1) (naming ``name``).
    """
    if isinstance(sparsity, Mapping):  # where one number is needed (a dict's own values, a schedule's end)
        raise ValueError(f"{name} must be a number in [0, 1), got a dict {dict(sparsity)!r}: per-weight fractions "
                         "{name or pattern: fraction} are the sparsity of prune_one_shot, prune_with and search_damp; "
                         f"{name} takes one number")
    if not is_real(sparsity):
        tensor = " (a tensor: pass float(...) of it)" if isinstance(sparsity, torch.Tensor) and sparsity.numel() == 1 \
            else ""
        raise ValueError(f"{name} must be a number in [0, 1), got {sparsity!r}{tensor}")
    if not 0.0 <= float(sparsity) < 1.0:
        percent = f" (a fraction: {name}={float(sparsity) / 100:g} for {float(sparsity):g}%)" \
            if 5.0 <= float(sparsity) < 100.0 else ""
        raise ValueError(f"{name} must lie in [0, 1), got {sparsity}{percent}")
    return float(sparsity)


def check_min_density(min_density, sparsity: float = 0.0) -> float:
    """``min_density`` must lie in [0, 1] and be keepable at ``sparsity`` (min_density <= 1 - sparsity)."""
    if not is_real(min_density) or not 0.0 <= float(min_density) <= 1.0:
        raise ValueError(f"min_density must lie in [0, 1], got {min_density!r}")
    if float(min_density) > 1.0 - float(sparsity) + 1e-12:
        raise ValueError(f"min_density={min_density} cannot be kept at sparsity={sparsity}: every weight would "
                         f"keep more than the {1.0 - float(sparsity):g} of its entries the sparsity allows")
    return float(min_density)


def _keep_top(score: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Keep the ``num_keep`` largest entries; among equal scores the lower flat index first.

    The tie rule is part of the contract (``torch.topk`` leaves it unspecified): it makes
    masks reproducible, and :mod:`woodfisher.distributed.select` reproduces it exactly.
    Equal means equal as numbers (``-0.0 == 0.0``; ``-inf`` ties with ``-inf``).
    """
    flat = score.flatten()
    if num_keep <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if num_keep >= flat.numel():
        return torch.ones_like(score, dtype=torch.bool)
    kth = torch.topk(flat, num_keep, sorted=False).values.min()
    keep = flat > kth
    ties = flat == kth
    keep |= ties & (ties.cumsum(0) <= num_keep - int(keep.sum()))
    return keep.view_as(score)


def _check_inputs(scores: Any, pruned: Any) -> None:
    """ValueError naming ``scores`` / ``pruned`` unless they are dicts of tensors, ``pruned``'s bool and shaped as
    the scores of the same name."""
    if not isinstance(scores, Mapping) or not all(isinstance(s, torch.Tensor) for s in scores.values()):
        got = type(scores).__name__ if not isinstance(scores, Mapping) else \
            {n: type(s).__name__ for n, s in scores.items() if not isinstance(s, torch.Tensor)}
        raise ValueError(f"scores must be a dict {{name: tensor}}, got {got}")
    if not scores:
        raise ValueError("scores is empty: no prunable parameter")
    if pruned is None:
        return
    if not isinstance(pruned, Mapping):
        raise ValueError(f"pruned must be a dict {{name: bool keep-mask}} or None, got {type(pruned).__name__}")
    for name, mask in pruned.items():
        if name not in scores:
            continue
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != scores[name].shape:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"pruned[{name!r}] must be a bool keep-mask of its scores' shape "
                             f"{tuple(scores[name].shape)}, got {got}")


def select_masks(scores: Scores, sparsity: Union[float, Mapping[str, float]], mode: str = "global",
                 min_density: float = 0.0, pruned: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Keep-masks reaching ``sparsity`` over all scored parameters.

    Args:
        scores: {name: (shape) scores}; NaN scores are refused.
        sparsity: target fraction of zeros in [0, 1), counted over all entries; or {name: fraction} for every
            scored name, each weight to its own (ranked within the weight, as "layerwise"; ``mode`` is not read).
        mode: "global" (one threshold across layers, the paper's joint mode) or
            "layerwise" (every layer at ``sparsity``, the independent mode).
        min_density: every layer keeps at least this fraction (guards layer collapse).
        pruned: {name: bool keep-mask} of weights already pruned; they stay pruned.
    Returns:
        {name: bool keep-mask}. Ties are broken toward the lower index in the order of
        ``scores`` (layer after layer, each flattened row-major), see :func:`_keep_top`.
    Raises:
        ValueError: ``sparsity`` not in [0, 1), an unknown ``mode``, ``min_density`` not in
            [0, 1], ``scores`` not a non-empty dict of tensors, NaN scores (naming the parameter), or ``pruned``
            not a dict of bool masks of the scores' shapes (naming the entry); a ``sparsity`` dict without a scored
            name (naming ``sparsity``) or with a value outside [0, 1) (naming ``sparsity[name]``).
    """
    if not isinstance(sparsity, Mapping):
        sparsity = check_sparsity(sparsity)
    if mode not in ("global", "layerwise"):
        raise ValueError(f"mode must be 'global' or 'layerwise', got {mode!r}")
    check_min_density(min_density)
    _check_inputs(scores, pruned)
    per = _per_weight(sparsity, scores)
    prepared = {}
    for name, s in scores.items():
        if torch.isnan(s).any():
            raise ValueError(f"scores for {name!r} contain NaN")
        s = s.detach().to(torch.float64)
        if pruned is not None and name in pruned:
            s = s.masked_fill(~pruned[name].to(s.device), float("-inf"))
        prepared[name] = s
    # a floor counts live entries only: entries pruned before stay pruned, so they cannot fill it (nor the budget)
    floors = {n: min(density_floor(min_density, s.numel()),
                     s.numel() if pruned is None or n not in pruned else int(pruned[n].sum()))
              for n, s in prepared.items()}
    if mode == "layerwise" or per:
        return {n: _keep_top(s, max(floors[n], s.numel() - int(round((per[n] if per else sparsity) * s.numel()))))
                for n, s in prepared.items()}
    total = sum(s.numel() for s in prepared.values())
    num_keep = total - int(round(sparsity * total))
    # Reserve each layer's floor first, then rank the rest globally.
    masks = {n: _keep_top(s, floors[n]) for n, s in prepared.items()}
    rest = torch.cat([s.flatten().masked_fill(masks[n].flatten(), float("-inf"))
                      for n, s in prepared.items()])
    extra = max(0, num_keep - sum(int(m.sum()) for m in masks.values()))
    chosen = _keep_top(rest, extra)
    offset = 0
    for n, s in prepared.items():
        masks[n] = masks[n] | chosen[offset:offset + s.numel()].view_as(s)
        offset += s.numel()
    return masks


def _per_weight(sparsity: Any, scores: Scores) -> Optional[Dict[str, float]]:
    """None for one number; {name: fraction} of a mapping that gives every scored name a fraction in [0, 1) (a
    ValueError naming ``sparsity`` / ``sparsity[name]`` otherwise)."""
    if not isinstance(sparsity, Mapping):
        return None
    missing = [n for n in scores if n not in sparsity]
    if missing:
        raise ValueError(f"sparsity: a dict must give every scored weight a fraction; {missing[:4]} have none")
    return {n: check_sparsity(sparsity[n], f"sparsity[{n!r}]") for n in scores}


def collapsed(masks: Mapping[str, torch.Tensor], collapse_density: float = COLLAPSE_DENSITY) -> List[str]:
    """Names of the keep-masks with no entry kept, or a kept fraction below ``collapse_density``.

    Args:
        masks: {name: bool keep-mask}.
        collapse_density: in [0, 1); 0 flags only layers with nothing kept.
    Returns:
        names in the order of ``masks``.
    """
    check_collapse_density(collapse_density)
    out = []
    for name, keep in masks.items():
        nnz = int(keep.sum())
        if nnz == 0 or nnz < collapse_density * keep.numel():
            out.append(name)
    return out


def floor_shortfall(keep: Mapping[str, torch.Tensor], min_density: float) -> List[str]:
    """Names of the keep-masks holding fewer entries than ``min_density`` asks (:func:`density_floor`): weights
    pruned below the floor before the call, which no call revives."""
    return [n for n, k in keep.items() if int(k.sum()) < density_floor(min_density, k.numel())]


def density_floor(min_density: float, numel: int) -> int:
    """The entries (or rows) a weight of ``numel`` keeps at least under ``min_density``: ``ceil(min_density *
    numel)`` (not rounded: "at least this fraction"), at most ``numel``; a 1e-9 slack absorbs float error."""
    return min(int(numel), math.ceil(float(min_density) * numel - 1e-9))


def check_keeps_weights(sparsity: Union[float, Mapping[str, float]], sizes: Mapping[str, int], mode: str = "global",
                        min_density: float = 0.0, name: str = "sparsity") -> None:
    """Refuse a ``sparsity`` that would prune every entry of ``sizes`` ({name: numel}).

    :func:`select_masks` keeps ``total - round(sparsity * total)`` entries (global mode) or
    ``numel - round(sparsity * numel)`` per weight (layerwise, or ``sparsity`` {name: fraction}), at least the
    ``min_density`` floors; when that is 0 everywhere the model would be emptied.

    Raises:
        ValueError: naming ``sparsity`` (as ``name``, with the value passed) and the largest value
            that keeps a weight.
    """
    floors = sum(density_floor(min_density, n) for n in sizes.values())
    total = sum(sizes.values())
    if isinstance(sparsity, Mapping):  # per weight: one that keeps an entry is enough
        if max(floors, sum(n - int(round(sparsity[k] * n)) for k, n in sizes.items())) <= 0:
            raise ValueError(f"{name}={dict(sparsity)!r} would prune every entry of the {len(sizes)} weights; lower "
                             "a fraction")
        return
    if mode == "layerwise":
        kept = sum(n - int(round(sparsity * n)) for n in sizes.values())
        count = max(sizes.values())
    else:
        kept = total - int(round(sparsity * total))
        count = total
    if max(kept, floors) <= 0:
        where = (f"no entry in any of the {len(sizes)} weights (the largest has {count})" if mode == "layerwise"
                 else f"none of the {total} prunable entries")
        raise ValueError(f"{name}={sparsity!r} would prune every weight: {mode} mode keeps {where}; "
                         f"use {name} < {1.0 - 0.5 / count:.6g}")


def sparsity_of(masks: Dict[str, torch.Tensor]) -> float:
    """Overall fraction of pruned entries.

    Args:
        masks: {name: bool keep-mask} (True = kept), any shapes.
    Returns:
        Fraction in [0, 1] of False entries over all masks (0.0 for no entries).
    """
    total = sum(m.numel() for m in masks.values())
    if not total:
        return 0.0
    return 1.0 - sum(int(m.count_nonzero()) for m in masks.values()) / total


def select_kept_masks(scores: Scores, sparsity: Union[float, Mapping[str, float]], mode: str, min_density: float,
                      keep: Dict[str, torch.Tensor], flops: Optional[Dict[str, float]] = None,
                      beta: float = 0.0) -> Dict[str, torch.Tensor]:
    """:func:`select_masks` for a pruning step: scores divided by ``flops[name] ** beta``
    (the FLOPs-aware statistic, when ``flops`` is given), and entries outside the
    previous keep-masks ``keep`` stay pruned."""
    if flops:
        scores = {n: s / flops[n] ** beta for n, s in scores.items()}
    masks = select_masks(scores, sparsity, mode, min_density, pruned=keep)
    return {n: masks[n] & keep[n] for n in masks}
