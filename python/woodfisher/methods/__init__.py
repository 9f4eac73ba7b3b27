"""Pruning methods: one module each, one line each in :data:`METHODS`.

The registry is what the option validation (:class:`woodfisher.PruneConfig`), the CLI's
``--method`` choices and the docs read. To add a method, write a module with a
:class:`~woodfisher.methods.base.PruningMethod` (or, for a score-only baseline, a
:class:`~woodfisher.methods.base.ScoreMethod` with ``scores(ctx)``) and add one line below.

A method of your own, outside the package: :func:`register_method` checks it and adds it to
:data:`METHODS`; then ``method="<its name>"`` works everywhere a built-in name does
(``prune_one_shot``, ``estimate_curvature`` / ``prune_with``, ``GradualPruner``, ``search_damp``,
``FisherHook``, and the CLI's ``--method`` when registered before ``woodfisher.cli.main`` runs).
"""
from .base import PruningMethod, ScoreMethod, StepContext
from .kfac import KFAC
from .magnitude import GlobalMagnitude, Magnitude
from .woodfisher import DiagFisher, WoodFisher

METHODS = {m.name: m for m in (
    WoodFisher(),
    Magnitude(),
    GlobalMagnitude(),
    DiagFisher(),
    KFAC(),
)}

#: The curvature kinds :func:`woodfisher.estimate_curvature` can build (``PruningMethod.curvature``).
CURVATURE_KINDS = ("none", "blockwise", "diagonal", "kfac")


def _check_protocol(method: PruningMethod) -> None:
    """ValueError naming ``method`` for a method object that breaks the protocol of :class:`PruningMethod`."""
    kind = type(method)
    name = method.name
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"method: {kind.__name__}.name must be a non-empty identifier (the method=... key), got "
                         f"{name!r}")
    if method.curvature not in CURVATURE_KINDS:
        raise ValueError(f"method: {kind.__name__}.curvature must be one of {CURVATURE_KINDS}, got "
                         f"{method.curvature!r}")
    if not set(method.patterns) <= {"nm", "rows"}:
        raise ValueError(f"method: {kind.__name__}.patterns may hold 'nm' and 'rows', got {method.patterns!r}")
    if method.patterns and method.curvature == "diagonal":
        raise ValueError(f"method: {kind.__name__}.patterns={method.patterns!r} with curvature 'diagonal', whose "
                         "blocks hold one entry each: a group pattern needs blocks of whole groups; use curvature "
                         "'blockwise' (or 'none' for a score-only method)")
    if method.fixed_mode not in (None, "global", "layerwise"):
        raise ValueError(f"method: {kind.__name__}.fixed_mode must be None, 'global' or 'layerwise', got "
                         f"{method.fixed_mode!r}")
    if isinstance(method, ScoreMethod) and kind.step is ScoreMethod.step and kind.scores is ScoreMethod.scores:
        raise ValueError(f"method: {kind.__name__} is a ScoreMethod without scores(ctx); implement it")
    if not isinstance(method, ScoreMethod) and kind.step is PruningMethod.step:
        raise ValueError(f"method: {kind.__name__} does not implement step(ctx)")


def register_method(method, replace: bool = False) -> PruningMethod:
    """Check a pruning method and add it to :data:`METHODS` under ``method.name``.

    Args:
        method: a :class:`PruningMethod` instance (or its class, instantiated without arguments); a
            :class:`ScoreMethod` implements ``scores(ctx)``, any other ``step(ctx)``.
        replace: allow replacing a method already registered under that name (a built-in one included).
    Returns:
        The registered instance.
    Raises:
        ValueError: naming ``method``: not a PruningMethod, an empty or non-identifier ``name``, a name already
            registered (without ``replace=True``), a ``curvature`` not in :data:`CURVATURE_KINDS`, ``patterns``
            other than "nm" / "rows" (none with a "diagonal" curvature), a ``fixed_mode`` other than None /
            "global" / "layerwise", or neither ``step`` nor (for a ScoreMethod) ``scores`` implemented.
    """
    if isinstance(method, type) and issubclass(method, PruningMethod):
        method = method()
    if not isinstance(method, PruningMethod):
        raise ValueError(f"method must be a woodfisher.methods.PruningMethod (or ScoreMethod) instance, got "
                         f"{type(method).__name__}")
    name = method.name
    _check_protocol(method)
    if name in METHODS and not replace and METHODS[name] is not method:
        raise ValueError(f"method: the name {name!r} is taken by {type(METHODS[name]).__name__}; choose another name "
                         "or pass replace=True")
    METHODS[name] = method
    return method


def check_method(value) -> None:
    """``value`` must be a key of :data:`METHODS` holding a method that keeps the protocol (checked as by
    :func:`register_method`, also for one put into ``METHODS`` directly); ValueError naming ``method`` otherwise (an
    unregistered :class:`PruningMethod` gets the :func:`register_method` call that adds it)."""
    if isinstance(value, str) and value in METHODS:
        if not isinstance(METHODS[value], PruningMethod):
            raise ValueError(f"method: METHODS[{value!r}] is a {type(METHODS[value]).__name__}, not a "
                             "woodfisher.methods.PruningMethod; add methods with woodfisher.register_method")
        _check_protocol(METHODS[value])  # also a method put into METHODS directly
        if METHODS[value].name != value:
            raise ValueError(f"method: METHODS[{value!r}] holds a method named {METHODS[value].name!r}; register it "
                             "under its own name (woodfisher.register_method)")
        return
    hint = ""
    if isinstance(value, PruningMethod) or (isinstance(value, type) and issubclass(value, PruningMethod)):
        shown = value.__name__ if isinstance(value, type) else f"{type(value).__name__}()"
        hint = f"; register your method first, woodfisher.register_method({shown}), then pass method={value.name!r}"
    elif isinstance(value, str):  # e.g. a resumed run in a process that has not registered its own method yet
        hint = "; a method of your own is registered first, in every process: woodfisher.register_method(YourMethod)"
    raise ValueError(f"method must be one of {tuple(METHODS)}, got {value!r}{hint}")


__all__ = ["CURVATURE_KINDS", "check_method", "METHODS", "PruningMethod", "register_method", "ScoreMethod",
           "StepContext"]
