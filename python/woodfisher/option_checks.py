"""Checks of single option values shared by :class:`woodfisher.PruneConfig`, the CLI, the gradual pruner and
pruning at initialisation: each raises a ValueError naming the option, before anything runs.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch

from . import structured as st
from .masks import is_int, is_real

__all__ = ["check_int", "check_int_or", "check_choice", "check_bool", "pattern_fixed_sparsity",
           "check_pattern_sparsity", "check_names"]

_REQUIRED = object()


def pattern_fixed_sparsity(pattern: Any, default: Any = _REQUIRED) -> float:
    """The sparsity an omitted ``sparsity`` takes: 1 - N/M for ``pattern="N:M"``, else ``default`` (when given) or a
    ValueError (``sparsity`` is required)."""
    parsed = st.parse_pattern(pattern)
    fixed = st.pattern_sparsity(parsed) if parsed is not None else None
    if fixed is not None:
        return fixed
    if default is _REQUIRED:
        raise ValueError("sparsity is required (only pattern='N:M' fixes it, at 1 - N/M)")
    return default


def check_pattern_sparsity(sparsity: Any, pattern: Any, name: str = "sparsity") -> None:
    """An explicit ``sparsity`` that an N:M ``pattern`` contradicts (it fixes the sparsity at 1 - N/M): a ValueError
    naming ``name`` that says the value the pattern fixes and that it may be omitted. An equal value (to 1e-6:
    0.666667 for 1:3) passes, and so does any value without an N:M pattern (:func:`check_sparsity` checks the rest).
    """
    parsed = st.parse_pattern(pattern)
    fixed = st.pattern_sparsity(parsed) if parsed is not None else None
    if fixed is None or not is_real(sparsity) or math.isclose(float(sparsity), fixed, rel_tol=0.0, abs_tol=1e-6):
        return
    raise ValueError(f"{name}={float(sparsity):g} contradicts pattern={pattern!r}, which fixes the sparsity at "
                     f"{fixed:g} (1 - N/M: N of every M weights kept); pass {name}={fixed:g} or leave it out (it then "
                     "defaults to the pattern's)")


def check_int(name: str, value: Any, low: int = 1) -> int:
    """``value`` must be an integer (not a bool; numpy integers accepted) >= ``low``; ValueError naming ``name``
    otherwise. Returns it as a Python int."""
    if not is_int(value) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def check_int_or(name: str, value: Any, others: str) -> None:
    """``value`` must be an int >= 1 (the caller has accepted ``others``); the message lists both."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be an int >= 1 or {others}, got {value!r}")


def check_names(name: str, value: Any) -> Optional[Tuple[str, ...]]:
    """``modules`` / ``exclude``: None, one name, or a non-empty list of module / parameter names or shell-style
    patterns; returned as a tuple (None stays None). A ValueError naming ``name`` otherwise (module objects: the
    recipe for their names)."""
    if value is None:
        return None
    names = (value,) if isinstance(value, str) else tuple(value) if hasattr(value, "__iter__") else (value,)
    if not names or not all(isinstance(m, str) for m in names):
        objects = " (module objects: their names are [name for name, mod in model.named_modules() if mod is " \
            "layer])" if any(hasattr(m, "named_modules") for m in names) else \
            " (tensors: their names are [name for name, p in model.named_parameters() if p is weight])" \
            if any(isinstance(m, torch.Tensor) for m in names) else ""
        shown = value if isinstance(value, str) else [describe(m) for m in names]
        raise ValueError(f"{name} must be None or a non-empty list of names, got {shown!r}{objects}")
    return names


class _Shown(str):
    def __repr__(self) -> str:
        return str(self)


def describe(obj: Any) -> str:
    """A short stand-in for an object given where a name was expected: a module's class, a tensor's kind and shape
    (their repr prints every value); others as repr, cut at 80 characters."""
    if isinstance(obj, torch.Tensor):
        return _Shown(f"<{type(obj).__name__} of shape {tuple(obj.shape)}>")
    if hasattr(obj, "named_modules"):
        return _Shown(f"<{type(obj).__name__} module>")
    text = repr(obj)
    return _Shown(text if len(text) <= 80 else text[:77] + "...")


def check_choice(name: str, value: Any, choices: Tuple[str, ...]) -> None:
    """``value`` must be one of ``choices``; ValueError naming ``name`` otherwise."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """``value`` must be True or False (not 0 / 1); ValueError naming ``name`` otherwise."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")

