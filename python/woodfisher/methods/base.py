"""The protocol every pruning method implements, and the step context it receives.

A method is one small object (see :mod:`woodfisher.methods` for the registry):

- ``name``: the registry key (``method="..."``);
- ``curvature``: what :func:`woodfisher.estimate_curvature` must build for it: "none",
  "blockwise", "diagonal" or "kfac";
- ``patterns``: the group patterns it supports ("nm", "rows"); ``woodtaylor``: whether it
  supports the first-order term; ``joint_update``: whether it supports ``joint_update=True``;
  ``fixed_mode``: a mode it always uses (or None; another explicit ``mode`` than the default "global" is
  refused, naming ``other_mode``, the method that ranks the other way);
- ``check(config)`` / ``check_targets(targets, config)``: refuse what it cannot do;
- ``block_size(config)``: the Fisher block size it needs;
- ``step(ctx) -> (new weights, keep-masks)``: one pruning step given the curvature.

:class:`ScoreMethod` is the shortcut for a score-only baseline: implement ``scores(ctx)``
(higher = keep) and the shared selection and zeroing do the rest.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch

from .. import structured as st
from ..gradients import compute_dtype
from ..masks import select_kept_masks
from ..progress import phase
from .obs import diagonal_of, saliency_of, update_of
from .outputs import check_scores
from .score_patterns import pattern_keep

Tensors = Dict[str, torch.Tensor]
_PHASES = {"select": "selection", "update": "update"}


@dataclass
class StepContext:
    """What one pruning step works with.

    Attributes:
        targets: the pruned weights (:class:`woodfisher.targets.PruneTarget`).
        curvature: the :class:`woodfisher.curvature.Curvature` of this step.
        config: the :class:`woodfisher.PruneConfig`.
        sparsity: the step's target sparsity over all targets, or {name: fraction} of each target (a per-weight
            ``sparsity``: :mod:`woodfisher.per_weight`).
        keep: {name: bool keep-mask} before the step (pruned entries stay pruned).
        timings: seconds per phase, updated in place ("select", "update"; see :meth:`timed`).

    Building blocks for a method of one's own: :meth:`select` (masks from scores), :meth:`obs_saliency`,
    :meth:`obs_update` and :meth:`inverse_diagonal` (any form of a blockwise or diagonal curvature),
    :meth:`blocked_weights`; ``curvature.grads`` holds the kept per-sample gradients ((B, m, c), blockwise, None
    when streamed). What a method returns is checked (:mod:`woodfisher.methods.outputs`).
    """

    targets: List[Any]
    curvature: Any
    config: Any
    sparsity: Union[float, Dict[str, float]]
    keep: Tensors
    timings: Dict[str, float]

    @property
    def mode(self) -> str:
        """The ranking of the step: "layerwise" for per-weight targets (``sparsity`` a dict), else the method's
        fixed mode or the config's."""
        if isinstance(self.sparsity, Mapping):
            return "layerwise"
        fixed = self.config.method_impl.fixed_mode
        return fixed if fixed is not None else self.config.mode

    @contextlib.contextmanager
    def timed(self, name: str, total: Optional[int] = None, unit: str = "weight") -> Iterator[Any]:
        """Time a block as phase ``name`` ("select" or "update"): added to :attr:`timings` and shown
        on the active :mod:`woodfisher.progress` display; yields its handle (``update(n)`` advances a
        phase with a ``total``: count, rate and time left)."""
        start = time.perf_counter()
        try:
            with phase(_PHASES.get(name, name), total, unit) as handle:
                yield handle
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def select(self, scores: Tensors) -> Tensors:
        """Keep-masks from ``scores`` (higher = keep): FLOPs-aware when beta > 0, pruned stay pruned.

        ``scores`` is checked first (:func:`woodfisher.methods.outputs.check_scores`: a ValueError naming the
        method and the weight for a missing / extra weight, another shape, NaN)."""
        scores = check_scores(self, scores)
        return select_kept_masks(scores, self.sparsity, self.mode, self.config.min_density, self.keep,
                                 self.curvature.flops, self.config.beta)

    def obs_saliency(self, target) -> torch.Tensor:
        """The OBS statistic ``rho_q = w_q^2 / (2 [F^-1]_qq)`` (WoodFisher paper, Eq. 11; WoodTaylor's Eq. 23 when
        the curvature holds a loss gradient) of one weight, from a blockwise or diagonal curvature in any form
        (dense, low-rank, offloaded): a tensor of the weight's shape, loss units."""
        w = target.blocks(target.effective_weight().to(self._dtype()))
        lg = (self.curvature.loss_grad or {}).get(target.name)
        return target.unblock(saliency_of(self.curvature.inverses[target.name], w, lg, self.config.backend))

    def obs_update(self, target, keep: torch.Tensor) -> torch.Tensor:
        """The weight after the OBS update that removes the entries ``keep`` marks False (paper Eq. 10 summed over
        them; ``joint_update=True``: their joint optimum per block): a tensor of the weight's shape, those entries
        exactly 0. ``keep``: bool of the weight's shape."""
        w = target.blocks(target.effective_weight().to(self._dtype()))
        lg = (self.curvature.loss_grad or {}).get(target.name)
        return target.unblock(update_of(self.curvature.inverses[target.name], w, ~target.blocks(keep), lg,
                                        self.config.backend, self.config.joint_update))

    def inverse_diagonal(self, target) -> torch.Tensor:
        """``[F^-1]_qq`` of every entry of one weight (any form of a blockwise or diagonal curvature): a tensor of
        the weight's shape."""
        return target.unblock(diagonal_of(self.curvature.inverses[target.name]))

    def blocked_weights(self) -> Tensors:
        """{name: (B, c)} effective weights in the curvature's dtype."""
        dtype = self._dtype()
        return {target.name: target.blocks(target.effective_weight().to(dtype)) for target in self.targets}

    def _dtype(self) -> torch.dtype:
        return compute_dtype(self.targets[0].param.dtype)


class PruningMethod:
    """Base of every method; subclasses set the class attributes and implement :meth:`step`."""

    name: ClassVar[str] = ""
    curvature: ClassVar[str] = "none"
    patterns: ClassVar[Tuple[str, ...]] = ()
    woodtaylor: ClassVar[bool] = False
    joint_update: ClassVar[bool] = False
    fixed_mode: ClassVar[Optional[str]] = None
    other_mode: ClassVar[Optional[str]] = None  # the method that ranks as the other mode (messages)
    summary: ClassVar[str] = ""

    def check(self, config) -> None:
        """Refuse option combinations this method does not support (ValueError naming them)."""
        if config.woodtaylor and not self.woodtaylor:
            raise ValueError(f"woodtaylor=True is not supported by method {self.name!r}")
        if self.fixed_mode is not None and config.mode not in (self.fixed_mode, "global"):
            # "global" is the default mode, which a method of its own mode reads as "not chosen"
            other = f"; method={self.other_mode!r} is its {config.mode} form" if self.other_mode else ""
            raise ValueError(f"mode={config.mode!r} does not apply to method {self.name!r}, which always ranks "
                             f"{self.fixed_mode}{other}")
        if config.joint_update and not self.joint_update:
            raise ValueError(f"joint_update=True is not supported by method {self.name!r} (only by the blockwise "
                             "OBS methods 'woodfisher' and 'diag_fisher')")
        parsed = st.parse_pattern(config.pattern)
        if parsed is None:
            return
        if parsed[0] not in self.patterns:
            raise ValueError(f"pattern={config.pattern!r} is not supported by method {self.name!r} "
                             f"(it supports {list(self.patterns) or 'no pattern'})")
        if config.num_steps not in (1, "auto"):  # a pattern's mask is reached in one step
            raise ValueError(f"num_steps={config.num_steps!r} with pattern={config.pattern!r}: a pattern is pruned "
                             "in one step; pass num_steps=1 (or 'auto')")
        if config.woodtaylor:
            raise ValueError(f"woodtaylor=True with pattern={config.pattern!r}: patterns use the WoodFisher "
                             "statistic; pass woodtaylor=False")
        if parsed[0] == "nm" and config.beta > 0:  # a silent no-op otherwise (and a FLOPs pass for nothing)
            raise ValueError(f"beta={config.beta:g} has no effect with pattern={config.pattern!r}: every run of "
                             f"{parsed[2]} keeps {parsed[1]} whatever its layer's FLOPs; pass beta=0 (pattern='rows' "
                             "and unstructured pruning weigh layers by FLOPs)")
        block = config.block_size
        if parsed[0] == "nm" and isinstance(block, int) and block % parsed[2]:
            raise ValueError(f"block_size={block} must be a multiple of M={parsed[2]} for pattern "
                             f"{config.pattern!r} (a run of M weights never crosses a block), or 'auto' / None")
        # a sparsity other than the one N:M fixes: PruneConfig's own check (config.check_pattern_sparsity)

    def check_targets(self, targets, config) -> None:
        """Refuse weights this method cannot prune (e.g. a pattern that does not fit a row)."""
        parsed = st.parse_pattern(config.pattern)
        if parsed is not None:
            st.check_pattern_layers(parsed, targets)

    def block_size(self, config) -> Optional[int]:
        """The Fisher block size this method needs (None = whole weights; 1 for a "diagonal" curvature, whose
        inverses are one (1, 1) block per entry)."""
        return 1 if self.curvature == "diagonal" else config.fisher_block_size

    def step(self, ctx: StepContext) -> Tuple[Tensors, Tensors]:
        """One pruning step: ({name: new weights}, {name: bool keep-mask}), each with the weight's number of
        entries; pruned entries are zeroed by the caller. Checked before anything is written
        (:func:`woodfisher.methods.outputs.check_step_output`)."""
        raise NotImplementedError(f"{type(self).__name__}.step(ctx) is not implemented")


class ScoreMethod(PruningMethod):
    """A method that only scores weights (higher = keep); selection and zeroing are shared."""

    def scores(self, ctx: StepContext) -> Tensors:
        """{weight name (``target.name`` of ``ctx.targets``): scores of the weight's shape}, higher = keep; any
        real dtype and device (moved to the weight's); NaN is refused, +-inf means keep / prune first."""
        raise NotImplementedError(f"{type(self).__name__}.scores(ctx) is not implemented")

    def step(self, ctx: StepContext) -> Tuple[Tensors, Tensors]:
        """Masks from :meth:`scores`: unstructured by :meth:`StepContext.select`, or with a ``pattern`` this
        method lists in ``patterns`` by :func:`woodfisher.methods.score_patterns.pattern_keep`."""
        parsed = st.parse_pattern(ctx.config.pattern)
        with ctx.timed("select"):
            scores = self.scores(ctx)
            keep = ctx.select(scores) if parsed is None else pattern_keep(ctx, check_scores(ctx, scores), parsed)
        return {target.name: target.effective_weight() for target in ctx.targets}, keep
