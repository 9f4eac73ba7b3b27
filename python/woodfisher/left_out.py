"""What a default call (``modules=None``) says about the model's weights it treats specially: weights it leaves out
(recurrent and transposed-convolution layers, pruned only when named; weights recomputed on every forward by
weight_norm / spectral_norm, never pruned) and frozen weights it prunes beside trainable ones (a frozen backbone).
One warning each, at the caller's line; the selection itself is :func:`woodfisher.targets.default_target_names`.
"""
from __future__ import annotations

from typing import Iterable, List, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from .diagnostics import warn_at_caller
from .model_entries import default_target_names, join_name, own_forward, param_entries, unwrap_model, weight_kind

__all__ = ["warn_left_out"]


def warn_left_out(model: nn.Module, modules: Optional[Iterable[str]]) -> None:
    """Warn at the caller's line when the default targets (``modules`` None) leave out weights of the model: those
    of recurrent layers (``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``), transposed convolutions (``nn.ConvTranspose*``) and
    custom layers holding a ``weight`` of >= 2 dims, pruned only when named, and Linear / Conv weights
    recomputed from other parameters on every forward (weight_norm / spectral_norm, as hooks or parametrizations),
    and weights of Linear / Conv subclasses whose forward transforms them (:func:`woodfisher.targets.own_forward`),
    which are not pruned at all."""
    if modules is not None:
        return
    inner, prefix = unwrap_model(model)
    left = {name: (kind, mod) for name, mod in inner.named_modules() if (kind := _left_kind(mod)) is not None}
    if left:
        name, (_, mod) = next(iter(left.items()))
        example = prefix + join_name(name, next(k for k, p in mod.named_parameters(recurse=False) if p.dim() >= 2))
        layers = [f"{prefix}{n} ({type(m).__name__})" for n, (_, m) in left.items()][:4]
        kinds = " / ".join(dict.fromkeys(kind for kind, _ in left.values()))
        warn_at_caller(f"the weights of the {kinds} layers {layers}{' and more' if len(left) > 4 else ''} are not "
                       "pruned by default (Linear / Conv / attention projection weights are), and the sparsity counts "
                       f"the other weights only; name them to prune them, e.g. modules=[..., {example!r}]")
    chosen = default_target_names(inner)
    _warn_frozen(inner, prefix, chosen)
    chosen = set(chosen)
    derived = [f"{prefix}{join_name(name, 'weight')} ({type(mod).__name__})" for name, mod in inner.named_modules()
               if weight_kind(mod, "weight") is not None and join_name(name, "weight") not in chosen
               and _recomputed(mod)]
    if derived:
        warn_at_caller(f"the weights {derived[:4]}{' and more' if len(derived) > 4 else ''} are not pruned: each is "
                       "recomputed from other parameters on every forward (weight_norm / spectral_norm / orthogonal: a "
                       "parametrization that is not a mask), so zeros "
                       "written to it would not last, and the sparsity counts the other weights only; to prune them, "
                       "remove the reparametrisation first (torch.nn.utils.parametrize.remove_parametrizations("
                       "module, 'weight'), or torch.nn.utils.remove_weight_norm / remove_spectral_norm)")
    _warn_own_forward(inner, prefix)


def _warn_own_forward(inner: nn.Module, prefix: str) -> None:
    """One warning naming the Linear / Conv subclasses whose forward transforms the weight (weight
    standardization; :func:`.own_forward`), which the default targets leave out."""
    own = [f"{prefix}{join_name(name, 'weight')} ({parametrize.type_before_parametrizations(mod).__name__})"
           for name, mod in inner.named_modules() if own_forward(mod) and not _recomputed(mod)]
    if own:
        warn_at_caller(f"the weights {own[:4]}{' and more' if len(own) > 4 else ''} are not pruned: each belongs to a "
                       "subclass of nn.Linear / nn.Conv* whose forward computes with a transform of the weight "
                       "(weight standardization as in timm's StdConv2d, QAT fake quantization), not the weight "
                       "itself; the sparsity counts the other weights only (for QAT: prune the float model before "
                       "torch.ao.quantization.prepare_qat)")


def _left_kind(module: nn.Module) -> Optional[str]:
    """What kind of layer ``module`` is when it holds weights of >= 2 dims that no default target covers: recurrent,
    transposed-convolution, or custom (a module of its own type with a ``weight`` Parameter, e.g. one calling
    ``F.conv2d(x, self.weight)``, or a leaf module holding a Parameter of >= 2 dims under any name); None otherwise
    (embeddings are left out by design, and said so in the docs)."""
    if isinstance(module, nn.RNNBase):
        kind = "recurrent"
    elif isinstance(module, nn.modules.conv._ConvTransposeNd):
        kind = "transposed-convolution"
    elif weight_kind(module, "weight") is None and not isinstance(module, (nn.Embedding, nn.EmbeddingBag,
                                                                       nn.MultiheadAttention)):
        weight = module._parameters.get("weight")
        # a `weight` of its own, or any matrix of a leaf module (`self.w`, `self.kernel`: a layer calling F.linear /
        # F.conv2d on it); matrices of a module with children (a ViT's pos_embed / cls_token) are not layers
        leaf = next(module.children(), None) is None and any(_matrix(p) for p in module._parameters.values())
        kind = "custom" if _matrix(weight) or leaf else None
    else:
        kind = None
    if kind is None or not any(p.dim() >= 2 for p in module.parameters(recurse=False)):
        return None
    return kind


def _matrix(param) -> bool:
    return param is not None and param.is_floating_point() and param.dim() >= 2


def _warn_frozen(inner: nn.Module, prefix: str, chosen: List[str]) -> None:
    """Warn when the default targets mix frozen (``requires_grad=False``) and trainable weights: the frozen ones
    are pruned and OBS-updated like the others, which a caller who froze a backbone rarely means."""
    entries = param_entries(inner)  # logical names: "fc.weight" also under torch.nn.utils.prune ("fc.weight_orig")
    frozen = [prefix + n for n in chosen if not entries[n]["param"].requires_grad]
    trainable = [prefix + n for n in chosen if entries[n]["param"].requires_grad]
    if not frozen or not trainable:  # all frozen (a model frozen for deployment) or none: nothing mixed
        return
    fix = (f"modules={trainable!r}" if len(trainable) <= 4 else
           "modules=[t.name for t in woodfisher.resolve_targets(model) if t.param.requires_grad]")
    warn_at_caller(f"{len(frozen)} of the {len(chosen)} weights pruned by default are frozen (requires_grad=False: "
                   f"{frozen[:3]}{' and more' if len(frozen) > 3 else ''}): they are pruned and their kept entries "
                   f"moved by the OBS update like the trainable ones; to prune the trainable weights only, pass "
                   f"{fix}")


def _recomputed(module: nn.Module) -> bool:
    """Whether ``module.weight`` is computed from other parameters (a non-mask parametrization, or a plain tensor
    that a forward pre-hook writes, as the hook-based weight_norm / spectral_norm do)."""
    if parametrize.is_parametrized(module, "weight"):
        return not all(hasattr(f, "mask") for f in module.parametrizations["weight"])
    return "weight" not in module._parameters and isinstance(getattr(module, "weight", None), torch.Tensor)
