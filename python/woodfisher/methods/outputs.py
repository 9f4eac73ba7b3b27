"""Checks of what a pruning method returns, before anything is written.

A method (one of :data:`woodfisher.methods.METHODS`, a caller's own included) hands back scores
(:meth:`~woodfisher.methods.base.ScoreMethod.scores`) or a step's new weights and keep-masks
(:meth:`~woodfisher.methods.base.PruningMethod.step`). Both are checked here so that a method's
mistake is a ValueError naming the method, the weight and what is wrong -- not a RuntimeError from
deep inside the selection, a KeyError, or a model silently written with NaN weights, revived
entries or masks of another sparsity than asked for. The model is unchanged when a check fails
(the engine restores it).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

import torch

Tensors = Dict[str, torch.Tensor]

__all__ = ["check_scores", "check_step_output"]


def _who(ctx) -> str:
    return f"method {ctx.config.method!r}"


def _check_names(what: str, ctx, got: Any) -> None:
    if not isinstance(got, Mapping):
        raise ValueError(f"{_who(ctx)}: {what} must be a dict {{weight name: tensor}} over the step's weights "
                         f"{[t.name for t in ctx.targets][:4]}, got {type(got).__name__}")
    expected = [t.name for t in ctx.targets]
    missing = [n for n in expected if n not in got]
    extra = [n for n in got if n not in expected]
    if missing or extra:
        raise ValueError(f"{_who(ctx)}: {what} must have one entry per pruned weight (target.name of ctx.targets): "
                         f"missing {missing[:4]}, unexpected {extra[:4]}")


def _check_tensor(what: str, ctx, target, value: Any, exact_shape: bool) -> None:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{_who(ctx)}: {what}[{target.name!r}] must be a tensor, got {type(value).__name__}")
    shape = tuple(target.shape)
    if (tuple(value.shape) != shape) if exact_shape else (value.numel() != target.numel):
        need = f"the weight's shape {shape}" if exact_shape else f"the weight's {target.numel} entries {shape}"
        raise ValueError(f"{_who(ctx)}: {what}[{target.name!r}] has shape {tuple(value.shape)}, it needs {need} "
                         "(blocked values: target.unblock(...))")
    if value.is_meta or value.is_complex():
        raise ValueError(f"{_who(ctx)}: {what}[{target.name!r}] is a {value.dtype} tensor on {value.device}; it "
                         "needs real values with data (on the weight's device)")


def check_scores(ctx, scores: Any) -> Tensors:
    """Check a method's scores for one step; returns them on the weights' devices.

    Args:
        ctx: the step's :class:`~woodfisher.methods.base.StepContext`.
        scores: {weight name: tensor of the weight's shape} (higher = keep), any real dtype.
    Returns:
        The scores, each on its weight's device.
    Raises:
        ValueError: naming the method and the weight: not a dict over exactly the step's weights, a value
            that is not a tensor of the weight's shape, complex or meta, or NaN scores.
    """
    _check_names("scores", ctx, scores)
    out = {}
    for target in ctx.targets:
        value = scores[target.name]
        _check_tensor("scores", ctx, target, value, exact_shape=True)
        value = value.detach().to(target.param.device)
        bad = int(torch.isnan(value).sum())
        if bad:
            raise ValueError(f"{_who(ctx)}: scores[{target.name!r}] has {bad} NaN of {value.numel()} entries "
                             "(+inf / -inf are allowed: always keep / prune first)")
        out[target.name] = value
    return out


def _sparsity(masks: Mapping[str, torch.Tensor], targets: List[Any]) -> float:
    total = sum(t.numel for t in targets)
    return 1.0 - sum(int(masks[t.name].sum()) for t in targets) / total


def check_step_output(ctx, output: Any) -> Tuple[Tensors, Tensors]:
    """Check a method's ``step(ctx)`` result before it is written.

    Args:
        ctx: the step's :class:`~woodfisher.methods.base.StepContext` (``ctx.keep``: the masks before the step).
        output: ``({name: new weight}, {name: bool keep-mask})``, each with the weight's number of entries.
    Returns:
        ``(new, keep)`` as given.
    Raises:
        ValueError: naming the method (and the weight): not a pair of dicts over exactly the step's weights; a
            value without the weight's number of entries; keep-masks that are not bool; a mask that keeps an
            entry pruned before the step (pruned entries stay pruned); non-finite new values at kept entries;
            masks whose sparsity over the step's weights is off the step's target (``ctx.sparsity``, or the
            sparsity before the step when that is higher; layerwise: each weight's) by more than 1% (plus a row
            per weight with a pattern).
    """
    if not (isinstance(output, tuple) and len(output) == 2):
        raise ValueError(f"{_who(ctx)}: step(ctx) must return a pair ({{name: new weight}}, {{name: bool "
                         f"keep-mask}}), got {type(output).__name__}")
    new, keep = output
    _check_names("step's new weights", ctx, new)
    _check_names("step's keep-masks", ctx, keep)
    for target in ctx.targets:
        n = target.name
        _check_tensor("step's new weights", ctx, target, new[n], exact_shape=False)
        _check_tensor("step's keep-masks", ctx, target, keep[n], exact_shape=False)
        mask = keep[n].reshape(target.shape).to(target.param.device)
        if mask.dtype != torch.bool:
            raise ValueError(f"{_who(ctx)}: keep-mask of {n!r} is {mask.dtype}; keep-masks are bool (True = kept)")
        revived = int((mask & ~ctx.keep[n]).sum())
        if revived:
            raise ValueError(f"{_who(ctx)}: keep-mask of {n!r} keeps {revived} entries pruned before the step; "
                             "pruned entries stay pruned (mask & ctx.keep[name])")
        values = new[n].detach().reshape(target.shape).to(target.param.device)
        bad = int((~torch.isfinite(values) & mask).sum())
        if bad:
            raise ValueError(f"{_who(ctx)}: new weights of {n!r} have {bad} NaN / Inf values at kept entries")
    total = sum(t.numel for t in ctx.targets)
    # a pattern prunes whole rows / groups: up to one row per weight short of the target (layerwise)
    grain = (sum(t.row_length for t in ctx.targets) if ctx.config.pattern is not None else 1) / total
    reached, before = _sparsity(keep, ctx.targets), _sparsity(ctx.keep, ctx.targets)
    per = ctx.sparsity if isinstance(ctx.sparsity, Mapping) else None
    asked = sum(t.numel * per[t.name] for t in ctx.targets) / total if per else ctx.sparsity
    if per or (ctx.config.method_impl.fixed_mode or ctx.config.mode) == "layerwise":  # each to max(target, its own)
        most = sum(t.numel * max(per[t.name] if per else ctx.sparsity, 1.0 - float(ctx.keep[t.name].double().mean()))
                   for t in ctx.targets) / total
    else:
        most = max(ctx.sparsity, before)
    low, high = asked - 0.01 - grain, most + 0.01 + grain
    if not low <= reached <= (high if ctx.config.pattern is None else 1.0):
        raise ValueError(f"{_who(ctx)}: the step's keep-masks have sparsity {reached:.4f} over its weights, the "
                         f"step asked for {asked:.4f} (ctx.sparsity; {before:.4f} before the step)")
    return new, keep
