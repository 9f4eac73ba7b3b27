"""Gradual pruning on the polynomial schedule of Zhu & Gupta (2017).

Pruning happens at steps ``t = t0, t0 + dt, ..., t0 + n dt`` (``start_step``,
``frequency``, ``end_step = t0 + n dt``) to the sparsity

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt))^3 ,   s_i = 0.05 by default

(the paper's appendix S1.1). Between pruning steps the masks are kept with
``torch.nn.utils.prune.custom_from_mask`` (``weight_orig`` parameter, ``weight_mask``
buffer, ``weight = weight_orig * weight_mask`` recomputed before every forward), so an
ordinary training loop fine-tunes only the surviving weights. The optimizer keeps
working: prune re-registers the same Parameter object as ``weight_orig``.
:func:`make_permanent` removes the reparametrisation (pruned entries stay 0).
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from .config import PruneConfig
from .masks import check_sparsity
from .pruner import PruneResult, prune_one_shot
from .targets import resolve_targets


def polynomial_sparsity(step: int, *, final_sparsity: float, start_step: int, end_step: int,
                        frequency: int = 1, initial_sparsity: float = 0.05) -> float:
    """Target sparsity at ``step``: 0 before ``start_step``, the cubic ramp, then ``final_sparsity``.

    The ramp is evaluated at the last scheduled pruning step <= ``step``.
    """
    if step < start_step:
        return 0.0
    if end_step == start_step:
        return float(final_sparsity)
    last = start_step + ((min(step, end_step) - start_step) // frequency) * frequency
    frac = (last - start_step) / (end_step - start_step)
    return float(final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** 3)


def apply_masks(model: nn.Module, masks: Dict[str, torch.Tensor]) -> None:
    """Hold ``masks`` ({"<module>.weight": keep}) with torch.nn.utils.prune on ``model``."""
    named = dict(model.named_modules())
    for pname, keep in masks.items():
        mname = pname[: -len(".weight")] if pname.endswith(".weight") else pname
        if mname not in named:
            raise ValueError(f"masks: no module named {mname!r} in the model")
        module = named[mname]
        keep = keep.to(device=next(module.parameters()).device)
        if hasattr(module, "weight_mask"):
            with torch.no_grad():
                module.weight_mask.copy_(keep.to(module.weight_mask.dtype))
                module.weight_orig.mul_(module.weight_mask)
                setattr(module, "weight", module.weight_orig * module.weight_mask)
        else:
            torch_prune.custom_from_mask(module, "weight", keep)
            with torch.no_grad():
                module.weight_orig.mul_(module.weight_mask)


def make_permanent(model: nn.Module) -> nn.Module:
    """Remove every ``torch.nn.utils.prune`` weight reparametrisation (weights keep their zeros)."""
    for module in model.modules():
        if hasattr(module, "weight_orig") and hasattr(module, "weight_mask"):
            torch_prune.remove(module, "weight")
    return model


class GradualPruner:
    """Prunes at scheduled steps with :func:`prune_one_shot` and keeps the masks.

    Args:
        model: network to prune (modified in place).
        loader: default ``(inputs, targets)`` loader for the Fisher (``step`` may override).
        final_sparsity: s_f in [0, 1). initial_sparsity: s_i (default 0.05).
        start_step, end_step, frequency: pruning at start_step + k * frequency up to
            end_step (``end_step - start_step`` must be a multiple of ``frequency``).
        prune_kwargs: the other :class:`woodfisher.PruneConfig` fields (method, mode, block_size, ...),
            validated here.

    Typical loop::

        pruner = GradualPruner(model, loader, final_sparsity=0.9, start_step=0, end_step=40,
                               frequency=5, method="woodfisher", block_size=1000)
        for epoch in range(100):
            pruner.step(epoch)
            train_one_epoch(model)
        make_permanent(model)
    """

    def __init__(self, model: nn.Module, loader: Optional[Iterable] = None, *, final_sparsity: float,
                 start_step: int = 0, end_step: int = 0, frequency: int = 1,
                 initial_sparsity: float = 0.05, **prune_kwargs):
        check_sparsity(final_sparsity)
        check_sparsity(initial_sparsity)
        for name, v in (("start_step", start_step), ("end_step", end_step), ("frequency", frequency)):
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "frequency" else 0):
                raise ValueError(f"{name} must be an int >= {1 if name == 'frequency' else 0}, got {v!r}")
        if end_step < start_step or (end_step - start_step) % frequency:
            raise ValueError(f"end_step - start_step must be a non-negative multiple of frequency, got "
                             f"start_step={start_step}, end_step={end_step}, frequency={frequency}")
        if initial_sparsity > final_sparsity:
            raise ValueError(f"initial_sparsity ({initial_sparsity}) must not exceed final_sparsity "
                             f"({final_sparsity})")
        if "sparsity" in prune_kwargs:
            raise ValueError("pass final_sparsity, not sparsity, to GradualPruner")
        self.config = PruneConfig.from_options(sparsity=float(final_sparsity), **prune_kwargs)
        resolve_targets(model, self.config.modules, self.config.method_impl.block_size(self.config))
        self.model, self.loader = model, loader
        self.final_sparsity, self.initial_sparsity = float(final_sparsity), float(initial_sparsity)
        self.start_step, self.end_step, self.frequency = start_step, end_step, frequency
        self.prune_kwargs = prune_kwargs
        self.last_step: Optional[int] = None
        self.history: List[dict] = []

    def is_pruning_step(self, step: int) -> bool:
        return self.start_step <= step <= self.end_step and (step - self.start_step) % self.frequency == 0

    def target_sparsity(self, step: int) -> float:
        return polynomial_sparsity(step, final_sparsity=self.final_sparsity, start_step=self.start_step,
                                   end_step=self.end_step, frequency=self.frequency,
                                   initial_sparsity=self.initial_sparsity)

    def step(self, step: int, loader: Optional[Iterable] = None) -> Optional[PruneResult]:
        """Prune if ``step`` is scheduled and not done yet; returns the result or None."""
        if not self.is_pruning_step(step) or (self.last_step is not None and step <= self.last_step):
            return None
        target = self.target_sparsity(step)
        result = prune_one_shot(self.model, loader if loader is not None else self.loader,
                                self.config.replace(sparsity=target))
        apply_masks(self.model, result.masks)
        self.last_step = step
        self.history.append({"step": step, "target": target, "sparsity": result.sparsity,
                             "damp": result.damp})
        return result

    def masks(self) -> Dict[str, torch.Tensor]:
        """Current keep-masks {"<module>.weight": bool} of the pruned layers."""
        return {t.name: t.keep_mask() for t in resolve_targets(self.model, self.config.modules)}

    def state_dict(self) -> dict:
        """Schedule, progress and masks (save it next to ``model.state_dict()``)."""
        return {"schedule": {"final_sparsity": self.final_sparsity, "initial_sparsity": self.initial_sparsity,
                             "start_step": self.start_step, "end_step": self.end_step,
                             "frequency": self.frequency},
                "last_step": self.last_step, "history": list(self.history),
                "masks": {k: v.cpu() for k, v in self.masks().items()} if self.last_step is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        """Restore progress and re-apply the masks (call before ``model.load_state_dict``).

        The model then has the ``weight_orig`` / ``weight_mask`` entries that a
        checkpoint of a model under pruning holds.
        """
        if not isinstance(state, dict) or "schedule" not in state or "last_step" not in state:
            raise ValueError("state is not a GradualPruner state_dict")
        mine = self.state_dict()["schedule"]
        diff = {k: (v, state["schedule"].get(k)) for k, v in mine.items()
                if not math.isclose(float(v), float(state["schedule"].get(k, float("nan"))))}
        if diff:
            raise ValueError(f"state has a different schedule: {diff}")
        if state["masks"]:
            apply_masks(self.model, state["masks"])
        self.last_step = state["last_step"]
        self.history = list(state["history"])
