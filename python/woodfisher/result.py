"""What a pruning call returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import torch

__all__ = ["PruneResult", "layer_rows"]


@dataclass
class PruneResult:
    """What :func:`woodfisher.prune_one_shot` (and :func:`woodfisher.prune_with`) did.

    Attributes:
        masks: {weight name (e.g. "fc1.weight"): bool keep-mask of the weight's shape}.
        layers: one dict per pruned weight: name, shape, numel, nnz, sparsity, and
            ``inverse`` (the Fisher form used: "sequential", "lowrank", "stream",
            "diagonal", "kfac" or None for magnitude); with a per-weight ``sparsity`` dict also ``target``, the
            weight's fraction asked for.
        sparsity: overall fraction of zeros over the pruned weights (unique tensors).
        damp: the dampening lambda of the last step (with ``num_steps`` > 1 and ``damp="auto"`` each step
            resolves its own from its gradients); None for magnitude baselines.
        config: the options of the call (callables by name).
        timings: seconds per phase: gradients, inverse, select, update, and total (>= the sum of the phases;
            from :func:`woodfisher.prune_with`, gradients and inverse are the curvature's, spent once in
            :func:`woodfisher.estimate_curvature` and shared by every ``prune_with`` of a sweep, and total
            includes them).
        collapsed: names of the pruned weights left with no entry, or with a kept fraction
            below :data:`woodfisher.masks.COLLAPSE_DENSITY` (layer collapse; a warning is
            issued too); empty when none.
        magnitude_overlap: fraction of the weights this call pruned that magnitude pruning
            (global or layerwise, as ``mode``) of the starting weights would also have pruned
            at the same sparsity (:func:`woodfisher.diagnostics.magnitude_overlap`); near 1 means
            the mask degenerated to magnitude pruning. None for patterns or when nothing was pruned.

    Saving: ``torch.save(res, path)`` and ``torch.load(path)`` (``weights_only=True``, torch's default)
    work once :mod:`woodfisher` is imported (the class is registered with
    ``torch.serialization.add_safe_globals``; it holds only tensors, numbers, strings, lists and dicts).
    """

    masks: Dict[str, torch.Tensor]
    layers: List[dict]
    sparsity: float
    damp: Optional[float]
    config: dict
    timings: Dict[str, float] = field(default_factory=dict)
    collapsed: List[str] = field(default_factory=list)
    magnitude_overlap: Optional[float] = None

    def __repr__(self) -> str:
        """A summary (the masks themselves are not printed: a notebook cell showing a result stays short)."""
        total = sum(row["numel"] for row in self.layers)
        kept = sum(row["nnz"] for row in self.layers)
        damp = "None" if self.damp is None else f"{self.damp:.3g}"
        overlap = "None" if self.magnitude_overlap is None else f"{self.magnitude_overlap:.3f}"
        how = "criterion" if "criterion" in self.config else "method"  # a PaI result names its criterion
        seconds = self.timings.get("total", sum(self.timings.values()))
        collapsed = _short_list(self.collapsed)
        return (f"{type(self).__name__}(sparsity={self.sparsity:.4f}, {how}={self.config.get(how)!r}, damp={damp}, "
                f"weights={len(self.layers)} ({kept}/{total} entries kept), collapsed={collapsed}, "
                f"magnitude_overlap={overlap}, seconds={seconds:.2f}; see .masks, .layers, .timings)")


if hasattr(torch.serialization, "add_safe_globals"):  # torch >= 2.4
    torch.serialization.add_safe_globals([PruneResult])  # torch.load(weights_only=True) of a saved result


def _short_list(names: List[str], shown: int = 3) -> str:
    """``names`` as a list literal, cut after ``shown`` with a count of the rest (a summary line stays short
    when hundreds of weights collapse)."""
    if len(names) <= shown:
        return repr(list(names))
    return "[" + ", ".join(repr(n) for n in names[:shown]) + f", ... +{len(names) - shown} more]"


def layer_rows(masks: Dict[str, torch.Tensor], forms: Optional[Dict[str, Optional[str]]] = None,
               sparsity: Any = None) -> List[dict]:
    """[{name, shape, numel, nnz, sparsity, inverse}] of keep-masks, in order; with ``sparsity`` a per-weight
    {name: fraction} dict, each row also holds its weight's ``target``."""
    rows = []
    for name, keep in masks.items():
        nnz = int(keep.sum())
        rows.append(dict(name=name, shape=tuple(keep.shape), numel=keep.numel(), nnz=nnz,
                         sparsity=1.0 - nnz / keep.numel(), inverse=(forms or {}).get(name)))
        if isinstance(sparsity, Mapping):
            rows[-1]["target"] = sparsity.get(name)
    return rows
