"""The options of a pruning run: one frozen, validated dataclass.

:class:`PruneConfig` holds every option of :func:`woodfisher.prune_one_shot`,
:func:`woodfisher.estimate_curvature` / :func:`woodfisher.prune_with`, the
:class:`woodfisher.GradualPruner` and the CLI (whose flags and config-file keys are these
field names). It is validated once, in ``__post_init__``: a bad value raises a
ValueError naming the field, before anything runs. Method-specific rules (which patterns
and modes a method supports, whether it needs data) come from the method registry
(:mod:`woodfisher.methods`), so adding a method never touches this file.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from woodfisher_kernels.sizes import check_bytes

from . import structured as st
from .auto_rules import (
    AUTO_BLOCK_PER_GRAD,
    AUTO_MANY_STEPS,
    AUTO_STEP_GRADS,
    AUTO_STEP_KEEP,
    auto_num_steps,
    split_grads,
    step_count,
    step_sparsities,
)
from .damping import check_damp
from .distributed.group import check_group, describe_group
from .losses import check_loss_fn
from .masks import check_min_density, check_sparsity, is_int, is_real
from .methods import METHODS, check_method
from .names import unknown_names
from .option_checks import (
    check_bool,
    check_choice,
    check_int,
    check_int_or,
    check_names,
    check_pattern_sparsity,
    pattern_fixed_sparsity,
)
from .per_sample import PER_SAMPLE_PATHS
from .per_weight import check_map_floor, check_sparsity_map, is_per_weight, weight_steps

__all__ = ["PruneConfig", "MODES", "FORMS", "BACKENDS", "SCHEDULES", "AUTO_MANY_STEPS", "check_int", "auto_num_steps",
           "pattern_fixed_sparsity", "check_pattern_sparsity", "AUTO_BLOCK_PER_GRAD", "AUTO_STEP_KEEP",
           "AUTO_STEP_GRADS"]

MODES = ("global", "layerwise")
FORMS = ("auto", "sequential", "lowrank", "stream", "offload")
BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")
SCHEDULES = ("geometric", "linear")

#: Fields stored as Python numbers whatever numeric type was passed (numpy scalars from a sweep, ...): reports
#: and configs serialise them as JSON, and the arithmetic of the steps stays in Python numbers.
_INT_FIELDS = ("num_grads", "fisher_batch_size", "num_steps", "block_size", "memory_budget", "seed")
_FLOAT_FIELDS = ("sparsity", "beta", "min_density", "damp")


def _check_names(options: Dict[str, Any]) -> None:
    """Refuse keyword names that are not fields of :class:`PruneConfig` (a ValueError naming them)."""
    fields = {f.name for f in dataclasses.fields(PruneConfig)}
    unknown = set(options) - fields
    if unknown:
        raise ValueError(f"{unknown_names(unknown, fields, 'option')}; options are the fields of PruneConfig")


def _check_joint(config: "PruneConfig") -> None:
    """``joint_update=True`` needs the OBS update, no pattern (its update is already joint with
    ``group_exact=True``) and no WoodTaylor term (a ValueError naming joint_update)."""
    if not config.joint_update:
        return
    if not config.obs_update:
        raise ValueError("joint_update=True needs obs_update=True (it is a form of the OBS update)")
    if config.pattern is not None:
        raise ValueError(f"joint_update=True is for unstructured pruning, got pattern={config.pattern!r}: a "
                         "pattern's update is already joint per block with group_exact=True")
    if config.woodtaylor:
        raise ValueError("joint_update=True does not support woodtaylor=True (its update holds the first-order "
                         "term of Eqs. 21-23); pass one of them")


@dataclass(frozen=True)
class PruneConfig:
    """Every option of a pruning run (field names = keyword arguments = CLI config keys).

    Attributes:
        sparsity: target fraction of zeros over the pruned weights, in [0, 1) (omitted, here, in
            :meth:`from_options` and hence ``prune_one_shot``: 1 - N/M with ``pattern="N:M"``, else a ValueError);
            or a dict {weight / module name or shell-style pattern: fraction in [0, 1)}: the pruned weights are those
            its keys select (within ``modules``, less ``exclude``), each pruned to its own fraction, ranked within
            the weight as ``mode="layerwise"`` ranks (``mode`` is then not read, and a result reports "layerwise": a
            dict means per-weight targets;
            :mod:`woodfisher.per_weight` has the rules, e.g. a weight's own name wins over a pattern); stored as a
            dict. Not with a ``pattern`` (ValueError naming ``pattern``); a bad value is a ValueError naming
            ``sparsity[key]``.
        method: a name of :data:`woodfisher.methods.METHODS`: "woodfisher" (OBS with the
            blockwise inverse empirical Fisher, paper Eqs. 2, 10, 11), "magnitude"
            (layerwise |w|), "global_magnitude", "diag_fisher" (OBS with a diagonal Fisher),
            "kfac" (K-FAC OBS), or one of your own added by :func:`woodfisher.register_method`.
        mode: "global" (joint ranking across weights) or "layerwise" (independent); a per-weight ``sparsity``
            dict ranks each weight on its own whatever the mode (a result reports "layerwise").
        loss_fn: ``loss_fn(predictions, targets)`` -> mean loss; None = the model's own
            ``outputs.loss`` when it returns one, else :func:`woodfisher.losses.default_loss`. Per-sample
            gradients are taken through the predictions only: a term reading the model's parameters itself
            (a weight regulariser) is left out of the Fisher, with a warning.
        block_size: Fisher block size c (entries); "auto" (default): c = 4 times the number
            of gradients of a step (:data:`AUTO_BLOCK_PER_GRAD`; blocks a few times larger
            than m, where ``F^-1`` is neither noisy nor nearly diagonal; rounded up to a
            multiple of M for an N:M pattern, whole weights for ``pattern="rows"``); None:
            whole-weight blocks (the paper's one-shot setting).
        num_grads: m, gradients in the Fisher ("fisher subsample size") over the whole call
            (default 512): with several steps each step gets ``num_grads // steps`` of them
            (the first ``num_grads % steps`` steps one more), so the samples read stay the same.
        fisher_batch_size: samples averaged per gradient ("fisher mini-batch size").
        damp: lambda > 0 of ``F = lambda I + G^T G / N``, or "auto" (default): lambda =
            0.01 times the mean diagonal of the empirical Fisher over the entries not pruned yet
            (:data:`woodfisher.damping.AUTO_ALPHA`)
            (:func:`woodfisher.damping.auto_damp`); the paper's absolute value is ``damp=1e-5``.
        num_steps: steps from the current to the target sparsity, the gradients and
            inverses recomputed before each (the paper's recomputation); "auto" (default):
            :func:`auto_num_steps` (each step keeps >= 80% of the unpruned weights, with 64 to
            128 gradients per step when ``num_grads`` allows: 8 steps from dense to 80% with
            512 gradients; always 1 with a pattern). :func:`woodfisher.estimate_curvature` is
            always one step.
        step_schedule: the sparsities of the steps: "geometric" (default; every step prunes
            the same fraction of the weights still unpruned) or "linear" (equal increments
            of sparsity).
        obs_update: apply the OBS weight update (False: prune by mask only, OBD-style).
        joint_update: unstructured pruning (``pattern=None``) only: the OBS update of each Fisher block is the
            optimum of the quadratic model under all its pruned weights' constraints at once,
            ``dw = -F^-1 E_Q ([F^-1]_QQ)^-1 w_Q`` (WoodFisher paper Sec. 4.2, Eqs. 12-17, for |Q| weights;
            :func:`woodfisher.structured.joint_update`), instead of the sum of the single-weight updates
            (Eq. 10 summed, the paper's Sec. 4.3 default). False (default): the summed update. Same masks
            (the selection of a step does not depend on it); costs one q x q float64 solve per block
            (q = pruned entries of the block; an m x m one with a low-rank inverse when q > m). Needs
            ``obs_update=True`` and ``woodtaylor=False``; methods "woodfisher" and "diag_fisher" (where it
            equals the summed update: blocks of one entry).
        woodtaylor: add the first-order term (WoodTaylor, paper Eqs. 21-23).
        beta: FLOPs-aware statistic ``rho / flops_per_param ** beta`` (paper Sec. 5.4).
        modules: module or parameter names to prune, or shell-style patterns over full names
            (``"blocks.*.mlp.*"``: the default targets in the modules they match); None = every Linear /
            Conv weight, see :mod:`woodfisher.targets`; stored as a tuple.
        exclude: names or shell-style patterns of weights not to prune, read as ``modules`` reads its entries
            (exact names, tied aliases, wrapper prefixes; a module name means every target it holds; a pattern
            matches the targets by their names or their modules' names): removed from the targets (the default
            ones, or those ``modules`` picked); every entry must remove at least one target and at least one
            target must be left (ValueErrors naming ``exclude``); None = nothing excluded; stored as a tuple.
        pattern: None, "N:M" (e.g. "2:4"; fixes the sparsity at 1 - N/M; N of every M consecutive input
            features of a Linear row, of every M consecutive input channels at each (out, kernel position) of a
            conv: the 2:4 sparse tensor core layout) or "rows" (whole rows, as many pruned entries as ``sparsity``
            allows and never more: :func:`woodfisher.structured.select_rows`).
        group_exact: exact group statistic (True) or the paper's Eq. 18 relaxation.
        memory_budget: device bytes for gradients + inverses (an int, or a size such as "4GiB" / "1.5 GB",
            :func:`woodfisher.memory.parse_bytes`); gradients are streamed into dense
            inverses when keeping them does not fit, and on a GPU the inverses are offloaded to
            host memory when neither fits (:mod:`woodfisher.offload`). None (default): the memory the device
            has available (:func:`woodfisher.memory.available_bytes`) is the budget; a step that must
            then stream or offload says so in a warning, one that cannot fit is a ValueError before any
            gradient is computed.
        sampled_fisher: targets drawn from the model's predictive distribution (paper Sec. 6.3).
        seed: seeds the target sampling.
        progress: progress over the phases: a live tqdm line on a terminal, tqdm's widget in a notebook,
            plain lines in a log or pipe (off with ``TQDM_DISABLE=1``; see :mod:`woodfisher.progress`); False: none.
        backend: kernel backend of :mod:`woodfisher_kernels` ("auto" | "cuda" | "triton" | "cpu" | "torch").
        inverse_form: "auto" | "sequential" | "lowrank" | "stream" | "offload" (force a form;
            "offload" keeps gradients and inverses in host memory, streamed through the kernels
            in chunks that fit ``memory_budget``, on any device).
        per_sample_grads: how the per-sample gradients (``fisher_batch_size=1``) are formed: "vmap"
            (``torch.func``, the default) or "expanded" (torch's expanded weights: one batched forward and
            backward, per-sample linear / conv weight gradients from the saved activations; ``vmap`` where it
            has no rule); equal to 1e-10 in float64, speed depends on the device and model
            (``benchmarks/step_cpu.py`` times both; :mod:`woodfisher.gradients`).
        min_density: every weight keeps at least this fraction of its entries.
        batch_adapter: ``adapter(loader item) -> woodfisher.Batch`` (see :mod:`woodfisher.batches`);
            None = the default reading of (inputs, targets) tuples, dicts and tensors.
        keep_masks: after pruning, hold the masks with ``torch.nn.utils.prune``
            (:func:`woodfisher.attach_masks`) so fine-tuning cannot revive pruned weights;
            :func:`woodfisher.make_permanent` removes them.
        group: the ``torch.distributed`` process group to prune over: "auto" (the default group
            when one is initialised with more than one process), None (never: each process
            prunes on its own) or a ProcessGroup; see :mod:`woodfisher.distributed`.
    Raises:
        ValueError: naming the field, for any value outside its domain or a combination
            the method does not support; a keyword that is no field (naming it and the closest field).
    """

    # omitted: the one an N:M pattern fixes, else a ValueError (not a TypeError)
    sparsity: Union[float, Dict[str, float], None] = None
    method: str = "woodfisher"
    mode: str = "global"
    loss_fn: Optional[Callable] = None
    block_size: Optional[Union[int, str]] = "auto"
    num_grads: int = 512
    fisher_batch_size: int = 1
    damp: Union[float, str] = "auto"
    num_steps: Union[int, str] = "auto"
    step_schedule: str = "geometric"
    obs_update: bool = True
    joint_update: bool = False
    woodtaylor: bool = False
    beta: float = 0.0
    modules: Optional[Tuple[str, ...]] = None
    exclude: Optional[Tuple[str, ...]] = None
    pattern: Optional[str] = None
    group_exact: bool = True
    memory_budget: Optional[int] = None
    sampled_fisher: bool = False
    seed: int = 0
    progress: bool = True
    backend: str = "auto"
    inverse_form: str = "auto"
    per_sample_grads: str = "vmap"
    min_density: float = 0.0
    batch_adapter: Optional[Callable] = None
    keep_masks: bool = False
    group: Any = "auto"

    def __new__(cls, *args, **kwargs):
        # a misspelt keyword is a ValueError naming it (the generated __init__ would raise a TypeError)
        _check_names(kwargs)
        return super().__new__(cls)

    def __post_init__(self):
        if is_per_weight(self.sparsity):
            object.__setattr__(self, "sparsity", check_sparsity_map(self.sparsity))
            if self.pattern is not None:
                raise ValueError(f"pattern={self.pattern!r} fixes one sparsity for every weight; sparsity as a dict "
                                 "(per-weight fractions) is for unstructured pruning (leave pattern out)")
        else:
            if self.sparsity is None:
                object.__setattr__(self, "sparsity", pattern_fixed_sparsity(self.pattern))
            check_sparsity(self.sparsity)
            check_pattern_sparsity(self.sparsity, self.pattern)
            object.__setattr__(self, "sparsity", pattern_fixed_sparsity(self.pattern, self.sparsity))  # 0.667 -> 2/3
        check_method(self.method)
        check_choice("mode", self.mode, MODES)
        for name in ("num_grads", "fisher_batch_size"):
            check_int(name, getattr(self, name))
        if self.num_steps != "auto":
            check_int_or("num_steps", self.num_steps, "'auto'")
            if self.num_steps > self.num_grads:
                raise ValueError(f"num_steps={self.num_steps} needs num_grads >= num_steps (num_grads={self.num_grads} "
                                 "is the total over all steps)")
        check_choice("step_schedule", self.step_schedule, SCHEDULES)
        if self.block_size is not None and self.block_size != "auto":
            check_int_or("block_size", self.block_size, "'auto' or None (whole layers)")
        check_damp(self.damp)
        beta = self.beta
        if not is_real(beta) or not 0 <= beta < math.inf:
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        if self.memory_budget is not None:
            budget = self.memory_budget
            if isinstance(budget, str):   # "4GiB", "1.5e9"; "0GB" refused naming the string
                budget = int(check_bytes("memory_budget", budget))
                object.__setattr__(self, "memory_budget", budget)
            if is_real(budget) and not is_int(budget) and math.isfinite(budget) and float(budget).is_integer():
                object.__setattr__(self, "memory_budget", int(budget))   # 2e9 bytes, a JSON config's 2e9
            check_int("memory_budget", self.memory_budget)
        check_loss_fn(self.loss_fn)
        if self.batch_adapter is not None and not callable(self.batch_adapter):
            raise ValueError("batch_adapter must be callable(loader item) -> woodfisher.Batch, or None")
        check_choice("backend", self.backend, BACKENDS)
        check_choice("inverse_form", self.inverse_form, FORMS)
        check_choice("per_sample_grads", self.per_sample_grads, PER_SAMPLE_PATHS)
        if self.inverse_form == "offload" and self.memory_budget is None:
            raise ValueError("inverse_form='offload' needs memory_budget (device bytes) to size its chunks")
        if is_per_weight(self.sparsity):
            check_map_floor(self.min_density, self.sparsity)
        else:
            check_min_density(self.min_density, self.sparsity)
        for name in ("obs_update", "joint_update", "woodtaylor", "group_exact", "sampled_fisher", "progress",
                     "keep_masks"):
            check_bool(name, getattr(self, name))
        _check_joint(self)
        check_int("seed", self.seed, low=0)
        for name in ("modules", "exclude"):
            object.__setattr__(self, name, check_names(name, getattr(self, name)))
        st.parse_pattern(self.pattern)
        check_group(self.group)
        for name, kind in [(n, int) for n in _INT_FIELDS] + [(n, float) for n in _FLOAT_FIELDS]:
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, dict)):
                object.__setattr__(self, name, kind(value))
        METHODS[self.method].check(self)

    # ---- derived -------------------------------------------------------------------
    @property
    def method_impl(self):
        """The method object of :data:`woodfisher.methods.METHODS`."""
        return METHODS[self.method]

    @property
    def needs_data(self) -> bool:
        """Whether a loader is required (curvature or FLOPs-aware statistic)."""
        return self.method_impl.curvature != "none" or self.beta > 0

    def steps(self, start: Union[float, Dict[str, float]] = 0.0) -> List[Tuple[Any, int]]:
        """The steps of a call from sparsity ``start``: [(target sparsity, gradients of the step)].

        ``num_steps`` ("auto": :func:`auto_num_steps`, 1 with a pattern or for a method
        without curvature) steps on ``step_schedule`` (:func:`woodfisher.auto_rules.step_sparsities`); ``num_grads``
        split over them. A step never lowers the sparsity below ``start``; layerwise (each weight to its own
        target) a ``start`` at or above the final sparsity gives one step at the final sparsity. A per-weight
        ``sparsity`` (keys: the target names, :func:`woodfisher.per_weight.fit_sparsities`) schedules every weight
        from its own start to its own target on the same rule, in the steps the weight needing most of them
        plans (:func:`woodfisher.per_weight.weight_steps`).

        Args:
            start: the model's current sparsity, a fraction in [0, 1); per weight, {name: fraction} (one number:
                every weight's).
        Returns:
            List of ``(sparsity in [0, 1), number of gradients)`` ({name: sparsity} per weight), one per step; the
            last sparsity is :attr:`final_sparsity` and the gradients sum to ``num_grads``.
        """
        if is_per_weight(self.sparsity):
            return weight_steps(self, start)
        final = self.final_sparsity
        if final <= start and (self.method_impl.fixed_mode or self.mode) == "layerwise":
            return [(final, self.num_grads)]  # each weight to final (those above keep theirs): start is no floor
        n = step_count(self, start, final)
        return list(zip(step_sparsities(start, final, n, self.step_schedule), split_grads(self.num_grads, n)))

    @property
    def fisher_block_size(self) -> Optional[int]:
        """Block size c for this config's ``num_grads`` (None = whole weights): resolves "auto"."""
        if self.block_size == "auto":
            parsed = st.parse_pattern(self.pattern)
            if parsed is not None and parsed[0] == "rows":
                return None  # whole rows in a block: whole layers
            c = max(1, AUTO_BLOCK_PER_GRAD * self.num_grads)
            return c if parsed is None else -(-c // parsed[2]) * parsed[2]  # N:M: a multiple of M
        return self.block_size

    @property
    def channels_last(self) -> bool:
        """Whether conv weights are blocked in (out, *kernel, in) order: with an N:M ``pattern``, whose runs of M
        are then M consecutive input channels at one (out, kernel position), as 2:4 sparse tensor cores need
        (see :mod:`woodfisher.layout`)."""
        parsed = st.parse_pattern(self.pattern)
        return parsed is not None and parsed[0] == "nm"

    @property
    def final_sparsity(self) -> Union[float, Dict[str, float]]:
        """The sparsity reached at the end: ``sparsity`` (a dict for per-weight fractions), or the one an N:M
        pattern fixes."""
        parsed = st.parse_pattern(self.pattern)
        fixed = st.pattern_sparsity(parsed) if parsed is not None else None
        return self.sparsity if fixed is None else fixed

    def replace(self, **changes) -> "PruneConfig":
        """A validated copy with ``changes``.

        Args:
            **changes: field names of :class:`PruneConfig` and their new values.
        Returns:
            A new :class:`PruneConfig`.
        Raises:
            ValueError: unknown names (listing them), or a value ``__post_init__`` refuses (naming the field).
        """
        _check_names(changes)
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_options(cls, **options) -> "PruneConfig":
        """Build from keyword options; an omitted ``sparsity`` is the one an N:M ``pattern`` fixes.

        Args:
            **options: field names of :class:`PruneConfig` and their values.
        Returns:
            A validated :class:`PruneConfig`.
        Raises:
            ValueError: unknown names (listing them), ``sparsity`` omitted without an N:M pattern,
                or a value ``__post_init__`` refuses (naming the field).
        """
        _check_names(options)
        if "sparsity" not in options:
            options["sparsity"] = pattern_fixed_sparsity(options.get("pattern"))
        return cls(**options)

    def as_dict(self) -> Dict[str, Any]:
        """Plain values for reports: callables by name, tuples as lists.

        Returns:
            {field name: JSON-friendly value}.
        """
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "group":
                v = describe_group(v)
            elif callable(v):
                v = getattr(v, "__name__", repr(v))
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out
