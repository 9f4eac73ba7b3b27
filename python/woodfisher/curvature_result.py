"""The result of phase one, :class:`Curvature`, and the blockwise inverses it is re-inverted with.

:func:`woodfisher.estimate_curvature` makes it; :func:`woodfisher.prune_with` reads it (any number of times, at any
sparsity); :meth:`Curvature.with_damp` inverts its kept gradients again with another damp.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

import woodfisher_kernels as wk

from .conditioning import layer_inverse
from .config import PruneConfig
from .damping import FisherStats, resolve_damp
from .distributed.consistent import check_same_call, collective_entry
from .distributed.estimate import invert_sharded
from .progress import phase
from .targets import Layout, PruneTarget, resolve_targets

__all__ = ["Curvature", "blockwise_from_grads"]


@dataclass
class Curvature:
    """The curvature of one pruning step, reusable for several sparsities.

    Attributes:
        kind: "none" (magnitude), "blockwise", "diagonal" or "kfac".
        config: the options it was estimated with.
        layouts: {weight name: :class:`woodfisher.targets.Layout`} (shape, kind, block size).
        inverses: {weight name: (B, c, c) tensor | LowRankInverse | OffloadedInverse (``inverse_form="offload"``)
            | (numel, 1, 1) diagonal ``1 / (damp + mean g^2)`` | (S^-1, A^-1) K-FAC factors}; empty for "none".
            A method of one's own reads the blockwise and diagonal forms through
            :meth:`woodfisher.methods.StepContext.obs_saliency` / ``obs_update`` / ``inverse_diagonal``.
        forms: {weight name: "sequential" | "lowrank" | "stream" | "diagonal" | "kfac"}.
        damp: the lambda used (None for "none").
        stats: the Fisher statistics the damp was resolved from.
        loss_grad: {weight name: (B, c) mean loss gradient} (WoodTaylor) or None.
        keep: {weight name: bool keep-mask} when the gradients were taken (masked there).
        flops: {weight name: FLOPs per entry and sample} when ``config.beta > 0``.
        grads: {weight name: (B, m, c)} kept gradients in the blocks' layout (for :meth:`with_damp`),
            None when streamed.
        timings: seconds spent on gradients and inverses.
        kappa: {weight name: largest ``kappa = lambda_max(G^T G / N) / damp`` of its blocks left in
            float32} for float32 gradients inverted in a dense form -- in memory, offloaded, sharded (the
            same on every rank) or streamed (:mod:`woodfisher.conditioning`, :mod:`woodfisher.streaming`):
            a power-iteration estimate, exact to ~10% beyond ``eps32 * kappa > 1e-3``; below that level only
            the block of the largest Frobenius bound is estimated (0: every other block was certified by
            the bound). Streamed with a fixed damp, a layer the bound certifies (or whose gradients could not
            be read again) records the bound ``(1 + 1e-3) ||G||_F^2 / (N damp)`` itself; streamed with
            ``damp="auto"``, the value is exact (``eigvalsh`` of the kept Gram block).
        refined: {weight name: blocks whose dense inverse was recomputed (or, streamed with
            ``damp="auto"``, built) in float64, or whose low-rank factor is kept in float64, because
            ``eps32 * kappa > 1e-3``} (layers with none are absent).
        shard: None, or (estimated across the ranks of a process group) the blocks this rank
            holds: ``inverses`` and ``loss_grad`` then cover only those blocks
            (:mod:`woodfisher.distributed`).
        fingerprint: {weight name: (sum, sum of squares)} of the weights it was estimated on
            (:func:`woodfisher.state.fingerprint`), which :func:`woodfisher.prune_with` checks; empty where
            not checked (kind "none", and a :class:`woodfisher.FisherHook` window, taken while the weights train).
    """

    kind: str
    config: PruneConfig
    layouts: Dict[str, Layout]
    inverses: Dict[str, Any] = field(default_factory=dict)
    forms: Dict[str, Optional[str]] = field(default_factory=dict)
    damp: Optional[float] = None
    stats: Optional[FisherStats] = None
    loss_grad: Optional[Dict[str, torch.Tensor]] = None
    keep: Dict[str, torch.Tensor] = field(default_factory=dict)
    flops: Optional[Dict[str, float]] = None
    grads: Optional[Dict[str, torch.Tensor]] = None
    timings: Dict[str, float] = field(default_factory=dict)
    shard: Optional[Any] = None
    kappa: Dict[str, float] = field(default_factory=dict)
    refined: Dict[str, int] = field(default_factory=dict)
    fingerprint: Dict[str, Tuple[float, float]] = field(default_factory=dict)

    def targets(self, model: nn.Module) -> List[PruneTarget]:
        """The weights of ``model`` this curvature is about (same names, shapes and blocks).

        Args:
            model: the network the curvature was estimated on, or a copy of it.
        Returns:
            One :class:`PruneTarget` per weight of :attr:`layouts`, with its block size set.
        Raises:
            ValueError: naming ``curvature``: a weight missing from ``model``, of another shape than estimated, or
                named otherwise (the model wrapped differently: DataParallel, torch.compile, ...).
        """
        targets = resolve_targets(model, list(self.layouts), None, arg="curvature")
        for target in targets:
            layout = self.layouts.get(target.name)
            if layout is None:
                raise ValueError(f"curvature: estimated for {list(self.layouts)[:3]}, the model names its weights "
                                 f"{[t.name for t in targets][:3]}: it is wrapped otherwise than the model the "
                                 "curvature was estimated on (DataParallel / DDP / torch.compile add a prefix); pass "
                                 "it wrapped the same way, or its inner module (model.module / model._orig_mod)")
            if tuple(target.shape) != tuple(layout.shape):
                raise ValueError(f"curvature: weight {target.name!r} has shape {tuple(target.shape)}, the curvature "
                                 f"was estimated for {tuple(layout.shape)}")
            target.block_size, target.channels_last = layout.block_size, layout.channels_last
        return targets

    def __repr__(self) -> str:
        """A summary (the inverses and gradients themselves are not printed)."""
        forms: Dict[str, int] = {}
        for form in self.forms.values():
            forms[str(form)] = forms.get(str(form), 0) + 1
        damp = "None" if self.damp is None else f"{self.damp:.3g}"
        return (f"Curvature(kind={self.kind!r}, method={self.config.method!r}, weights={len(self.layouts)}, "
                f"forms={forms}, damp={damp}, num_grads={self.config.num_grads}, "
                f"block_size={self.config.block_size!r}, gradients {'kept' if self.grads is not None else 'not kept'}"
                f"{'' if self.shard is None else ', sharded'})")

    def with_damp(self, damp: float) -> "Curvature":
        """The same gradients inverted with another damp, no new gradients (WoodFisher paper, Eq. 2).

        Args:
            damp: lambda > 0 (absolute) or "auto", as the ``damp`` field of :class:`PruneConfig`.
        Returns:
            A new :class:`Curvature` (this one is unchanged). A sharded curvature (estimated under a
            process group, :mod:`woodfisher.distributed`) keeps each rank's gradient slices and is
            re-inverted block by block on its owner: call it on every rank of the group, with the same damp.
        Raises:
            ValueError: not a blockwise curvature with kept gradients (streamed or another kind), a
                damp :class:`PruneConfig` refuses, another damp on another rank (sharded), or inverses that fail
                (see :func:`woodfisher_kernels.fisher_inverse`).
        """
        if self.kind != "blockwise" or self.grads is None:
            raise ValueError("with_damp needs a blockwise curvature whose gradients were kept (not streamed); "
                             "estimate the curvature again with the new damp")
        if self.shard is not None:  # collective: each rank re-inverts the blocks it owns
            with collective_entry(self.shard.group):
                config = self.config.replace(damp=damp)
                value = resolve_damp(damp, self.stats)
                check_same_call(self.shard.group, None, [], damp=value)
            new = replace(self, config=config, damp=value)
            invert_sharded(new, self.grads, self.stats.count, config.backend)
            return new
        config = self.config.replace(damp=damp)
        value = resolve_damp(damp, self.stats)
        invs, forms, kappa, refined = blockwise_from_grads(self.grads, self.layouts, value, self.stats.count, config)
        return replace(self, config=config, inverses=invs, forms=forms, damp=value, kappa=kappa, refined=refined)


def blockwise_from_grads(grads, layouts, damp, count, config):
    """{name: inverse} (form by choose_form, or forced), {name: form}, {name: kappa}, {name: blocks refined in
    float64} from kept (B, m, c) gradients (:func:`woodfisher.conditioning.layer_inverse`)."""
    budget = None if config.memory_budget is None else config.memory_budget - sum(
        g.numel() * g.element_size() for g in grads.values())
    form = "auto" if config.inverse_form == "stream" else config.inverse_form
    invs, forms, kappa, refined = {}, {}, {}, {}
    with phase("inverses", total=len(grads), unit="weight") as bar:
        for name, g in grads.items():
            invs[name], k, fixed = layer_inverse(name, g, damp, count, form, budget, config.backend)
            if k is not None:
                kappa[name] = k
            if fixed:
                refined[name] = fixed
            forms[name] = "lowrank" if isinstance(invs[name], wk.LowRankInverse) else "sequential"
            bar.update(1)
    return invs, forms, kappa, refined
