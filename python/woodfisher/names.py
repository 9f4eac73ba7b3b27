"""Messages for names a caller spelt that do not exist (options, config keys, weights)."""
from __future__ import annotations

import difflib
import re
from typing import Iterable, List, Optional

__all__ = ["closest", "unknown_names"]

_DIGITS = re.compile(r"\d+")


def closest(name: str, known: Iterable[str]) -> Optional[str]:
    """The name of ``known`` closest to ``name`` (difflib ratio >= 0.75: a typo, a dash for an underscore), or None.

    A name that differs from its match only in its numbers (``"9.weight"`` for ``"2.weight"``, ``"layer4"`` for
    ``"layer1"``) gets no suggestion: that is another layer, not a misspelling of this one."""
    close = difflib.get_close_matches(str(name), sorted(set(map(str, known))), n=1, cutoff=0.75)
    if not close or _DIGITS.sub("#", close[0]) == _DIGITS.sub("#", str(name)):
        return None
    return close[0]


def unknown_names(given: Iterable[str], known: Iterable[str], what: str) -> str:
    """A message naming the unknown ``given`` names, each with the closest of ``known`` when one is close.

    Args:
        given: the names the caller passed that are not in ``known`` (at least one).
        known: every valid name.
        what: what the names are, for the message (``"option"``, ``"config key"``).
    Returns:
        e.g. ``"unknown option 'num_grad' (did you mean 'num_grads'?)"``; the caller raises it.
    """
    known = list(known)
    parts: List[str] = []
    for name in sorted(map(str, given)):
        match = closest(name, known)
        parts.append(f"{name!r} (did you mean {match!r}?)" if match else repr(name))
    plural = "s" if len(parts) > 1 else ""
    return f"unknown {what}{plural} {', '.join(parts)}"
