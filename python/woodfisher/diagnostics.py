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
import contextvars
import dataclasses
import os
import sys
import warnings
from typing import Dict, Iterator, Optional, Tuple

import torch

from .masks import select_kept_masks

__all__ = ["magnitude_overlap", "warn_if_degenerate", "reissue", "warn_at_caller", "warnings_held", "release_notices",
           "notices_dropped",
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
    the same from Python 3.12 on). Inside a :func:`warnings_held` block the notice is held by it.

    Args:
        message: the warning text. category: a ``Warning`` subclass (default UserWarning).
    """
    held = _HELD.get()
    if held is not None:
        held.append((message, category))
        return
    import woodfisher_kernels
    dirs = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, woodfisher_kernels.__file__))
    level, frame = 1, sys._getframe(1)
    while frame is not None and (os.path.abspath(frame.f_code.co_filename).startswith(dirs)
                                 or frame.f_code.co_filename == contextlib.__file__):  # a held notice's release
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)


class _Held(list):
    """The (message, category) notices of a :func:`warnings_held` block; ``outer``: the enclosing block's."""
    outer: Optional["_Held"] = None


#: The notices held by the innermost :func:`warnings_held` block (None: none is active).
_HELD: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("woodfisher_held_notices", default=None)


@contextlib.contextmanager
def warnings_held() -> Iterator[list]:
    """Hold the notices of the block (:func:`warn_at_caller`'s) until it completes: a call refused after a notice
    (by a check, or by its loader and model on the data: a weight left dense, frozen weights, a planned number of
    steps, then a ValueError) prints no notice, only its error.

    On a clean exit (or at :func:`release_notices`) each held notice is issued, in order, at the caller's line, so
    the caller's filters (``error``, ``ignore``, ``once``) and ``pytest.warns`` see it as before; on a ValueError
    (the call refused) they are dropped, on another exception (out of memory, an interrupt) issued. Inside another
    block they pass to it. Warnings issued with ``warnings.warn`` directly (torch's) are not held.

    Returns:
        A context manager; ``with warnings_held() as held:`` binds the list of held (message, category): what the
        block removes from it is dropped (the report of a refused call).
    Raises:
        whatever the block raises, unchanged.
    """
    held = _Held()
    held.outer = _HELD.get()
    token = _HELD.set(held)
    try:
        yield held
    except ValueError:  # a refused call: its notices are dropped
        _HELD.reset(token)
        raise
    except BaseException:  # out of memory, an interrupt: what the call said so far is issued
        _release(held, token)
        raise
    _release(held, token)


def _release(held: "_Held", token) -> None:
    now = _HELD.get()
    _HELD.reset(token)
    if now is held:  # not released yet
        for message, category in held:
            warn_at_caller(message, category)


@contextlib.contextmanager
def notices_dropped() -> Iterator[None]:
    """Drop the notices of the block, held or not (a check that runs what a later step runs again, with its notice:
    ``warnings.catch_warnings`` alone would not drop a notice held by an enclosing :func:`warnings_held`).

    Returns:
        A context manager.
    """
    with warnings.catch_warnings(), warnings_held() as held:
        warnings.simplefilter("ignore")
        yield
        held.clear()


def release_notices() -> None:
    """Issue the notices the innermost :func:`warnings_held` block holds now (the call has passed the point where
    it could still be refused for its input, e.g. the first step's gradients) and let the later ones through."""
    held = _HELD.get()
    if held is None:
        return
    _HELD.set(held.outer)  # to the enclosing block, if any, else issued
    for message, category in held:
        warn_at_caller(message, category)
    held.clear()
