"""Shell-style patterns in ``modules=`` (and every argument that names weights the same way): which of the
default targets a pattern selects, and what to say for a regular expression, which names never are.
"""
from __future__ import annotations

import fnmatch
from typing import Dict, List

__all__ = ["match_pattern", "regex_like", "regex_hint", "is_dict_key", "naming"]


def match_pattern(pattern: str, owners: Dict[str, List[str]], arg: str = "modules") -> List[str]:
    """The weights whose full name, or the name of a module holding them or of one of its parents, matches
    ``pattern`` (``fnmatch.fnmatchcase``: ``*`` also matches dots).

    Args:
        pattern: e.g. ``"blocks.*.mlp.*"``, ``"*.attn"``.
        owners: {weight name: names of the modules that hold it}, in the order to return them (the default
            targets, registration order).
        arg: the caller's argument, for the message.
    Returns:
        the matching weight names, in the order of ``owners``.
    Raises:
        ValueError: naming ``arg``, when nothing matches.
    """
    chosen = []
    for name, holders in owners.items():
        paths = {name} | {owner[:i] for owner in holders
                          for i in range(len(owner) + 1) if i == len(owner) or owner[i] == "."}
        if any(fnmatch.fnmatchcase(path, pattern) for path in paths):
            chosen.append(name)
    if not chosen:
        raise ValueError(f"{arg}: the pattern {pattern!r} matches no weight pruned by default (Linear / Conv / "
                         "attention projection) nor a module holding one; patterns are shell-style (fnmatch: * ? "
                         "[...]) over full names, e.g. 'blocks.*.mlp.*'; other weights are pruned only when named "
                         f"exactly{regex_hint(arg) if regex_like(pattern) else ''}")
    return chosen


def regex_like(name: str) -> bool:
    """Whether ``name`` holds characters of regular expressions that neither names nor shell patterns use, or has
    SparseML's ``re:`` prefix."""
    return name.startswith(("re:", ".")) or any(c in name for c in "\\^$+|()")  # no name starts with "."


def regex_hint(arg: str) -> str:
    """The recipe for selecting weights by a regular expression, for messages about ``arg`` (a key of a per-weight
    sparsity dict, ``"sparsity['re:.*']"``: the dict built from the names)."""
    names = "[t.name for t in woodfisher.resolve_targets(model) if re.fullmatch(<regex>, t.name)]"
    if is_dict_key(arg):
        return f"; for a regular expression, {arg.split('[')[0]}={{name: <fraction> for name in {names}}}"
    return f"; for a regular expression, {arg}={names}"


def is_dict_key(arg: str) -> bool:
    """Whether the argument named in a message is a key of a dict (``"sparsity['fc*']"``), not a list of names."""
    return arg.endswith("]") and "[" in arg


def naming(arg: str, names) -> str:
    """How to pass ``names`` (a list of full names, or the source of an expression giving them) to the argument
    named ``arg`` in a message: ``modules=[...]``, or for a key of a sparsity dict (``"sparsity['rnn.*']"``) the
    dict ``sparsity={name: <fraction>, ...}``."""
    if not is_dict_key(arg):
        return f"{arg}={names!r}" if not isinstance(names, str) else f"{arg}={names}"
    base = arg.split("[")[0]
    if isinstance(names, str):
        return f"{base}={{name: <fraction> for name in {names}}}"
    return f"{base}={{" + ", ".join(f"{name!r}: <fraction>" for name in names) + "}"
