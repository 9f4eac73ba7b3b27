"""The measured rules behind ``block_size="auto"`` and ``num_steps="auto"`` (:class:`woodfisher.PruneConfig`).

The constants were chosen on held-out training data (``benchmarks/results/ONESHOT.md``,
``benchmarks/results/damp_*.md``); :mod:`woodfisher.config` applies them, and the CLI and the engine read them
from here.
"""
from __future__ import annotations

import math
from typing import Any, List, Tuple

__all__ = ["AUTO_BLOCK_PER_GRAD", "AUTO_STEP_KEEP", "AUTO_STEP_GRADS", "AUTO_MANY_STEPS", "auto_num_steps",
           "step_sparsities", "step_count", "split_grads"]

#: ``block_size="auto"``: c = AUTO_BLOCK_PER_GRAD * (gradients of the step). Measured on held-out
#: training data (benchmarks/results/ONESHOT.md): c = m makes F^-1 noisy, c >> m (whole layers)
#: makes its diagonal nearly constant (the mask degenerates to magnitude); 2m-8m is best.
AUTO_BLOCK_PER_GRAD = 4
#: ``num_steps="auto"``: every step keeps at least this fraction of the weights still unpruned ...
AUTO_STEP_KEEP = 0.8
#: ... within (fewest, most) gradients per step when ``num_grads`` allows: no step holds more gradients
#: than the most (the memory of a step), none has fewer than the fewest (the Fisher's noise).
AUTO_STEP_GRADS = (64, 128)
#: ``num_steps="auto"`` planning more Fisher recomputations than this warns (num_grads is the
#: total over the call: a large one means many steps, each a full gradient collection + inversion).
AUTO_MANY_STEPS = 16


def auto_num_steps(start: float, final: float, num_grads: int, keep: float = AUTO_STEP_KEEP,
                   grads_per_step: Tuple[int, int] = AUTO_STEP_GRADS) -> int:
    """Steps for ``num_steps="auto"`` from sparsity ``start`` to ``final`` with ``num_grads`` gradients.

    n = ceil(log((1 - final) / (1 - start)) / log(keep)) (the fewest geometric steps that each
    keep >= ``keep`` of the unpruned weights), then brought into [min(ceil(num_grads / most),
    AUTO_MANY_STEPS), max(1, num_grads // fewest)] with (fewest, most) = ``grads_per_step``; 1
    when nothing is pruned. With the defaults (keep 0.8, 64-128 gradients, num_grads 512):
    10% -> 4 steps, 50% -> 4, 70% -> 6, 80% and above -> 8. A large num_grads alone never
    plans more than AUTO_MANY_STEPS steps (their steps get more than ``most`` gradients):
    num_grads=100000 is 16 steps of 6250, not 782 steps of 128 re-reading the same samples.
    """
    if final <= start:
        return 1
    fewest, most = grads_per_step
    ratio = (1.0 - final) / max(1.0 - start, 1e-12)
    n = 1 if ratio >= keep else math.ceil(math.log(ratio) / math.log(keep) - 1e-9)
    return max(1, min(max(n, min(-(-num_grads // most), AUTO_MANY_STEPS)), num_grads // fewest))


def step_sparsities(start: float, final: float, n: int, schedule: str) -> List[float]:
    """The sparsities after each of ``n`` steps from ``start`` to ``final`` (the rule of
    :meth:`woodfisher.PruneConfig.steps`, for one number or one weight of a per-weight ``sparsity``).

    Args:
        start, final: fractions in [0, 1). n: steps, >= 1. schedule: "geometric" (every step prunes the same
            fraction of the entries still unpruned) or "linear" (equal increments); linear when ``final <= start``.
    Returns:
        ``n`` fractions, none below ``start``, the last one ``max(start, final)``.
    """
    if schedule == "linear" or final <= start:
        targets = [start + (final - start) * (i + 1) / n for i in range(n)]
    else:
        d0, d1 = 1.0 - start, 1.0 - final
        targets = [1.0 - d0 * (d1 / d0) ** ((i + 1) / n) for i in range(n)]
    targets[-1] = final
    return [max(start, s) for s in targets]


def step_count(config: Any, start: float, final: float) -> int:
    """The steps of a :class:`woodfisher.PruneConfig` from sparsity ``start`` to ``final``.

    Args:
        config: the config (its ``num_steps``, ``pattern``, method and ``num_grads``). start, final: fractions.
    Returns:
        ``num_steps``; for "auto" 1 with a pattern or a method without curvature, else :func:`auto_num_steps`.
    """
    if config.num_steps != "auto":
        return config.num_steps
    if config.pattern is not None or config.method_impl.curvature == "none":
        return 1
    return auto_num_steps(start, final, config.num_grads)


def split_grads(num_grads: int, n: int) -> List[int]:
    """``num_grads`` gradients split over ``n`` steps.

    Args:
        num_grads: the call's total. n: steps, >= 1.
    Returns:
        ``n`` counts summing to ``num_grads``, the first ``num_grads % n`` one more than the others.
    """
    base, extra = divmod(num_grads, n)
    return [base + (i < extra) for i in range(n)]
