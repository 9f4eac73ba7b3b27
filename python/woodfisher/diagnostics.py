"""Is the second-order mask really second-order? Overlap with magnitude pruning.

With whole-layer Fisher blocks much larger than the number of gradients (c >> m) and a
small damp, the diagonal of ``F^-1`` is almost constant over a block, so the WoodFisher
statistic ``rho_q = w_q^2 / (2 [F^-1]_qq)`` (paper Eq. 11) ranks weights almost exactly
as ``|w_q|`` does: the mask degenerates to magnitude pruning and only the OBS update is
second-order. :func:`magnitude_overlap` measures this for a call, and
:func:`warn_if_degenerate` says so.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import warnings
from typing import Dict, Iterator, Optional, Tuple

import torch

from .masks import select_kept_masks

__all__ = ["magnitude_overlap", "warn_if_degenerate", "reissue", "warn_at_caller", "warnings_held",
           "DEGENERATE_OVERLAP", "MIN_WARN_COUNT"]

#: An overlap at or above this is reported as a mask that degenerated to magnitude pruning.
DEGENERATE_OVERLAP = 0.99
#: No warning below this many pruned weights.
MIN_WARN_COUNT = 1000


def magnitude_overlap(weights: Dict[str, torch.Tensor], keep_before: Dict[str, torch.Tensor],
                      keep_after: Dict[str, torch.Tensor], sparsity: float, mode: str,
                      min_density: float = 0.0) -> Tuple[Optional[float], int]:
    """Fraction of the newly pruned weights that magnitude pruning would also have pruned.

    Args:
        weights: {name: weight} before the call (the starting point of both rankings).
        keep_before, keep_after: {name: bool keep-mask} before and after the call.
        sparsity: the sparsity the call reached (magnitude pruning is asked for the same).
        mode: "global" (compare with global magnitude) or "layerwise" (layerwise magnitude).
        min_density: the call's per-weight floor (applied to magnitude pruning too).
    Returns:
        (overlap, count): overlap = |P_call & P_mag| / |P_mag| in [0, 1], where P are the
        entries pruned by the call and by magnitude pruning of the starting weights, None
        when magnitude pruning prunes nothing new; count = |P_mag|.
    """
    scores = {n: w.detach().abs() for n, w in weights.items()}
    mag = select_kept_masks(scores, sparsity, mode, min_density, keep_before)
    mag_new = sum(int((keep_before[n] & ~mag[n]).sum()) for n in weights)
    if mag_new == 0:
        return None, 0
    both = sum(int((keep_before[n] & ~mag[n] & ~keep_after[n]).sum()) for n in weights)
    return both / mag_new, mag_new


def warn_if_degenerate(overlap: Optional[float], count: int, config, stacklevel: int = 2) -> None:
    """A UserWarning when a curvature method's mask overlaps magnitude's by >= :data:`DEGENERATE_OVERLAP`.

    Only when at least :data:`MIN_WARN_COUNT` weights were pruned (on tiny layers equal masks are common).
    The warning names only the causes the call's options can have (a block size or a damp set by
    hand; at their defaults, which already fit the blocks and the damp to the gradients, only more
    gradients per step or more steps help).

    Args:
        overlap: the fraction in [0, 1] from :func:`magnitude_overlap`, or None.
        count: the number of weights magnitude pruning pruned (:func:`magnitude_overlap`'s count).
        config: the call's :class:`woodfisher.PruneConfig`.
        stacklevel: frames above the caller the warning points at.
    """
    if overlap is None or overlap < DEGENERATE_OVERLAP or count < MIN_WARN_COUNT:
        return
    default = {field.name: field.default for field in dataclasses.fields(config)}
    causes = []
    if config.block_size != default["block_size"]:
        causes.append(f"Fisher blocks much larger than the number of gradients (c >> m makes the diagonal of F^-1 "
                      f"nearly constant; block_size={default['block_size']!r} ties c to m)")
    if config.damp != default["damp"]:
        causes.append(f"a damp that dominates the Fisher (damp={default['damp']!r} is relative to it)")
    remedy = "more gradients per step (num_grads) or more steps (num_steps, each recomputing the Fisher) help"
    if causes:
        why = "Usual causes: " + "; ".join(causes) + "; or too few gradients per step: " + remedy
    else:
        why = (f"block_size={default['block_size']!r} and damp={default['damp']!r} (the defaults) already fit the "
               f"blocks and the damp to the gradients: {remedy}")
    warnings.warn(f"method={config.method!r} pruned {100 * overlap:.1f}% the same weights as magnitude pruning "
                  f"would (block_size={config.block_size}, num_grads={config.num_grads}, damp={config.damp}, "
                  f"num_steps={config.num_steps}): the Fisher barely changed the mask (only the weight update is "
                  f"second-order). {why}",
                  UserWarning, stacklevel=stacklevel + 1)


def reissue(caught, stacklevel: int = 1) -> None:
    """Warn again, once each (same text and category, first-seen order), the recorded warnings.

    Pointing ``stacklevel`` frames above the function that calls this (1: that function's caller),
    so that a public entry point built on other public calls reports at its own caller's line.

    Args:
        caught: the list a ``warnings.catch_warnings(record=True)`` block recorded.
        stacklevel: frames above the calling function (>= 1).
    """
    for text, category in dict.fromkeys((str(w.message), w.category) for w in caught):
        warnings.warn(text, category, stacklevel=stacklevel + 2)


def warn_at_caller(message: str, category=UserWarning) -> None:
    """``warnings.warn`` pointing at the first frame outside woodfisher and woodfisher_kernels.

    That is the user's line, whichever public entry point led here (``skip_file_prefixes`` does
    the same from Python 3.12 on).

    Args:
        message: the warning text. category: a ``Warning`` subclass (default UserWarning).
    """
    import woodfisher_kernels
    dirs = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, woodfisher_kernels.__file__))
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(dirs):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)


@contextlib.contextmanager
def warnings_held() -> Iterator[list]:
    """Hold the warnings of the block (an entry point's checks) until it completes: a call refused by a check after a
    notice (a weight left dense, frozen weights, a planned number of steps) prints no notice, only its ValueError.
    The block gets the list of held records: what it removes from it is dropped (a report of a refused call).

    On a clean exit each held warning is issued again, in order, at the line it pointed to (the caller's frame,
    found on the current stack; else as recorded with ``warnings.warn_explicit``), so the caller's filters
    (``error``, ``ignore``, ``once``) and ``pytest.warns`` see it as before. On an exception they are dropped.

    Returns:
        A context manager; ``with warnings_held() as held:`` binds the list of held ``warnings.WarningMessage``.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
    for record in caught:
        level, frame = 1, sys._getframe(0)  # stacklevel 1: this frame
        while frame is not None and not (frame.f_code.co_filename == record.filename
                                         and frame.f_lineno == record.lineno):
            frame, level = frame.f_back, level + 1
        if frame is None:
            warnings.warn_explicit(record.message, record.category, record.filename, record.lineno)
        else:  # the frame the warning pointed at: its module's registry and filters apply, as for a direct warning
            warnings.warn(record.message, record.category, stacklevel=level)
