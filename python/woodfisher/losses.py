"""The loss of a batch: the model's own, the caller's ``loss_fn``, or the default cross-entropy.

:func:`compute_loss` is the one rule: the model's own ``outputs.loss`` when it computed one
(HuggingFace models given ``labels``) and no ``loss_fn`` is passed, else ``loss_fn(predictions,
target)`` with ``predictions = logits_of(outputs)``. The default loss (:func:`default_loss`) is
the mean cross-entropy over the class dimension (the last one for sequence outputs (N, T, V) with
targets (N, T); dimension 1 otherwise), which is also right for log-probability outputs since
log_softmax is idempotent. Data it does not fit (regression targets, a single output) is refused
with a ValueError naming ``loss_fn``, never turned into a zero or meaningless Fisher.
"""
from __future__ import annotations

import collections.abc
import functools
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .diagnostics import warn_at_caller

__all__ = ["ADAPTER_HINT", "find_logits", "logits_of", "default_loss", "check_probabilities", "model_loss",
           "compute_loss", "sample_targets", "check_loss_fn", "warn_loss_beyond_outputs",
           "whole_outputs"]

ADAPTER_HINT = ("pass batch_adapter=lambda b: woodfisher.Batch(args=(inputs,), kwargs={}, target=targets) "
                "to say which part is which")


def _field(outputs: Any, name: str) -> Optional[torch.Tensor]:
    """The tensor ``name`` of structured outputs (dict / ModelOutput key, namedtuple / dataclass field or any
    other object's attribute), or None when there is none."""
    if isinstance(outputs, torch.Tensor):
        return None
    if isinstance(outputs, collections.abc.Mapping):
        value = outputs.get(name)
    elif isinstance(outputs, (tuple, list)) and name not in getattr(outputs, "_fields", ()):
        value = None  # a plain tuple / list has no names (a namedtuple's are its _fields)
    else:
        value = getattr(outputs, name, None)
    return value if isinstance(value, torch.Tensor) else None


def find_logits(outputs: Any) -> Optional[torch.Tensor]:
    """The prediction tensor of a model's outputs, or None when they hold none the pruner can name.

    Args:
        outputs: what the model returned: a tensor; a dict / ModelOutput, namedtuple, dataclass or other
            object with a ``logits`` tensor (taken by name wherever it is); or a tuple / list whose first
            entry is a tensor (timm / torchvision style ``(logits, aux...)``).
    Returns:
        the predictions tensor, or None.
    """
    if isinstance(outputs, torch.Tensor):
        return outputs
    named = _field(outputs, "logits")
    if named is not None:
        return named
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    return None


def logits_of(outputs: Any) -> torch.Tensor:
    """The prediction tensor of a model's outputs (:func:`find_logits`).

    Raises:
        ValueError: outputs without a tensor, a ``logits`` field or a tensor first entry.
    """
    found = find_logits(outputs)
    if found is None:
        raise ValueError(f"cannot find the predictions in the model's outputs ({type(outputs).__name__}); "
                         "return a tensor, a tuple whose first entry is the predictions, or a dict / ModelOutput / "
                         "namedtuple / dataclass with a 'logits' field; or pass loss_fn, which then receives the "
                         "outputs as the model returned them")
    return found


def default_loss(outputs: torch.Tensor, target: torch.Tensor, gathered: bool = False) -> torch.Tensor:
    """Mean cross-entropy; class dim last for (N, T, V) outputs with (N, T) targets, else dim 1.

    Outputs whose two readings both fit (``(N, T, T)`` with ``(N, T)`` class targets: T classes, or T
    steps of a Conv1d's ``(N, C, T)``) are refused: a loader of variable lengths would switch between them.

    Args:
        outputs: logits or log-probabilities, (N, C) or (N, C, d1, ...) or (N, T, V).
        target: class indices (N,) / (N, d1, ...) / (N, T) of any integer dtype, or class probabilities of the
            outputs' shape.
        gathered: for class indices, the same loss written as ``log_softmax`` + ``gather``
            (:func:`_gathered_cross_entropy`): the form for per-sample gradients under ``vmap``, whose batching rule
            for ``nll_loss`` dispatches 26 operators per call against 17 (a batched pass is faster with
            ``nll_loss``'s fused kernel).
    Returns:
        scalar loss (mean over samples / positions).
    Raises:
        ValueError: naming ``loss_fn``, for outputs the default cross-entropy does not fit or fits two ways.
    """
    if not target.is_floating_point() and target.dtype not in (torch.int64, torch.uint8):
        target = target.long()  # int32 / int16 class indices (numpy's default on some platforms) as cross_entropy takes
    last = not target.is_floating_point() and outputs.dim() == target.dim() + 1 and outputs.dim() > 2 \
        and outputs.shape[:-1] == target.shape
    if last and outputs.shape[2:] == target.shape[1:]:  # (N, T, T) with (N, T): both readings fit
        raise ValueError(f"loss_fn: the outputs {tuple(outputs.shape)} and class targets {tuple(target.shape)} fit "
                         "the default cross-entropy with the classes on the last dim (a sequence model's (N, T, V) "
                         "logits) and on dim 1 (PyTorch's (N, C, T): a Conv1d's output) alike, and the pruner does "
                         "not guess; pass loss_fn=lambda out, y: torch.nn.functional.cross_entropy(out.flatten(0, -2), "
                         "y.flatten()) for the first or loss_fn=torch.nn.functional.cross_entropy for the second")
    _check_cross_entropy_shapes(outputs, target, -1 if last else 1)
    if last:
        outputs, target = outputs.reshape(-1, outputs.shape[-1]), target.reshape(-1)
    if gathered and not target.is_floating_point():
        return _gathered_cross_entropy(outputs, target)
    return F.cross_entropy(outputs, target)


def _gathered_cross_entropy(outputs: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``F.cross_entropy(outputs, target)`` (class dim 1, class-index targets; the mean over the targets that are not
    ``ignore_index``, NaN when all are) as ``-sum(log_softmax(outputs)[target] * valid) / sum(valid)``."""
    valid = target != ignore_index
    index = torch.where(valid, target, 0)
    if index.dtype != torch.int64:
        index = index.long()
    picked = F.log_softmax(outputs, 1).gather(1, index.unsqueeze(1)).squeeze(1)
    return -(picked * valid).sum() / valid.sum()


#: how a loss other than the default cross-entropy is passed, for messages
_LOSS_HINT = ("pass loss_fn=(your loss), e.g. loss_fn=torch.nn.functional.mse_loss for a regression or "
              "torch.nn.functional.binary_cross_entropy_with_logits for one logit per sample")


def _check_cross_entropy_shapes(outputs: torch.Tensor, target: torch.Tensor, class_dim: int) -> None:
    """Refuse outputs / targets the default cross-entropy does not fit (shapes only: runs under ``vmap``).

    Cross-entropy over one class is 0 whatever the weights (every gradient would be zero), and
    floating targets are class probabilities of the outputs' shape.
    """
    if outputs.dim() == 1 and outputs.numel() >= 2 and not target.is_floating_point() and target.dim() == 1 \
            and target.numel() == 1:  # one sample's logits without the batch dim
        raise ValueError(f"model: on a batch of one sample it returns outputs of shape {tuple(outputs.shape)}, "
                         f"without the batch dimension (a .squeeze() in forward?), while the target has shape "
                         f"{tuple(target.shape)}; per-sample gradients call the model on one sample at a time: "
                         "squeeze only the dims meant (x.flatten(1), or x.squeeze(-1).squeeze(-1))")
    if outputs.dim() < 2 or outputs.shape[class_dim] < 2:
        raise ValueError(f"loss_fn: the default loss is cross-entropy over the class dim, but the outputs have "
                         f"shape {tuple(outputs.shape)} (fewer than 2 classes: the loss would be 0 and every "
                         f"gradient zero); {_LOSS_HINT}")
    if target.is_floating_point() and target.shape != outputs.shape:
        raise ValueError(f"loss_fn: the default loss is cross-entropy; floating-point targets must be class "
                         f"probabilities of the outputs' shape {tuple(outputs.shape)}, got {tuple(target.shape)}; "
                         f"{_LOSS_HINT}")


def check_probabilities(target: Any) -> None:
    """Floating-point targets of the default cross-entropy must be class probabilities (not under ``vmap``).

    Args:
        target: a batch's target; integer class indices and non-tensors pass.
    Raises:
        ValueError: naming ``loss_fn``, for floating targets with fewer than 2 dims, a negative entry, or
            a row along dim 1 (the class dim) that does not sum to 1 (within 1e-2); sequence probabilities
            over the last dim get the ``loss_fn`` that reads them so.
    """
    if not isinstance(target, torch.Tensor) or not target.is_floating_point():
        return
    def sums_to_one(dim: int) -> bool:
        sums = target.double().sum(dim)
        return bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-2))

    if target.dim() < 2 or bool((target < 0).any()) or not sums_to_one(1):
        if target.dim() > 2 and not bool((target < 0).any()) and sums_to_one(-1):
            raise ValueError(f"loss_fn: the targets of shape {tuple(target.shape)} are probabilities over the last "
                             "dim, but the default cross-entropy of floating targets takes the classes on dim 1 "
                             "(as torch.nn.functional.cross_entropy); pass loss_fn=lambda out, p: "
                             "torch.nn.functional.cross_entropy(out.flatten(0, -2), p.flatten(0, -2))")
        sums = target.double().sum(1) if target.dim() >= 2 else None
        got = "fewer than 2 dims" if sums is None else \
            f"entries in [{float(target.min()):.3g}, {float(target.max()):.3g}], sums over dim 1 in " \
            f"[{float(sums.min()):.3g}, {float(sums.max()):.3g}]"
        raise ValueError(f"loss_fn: the targets are floating point of shape {tuple(target.shape)} but not class "
                         f"probabilities ({got}), and the default loss is cross-entropy; {_LOSS_HINT}")


def model_loss(outputs: Any) -> Optional[torch.Tensor]:
    """The loss a model returned itself (dict / ModelOutput ``loss``, e.g. HF with ``labels``), or None; not read
    from other outputs (a dataclass's ``loss`` may be an auxiliary term, not the loss to differentiate)."""
    return _field(outputs, "loss") if isinstance(outputs, collections.abc.Mapping) else None


#: dict keys that look like a target under another name than HuggingFace's ``labels``
class LossFnError(ValueError):
    """A ``loss_fn`` that returned something other than the scalar loss: the argument at fault is ``loss_fn``,
    not the loader's data, so :func:`woodfisher.batches.loader_errors` lets it through as it is."""


def compute_loss(outputs: Any, target: Any, loss_fn: Optional[Callable], gathered: bool = False) -> torch.Tensor:
    """The scalar loss of one batch.

    Without ``loss_fn``: the model's own ``outputs.loss`` when it computed one (HF models
    given ``labels``: shifted for causal LMs, as the model defines it), else
    :func:`default_loss` (predictions, target). With ``loss_fn``: ``loss_fn(predictions,
    target)``. The predictions are the outputs' ``logits`` (:func:`find_logits`); ``loss_fn`` gets the
    outputs as the model returned them when they hold no such tensor (e.g. torchvision's ``{"out", "aux"}``)
    or is marked by :func:`whole_outputs`. ``gathered``: see :func:`default_loss` (per-sample gradients under ``vmap``).

    Raises:
        ValueError: no target and no model loss (unlabelled data needs ``sampled_fisher``); a ``loss_fn`` result
            that is not a scalar (one entry) (:class:`LossFnError`, naming ``loss_fn``).
    """
    own = model_loss(outputs) if loss_fn is None else None
    if own is not None:
        return own
    if target is None:
        raise ValueError("the batch has no targets and the model returned no loss: yield (inputs, targets) "
                         "batches, include 'labels' in dict batches, pass sampled_fisher=True to draw "
                         f"targets from the model, or {ADAPTER_HINT}")
    if loss_fn is None:
        loss = default_loss(logits_of(outputs), target, gathered)
    else:
        given = loss_input(outputs, loss_fn)
        try:
            loss = loss_fn(given, target)
        except Exception as err:
            if given is not outputs and hasattr(err, "add_note"):  # the caller may expect the whole outputs
                err.add_note(f"loss_fn received the predictions only (a {tuple(given.shape)} tensor taken from "
                             f"the model's {type(outputs).__name__}: its 'logits' or first entry); pass "
                             "loss_fn=woodfisher.losses.whole_outputs(loss_fn) to receive the outputs as returned")
            raise
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise LossFnError(f"loss_fn must return the mean loss as a scalar tensor, got {shape} "
                         "(reduction='none'? use the mean)")
    return loss.reshape(())  # a one-entry (1,) loss is the scalar (torch.func.grad takes scalars only)


def loss_input(outputs: Any, loss_fn: Callable) -> Any:
    """What ``loss_fn`` receives: the predictions (:func:`find_logits`), or the outputs as returned when they hold
    none or ``loss_fn`` is marked by :func:`whole_outputs`."""
    found = None if getattr(loss_fn, "whole_outputs", False) else find_logits(outputs)
    return outputs if found is None else found


def whole_outputs(loss_fn: Callable) -> Callable:
    """Mark ``loss_fn`` to receive the model's outputs as returned.

    By default a ``loss_fn`` receives the predictions (:func:`find_logits`: a tuple's first entry, a dict's /
    ModelOutput's ``logits``). A loss that needs the rest -- an auxiliary head ``(logits, aux)``, deep
    supervision, a dict of several heads -- is wrapped with this; everything else is unchanged (per-sample
    gradients, K-FAC, held-out losses).

    Args:
        loss_fn: ``loss_fn(outputs, target) -> scalar loss``, outputs as the model's forward returns them.
    Returns:
        A callable computing the same as ``loss_fn``, marked with ``whole_outputs = True``.
    Raises:
        ValueError: ``loss_fn`` not callable.
    """
    check_loss_fn(loss_fn)
    if loss_fn is None:
        raise ValueError("loss_fn must be callable(outputs, targets), got None")

    def wrapped(outputs, target):
        return loss_fn(outputs, target)
    if hasattr(loss_fn, "__name__"):  # reports name the caller's loss
        functools.update_wrapper(wrapped, loss_fn)
    else:  # e.g. an nn.CrossEntropyLoss instance
        wrapped.__name__ = wrapped.__qualname__ = type(loss_fn).__name__
    wrapped.whole_outputs = True
    return wrapped


def sample_targets(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Class indices drawn from ``softmax(logits)`` over the last dim: (..., K) -> (...) int64.

    Classification outputs (N, K) give (N,); sequence outputs (N, T, V) give (N, T). The
    draw runs on the CPU generator (reproducible across devices) in float64.
    """
    probs = torch.softmax(logits.detach().double(), dim=-1).cpu()
    flat = probs.reshape(-1, probs.shape[-1])
    labels = torch.multinomial(flat, 1, generator=generator).squeeze(1)
    return labels.reshape(probs.shape[:-1]).to(logits.device)


def check_loss_fn(loss_fn: Any) -> None:
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError("loss_fn must be callable(outputs, targets) or None")


def warn_loss_beyond_outputs(forward: Callable[[Any], Any], loss_fn: Callable, batch: Any) -> None:
    """Warn when ``loss_fn`` reaches tensors that require grad other than the model's outputs.

    The Fisher's per-sample gradients are taken through the outputs only (``torch.func`` on the
    pruned weights), so a term of ``loss_fn`` that reads the model's parameters itself (a weight
    regulariser ``lam * sum(p ** 2 for p in model.parameters())``) is left out of them, as it is of
    the empirical Fisher (the Hessian of an L2 term, ``2 lam I``, adds to the damp instead). This
    runs the model once without gradients on ``batch`` and the loss with them: a loss that still
    requires grad reached such a tensor.

    Args:
        forward: batch -> the model's outputs (called under ``torch.no_grad()``).
        loss_fn: the caller's ``loss_fn(outputs, target)``.
        batch: a :class:`woodfisher.Batch` (one group of samples is enough).
    """
    with torch.no_grad():
        out = forward(batch)
    with torch.enable_grad():
        loss = loss_fn(loss_input(out, loss_fn), batch.target)
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        warn_at_caller("loss_fn depends on tensors that require grad besides the model's outputs (a weight "
                       "regulariser reading model.parameters()?): the Fisher's per-sample gradients are taken "
                       "through the outputs only, so that term is left out of the Fisher (an L2 term's curvature "
                       "2*lam*I acts like the damp: add it to damp=...); return the data loss only to silence this")
