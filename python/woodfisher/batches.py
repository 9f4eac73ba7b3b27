"""From what a loader yields to a model call: batch adapters, loader checks and messages.

A loader item becomes a :class:`Batch` ``(args, kwargs, target)``: the model is called as
``model(*args, **kwargs)`` and the loss is ``loss_fn(outputs, target)``. The default
adapter (:func:`default_adapter`) understands

- ``(x, y)`` and ``(x, y, extra...)`` (extras ignored), ``((x1, x2), y)`` (several inputs),
  ``({"a": a, "b": b}, y)`` (keyword inputs), ``(x,)`` (unlabelled);
- a dict (HuggingFace style ``input_ids``, ``attention_mask``, ``labels``): everything is
  passed as keyword arguments; with ``labels`` the model computes its own loss
  (``outputs.loss``), without them the batch is unlabelled;
- a bare tensor: unlabelled inputs (fine with ``sampled_fisher=True``, which draws targets
  from the model's predictive distribution: no dummy targets needed).

It never guesses: a tuple whose target position is ambiguous (a later element with the
batch dim that could be the target as well: a float second element followed by an integer
one, ``(x, mask, y)``, a second element shaped like the inputs, ``(input_ids,
attention_mask, labels)``, or integer lengths of padded sequences followed by integer labels,
``(x, lengths, y)``) or not a tensor is refused with a ValueError that shows the
adapter to pass, e.g. ``batch_adapter=lambda b: Batch((b[0], b[1]), {}, b[2])``.

Outputs may be a tensor, a dict or a HuggingFace ``ModelOutput``; the loss of a batch is
:func:`woodfisher.losses.compute_loss` (the model's own, ``loss_fn``, or the default cross-entropy;
re-exported here with the other loss functions).
"""
from __future__ import annotations

import collections.abc
import contextlib
import itertools
from typing import Any, Callable, Iterable, Optional, Tuple

import torch
from torch.utils import _pytree as pytree

# the loss functions live in .losses; re-exported here, where they were first documented
from .batch import Batch
from .batch_dims import (
    BATCH_DIM_FIX,
    BatchDimError,
    check_batch_dims,
    describe_leaf,
    lengths_like,
    unsplit_inputs,
)
from .loader_hints import fix_hint, positional_adapter, takes_as_keywords
from .losses import (
    ADAPTER_HINT,
    LossFnError,
    check_loss_fn,
    check_probabilities,
    compute_loss,
    default_loss,
    logits_of,
    model_loss,
    sample_targets,
)
from .memory import is_out_of_memory

__all__ = ["Batch", "default_adapter", "to_batch", "is_single_pass", "peek", "default_loss", "logits_of",
           "model_loss", "compute_loss", "check_labelled", "check_probabilities", "sample_targets", "check_loss_fn",
           "check_loader", "describe", "loader_errors", "check_batch_dims"]



def _is_tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


def _inputs(x) -> Tuple[tuple, dict]:
    if isinstance(x, collections.abc.Mapping):
        return (), dict(x)
    if isinstance(x, (tuple, list)):
        return tuple(x), {}
    return (x,), {}


def _first_tensor(x) -> Optional[torch.Tensor]:
    return next((leaf for leaf in pytree.tree_leaves(x) if _is_tensor(leaf) and leaf.dim() >= 1), None)


def _adapter_example(length: int, target: int) -> str:
    rest = ", ".join(f"b[{i}]" for i in range(length) if i != target)
    return (f"e.g. batch_adapter=lambda b: woodfisher.Batch(args=({rest},), kwargs={{}}, target=b[{target}]) "
            "(inputs as positional args or keyword args of the model, the loss target, or target=None)")


def _ambiguous(x, y: torch.Tensor, rest: list) -> bool:
    """Whether a later element of ``(x, y, *rest)`` could be the target as well as ``y``.

    Extras that are not tensors with the batch dim never are. A batched extra makes the
    reading ambiguous when ``y`` is float or bool (never class indices) and the extra is not
    float (``(x, mask, labels)``), when ``y`` has the shape of the first input
    (``(input_ids, attention_mask, labels)``), or when integer ``y`` reads as the lengths of the
    padded sequences (:func:`woodfisher.batch_dims.lengths_like`) and an integer extra has its shape
    (``(x, lengths, labels)``).
    """
    if not rest:  # (inputs, target): nothing else could be the target (and no pytree walk per item)
        return False
    first = _first_tensor(x)
    if first is None:
        return False
    n = first.shape[0]
    extras = [r for r in rest if _is_tensor(r) and r.dim() >= 1 and r.shape[0] == n]
    if not extras:
        return False
    if y.shape == first.shape:
        return True
    if lengths_like(y, first) and any(not r.is_floating_point() and r.shape == y.shape for r in extras):
        return True  # (x, lengths, y): a speech collate's padded sequences, their lengths, then the labels
    return (y.is_floating_point() or y.dtype == torch.bool) and any(not r.is_floating_point() for r in extras)


def default_adapter(item: Any) -> Batch:
    """The default reading of a loader item (see the module docstring).

    Raises:
        ValueError: an item it cannot read without guessing, with an example adapter.
    """
    if isinstance(item, Batch):
        return item
    if _is_tensor(item):
        return Batch((item,), {}, None)
    if isinstance(item, collections.abc.Mapping):
        kwargs = dict(item)
        return Batch((), kwargs, kwargs.get("labels"))
    if isinstance(item, (tuple, list)) and len(item) == 1:
        args, kwargs = _inputs(item[0])
        return Batch(args, kwargs, None)
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        x, y, rest = item[0], item[1], list(item[2:])
        if not _is_tensor(y):
            raise ValueError(f"loader items should be (inputs, targets) batches; the second element is a "
                             f"{type(y).__name__}, not a target tensor; {_adapter_example(len(item), 1)}")
        if _ambiguous(x, y, rest):
            raise ValueError(f"ambiguous batch of {len(item)} tensors {[describe_leaf(t) for t in item]}: more than "
                             f"one element after the inputs could be the target, and the pruner does not guess; "
                             f"say which is which, {_adapter_example(len(item), len(item) - 1)}")
        args, kwargs = _inputs(x)
        return Batch(args, kwargs, y)
    raise ValueError(f"loader must yield (inputs, targets) batches, a dict of tensors or a tensor, got "
                     f"{type(item).__name__}; {ADAPTER_HINT}")


def to_batch(item: Any, adapter: Optional[Callable[[Any], Any]] = None) -> Batch:
    """Apply ``adapter`` (or :func:`default_adapter`) and check what it returned."""
    if adapter is None:
        return default_adapter(item)
    try:
        out = adapter(item)
    except Exception as err:  # noqa: BLE001 - the caller's adapter on the caller's data
        raise ValueError(f"batch_adapter failed on a loader item ({type(item).__name__}): "
                         f"{type(err).__name__}: {err}") from err
    if isinstance(out, Batch):
        return out
    if isinstance(out, tuple) and len(out) == 3 and isinstance(out[0], (tuple, list)) \
            and isinstance(out[1], collections.abc.Mapping):
        return Batch(tuple(out[0]), dict(out[1]), out[2])
    raise ValueError(f"batch_adapter must return a woodfisher.Batch or (args tuple, kwargs dict, target), "
                     f"got {type(out).__name__}")


def check_loader(loader: Any) -> None:
    """``loader`` must be an iterable of batches (a DataLoader, a list, a generator...)."""
    if not isinstance(loader, collections.abc.Iterable) or isinstance(loader, (str, bytes)):
        dataset = hasattr(loader, "__getitem__") and hasattr(loader, "__len__")  # a map-style Dataset: samples
        raise ValueError(f"loader must be an iterable of batches (a DataLoader, a list, a generator), "
                         f"got {type(loader).__name__}" + ("; a Dataset yields single samples: pass "
                                                           "torch.utils.data.DataLoader(dataset, batch_size=...)"
                                                           if dataset else ""))


def _shapes(tree) -> list:
    return [f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
            + ("" if x.device.type == "cpu" else f" on {x.device}")
            for x in pytree.tree_leaves(tree) if _is_tensor(x)]


def describe(batch: Batch) -> str:
    """The shapes and dtypes of a batch's tensors, for messages: ``"args (8, 7) float32; target (8,) int64"``;
    keyword inputs by name: ``"kwargs input_ids=(8, 12) int64, labels=(8,) int64"``."""
    parts = []
    target = None if batch.target is batch.kwargs.get("labels") else batch.target  # dict labels: named once
    for label, tree in (("args", batch.args), ("kwargs", batch.kwargs), ("target", target)):
        if label == "kwargs":
            shapes = [f"{key}={shape}" for key, value in tree.items() for shape in _shapes(value)]
        else:
            shapes = _shapes(tree)
        if shapes:
            parts.append(label + " " + ", ".join(shapes))
    return "; ".join(parts) or "no tensors"


@contextlib.contextmanager
def loader_errors(batch: Batch, name: str = "loader",
                  replay: Optional[Callable[[], Optional[Tuple[int, Batch, Exception]]]] = None):
    """Re-raise an error of the model or the loss on ``batch`` as a ValueError naming ``name`` (the loader).

    Wrong input shapes or dtypes, out-of-range class targets, inputs on a device the model
    cannot use: the message gives the shapes (:func:`describe`) and the original error
    (chained). When ``batch`` is not what the loader yielded (the gradient collector
    concatenates loader items into chunks and calls the model per sample), ``replay()``
    runs the items of the chunk one by one as the loader yielded them and returns
    ``(loader index, item, its error)`` for the first that fails (None: each runs alone);
    the message then names that item, its own shapes and its own error. Running out of
    memory is not a bad input and passes through.
    """
    try:
        yield
    except (torch.OutOfMemoryError, LossFnError, BatchDimError):   # passes through as it is (not the data's
        # fault, or a message that already names the tensor and the fix)
        raise
    except Exception as err:  # noqa: BLE001 - any failure of the caller's model on the caller's data
        if is_out_of_memory(err):  # the CPU allocator's RuntimeError
            raise
        found = replay() if replay is not None else None
        if found is not None:
            index, item, own = found
            raise ValueError(f"{name}: the model or the loss failed on item {index} of the loader, {describe(item)}: "
                             f"{type(own).__name__}: {own}{fix_hint(own, item)}"
                             f"{''.join('; ' + note for note in getattr(own, '__notes__', ()))}") from own
        what = f"a batch with {describe(batch)}"
        unsplit = unsplit_inputs(batch) if replay is not None else []
        if unsplit:  # the usual cause: a per-sample tensor with its batch on another dim, passed whole
            what = (f"{describe(batch)} (samples taken along dim 0 of every tensor whose dim 0 is the batch size, "
                    f"and called per gradient; each loader item alone runs); {', '.join(unsplit)} has no dim 0 "
                    f"of the batch size {batch.size}, so every sample got it whole; {BATCH_DIM_FIX}")
        elif replay is not None:
            what = (f"{describe(batch)} (the loader's items concatenated and called per gradient; each item alone "
                    f"runs, so the model cannot be called on groups of fisher_batch_size samples)")
        raise ValueError(f"{name}: the model or the loss failed on {what}: "
                         f"{type(err).__name__}: {err}{fix_hint(err, batch)}"
                         f"{''.join('; ' + note for note in getattr(err, '__notes__', ()))}") from err


def is_single_pass(loader: Iterable) -> bool:
    """True for loaders that can be iterated once (generators, iterators), False for re-iterables."""
    return isinstance(loader, collections.abc.Iterator)


def peek(loader: Iterable) -> Tuple[Any, Iterable]:
    """(first item or None, a loader that still yields every item, the first included)."""
    if not is_single_pass(loader):
        return next(iter(loader), None), loader
    first = next(loader, None)
    return first, (loader if first is None else itertools.chain([first], loader))


TARGET_LIKE_KEYS = ("target", "targets", "label", "y", "class", "classes", "class_labels")


def check_labelled(batch: Batch, loss_fn: Optional[Callable] = None, forward: Optional[Callable] = None) -> None:
    """Refuse a batch without a target (and without a ``labels`` keyword for the model's own loss), or
    whose target the default loss does not fit.

    Args:
        batch: one loader item as a :class:`Batch`.
        loss_fn: the caller's loss; None = the default cross-entropy, whose floating-point targets
            must be class probabilities (:func:`check_probabilities`), unless the model is given them
            as ``labels=`` (HuggingFace: it computes its own loss, e.g. MSE for a regression head).
        forward: the model's ``forward`` (None: unknown): the adapter suggested for a dict batch fits its signature
            (:func:`woodfisher.loader_hints.positional_adapter` when it does not take every key as a keyword).
    Raises:
        ValueError: naming a dict batch's keys and, when one looks like a target (``target``,
            ``label``, ``y``, ...), the adapter that makes it the target; or naming ``loss_fn``.
    """
    if batch.target is not None or "labels" in batch.kwargs:
        if loss_fn is None and "labels" not in batch.kwargs:  # labels= : the model computes its own loss (HF)
            check_probabilities(batch.target)
        return
    if batch.kwargs and not batch.args:
        keys = list(batch.kwargs)
        guess = next((k for k in keys if k.lower() in TARGET_LIKE_KEYS), None)
        inputs, guessed = [k for k in keys if k != guess], ""
        if guess is not None and len(inputs) == 1:  # one input: positional suits forward(x) and forward(<key>=)
            fix = (f"pass batch_adapter=lambda b: woodfisher.Batch(args=(b[{inputs[0]!r}],), target=b[{guess!r}]) "
                   f"to make {guess!r} the target")
        elif guess is not None and not takes_as_keywords(forward, inputs):
            guessed, _, adapter = positional_adapter(inputs, next(k for k in inputs if not takes_as_keywords(
                forward, [k])), forward, f"b[{guess!r}]")
            fix = f"pass batch_adapter={adapter} to make {guess!r} the target"
        elif guess is not None:
            fix = (f"pass batch_adapter=lambda b: woodfisher.Batch(kwargs={{k: v for k, v in b.items() "
                   f"if k != {guess!r}}}, target=b[{guess!r}]) to make {guess!r} the target")
        else:
            fix = ("pass batch_adapter=lambda b: woodfisher.Batch(kwargs={...inputs...}, target=b[<key>]) to say "
                   "which key is the target")
        raise ValueError(f"dict batches with keys {keys} have no target: the default reading passes every key to "
                         f"the model as a keyword and takes the target from 'labels' only (HuggingFace's name); "
                         f"{fix}, or name it 'labels' if the model computes its own loss, or pass "
                         f"sampled_fisher=True to draw targets from the model{guessed}")
    compute_loss(None, None, None)  # raises: no targets and no model loss


