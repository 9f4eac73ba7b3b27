"""What to pass when the caller's model or the default loss refuses a loader's batch: the text that
:func:`woodfisher.batches.loader_errors` appends to its message (a ``batch_adapter`` to paste for dict
batches the model does not take as keywords, the conversion of uint8 images to float, the loss that
skips an 'ignore' class label). Each hint reads the batch (a :class:`woodfisher.Batch`) and the error only (the
batch_adapter hint also the signature of the ``forward`` the error's traceback shows was called).
"""
from __future__ import annotations

import inspect
from typing import Any, List, Optional, Tuple

import torch
from torch.utils import _pytree as pytree

__all__ = ["fix_hint", "positional_adapter", "takes_as_keywords"]


def fix_hint(err: Exception, batch: Any) -> str:
    """What to pass for a model or default loss that refused the batch: :func:`_labels_hint`; for uint8 images,
    the conversion to float; for class targets out of the outputs' range (segmentation's 255 'ignore' label), the
    loss that skips them."""
    hint = _labels_hint(err, batch)
    raw = [f"uint8{tuple(x.shape)}" for x in pytree.tree_leaves((batch.args, batch.kwargs))
           if isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() >= 3]
    dtype_error = isinstance(err, RuntimeError) and any(word in str(err) for word in (
        "dtype", "scalar type", "Byte", "unsigned char", "Input type"))
    if not hint and raw and dtype_error:  # images still in bytes: the model's dtype error
        return (f"; the inputs hold uint8 images {raw}: convert them to float before the model (torchvision: "
                "transforms.ToTensor(), or v2.ToDtype(torch.float32, scale=True), then Normalize)")
    target = batch.target
    if hint or not isinstance(err, IndexError) or "out of bounds" not in str(err) \
            or not isinstance(target, torch.Tensor) or target.is_floating_point() or target.numel() == 0:
        return hint
    top = int(target.max())
    return (f"; the class targets run up to {top} (an 'ignore' label such as 255?): the default cross-entropy "
            f"takes classes 0..C-1 only; pass loss_fn=torch.nn.CrossEntropyLoss(ignore_index={top}) to skip "
            "them, or remap the targets")


def _labels_hint(err: Exception, batch: Any) -> str:
    """For a model that refused one of a dict batch's keys as a keyword: the ``batch_adapter`` to paste."""
    if not isinstance(err, TypeError) or not batch.kwargs or batch.args:
        return ""
    refused = next((key for key in batch.kwargs if f"'{key}'" in str(err)), None)
    if refused is None:
        return ""
    if refused == "labels":
        return ("; the model does not take labels= (dict batches are passed as keyword arguments): pass "
                "batch_adapter=lambda b: woodfisher.Batch(kwargs={k: v for k, v in b.items() if k != 'labels'}, "
                "target=b['labels'])")
    target = ("b['labels']" if "labels" in batch.kwargs else "None" if batch.target is None else
              "(your target, as now)")
    guessed, inputs, adapter = positional_adapter([key for key in batch.kwargs if key != "labels"], refused,
                                                  _forward_of(err), target)
    return (f"; the model does not take {refused}= (dict batches are passed as keyword arguments){guessed}: to pass "
            f"{', '.join(inputs)} positionally, batch_adapter={adapter}")


def positional_adapter(keys: List[str], first: str, forward, target: str) -> Tuple[str, List[str], str]:
    """The ``batch_adapter`` for dict batches whose input ``keys`` ``forward`` does not all take as keywords: keys
    named after its parameters stay keywords, the others fill its leading parameters in the batch's order
    (``first`` first).

    Args:
        keys: the batch's input keys. first: the key to put first (the refused one). forward: the model's forward
            (None: unknown). target: the adapter's target expression, e.g. ``"b['label']"``.
    Returns:
        (what the placement guessed, '; ...' (:func:`_guessed`); the keys passed positionally; the adapter's text,
        ``lambda b: woodfisher.Batch(...)`` followed by the keys left out, if any).
    """
    inputs, keywords, dropped, slots = _placed(keys, first, forward)
    args = ", ".join(f"b[{key!r}]" for key in inputs) + ","
    kwargs = (", kwargs={" + ", ".join(f"{key!r}: b[{key!r}]" for key in keywords) + "}") if keywords else ""
    left = f" ({', '.join(dropped)} left out: forward takes no more arguments)" if dropped else ""
    return (_guessed(inputs, slots, forward), inputs,
            f"lambda b: woodfisher.Batch(args=({args}){kwargs}, target={target}){left}")


def takes_as_keywords(forward, keys: List[str]) -> bool:
    """Whether ``forward`` (None: unknown, taken as yes) accepts every one of ``keys`` as a keyword argument."""
    try:
        params = inspect.signature(forward).parameters.values() if forward is not None else None
    except (TypeError, ValueError):
        params = None
    if params is None:
        return True
    kinds = inspect.Parameter
    named = {p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)}
    return any(p.kind == kinds.VAR_KEYWORD for p in params) or set(keys) <= named


def _guessed(inputs: List[str], slots: Optional[List[str]], forward) -> str:
    """What the positional part of the hint guessed: the forward's parameters no batch key is named after, and the
    keys put in them in the batch's order (or, without a signature, that the order is the batch's)."""
    if slots is None:
        return (f"; the forward's signature could not be read, so no key is matched to a parameter by name: the "
                f"order below ({', '.join(inputs)}) is the batch's, a guess to check")
    pairs = ", ".join(f"{name} <- b[{key!r}]" for name, key in zip(slots, inputs))
    name = getattr(forward, "__qualname__", "forward")
    many = len(slots) > 1
    return (f"; no key of the batch is named after {name}'s parameter{'s' if many else ''} "
            f"{', '.join(dict.fromkeys(slots))}, so {'they are' if many else 'it is'} filled in the batch's order "
            f"({pairs}), a guess to check (or name the keys after the parameters)")


def _forward_of(err: Exception):
    """The ``forward`` the failed call bound its arguments to (``nn.Module.__call__``'s ``forward_call``, the
    deepest frame of the TypeError's traceback that holds one), or None."""
    tb, found = err.__traceback__, None
    while tb is not None:
        found = tb.tb_frame.f_locals.get("forward_call", found)
        tb = tb.tb_next
    return found if callable(found) else None


def _placed(keys: List[str], refused: str, forward) -> Tuple[List[str], List[str], List[str], Optional[List[str]]]:
    """(positional, keyword, left-out) batch keys for ``forward``, and the names of the parameters the positional
    keys fill (None without a signature): keys named by its parameters stay keywords, the others fill its free
    positional slots in the batch's order, the refused key first; without a signature, every key positionally (the
    batch's order)."""
    try:
        params = list(inspect.signature(forward).parameters.values()) if forward is not None else None
    except (TypeError, ValueError):
        params = None
    if params is None:
        return keys, [], [], None
    kinds = inspect.Parameter
    named = {p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)}
    keywords = [key for key in keys if key in named]
    slots: List[str] = []  # positional arguments fill the leading parameters, up to the first one a key names
    for p in params:
        if p.kind == kinds.VAR_POSITIONAL:
            slots += ["*" + p.name] * len(keys)
        if p.name in keywords or p.kind not in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD):
            break
        slots.append(p.name)
    slots = slots or ["(first argument)"]
    rest = [refused] + [key for key in keys if key not in named and key != refused]
    var_kw = any(p.kind == kinds.VAR_KEYWORD for p in params)
    used = rest[:len(slots)]
    return used, keywords, [] if var_kw else rest[len(slots):], slots[:len(used)]
