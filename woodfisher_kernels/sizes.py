"""Sizes in bytes: the one parser of "4GiB" / "1.5 GB" / "2e9", and the check of a memory budget.

Every function of this library that takes a bytes budget (:func:`woodfisher_kernels.choose_form`,
:func:`woodfisher_kernels.blockwise_inverse`) reads it with :func:`check_bytes`, and the pruner
(``woodfisher.memory.parse_bytes``, ``PruneConfig.memory_budget``) uses :func:`parse_bytes`, so the
same spellings are accepted everywhere.
"""
from __future__ import annotations

import re

from ._checks import check_positive

__all__ = ["UNITS", "parse_bytes", "check_bytes"]

#: unit (lower case) -> bytes: decimal KB / MB / GB / TB (powers of 1000), binary KiB ... TiB (powers of 1024)
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_bytes(text: str) -> int:
    """``"4GiB"`` -> 4294967296, ``"1.5 GB"`` -> 1500000000, ``"512MiB"``, ``"2e9"``: a size in bytes.

    Args:
        text: a number with an optional unit: B, KB / MB / GB / TB (powers of 1000) or KiB / MiB / GiB / TiB
            (powers of 1024), case-insensitive, spaces allowed.
    Returns:
        Bytes (int, rounded down).
    Raises:
        ValueError: for anything else (the message lists the units).
    """
    match = _SIZE.fullmatch(str(text))
    unit = match.group(2).lower() if match else None
    if unit not in UNITS:
        raise ValueError(f"{text!r} is not a size: a number of bytes, optionally with a unit (B, KB, MB, GB, TB or "
                         "KiB, MiB, GiB, TiB), e.g. '4GiB' or '1.5e9'")
    return int(float(match.group(1)) * UNITS[unit])


def check_bytes(name: str, value) -> float:
    """A bytes budget given as a number or a string of :func:`parse_bytes` (``"1GB"``, ``"512MiB"``).

    Args:
        name: the argument's name, for the error message.
        value: a finite number > 0 (int, float, numpy or one-element tensor) or a size string.
    Returns:
        Bytes (float; an integer value for a string).
    Raises:
        ValueError: naming ``name``: not a size string, not a number, or not finite and > 0.
    """
    if isinstance(value, str):
        try:
            size = parse_bytes(value)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        if size <= 0:  # "0GB", "0.4B": say what was given, not the 0 it became
            raise ValueError(f"{name} must be at least 1 byte, got {value!r} ({size} bytes)")
        return float(size)
    return check_positive(name, value)
