"""Activation checkpointing switched off while gradients for the Fisher are collected.

A model that calls ``torch.utils.checkpoint.checkpoint`` inside its forward (``use_reentrant=True`` or ``False``,
``checkpoint_sequential``, HuggingFace's ``model.gradient_checkpointing_enable()``, torch's ``checkpoint_wrapper``)
trades memory for a second forward in the backward. Neither variant runs under :mod:`torch.func`: the reentrant
one is an ``autograd.Function`` without ``setup_context`` and refuses ``torch.autograd.grad`` outright, the
non-reentrant one uses saved-tensor hooks, which ``torch.func.grad`` does not support. So
:class:`woodfisher.GradientCollector` computes each chunk inside :func:`checkpointing_off`: a checkpointed
function is then called as it is (its activations kept, nothing recomputed), and the per-sample gradients take
the batched ``vmap`` path (HuggingFace's input-embedding hook that comes with ``gradient_checkpointing_enable``,
which ``torch.func`` refuses, is lifted too). The numbers are those of the model without checkpointing
(checkpointing changes no value).

Memory: the activations of a chunk's samples are all held during its backward (none recomputed). They were
never part of the memory plan (:func:`woodfisher.plan_memory` counts gradients and inverses); the chunk is sized
by its gradients' memory and halved when it runs out of memory (:mod:`woodfisher.gradients`), so a model that
fits one sample's activations without checkpointing is served; one that does not raises the allocator's error.

Scope: the switch replaces the two entry points of ``torch.utils.checkpoint`` that its ``checkpoint`` function
looks up when called (so ``from torch.utils.checkpoint import checkpoint`` in the caller's code is covered too),
for the duration of one chunk's computation, in every thread of the process; outside it, checkpointing works as
before. On a torch without those entry points it does nothing (the per-sample loop then serves such a model), and
checkpointing of other libraries (DeepSpeed's, fairscale's) is not switched off: the loop (or its own error) serves
those.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch.utils.checkpoint as _checkpoint
from torch import nn

__all__ = ["checkpointing_off"]

_ENTRY_POINTS = ("CheckpointFunction", "_checkpoint_without_reentrant_generator")


class _CalledAsIs:
    """Stands for ``CheckpointFunction`` (``use_reentrant=True``): ``apply(function, preserve_rng_state, *args)``
    calls ``function(*args)`` once, keeping its activations."""

    @staticmethod
    def apply(function, _preserve_rng_state, *args):
        return function(*args)


def _no_hooks(*_args, **_kwargs) -> Iterator[None]:
    """Stands for the non-reentrant generator: ``checkpoint`` advances it before and after calling the function;
    it sets no saved-tensor hook and keeps nothing for a recomputation."""
    yield


@contextlib.contextmanager
def checkpointing_off(model: Optional[nn.Module] = None) -> Iterator[None]:
    """Context: ``torch.utils.checkpoint.checkpoint`` (both variants) calls the checkpointed function as it is, and
    the HuggingFace models inside ``model`` lose their input-embedding hooks (:func:`_input_grad_hooks_off`).

    Args:
        model: the network whose HuggingFace input-gradient hooks are lifted (None: none).
    Yields:
        None; the entry points and hooks are restored at the exit (also on an error; nested uses restore in order).
    """
    with _input_grad_hooks_off(model):
        if not all(hasattr(_checkpoint, name) for name in _ENTRY_POINTS):
            yield
            return
        saved = [getattr(_checkpoint, name) for name in _ENTRY_POINTS]
        _checkpoint.CheckpointFunction, _checkpoint._checkpoint_without_reentrant_generator = _CalledAsIs, _no_hooks
        try:
            yield
        finally:
            for name, value in zip(_ENTRY_POINTS, saved):
                setattr(_checkpoint, name, value)


@contextlib.contextmanager
def _input_grad_hooks_off(model: Optional[nn.Module]) -> Iterator[None]:
    """HuggingFace's ``gradient_checkpointing_enable()`` also calls ``enable_input_require_grads()``: a forward
    hook on the input embeddings calls ``output.requires_grad_(True)`` (so reentrant checkpointing sees an input
    that requires grad), which ``torch.func`` refuses inside a transform. Without checkpointing it serves nothing:
    lifted with ``disable_input_require_grads()``, put back with ``enable_input_require_grads()``."""
    hooked = [] if model is None else [
        m for m in model.modules()
        if hasattr(m, "disable_input_require_grads") and hasattr(m, "enable_input_require_grads")
        and (getattr(m, "_require_grads_hooks", None) or getattr(m, "_require_grads_hook", None) is not None)]
    for module in hooked:
        module.disable_input_require_grads()
    try:
        yield
    finally:
        for module in hooked:
            module.enable_input_require_grads()
