"""What is pruned: parameters (not modules), each once, and how each is cut into Fisher blocks.

A :class:`PruneTarget` is one weight Parameter, named as the caller's model names it. By
default the targets are the ``weight`` of every ``nn.Linear`` / ``nn.Conv{1,2,3}d``, of
HuggingFace's ``Conv1D`` (GPT-2; weight stored ``(in, out)``) and the input projections
of ``nn.MultiheadAttention`` (``in_proj_weight``, or ``q/k/v_proj_weight``), which that
module reads without calling a submodule. ``modules=`` accepts parameter names
(``"attn.in_proj_weight"``, any name of a tied Parameter), names of modules with a
``weight`` (meaning that weight, e.g. an ``nn.Embedding`` named on purpose) and names of
any other module (meaning the default targets inside it: ``"encoder.layers.0"``, or an
``nn.MultiheadAttention``'s projections), and shell-style patterns (``fnmatch``: ``*``, ``?``,
``[...]``; ``"blocks.*.mlp.*"``, ``"*.attn"``) over full names, meaning the default targets whose
name, or the name of a module holding them, matches. Biases and normalisation layers are never
pruned by default.

Rules (one place for all of them, the pruner, pruning at initialisation and reports):

- a Parameter shared by several modules (tied weights) is one target, under the first
  name ``named_parameters()`` gives it; sparsity is counted over unique tensors;
- a default target that is also held by an ``nn.Embedding`` (a tied LM head) is left out
  unless the caller names it;
- wrappers (``nn.DataParallel``, ``DistributedDataParallel``, ``torch.compile``, an FSDP root
  inside :func:`woodfisher.distributed.full_parameters`) are seen through: the pruner works
  on the wrapped module and reports names with the wrapper's prefix (``"module.fc1.weight"``),
  as the caller's ``named_parameters()`` names them;
- reparametrised weights are pruned in their real storage: ``torch.nn.utils.prune``
  (``weight_orig`` + ``weight_mask``) and ``torch.nn.utils.parametrize`` with a mask
  (``torch.ao.pruning``'s ``FakeSparsity``); targets keep the logical name ``"<m>.weight"``.

Blocks: see :mod:`woodfisher.layout` (canonical (out, in, ...) order, HF ``Conv1D`` transposed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from .layout import BlockLayout, Layout
from .masks import is_int
from .model_entries import (
    PRUNABLE_TYPES,
    WRAPPER_PREFIXES,
    default_target_names,
    is_hf_conv1d,
    mask_reparam_ok,
    own_forward,
    param_entries,
    strip_wrapper_prefixes,
    unwrap_model,
    weight_kind,
)
from .no_targets import no_targets_error
from .target_lookup import lookup_names, remove_excluded
from .weight_transform import base_type

__all__ = ["PRUNABLE_TYPES", "BlockLayout", "Layout", "PruneTarget", "resolve_targets", "unwrap_model",
           "default_target_names", "check_model", "WRAPPER_PREFIXES", "strip_wrapper_prefixes",
           "own_forward", "is_hf_conv1d", "check_module"]


@dataclass
class PruneTarget(BlockLayout):
    """One pruned weight.

    Attributes:
        name: the caller's name of the weight, e.g. ``"fc1.weight"``, ``"module.fc1.weight"``
            (wrapped), ``"attn.in_proj_weight"``; keys of masks and reports.
        key: its key in the unwrapped model's ``named_parameters()`` (``"fc1.weight_orig"``
            under torch.nn.utils.prune), for ``torch.func.functional_call``.
        module: the module that owns the attribute; ``attr``: its attribute name (``"weight"``).
        kind: ``"linear"`` (``(out, in)``, also raw MHA projections), ``"conv"``,
            ``"conv1d_hf"`` (``(in, out)`` storage).
        block_size: ``c``, entries per Fisher block (``numel`` for a whole-layer block).
        reparam: ``None``, ``"prune"`` (torch.nn.utils.prune) or ``"parametrize"``.
        owners: names of every module that holds this Parameter (several when tied).
        holders: (module, logical attribute) of every module that holds it (masks of
            tied weights are kept on each of them).
        channels_last: blocks in (out, *kernel, in) order (conv weights under an N:M pattern,
            see :mod:`woodfisher.layout`).
    """

    name: str
    key: str
    module: nn.Module
    attr: str
    kind: str
    block_size: int
    reparam: Optional[str] = None
    owners: Tuple[str, ...] = ()
    holders: Tuple[Tuple[nn.Module, str], ...] = ()
    channels_last: bool = False

    @property
    def param_name(self) -> str:
        """Alias of :attr:`name` (the key of masks)."""
        return self.name

    @property
    def label(self) -> str:
        """Short name for messages: the module name for ``<module>.weight``, else the parameter name."""
        return self.name[: -len(".weight")] if self.name.endswith(".weight") else self.name

    @property
    def reparametrised(self) -> bool:
        return self.reparam is not None

    @property
    def param(self) -> torch.Tensor:
        """The Parameter that stores the weight (``weight_orig`` / ``original`` when reparametrised)."""
        if self.reparam == "prune":
            return getattr(self.module, self.attr + "_orig")
        if self.reparam == "parametrize":
            return self.module.parametrizations[self.attr].original
        return getattr(self.module, self.attr)

    def _holders(self) -> Tuple[Tuple[nn.Module, str], ...]:
        return self.holders or ((self.module, self.attr),)

    def _mask_buffers(self) -> List[torch.Tensor]:
        """Every mask applied to the weight: ``<attr>_mask`` / parametrization masks of each holder."""
        masks = []
        for module, attr in self._holders():
            if self.reparam == "prune" and hasattr(module, attr + "_mask"):
                masks.append(getattr(module, attr + "_mask"))
            elif self.reparam == "parametrize" and parametrize.is_parametrized(module, attr):
                masks += [p.mask for p in module.parametrizations[attr]]
        return masks

    def refresh(self) -> None:
        """Recompute the derived ``<attr> = <attr>_orig * <attr>_mask`` of torch.nn.utils.prune holders now
        (their forward pre-hook would do it at the next call; a stale tensor must not be read before)."""
        if self.reparam != "prune":
            return
        with torch.no_grad():
            for module, attr in self._holders():
                if hasattr(module, attr + "_mask"):
                    setattr(module, attr, getattr(module, attr + "_orig") * getattr(module, attr + "_mask"))

    @property
    def shape(self) -> torch.Size:
        return self.param.shape

    def layout(self) -> Layout:
        """The weight's name, shape, kind and block size, without the tensors.

        Returns:
            :class:`Layout` (what a :class:`woodfisher.Curvature` keeps per weight).
        """
        return Layout(self.name, self.shape, self.kind, self.block_size, self.channels_last)

    def effective_weight(self) -> torch.Tensor:
        """The weight the model computes with (storage times every mask).

        Returns:
            Detached tensor of the weight's shape, dtype and device.
        """
        w = self.param.detach()
        for mask in self._mask_buffers():
            w = w * mask
        return w

    def keep_mask(self) -> torch.Tensor:
        """Current keep-mask: ``effective weight != 0`` (exact zeros count as pruned and stay pruned).

        Returns:
            Bool tensor of the weight's shape.
        """
        return self.effective_weight() != 0

    @torch.no_grad()
    def write(self, weight: torch.Tensor, keep: torch.Tensor) -> None:
        """Store new weights (pruned entries forced to exactly 0) and the keep-mask.

        Unchecked (the engine validates before writing).

        Args:
            weight: new values, any shape with the weight's number of entries (cast to its dtype).
            keep: bool keep-mask with the weight's number of entries.
        """
        keep = keep.reshape(self.shape)
        param = self.param
        param.copy_(weight.reshape(self.shape).to(param.dtype) * keep)
        for mask in self._mask_buffers():
            mask.copy_(keep.to(mask.dtype))
        self.refresh()


def check_module(model: nn.Module) -> None:
    """ValueError naming ``model`` unless it is an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        hint = ": prune the nn.Module before torch.export" if type(model).__name__ == "ExportedProgram" else ""
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}{hint}")


def check_model(model: nn.Module) -> None:
    """``model`` must be an ``nn.Module``, not TorchScript, whose parameters and buffers hold data (none on the meta
    device, no uninitialized lazy parameter)."""
    check_module(model)
    if isinstance(unwrap_model(model)[0], torch.jit.ScriptModule):  # functional_call cannot run it
        raise ValueError("model: a TorchScript module (torch.jit.script / torch.jit.trace) cannot be pruned: its "
                         "forward cannot run on other weights (torch.func); prune the nn.Module, then script or "
                         "trace the pruned one")
    if any(cls.__name__ == "_StatefulGraphModule" for cls in type(unwrap_model(model)[0]).__mro__):
        raise ValueError("model: a torch.export module (ExportedProgram.module()) cannot be pruned: it refuses eval() "
                         "and train(); prune the nn.Module, then export the pruned one")
    tensors = (*model.named_parameters(), *model.named_buffers())
    lazy = [n for n, t in tensors if isinstance(t, nn.parameter.UninitializedTensorMixin)]
    if lazy:
        raise ValueError(f"model: {lazy[:4]}{'...' if len(lazy) > 4 else ''} are uninitialized lazy parameters "
                         "(LazyLinear / LazyConv...): run one forward pass on a sample batch first")
    meta = [n for n, t in tensors if t.is_meta]
    if meta:
        raise ValueError(f"model: {meta[:4]}{'...' if len(meta) > 4 else ''} are on the meta device (no data); "
                         "materialise the model first (e.g. model.to_empty(device=...) and load its weights)")


def resolve_targets(model: nn.Module, modules: Optional[Iterable[str]] = None,
                    block_size: Optional[int] = None, arg: str = "modules",
                    channels_last: bool = False, exclude: Optional[Iterable[str]] = None) -> List[PruneTarget]:
    """The pruned weights of ``model``, each once, in registration order.

    Args:
        model: the network (wrappers are seen through, see the module docstring).
        modules: module names (``"fc1"``: its weight; a module without a weight, e.g.
            ``"layer1"`` or an ``nn.MultiheadAttention``: the default targets inside it) or
            parameter names (``"fc1.weight"``, ``"attn.in_proj_weight"``), optionally with
            the wrapper prefix (``"module.fc1"``); None = the default targets.
        block_size: entries per Fisher block (int >= 1), or None for whole-weight blocks; a weight
            smaller than ``block_size`` is one whole-weight block (blocks never span two weights).
        arg: the caller's argument that holds the names, for messages (``"masks"`` for
            :func:`woodfisher.attach_masks`).
        channels_last: lay conv weights out in (out, *kernel, in) order (for N:M patterns:
            :attr:`woodfisher.PruneConfig.channels_last`); other kinds keep theirs.
        exclude: names, module names or shell-style patterns of weights removed from the targets (the default ones,
            or those of ``modules``), read as ``modules`` reads its entries
            (:func:`woodfisher.target_lookup.remove_excluded`); None = none.
    Returns:
        list of :class:`PruneTarget`.
    Raises:
        ValueError: ``model`` not an ``nn.Module`` or on the meta device, unknown name (named), a
            named module without any prunable weight, a named parameter that is not a floating
            tensor of >= 2 dims, a weight of a non-floating dtype, no prunable weight, or a bad
            ``block_size``; an ``exclude`` entry that selects no target, or that leaves none (naming ``exclude``).
    """
    if block_size is not None and (not is_int(block_size) or block_size < 1):
        raise ValueError(f"block_size must be None (whole layers) or an int >= 1, got {block_size!r}")
    block_size = None if block_size is None else int(block_size)
    check_model(model)
    inner, prefix = unwrap_model(model)
    entries = param_entries(inner)
    if modules is None:
        chosen = default_target_names(inner)
    else:
        if isinstance(modules, str):
            modules = [modules]
        chosen = []
        for raw in modules:
            stripped = raw[len(prefix):] if prefix and isinstance(raw, str) and raw.startswith(prefix) else raw
            chosen += [name for name in lookup_names(entries, stripped, inner, arg) if name not in chosen]
    if not chosen:
        raise no_targets_error(entries, inner)
    if exclude is not None:
        chosen = remove_excluded(entries, chosen, [exclude] if isinstance(exclude, str) else exclude, inner, prefix)
    targets = []
    for name in chosen:
        info = entries[name]
        p = info["param"]
        kind = weight_kind(info["module"], info["attr"])
        if kind is None:
            if not p.is_floating_point() or p.dim() < 2:
                raise ValueError(f"{arg}: {name!r} has shape {tuple(p.shape)}; only weights with >= 2 dims "
                                 f"(rows = dim 0) can be pruned")
            kind = "linear" if p.dim() == 2 else "conv"
        if info["attr"] == "weight" and own_forward(info["module"]):
            cls = parametrize.type_before_parametrizations(info["module"])
            raise ValueError(f"{arg}: {name!r} belongs to a {cls.__name__}, a subclass of "
                             f"{base_type(info['module'], PRUNABLE_TYPES).__name__} whose forward computes with a "
                             "transform of the weight, not the weight itself (weight standardization as in timm's "
                             "StdConv2d: a standardized zero is no zero; QAT fake quantization), so it cannot be "
                             "pruned; prune the plain layer (for QAT: before torch.ao.quantization.prepare_qat) or "
                             "fold the transform into the weight first")
        if not mask_reparam_ok(info):
            raise ValueError(f"{arg}: {name!r} is reparametrised by torch.nn.utils.parametrize without a "
                             "'mask' (only mask parametrizations such as torch.ao.pruning's FakeSparsity can "
                             "be pruned); remove the parametrization first")
        if not p.is_floating_point():
            raise ValueError(f"model: weight {prefix + name!r} has dtype {p.dtype}; only floating-point weights "
                             "(float16, bfloat16, float32, float64) can be pruned")
        c = p.numel() if block_size is None else min(block_size, p.numel())
        targets.append(PruneTarget(prefix + name, info["key"], info["module"], info["attr"], kind, c,
                                   info["reparam"], tuple(prefix + n for n, _ in info["owners"]),
                                   tuple(info["holders"]), channels_last and kind == "conv"))
    return targets
