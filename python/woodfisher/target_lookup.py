"""The weights a caller's ``modules=`` entry means: exact names, tied aliases, wrapper prefixes, modules, patterns.

:func:`lookup_names` reads one entry (the rules: :mod:`woodfisher.targets`); every name it cannot read is a
ValueError naming the argument, with the nearest name, the full names that end with it, or the weights a pattern
matched that the defaults leave out (:func:`refuse_left_out_match`).
"""
from __future__ import annotations

from typing import Dict, Iterable, List

from torch import nn

from .model_entries import WRAPPER_PREFIXES, default_target_names, join_name, logical_name, mask_reparam_ok, own_forward
from .name_patterns import is_dict_key, match_pattern, naming, regex_hint, regex_like
from .names import closest
from .weight_transform import refuse_recomputed

__all__ = ["lookup_names", "refuse_left_out_match", "within", "remove_excluded"]


def refuse_left_out_match(entries: Dict[str, dict], pattern: str, model: nn.Module, arg: str,
                           error: ValueError) -> None:
    """A pattern that matches no default target but weights left out of the defaults: a ValueError saying which
    of those can be pruned when named (the list to paste) and which cannot (why); returns when it matches none."""
    others = {name: [owner for owner, _ in info["owners"]] for name, info in entries.items()
              if info["param"].dim() >= 2 and name not in default_target_names(model)}
    try:
        matched = match_pattern(pattern, others, arg)
    except ValueError:
        return
    modules = dict(model.named_modules(remove_duplicate=False))
    named, refused = [], []
    for name in matched:
        info = entries[name]
        path = name.split(".parametrizations.")[0] if ".parametrizations." in name else name.rpartition(".")[0]
        try:
            refuse_recomputed(modules.get(path), name, arg)
        except ValueError:
            refused.append(f"{name!r} (recomputed on every forward, e.g. by weight_norm)")
            continue
        if info["attr"] == "weight" and own_forward(info["module"]):
            refused.append(f"{name!r} (its layer's forward transforms the weight)")
        elif not mask_reparam_ok(info):
            refused.append(f"{name!r} (reparametrised by torch.nn.utils.parametrize without a mask)")
        else:
            named.append(name)
    parts = [f"{arg}: the pattern {pattern!r} matches only weights left out of the defaults"]
    if named:
        parts.append(f"these are pruned when named exactly: {naming(arg, named)}")
    if refused:
        parts.append("these cannot be pruned: " + ", ".join(refused))
    raise ValueError("; ".join(parts)) from error


def lookup_names(entries: Dict[str, dict], raw: str, model: nn.Module, arg: str = "modules") -> List[str]:
    """Logical parameter names for a user-given name or pattern (:func:`woodfisher.name_patterns.match_pattern`);
    a name with a wrapper's prefix (:data:`WRAPPER_PREFIXES`) the model does not have is read without it.

    A parameter name (any name of a tied Parameter) or a module with a ``weight`` gives
    that weight; any other module gives the default targets held by it or its submodules
    (``"enc.layers.0.self_attn"``: ``in_proj_weight`` and ``out_proj.weight``).
    """
    if not isinstance(raw, str):
        raise ValueError(f"{arg} must hold module or parameter names (str), got {raw!r}")
    by_id = {id(info["param"]): name for name, info in entries.items()}
    aliases = {}
    for key, p in model.named_parameters(remove_duplicate=False):
        mod_name, _, attr = key.rpartition(".")
        owner_name, logical, _ = logical_name(mod_name, attr)
        aliases.setdefault(join_name(owner_name, logical), by_id.get(id(p)))
    for cand in (raw, join_name(raw, "weight")):
        if cand in entries:
            return [cand]
        if aliases.get(cand) is not None:
            return [aliases[cand]]
    modules = dict(model.named_modules(remove_duplicate=False))
    refuse_recomputed(modules.get(raw.removesuffix(".weight") if raw not in modules else raw), raw, arg)
    if raw not in modules:
        for wrapper in WRAPPER_PREFIXES:  # a name from the model wrapped otherwise (DataParallel, torch.compile)
            if raw.startswith(wrapper):
                try:
                    return lookup_names(entries, raw[len(wrapper):], model, arg)
                except ValueError:
                    break  # the message below names what was given
        if any(c in raw for c in "*?["):  # not a name: a shell-style pattern
            try:
                return match_pattern(raw, {name: [owner for owner, _ in entries[name]["owners"]]
                                           for name in default_target_names(model)}, arg)
            except ValueError as error:
                refuse_left_out_match(entries, raw, model, arg, error)
                raise
        if raw in dict(model.named_buffers()):
            raise ValueError(f"{arg}: {raw!r} is a buffer, not a Parameter; only parameters are pruned")
        names = list(modules) + [key for key, _ in model.named_parameters()]
        ends = [name for name in names if name.endswith("." + raw)]
        if ends:  # a name relative to each block ("mlp.c_fc"): every full name is needed
            shown = ", ".join(repr(name) for name in ends[:3]) + (f" and {len(ends) - 3} more" if len(ends) > 3 else "")
            listed = "" if is_dict_key(arg) else (f", or {arg}=[name for name, _ in model.named_modules() "
                                                 f"if name.endswith({'.' + raw!r})]")
            raise ValueError(f"{arg}: no module or parameter is named {raw!r}; {len(ends)} end with it ({shown}): "
                             f"names are full names; the shell-style pattern {'*.' + raw!r} selects them all{listed}")
        if regex_like(raw):  # say what names are, not a near name
            raise ValueError(f"{arg}: {raw!r} looks like a regular expression; names are exact, or shell-style "
                             f"patterns (fnmatch: * ? [...]) such as 'blocks.*.mlp.*'{regex_hint(arg)}")
        if raw in ("__ALL__", "__ALL_PRUNABLE__"):  # SparseML's tokens
            raise ValueError(f"{arg}: {raw!r} is no name here: every prunable weight is {arg}=None (the default)")
        match = closest(raw, names)
        hint = f" (did you mean {match!r}?)" if match else ""
        raise ValueError(f"{arg}: no module or parameter named {raw!r} in the model{hint}")
    inside = [name for name in default_target_names(model)
              if any(within(owner, raw) for owner, _ in entries[name]["owners"])]
    if not inside:
        named = [name for name, info in entries.items() if within(name.rpartition(".")[0], raw)
                 and info["param"].is_floating_point() and info["param"].dim() >= 2]
        every = (named if len(named) <= 12 else  # all of them (a 2-layer bidirectional LSTM has 8 or 12)
                 f"[name for name, p in model.named_parameters() if name.startswith({raw + '.'!r}) and p.dim() >= 2]")
        hint = (f"; its weights are not pruned by default, name them to prune them: "
                f"{naming(arg if is_dict_key(arg) else 'modules', every)}"
                if named else " (and has no floating parameter of >= 2 dims either)")
        raise ValueError(f"{arg}: {raw!r} is a {type(modules[raw]).__name__}, which holds no Linear / Conv / "
                         f"attention projection weight{hint}")
    return inside


def within(name: str, parent: str) -> bool:
    return not parent or name == parent or name.startswith(parent + ".")



def remove_excluded(entries: Dict[str, dict], chosen: List[str], exclude: Iterable[str], model: nn.Module,
                    prefix: str = "") -> List[str]:
    """``chosen`` (logical names of the targets) without the weights ``exclude`` selects (``exclude=`` of
    :class:`woodfisher.PruneConfig`; the rules: :mod:`woodfisher.targets`).

    An entry is read as a ``modules=`` entry: a parameter name (any name of a tied Parameter, with or without a
    wrapper's prefix) means that weight; a module name every target it or its submodules hold; a shell-style pattern
    (``"*.fc*"``) the targets whose name, or a holding module's name, matches (:func:`match_pattern`).

    Args:
        entries: the unwrapped model's parameter entries. chosen: the targets before exclusion, in order.
        exclude: the entries. model: the unwrapped model. prefix: the wrapper prefix the caller's names may carry.
    Returns:
        the names of ``chosen`` left, in order.
    Raises:
        ValueError: naming ``exclude``: an entry that is no name of the model, one that selects none of ``chosen``,
            or nothing left to prune.
    """
    owners = {name: [owner for owner, _ in entries[name]["owners"]] for name in chosen}
    modules = dict(model.named_modules(remove_duplicate=False))
    removed = set()
    for raw in exclude:
        if not isinstance(raw, str):
            raise ValueError(f"exclude must hold module or parameter names (str), got {raw!r}")
        name = raw[len(prefix):] if prefix and raw.startswith(prefix) else raw
        if any(c in name for c in "*?[") and name not in modules and name not in entries:
            try:
                hit = match_pattern(name, owners, "exclude")
            except ValueError:
                hit = []
        elif name in modules:
            hit = [n for n in chosen if any(within(owner, name) for owner in owners[n])]
        else:
            hit = [n for n in lookup_names(entries, name, model, "exclude") if n in owners]
        if not hit:
            shown = ", ".join(repr(prefix + n) for n in chosen[:6]) + (" ..." if len(chosen) > 6 else "")
            why = _why_not_pruned(entries, name, model, prefix) or (
                "; exclude names weights that would be pruned, by their full names, modules or shell-style patterns "
                "(fnmatch: * ? [...])")
            raise ValueError(f"exclude: {raw!r} matches none of the weights to prune ({shown}){why}")
        removed.update(hit)
    left = [n for n in chosen if n not in removed]
    if not left:
        raise ValueError(f"exclude={list(exclude)!r} leaves no weight to prune: it removes all {len(chosen)} targets "
                         "(the default ones, or those the modules option or the keys of a sparsity dict select); "
                         "exclude fewer or select others")
    return left


def _why_not_pruned(entries: Dict[str, dict], name: str, model: nn.Module, prefix: str) -> str:
    """For an ``exclude`` entry that removes no target: the model's weights it names and why none is pruned (not
    a default target, or not selected by ``modules=`` / a sparsity dict), so that the entry can simply go."""
    modules = dict(model.named_modules(remove_duplicate=False))
    owners = {n: [owner for owner, _ in info["owners"]] for n, info in entries.items()
              if info["param"].is_floating_point() and info["param"].dim() >= 2}
    try:
        if name in modules and name not in entries:
            real = [n for n, held in owners.items() if any(within(owner, name) for owner in held)]
        elif any(c in name for c in "*?[") and name not in entries:
            real = match_pattern(name, owners, "exclude")
        else:
            real = lookup_names(entries, name, model, "exclude")
    except ValueError:
        return ""
    if not real:
        return ""
    defaults = set(default_target_names(model))
    shown = ", ".join(repr(prefix + n) for n in real[:3]) + (" ..." if len(real) > 3 else "")
    if len(real) == 1 and name.removesuffix(".weight") not in real[0]:
        shown += " (the same Parameter: tied)"
    reason = ("not pruned by default (embeddings, tied LM heads, RNN and transposed-conv weights are pruned only "
              "when named)" if not any(n in defaults for n in real) else
              "not selected by the modules option nor by the keys of a sparsity dict, which alone choose the "
              "weights to prune")
    return f": it names {shown}, {reason}, so it stays dense without exclude: drop the entry"
