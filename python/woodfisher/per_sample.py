"""How one chunk's gradients are formed: ``vmap``, expanded weights, or one backward per group.

Every function takes ``group_loss(sub, args, kwargs, target) -> scalar`` (the mean loss of the
samples given, with ``sub`` = {key: pruned Parameter} substituted into the model) and returns
{key: (G, *shape)}, the gradient of each of the chunk's G groups:

- :func:`vmap_grads`: ``fisher_batch_size=1``, exact per-sample gradients with ``torch.func``
  (``functional_call`` + ``vmap`` + ``grad``) over the whole chunk in one call (recurrent layers called
  without an initial state get batched zeros: :func:`batched_rnn_states`);
- :func:`expanded_grads`: the same numbers from torch's expanded weights
  (``torch.nn.utils._expanded_weights``): one batched forward and backward whose linear / conv
  weight gradients are formed per sample from the saved inputs and output gradients, instead of
  ``vmap``'s batched operators (``per_sample="expanded"``, ``PruneConfig.per_sample_grads``;
  ``"vmap"`` stays the default until a GPU has timed both; tests/test_gradients_expanded.py). It
  applies where :func:`expandable` says so, and a weight read by an operator it has no rule for
  (``nn.MultiheadAttention``'s ``in_proj_weight``) raises, so the caller uses ``vmap``;
- :func:`loop_grads`: one plain batched backward per group (``fisher_batch_size > 1``: a group is
  a mini-batch, which autograd reduces at full speed; and the fallback for models or losses that
  ``vmap`` cannot trace, with :func:`warn_vmap_fallback` once).

A model whose BatchNorm layers normalize with the statistics of the batch even in eval mode
(``track_running_stats=False``) has no per-sample gradients: one sample's loss depends on the other samples of
its batch, and ``vmap`` over single samples gives other numbers than any batched pass
(:func:`check_batch_statistics` refuses it for ``fisher_batch_size=1``).

Kernels dispatched for ResNet-20's 256 per-sample gradients (``benchmarks/step_ops.py``, one chunk): the batched
forward+backward 151, ``vmap`` 209 (BatchNorm as a per-channel multiply and add: :mod:`woodfisher.vmap_modules`;
the default cross-entropy as ``log_softmax`` + ``gather``: :func:`woodfisher.losses.default_loss`),
expanded weights 442.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch.func import grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import _pytree as pytree

from .batches import Batch
from .chunking import plain_size
from .diagnostics import warn_at_caller
from .vmap_modules import batched_rnn_states, no_mha_fast_path, time_major_guard

__all__ = ["PER_SAMPLE_PATHS", "vmap_grads", "batched_rnn_states", "time_major_guard", "expanded_grads",
           "expandable", "loop_grads", "warn_vmap_fallback", "batch_statistics_layers", "check_batch_statistics"]

#: How per-sample gradients (``fisher_batch_size=1``) are formed: ``torch.func.vmap`` or torch's expanded weights.
PER_SAMPLE_PATHS = ("vmap", "expanded")

Grads = Dict[str, torch.Tensor]


def vmap_grads(group_loss: Callable, sub: Grads, flat: Batch) -> Grads:
    """{key: (n, *shape)} per-sample gradients of the chunk's n samples, one ``vmap`` call (raises what ``vmap``
    raises on a model or loss it cannot trace)."""
    count = flat.size
    groups = flat.map_batched(lambda x: x.reshape(count, 1, *x.shape[1:]))
    dims = pytree.tree_map(lambda f: 0 if f else None, groups.batched())
    # the math attention kernel has vmap batching rules (flash / efficient SDPA fall back to a
    # per-sample loop under vmap, with a warning): same gradients, batched
    with sdpa_kernel([SDPBackend.MATH]), no_mha_fast_path(), warnings.catch_warnings():
        # torch's note that an operator without a batching rule runs per sample ("file us an issue"): the
        # gradients are right, and the caller cannot act on it (it named torch internals from our call)
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented "
                                "the batching rule")
        return vmap(grad(group_loss), in_dims=(None, *dims), randomness="different")(
            sub, groups.args, groups.kwargs, groups.target)


def expandable(flat: Batch, loss_fn) -> bool:
    """Expanded weights undo a mean over the chunk's samples: right for the default loss (``loss_fn`` None) on
    one label per sample (plain batch, 1-D target), not for a token-level mean whose counts differ between
    samples."""
    t = flat.target
    return loss_fn is None and plain_size(flat) is not None and isinstance(t, torch.Tensor) and t.dim() == 1


def expanded_grads(group_loss: Callable, sub: Grads, flat: Batch) -> Grads:
    """{key: (n, *shape)} per-sample gradients of the chunk's n samples by expanded weights (one batched
    forward + backward; the loss is the mean over the chunk, which the expanded weights undo)."""
    from torch.nn.utils._expanded_weights import ExpandedWeight
    leaves = {k: v.detach().requires_grad_(True) for k, v in sub.items()}
    expanded = {k: ExpandedWeight(v, flat.size, "mean") for k, v in leaves.items()}
    with torch.enable_grad():
        group_loss(expanded, flat.args, flat.kwargs, flat.target).backward()
    out = {}
    for k, v in leaves.items():
        g = getattr(v, "grad_sample", None)
        out[k] = torch.zeros(flat.size, *v.shape, dtype=v.dtype, device=v.device) if g is None else g
    return out


def loop_grads(group_loss: Callable, sub: Grads, keys: List[str], flat: Batch, fisher_batch_size: int,
               tick: Optional[Callable[[int], None]] = None) -> Grads:
    """{key: (G, *shape)}: one batched backward per group of ``fisher_batch_size`` samples, each written into the
    chunk's buffer (a weight the loss never reaches keeps its zeros); ``tick(1)`` after each group (progress)."""
    count = flat.size // fisher_batch_size
    out = {k: sub[k].new_zeros((count, *sub[k].shape)) for k in keys}
    for g in range(count):
        one = flat.take(g * fisher_batch_size, (g + 1) * fisher_batch_size)
        s = {k: v.detach().requires_grad_(True) for k, v in sub.items()}
        with torch.enable_grad():
            gs = torch.autograd.grad(group_loss(s, one.args, one.kwargs, one.target), [s[k] for k in keys],
                                     allow_unused=True)
        for k, gk in zip(keys, gs):
            if gk is not None:
                out[k][g].copy_(gk)
        del gs
        if tick is not None:
            tick(1)
    return out


def warn_vmap_fallback(err: Exception, model: nn.Module) -> None:
    """Say once, at the caller's line, that ``vmap`` could not run ``model`` (``err``) and why it usually is."""
    text = str(err).strip()
    reason = text.splitlines()[0].split(". ")[0][:200] if text else ""  # its first sentence
    hf = type(model).__module__.startswith("transformers.")
    eager = getattr(getattr(model, "config", None), "_attn_implementation", None) == "eager"
    warn_at_caller(f"per-sample gradients: torch.func.vmap cannot run the model or the loss "
                   f"({type(err).__name__}: {reason}), so they are computed one sample at a "
                   "time (the same values, slower); the usual causes are data-dependent Python "
                   "control flow (.item(), `if` on a tensor value) and in-place writes into tensors created in "
                   "forward or loss_fn" + (
                       "" if not hf else "; a HuggingFace model's padding-mask checks are one: load it with "
                       "attn_implementation='eager' to keep the batched path" if not eager else
                       "; a HuggingFace encoder's padding-mask check is one even with eager attention "
                       "(BERT): only batches without an attention_mask stay batched"))


def batch_statistics_layers(model: nn.Module) -> List[str]:
    """Names of the BatchNorm layers of ``model`` that normalize with the statistics of the batch in eval mode too
    (``track_running_stats=False``: no running statistics)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)
            and (module.running_mean is None or module.running_var is None)]


def check_batch_statistics(model: nn.Module, fisher_batch_size: int, alternative: Optional[str] = None) -> None:
    """ValueError naming the layers when per-sample gradients (``fisher_batch_size=1``) of ``model`` are undefined:
    a BatchNorm without running statistics couples the samples of a batch, so a sample's gradient depends on
    which samples share its batch (alone, a BatchNorm1d cannot even run: one value per channel). With
    ``fisher_batch_size`` = g > 1 each gradient is that of a group's mean loss, normalized with the group's batch
    statistics, as in training at batch size g (well defined). ``alternative``: what the message offers besides
    running statistics (default: ``fisher_batch_size`` = the training batch size)."""
    layers = batch_statistics_layers(model)
    if layers and fisher_batch_size == 1:
        alternative = alternative or ("pass fisher_batch_size=<your training batch size> (each gradient is then a "
                                      "group's, normalized with the group's statistics, as in training)")
        raise ValueError(f"model: the BatchNorm layers {layers[:4]}{' and more' if len(layers) > 4 else ''} have no "
                         "running statistics (track_running_stats=False) and normalize every batch with its own "
                         "statistics, in eval mode too, so one sample's loss depends on the other samples of its "
                         "batch and per-sample gradients (fisher_batch_size=1) are undefined; give them running "
                         f"statistics (track_running_stats=True, then forward passes in train mode over the data), or "
                         f"{alternative}")
