"""Gradual pruning on the polynomial schedule of Zhu & Gupta (2017).

Pruning happens at steps ``t = t0, t0 + dt, ..., t0 + n dt`` (``start_step``,
``frequency``, ``end_step = t0 + n dt``) to the sparsity

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt))^3 ,   s_i = 0.05 by default

(the paper's appendix S1.1). Between pruning steps the masks are kept with
``torch.nn.utils.prune.custom_from_mask`` (``weight_orig`` parameter, ``weight_mask``
buffer, ``weight = weight_orig * weight_mask`` recomputed before every forward), so an
ordinary training loop fine-tunes only the surviving weights. The optimizer keeps
working whenever it was built: the same Parameter objects stay in the same order of
``model.parameters()`` (:func:`woodfisher.attach_masks`), so resuming a run with an optimizer's
``state_dict`` works whether the optimizer is built before or after
:meth:`GradualPruner.load_state_dict`. :func:`make_permanent` removes the
reparametrisation (pruned entries stay 0, the parameters' order is kept) and ends the masks:
training after it revives pruned weights (their gradients and the optimizer's momentum are not 0).

An EMA of the weights (``torch.optim.swa_utils.AveragedModel``) pairs the model's buffers with
its copy's, so build it once the masks' buffers exist: ``attach_masks(model, pruner.masks())``
right after the pruner (all-ones masks before the first step), then ``AveragedModel(model)``;
with its default ``use_buffers=False`` its masks are copied from the model's at every
``update_parameters``. ``use_buffers=True`` averages the (float) masks into fractions, a dense
EMA: re-attach them with ``attach_masks(ema.module, pruner.masks())`` before using the EMA. Pruning calls switch off the
caller's ``torch.autocast`` and ``torch.inference_mode`` (:func:`woodfisher.state.caller_modes_off`).

Every method is failure-atomic: :meth:`GradualPruner.step` and
:meth:`GradualPruner.load_state_dict` check everything first and restore the weights,
masks and reparametrisations if anything fails later.
"""
from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .batches import check_loader, is_single_pass
from .checks import check_prunable
from .chunking import fitted_chunks
from .config import PruneConfig, check_int, check_pattern_sparsity, pattern_fixed_sparsity
from .diagnostics import reissue, warn_at_caller, warnings_held
from .distributed.consistent import check_same_numbers
from .distributed.fsdp import refuse_held_masks
from .distributed.group import active_group, local_phase
from .finetune import attach_masks, make_permanent
from .masks import check_sparsity, is_int, is_real
from .per_sample import check_batch_statistics
from .per_weight import check_sparsity_map, fit_sparsities, is_per_weight
from .pruner import PruneResult, prune_one_shot
from .state import Snapshot
from .structured import fit_pattern, parse_pattern, pattern_sparsity
from .targets import resolve_targets, strip_wrapper_prefixes, unwrap_model

__all__ = ["polynomial_sparsity", "GradualPruner", "apply_masks", "make_permanent"]

#: Former name of :func:`woodfisher.attach_masks`, kept working.
apply_masks = attach_masks

_SCHEDULE = ("final_sparsity", "initial_sparsity", "start_step", "end_step", "frequency")


def _check_schedule(final_sparsity, start_step, end_step, frequency, initial_sparsity) -> Tuple[int, int, int]:
    """(start_step, end_step, frequency) as ints; a ValueError naming the argument for a schedule outside its
    domain (see :class:`GradualPruner`)."""
    check_sparsity(final_sparsity, "final_sparsity")
    check_sparsity(initial_sparsity, "initial_sparsity")
    start_step, end_step = check_int("start_step", start_step, 0), check_int("end_step", end_step, 0)
    frequency = check_int("frequency", frequency)
    if end_step < start_step or (end_step - start_step) % frequency:
        raise ValueError(f"end_step - start_step must be a non-negative multiple of frequency, got "
                         f"start_step={start_step}, end_step={end_step}, frequency={frequency}")
    if initial_sparsity > final_sparsity:
        raise ValueError(f"initial_sparsity ({initial_sparsity}) must not exceed final_sparsity ({final_sparsity})")
    return start_step, end_step, frequency


def _check_pattern_schedule(config: PruneConfig, initial_sparsity: float, num_steps: int) -> None:
    """An N:M pattern fixes every step's sparsity at 1 - N/M: a schedule with other targets (the cubic ramp from
    ``initial_sparsity``) is refused here, naming ``pattern``, not at its first step."""
    parsed = parse_pattern(config.pattern)
    fixed = pattern_sparsity(parsed) if parsed is not None else None
    if fixed is None or num_steps == 0 or math.isclose(initial_sparsity, fixed):
        return
    raise ValueError(f"pattern={config.pattern!r} fixes the sparsity of every pruning step at {fixed:g}, but the "
                     f"schedule ramps from initial_sparsity={initial_sparsity:g} over {num_steps} steps; an N:M mask "
                     f"is reached in one step: pass start_step == end_step, or initial_sparsity={fixed:g} (later "
                     "steps keep that mask)")


def polynomial_sparsity(step: int, *, final_sparsity: float, start_step: int, end_step: int,
                        frequency: int = 1, initial_sparsity: float = 0.05) -> float:
    """Target sparsity at ``step``: 0 before ``start_step``, the cubic ramp, then ``final_sparsity``.

    Source: the polynomial schedule of Zhu & Gupta (2017, "To prune, or not to prune", Eq. 1),
    ``s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (t_n - t_0))^3``, used by the WoodFisher paper
    (Sec. 5.2 and S1.1). The ramp is evaluated at the last scheduled pruning step <= ``step``.

    Args:
        step: the current step (epoch or iteration; any unit, the same as the others).
        final_sparsity: s_f, a fraction in [0, 1). initial_sparsity: s_i, the fraction at ``start_step``.
        start_step, end_step: t_0 and t_n. frequency: steps between pruning steps (>= 1).
    Returns:
        The target sparsity, a fraction in [0, 1).
    Raises:
        ValueError: a schedule :class:`GradualPruner` refuses (naming the argument).
    """
    _check_schedule(final_sparsity, start_step, end_step, frequency, initial_sparsity)
    if step < start_step:
        return 0.0
    if end_step == start_step:
        return float(final_sparsity)
    last = start_step + ((min(step, end_step) - start_step) // frequency) * frequency
    if last == start_step:  # exactly s_i (s_f + (s_i - s_f) rounds: 0.5 + (0.05 - 0.5) = 0.04999999999999999)
        return float(initial_sparsity)
    frac = (last - start_step) / (end_step - start_step)
    return float(final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** 3)


class GradualPruner:
    """Prunes at scheduled steps with :func:`prune_one_shot` and keeps the masks.

    Args:
        model: network to prune (modified in place).
        loader: default ``(inputs, targets)`` loader for the Fisher (``step`` may override).
        final_sparsity: s_f in [0, 1); with an N:M ``pattern`` it may be omitted (1 - N/M), and another value is a
            ValueError naming it; or per weight, {name or pattern: fraction} as ``prune_one_shot``'s ``sparsity`` dict
            (:mod:`woodfisher.per_weight`): each weight on its own ramp, from ``min(s_i, its fraction)``.
            initial_sparsity: s_i (default 0.05).
        start_step, end_step, frequency: pruning at start_step + k * frequency up to
            end_step (``end_step - start_step`` must be a multiple of ``frequency``).
        prune_kwargs: the other :class:`woodfisher.PruneConfig` fields (method, mode, block_size, ...),
            validated here.

    Raises:
        ValueError: a sparsity outside [0, 1), ``keep_masks`` other than True, ``start_step`` / ``end_step`` not
            ints >= 0 or ``frequency`` not an int >= 1, ``end_step - start_step`` not a non-negative multiple of
            ``frequency``, ``initial_sparsity > final_sparsity``, ``sparsity`` passed, a ``loader`` that is not
            iterable (or single-pass, with more than one pruning step), a bad
            :class:`PruneConfig` option, weights that cannot be pruned or that a ``pattern`` does not fit, a
            BatchNorm without running statistics with ``fisher_batch_size=1`` (per-sample gradients undefined),
            or an N:M ``pattern`` (which fixes every step at 1 - N/M) with a ramp: it needs
            ``start_step == end_step`` or ``initial_sparsity = 1 - N/M``.

    Typical loop::

        pruner = GradualPruner(model, loader, final_sparsity=0.9, start_step=0, end_step=40,
                               frequency=5, method="woodfisher", block_size=1000)
        for epoch in range(100):
            pruner.step(epoch)
            train_one_epoch(model)
        make_permanent(model)
    """

    def __init__(self, model: nn.Module, loader: Optional[Iterable] = None, *, final_sparsity: Optional[float] = None,
                 start_step: int = 0, end_step: int = 0, frequency: int = 1,
                 initial_sparsity: float = 0.05, **prune_kwargs):
        refuse_held_masks(model, "GradualPruner")  # it holds the masks between steps
        if "sparsity" in prune_kwargs:
            raise ValueError("pass final_sparsity, not sparsity, to GradualPruner")
        if prune_kwargs.get("keep_masks", True) is not True:  # would be a silent no-op: the masks are held anyway
            raise ValueError(f"keep_masks={prune_kwargs['keep_masks']!r}: GradualPruner always holds the masks "
                             "between steps (torch.nn.utils.prune); drop them after the last step with "
                             "wf.make_permanent(model)")
        if final_sparsity is None:  # the one an N:M pattern fixes, else required
            try:
                final_sparsity = pattern_fixed_sparsity(prune_kwargs.get("pattern"))
            except ValueError:
                raise ValueError("final_sparsity is required (only pattern='N:M' fixes it, at 1 - N/M)") from None
        check_pattern_sparsity(final_sparsity, prune_kwargs.get("pattern"), "final_sparsity")
        per = is_per_weight(final_sparsity)  # each weight on its own ramp, from min(initial_sparsity, its own)
        if per:
            final_sparsity = check_sparsity_map(final_sparsity, "final_sparsity")
            check_sparsity(initial_sparsity, "initial_sparsity")
        most = max(final_sparsity.values()) if per else final_sparsity
        start_step, end_step, frequency = _check_schedule(most, start_step, end_step, frequency,
                                                          min(initial_sparsity, most) if per else initial_sparsity)
        if loader is not None:  # read at every pruning step, maybe hours into training: checked now
            check_loader(loader)
            if is_single_pass(loader) and end_step > start_step:
                raise ValueError(f"loader: a single-pass iterable ({type(loader).__name__}) is read up at the first "
                                 "pruning step, and the schedule has more; pass a re-iterable loader (a DataLoader, a "
                                 "list) or one per step: pruner.step(step, loader)")
        asked = PruneConfig.from_options(sparsity=final_sparsity if per else float(final_sparsity), **prune_kwargs)
        _check_pattern_schedule(asked, float(initial_sparsity), (end_step - start_step) // frequency)
        with warnings_held():  # the pattern's notice only for a pruner that is made
            # N:M: the weights it fits; a dict: its own
            config = fit_sparsities(model, fit_pattern(model, asked), "final_sparsity")
            targets = resolve_targets(model, config.modules, config.method_impl.block_size(config),
                                      channels_last=config.channels_last, exclude=config.exclude)
            config.method_impl.check_targets(targets, config)  # e.g. rows an N:M pattern does not fit
            if config.method_impl.curvature in ("blockwise", "diagonal"):  # per-sample gradients at every step
                check_batch_statistics(unwrap_model(model)[0], config.fisher_batch_size)
            check_prunable(targets, config, config.sparsity if per else final_sparsity, "final_sparsity")
            if per and active_group(config.group) is not None:
                raise ValueError("final_sparsity: per-weight fractions (a dict) are not supported over a process "
                                 "group; pass one number, or group=None to prune on each process by itself")
        self.config = config
        if config.modules != asked.modules:  # fit_pattern's weights, the exclusions already taken out
            prune_kwargs = dict(prune_kwargs, modules=list(config.modules), exclude=config.exclude)
        self.model, self.loader = model, loader
        self.final_sparsity = dict(config.sparsity) if per else float(final_sparsity)
        self.initial_sparsity = float(initial_sparsity)
        self.start_step, self.end_step, self.frequency = start_step, end_step, frequency
        self.prune_kwargs = prune_kwargs
        self.last_step: Optional[int] = None
        self.history: List[dict] = []
        # samples per gradient call that fitted after running out of memory, kept across the pruning steps
        # ({fisher_batch_size: samples}; :func:`woodfisher.chunking.fitted_chunks`): later steps start there
        self.fitted_chunks: Dict[int, int] = {}

    def is_pruning_step(self, step: int) -> bool:
        """Whether ``step`` is a scheduled pruning step.

        Args:
            step: the current step.
        Returns:
            True for ``start_step + k * frequency <= end_step``.
        """
        return self.start_step <= step <= self.end_step and (step - self.start_step) % self.frequency == 0

    def target_sparsity(self, step: int) -> Union[float, Dict[str, float]]:
        """The schedule's sparsity at ``step`` (:func:`polynomial_sparsity`).

        Args:
            step: the current step.
        Returns:
            A fraction in [0, 1); per weight ({weight name: fraction}) for a dict ``final_sparsity``, each weight's
            ramp from ``min(initial_sparsity, its final fraction)`` to its final fraction.
        """
        if isinstance(self.final_sparsity, dict):
            return {name: polynomial_sparsity(step, final_sparsity=final, start_step=self.start_step,
                                              end_step=self.end_step, frequency=self.frequency,
                                              initial_sparsity=min(self.initial_sparsity, final))
                    for name, final in self.final_sparsity.items()}
        return polynomial_sparsity(step, final_sparsity=self.final_sparsity, start_step=self.start_step,
                                   end_step=self.end_step, frequency=self.frequency,
                                   initial_sparsity=self.initial_sparsity)

    def step(self, step: int, loader: Optional[Iterable] = None) -> Optional[PruneResult]:
        """Prune if ``step`` is scheduled and not done yet; a ``step`` past a scheduled step that was not called
        (a loop whose steps skip it, or a run resumed past it) prunes to that step's sparsity, with a warning.

        Args:
            step: the current step (an int, in the unit of the schedule).
            loader: batches for the Fisher at this step; None = the constructor's loader.
        Returns:
            The step's :class:`PruneResult`, or None when nothing was pruned.
        Raises:
            ValueError: ``step`` not an int; under a process group, another ``step``, schedule or progress on
                another rank (on every rank: pruning is collective, and a rank that skipped it would leave the
                others waiting); or anything :func:`woodfisher.prune_one_shot`
                refuses; the model, its masks and the pruner's progress are then unchanged.
        """
        group = active_group(self.config.group)
        with nullcontext() if group is None else local_phase(group):  # a bad step on one rank: every rank raises
            if not is_int(step):
                raise ValueError(f"step must be an int, got {step!r}")
        step = int(step)
        if group is not None:  # every rank must take the same decision: pruning is a collective call
            check_same_numbers(group, "every rank must call step() with the same step, on pruners with the same "
                               "schedule and progress (state_dict)", step=step, last_step=self.last_step,
                               start_step=self.start_step, end_step=self.end_step, frequency=self.frequency,
                               initial_sparsity=self.initial_sparsity, final_sparsity=self.final_sparsity)
        due = self._due(step)
        if due is None:
            return None
        target = self.target_sparsity(due)
        snapshot = Snapshot(self._targets(), self.model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with fitted_chunks(self.fitted_chunks):
                result = prune_one_shot(self.model, loader if loader is not None else self.loader,
                                        self.config.replace(sparsity=target))
        try:
            apply_masks(self.model, result.masks)  # undoes its own partial work when it fails
        except BaseException:
            snapshot.restore()
            raise
        self.last_step = step
        self.history.append({"step": step, "target": target, "sparsity": result.sparsity,
                             "damp": result.damp})
        per = isinstance(target, dict)
        if not (any(target.values()) if per else target):  # a first step at initial_sparsity=0: expected
            caught = [w for w in caught if not str(w.message).startswith("sparsity=0 prunes nothing")]
        below = [] if per else [w for w in caught if str(w.message).startswith(f"sparsity={target:g} is below the ")]
        if below:  # zeros from before the pruner (another tool, a checkpoint): said in the schedule's terms
            caught = [w for w in caught if w not in below]
            warn_at_caller(f"step({step}): the schedule's sparsity {target:.4g} is below the {result.sparsity:.4g} of "
                           "zeros the pruned weights already hold (never revived), so it keeps that sparsity; the "
                           f"schedule prunes further once it passes it (initial_sparsity={result.sparsity:.4g} "
                           "starts the ramp there)")
        reissue(caught)  # at the training loop's line, not this one; last, so the step is recorded either way
        if due != step:  # the loop's steps passed a scheduled one: caught up here, said at the loop's line
            reached = "per-weight sparsities" if per else f"sparsity {target:.4g}"
            warn_at_caller(f"step({step}) is past the scheduled pruning step {due}, which was not called: pruned now "
                           f"to its {reached}; call step() at every step of the schedule's unit "
                           f"(start_step={self.start_step}, frequency={self.frequency}) to prune on the schedule")
        return result

    def _due(self, step: int) -> Optional[int]:
        """The latest scheduled step ``<= step`` not done yet (a loop whose steps skip a scheduled one prunes to its
        sparsity at the next call), or None."""
        if step < self.start_step:
            return None
        due = self.start_step + (min(step, self.end_step) - self.start_step) // self.frequency * self.frequency
        return None if self.last_step is not None and due <= self.last_step else due

    def _targets(self):
        """The pruned weights (``modules`` minus ``exclude``), whole-weight blocks."""
        return resolve_targets(self.model, self.config.modules, exclude=self.config.exclude)

    def masks(self) -> Dict[str, torch.Tensor]:
        """Current keep-masks of the pruned weights.

        Returns:
            {weight name: bool keep-mask of the weight's shape}.
        """
        return {target.name: target.keep_mask() for target in self._targets()}

    def state_dict(self) -> dict:
        """Schedule, progress and masks (save it next to ``model.state_dict()``).

        Returns:
            dict with keys "schedule", "last_step", "history", "masks" (CPU bool tensors).
        """
        return {"schedule": {"final_sparsity": self.final_sparsity, "initial_sparsity": self.initial_sparsity,
                             "start_step": self.start_step, "end_step": self.end_step,
                             "frequency": self.frequency},
                "last_step": self.last_step, "history": list(self.history),
                "masks": {k: v.cpu() for k, v in self.masks().items()} if self.last_step is not None else {}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore progress and re-apply the masks (call before ``model.load_state_dict``).

        Args:
            state: a dict from :meth:`state_dict`.

        The model then has the ``weight_orig`` / ``weight_mask`` entries that a
        checkpoint of a model under pruning holds, in the order of its parameters, so an
        optimizer built before or after this call loads its saved state correctly.

        Raises:
            ValueError: a state that is not a GradualPruner state_dict, a different schedule,
                or masks that do not fit this pruner's weights (names, shapes, values); all of it
                is checked before the model is touched, which is unchanged then. A state saved through
                another wrapper (DataParallel / DDP, torch.compile, or none) names the same weights: its
                ``module.`` / ``_orig_mod.`` prefixes are matched to this model's.
        """
        if not isinstance(state, Mapping) or any(k not in state for k in ("schedule", "last_step", "history",
                                                                          "masks")):
            raise ValueError("state is not a GradualPruner state_dict (keys schedule, last_step, history, masks)")
        theirs, mine = state["schedule"], self.state_dict()["schedule"]
        per = isinstance(theirs, Mapping) and isinstance(theirs.get("final_sparsity"), Mapping)
        if not isinstance(theirs, Mapping) or any(not _is_number(theirs.get(k)) for k in _SCHEDULE[per:]):
            raise ValueError(f"state['schedule'] must hold the numbers {list(_SCHEDULE)}, got {theirs!r}")
        diff = {k: (v, theirs[k]) for k, v in mine.items() if not _same_number(v, theirs[k])}
        if diff:
            raise ValueError(f"state has a different schedule (this pruner's value, the state's): {diff}")
        last, history, masks = state["last_step"], state["history"], state["masks"]
        if last is not None:
            check_int("state['last_step']", last, low=0)
        if not isinstance(history, (list, tuple)) or not all(isinstance(h, Mapping) for h in history):
            raise ValueError(f"state['history'] must be a list of dicts, got {type(history).__name__}")
        if not isinstance(masks, Mapping) or (last is None) != (len(masks) == 0):
            raise ValueError("state['masks'] must be a dict of keep-masks, empty exactly when no step was done")
        if masks:
            apply_masks(self.model, self._own_names(masks))  # checks every mask before it touches the model
        self.last_step = last
        self.history = [dict(h) for h in history]

    def _own_names(self, masks: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``masks`` under this pruner's weight names: a state saved through another wrapper (DataParallel / DDP,
        torch.compile, or none: the ``module.`` / ``_orig_mod.`` prefixes) names the same weights."""
        expected = [target.name for target in self._targets()]
        if sorted(masks) == sorted(expected):
            return dict(masks)
        theirs, mine = strip_wrapper_prefixes(masks), strip_wrapper_prefixes(expected)
        by_inner = {inner: name for name, inner in mine.items()}
        if sorted(theirs.values()) != sorted(by_inner):
            raise ValueError(f"state holds masks for {sorted(masks)}, this pruner prunes {sorted(expected)}")
        return {by_inner[theirs[name]]: keep for name, keep in masks.items()}


def _is_number(v) -> bool:
    return is_real(v) and math.isfinite(v)


def _same_number(mine, theirs) -> bool:
    """Equal schedule values: numbers to rounding, per-weight fractions over the same names (wrapper prefixes
    aside) to rounding."""
    if isinstance(mine, Mapping) or isinstance(theirs, Mapping):
        if not (isinstance(mine, Mapping) and isinstance(theirs, Mapping)):
            return False
        mine, theirs = ({inner: d[name] for name, inner in strip_wrapper_prefixes(d).items()} for d in (mine, theirs))
        return mine.keys() == theirs.keys() and all(_is_number(theirs[k]) and math.isclose(v, float(theirs[k]))
                                                    for k, v in mine.items())
    return math.isclose(float(mine), float(theirs))
