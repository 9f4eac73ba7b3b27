"""Per-weight sparsities: ``sparsity={name or pattern: fraction}`` (as SparseML recipes and Torch-Pruning's
``pruning_ratio_dict`` take them).

The keys are read as ``modules=`` reads its entries (:mod:`woodfisher.targets`: parameter names, tied aliases, wrapper
prefixes, module names meaning the targets they hold, shell-style patterns over the default targets). The pruned
weights are the ones the keys select (within ``modules=`` when it is given, less ``exclude=``); each is pruned to its
own fraction, its entries ranked within the weight (as ``mode="layerwise"`` ranks them for one shared number:
:func:`woodfisher.masks.select_masks`). A key naming the weight itself (its parameter name, or the module it is the
``weight`` of) wins over a module holding it, which wins over a pattern; two keys of the same kind giving one weight
different values are a ValueError naming ``sparsity`` and both keys, and so is a key whose fraction reaches no weight
(all it selects excluded, or given other values by keys of higher precedence: ``{"blocks": 0.5, "*.mlp.*": 0.9}``
would otherwise prune the MLPs to 0.5 without a word). A result of a dict reports ``mode="layerwise"``, the ranking
it means (the config keeps the caller's ``mode`` for a later scalar :func:`woodfisher.prune_with`).

:func:`fit_sparsities` turns a config's dict into its canonical form once, before anything runs: ``modules`` the
target names, ``exclude`` None and ``sparsity`` {target name: fraction}, so that every later step reads a weight's
target by its name. :func:`weight_starts` gives the per-weight starting sparsities that
:meth:`woodfisher.PruneConfig.steps` schedules each weight from.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .auto_rules import split_grads, step_count, step_sparsities
from .masks import check_min_density, check_sparsity, sparsity_of
from .model_entries import param_entries
from .option_checks import describe
from .targets import PruneTarget, resolve_targets, unwrap_model

__all__ = ["check_sparsity_map", "check_map_floor", "is_per_weight", "fit_sparsities", "weight_starts",
           "resolve_sparsities", "weight_steps"]

#: The precedence of a key over a weight: its own name, then a module holding it, then a pattern.
_OWN, _HOLDER, _PATTERN = 0, 1, 2
_KINDS = {_OWN: "names", _HOLDER: "module names", _PATTERN: "patterns"}


def is_per_weight(sparsity: Any) -> bool:
    """Whether ``sparsity`` is a per-weight mapping (not one number)."""
    return isinstance(sparsity, Mapping)


def check_sparsity_map(sparsity: Mapping, name: str = "sparsity") -> Dict[str, float]:
    """Validate ``sparsity={name or pattern: fraction}``.

    Args:
        sparsity: a non-empty mapping of str keys to real numbers in [0, 1).
        name: the caller's name of the argument (``"final_sparsity"`` for :class:`woodfisher.GradualPruner`).
    Returns:
        a plain dict of the same keys, values as floats.
    Raises:
        ValueError: an empty mapping or a key that is not a non-empty str (naming ``name``), a value that is not
            a number in [0, 1) (naming ``name[key]``).
    """
    if not sparsity:
        raise ValueError(f"{name}: an empty dict selects no weight; pass {{name or pattern: fraction}}, e.g. "
                         f"{name}={{'features.*': 0.9, 'classifier': 0.5}}")
    out = {}
    for key, value in sparsity.items():
        if not isinstance(key, str) or not key:
            hint = (f"; for modules as keys (Torch-Pruning's pruning_ratio_dict), pass their names: {name}={{n: "
                    "fraction for n, mod in model.named_modules() for layer, fraction in ratios.items() if mod is "
                    "layer}" if hasattr(key, "named_modules") else
                    f"; for weights as keys, pass their names: {name}={{n: fraction for n, p in "
                    "model.named_parameters() for weight, fraction in ratios.items() if p is weight}"
                    if isinstance(key, torch.Tensor) else "")
            raise ValueError(f"{name}: keys are weight or module names or shell-style patterns (non-empty str), "
                             f"got {describe(key)!r}{hint}")
        out[key] = check_sparsity(value, f"{name}[{key!r}]")
    return out


def check_map_floor(min_density, sparsity: Mapping[str, float]) -> float:
    """``min_density`` beside a per-weight ``sparsity``: every key's weights must be able to keep that floor.

    Args:
        min_density: the floor, a fraction in [0, 1]. sparsity: {key: fraction}, validated.
    Returns:
        ``min_density`` as a float.
    Raises:
        ValueError: ``min_density`` outside [0, 1], or above ``1 - fraction`` of some key (naming ``min_density``
            and those keys of ``sparsity``: their weights are pruned to exactly their fraction).
    """
    floor = check_min_density(min_density)
    over = {key: value for key, value in sparsity.items() if floor > 1.0 - value + 1e-12}
    if over:
        shown = ", ".join(f"sparsity[{key!r}]={value:g}" for key, value in over.items())
        raise ValueError(f"min_density={min_density} cannot be kept at {shown}: a weight pruned to a fraction s "
                         f"keeps only 1 - s of its entries; lower min_density to at most "
                         f"{1.0 - max(over.values()):g}, or those fractions to at most {1.0 - floor:g}")
    return floor


def _precedence(key: str, target: PruneTarget, prefix: str) -> int:
    if any(c in key for c in "*?["):
        return _PATTERN
    full = key if key.startswith(prefix) else prefix + key
    own = {target.name} | {o for o in target.owners} | {f"{o}.{target.attr}" if o else target.attr
                                                        for o in target.owners}
    return _OWN if full in own or key in own else _HOLDER


def resolve_sparsities(model: nn.Module, sparsity: Mapping[str, float], modules=None, exclude=None,
                       arg: str = "sparsity", pool: Optional[str] = None) -> Dict[str, float]:
    """{target name: fraction} of a per-weight ``sparsity`` (the rules: the module docstring).

    Args:
        model: the network (wrappers seen through; names as the caller's ``named_parameters()`` gives them).
        sparsity: {name or pattern: fraction in [0, 1)}, validated (:func:`check_sparsity_map`).
        modules, exclude: as :class:`woodfisher.PruneConfig` takes them.
        arg: the caller's name of the dict in messages (``"final_sparsity"`` for :class:`woodfisher.GradualPruner`).
        pool: what ``modules`` is, for the message of a key selecting none of them (:func:`woodfisher.prune_with`:
            the curvature's weights); None: the caller's ``modules=``.
    Returns:
        the targets' fractions, in the targets' (registration) order.
    Raises:
        ValueError: a key that names nothing in the model (naming ``sparsity[key]``), one that selects none of the
            weights ``modules`` / ``exclude`` leave (naming ``sparsity[key]``), one whose fraction reaches no weight
            because keys of higher precedence give every weight it selects another value (naming ``sparsity[key]``
            and those keys), two keys giving one weight different values (naming ``sparsity`` and both keys), and the
            errors of ``modules`` / ``exclude``.
    """
    prefix = unwrap_model(model)[1]
    allowed = None if modules is None else {t.name for t in resolve_targets(model, modules)}
    chosen: Dict[str, Tuple[int, str, float]] = {}
    selected: Dict[str, List[str]] = {}
    targets: Dict[str, PruneTarget] = {}
    for key, value in sparsity.items():
        found = [t for t in resolve_targets(model, [key], arg=f"{arg}[{key!r}]")
                 if allowed is None or t.name in allowed]
        if not found:
            raise ValueError(f"{arg}[{key!r}] selects none of the weights " + (pool or (
                f"modules={list(modules)!r} prunes; keys select weights within modules= (or leave modules out: the "
                "keys then choose them)")))
        selected[key] = [target.name for target in found]
        for target in found:
            rank = _precedence(key, target, prefix)
            held = chosen.get(target.name)
            if held is not None and held[0] == rank and held[2] != value:
                raise ValueError(f"{arg}: the {_KINDS[rank]} {held[1]!r} and {key!r} both select "
                                 f"{target.name!r}, with {held[2]:g} and {value:g}; give it one value (a weight's "
                                 "own name wins over a module holding it, which wins over a pattern)")
            if held is None or rank < held[0]:
                chosen[target.name] = (rank, key, value)
            targets.setdefault(target.name, target)
    order = {prefix + name: i for i, name in enumerate(param_entries(unwrap_model(model)[0]))}
    names = sorted((t.name for t in resolve_targets(model, list(targets), exclude=exclude)), key=order.__getitem__)
    _refuse_idle_keys(sparsity, selected, chosen, set(names), arg)
    return {name: chosen[name][2] for name in names}


def _refuse_idle_keys(sparsity: Mapping[str, float], selected: Dict[str, List[str]],
                      chosen: Dict[str, Tuple[int, str, float]], pruned: set, arg: str) -> None:
    """A ValueError naming ``sparsity[key]`` for a key whose fraction reaches no weight: all it selects is left
    dense by ``exclude=``, or given another value by keys of higher precedence (a silently ignored fraction)."""
    for key, value in sparsity.items():
        live = [name for name in selected[key] if name in pruned]
        if not live:
            shown = selected[key][:3] + (["..."] if len(selected[key]) > 3 else [])
            raise ValueError(f"{arg}[{key!r}] selects only weights that exclude leaves dense ({', '.join(shown)}); "
                             "drop the key or the exclude entry")
        if any(chosen[name][1] == key or chosen[name][2] == value for name in live):
            continue
        winners = list(dict.fromkeys(f"{chosen[name][1]!r} ({_KINDS[chosen[name][0]][:-1]}, "
                                     f"{chosen[name][2]:g})" for name in live))
        raise ValueError(f"{arg}[{key!r}]={value:g} reaches no weight: every weight it selects ({len(live)}) takes "
                         f"its value from a key of higher precedence: {', '.join(winners[:4])}"
                         f"{' ...' if len(winners) > 4 else ''} (a weight's own name wins over a module holding it, "
                         "which wins over a pattern, however many weights each selects); give those weights "
                         "their fractions by their own names, or drop the key")


def fit_sparsities(model: nn.Module, config, arg: str = "sparsity"):
    """``config`` itself for one number, else its canonical per-weight copy: ``modules`` the target names the keys
    select (within ``modules``, less ``exclude``), ``exclude`` None, ``sparsity`` {target name: fraction}.

    Args:
        model: the network. config: a :class:`woodfisher.PruneConfig`. arg: the dict's name in messages.
    Returns:
        a :class:`woodfisher.PruneConfig`.
    Raises:
        ValueError: as :func:`resolve_sparsities`.
    """
    if not is_per_weight(config.sparsity):
        return config
    fractions = resolve_sparsities(model, config.sparsity, config.modules, config.exclude, arg)
    if config.modules == tuple(fractions) and config.exclude is None and dict(config.sparsity) == fractions:
        return config
    return config.replace(sparsity=fractions, modules=tuple(fractions), exclude=None)


def weight_starts(config, keep: Mapping[str, torch.Tensor]) -> Union[float, Dict[str, float]]:
    """Where :meth:`woodfisher.PruneConfig.steps` starts: the sparsity of the keep-masks ``keep`` over all of them
    for one number, each weight's own for a per-weight ``sparsity`` ({name: fraction of False entries})."""
    if not is_per_weight(config.sparsity):
        return sparsity_of(dict(keep))
    return {name: 1.0 - float(mask.double().mean()) for name, mask in keep.items()}


def weight_steps(config, start: Union[float, Mapping[str, float]]) -> List[Tuple[Dict[str, float], int]]:
    """:meth:`woodfisher.PruneConfig.steps` of a per-weight ``sparsity``: every weight from its own start to its own
    target on the config's schedule (:func:`woodfisher.auto_rules.step_sparsities`), a weight already at or above
    its target held there (pruning never revives), in the most steps any weight plans
    (:func:`woodfisher.auto_rules.step_count`; 1 when none is below its target).

    Args:
        config: a :class:`woodfisher.PruneConfig` whose ``sparsity`` is {name: fraction}.
        start: {name: current sparsity}, or one number for every weight.
    Returns:
        [({name: sparsity of the step}, gradients of the step)], the gradients summing to ``num_grads``.
    Raises:
        ValueError: a ``start`` dict without a key of ``sparsity`` (naming ``start``).
    """
    finals = config.sparsity
    if isinstance(start, Mapping) and any(name not in start for name in finals):
        raise ValueError(f"start: per-weight starts must name every key of sparsity ({list(finals)}), got "
                         f"{list(start)}")
    starts = {name: float(start[name] if isinstance(start, Mapping) else start) for name in finals}
    live = [name for name, final in finals.items() if final > starts[name]]
    n = max((step_count(config, starts[name], finals[name]) for name in live), default=1)
    per = {name: step_sparsities(starts[name], final, n, config.step_schedule) if name in live else [final] * n
           for name, final in finals.items()}
    return [({name: per[name][i] for name in finals}, m) for i, m in enumerate(split_grads(config.num_grads, n))]
