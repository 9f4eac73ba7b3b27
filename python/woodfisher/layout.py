"""Which weights are pruned, and how each is cut into Fisher blocks.

A prunable layer is the ``weight`` of a ``torch.nn.Linear`` or ``Conv{1,2,3}d``
module (biases and normalisation layers are never pruned). Its weight is flattened
row-major (``(out, in)`` or ``(out, in, *kernel)`` -> ``numel``) and cut into blocks of
``c`` consecutive entries with :func:`woodfisher_kernels.to_blocks`; a block never
spans two layers and the zero padding of the last block is never pruned.
``block_size=None`` makes the whole layer one block.

Modules reparametrised by ``torch.nn.utils.prune`` (``weight_orig`` parameter and
``weight_mask`` buffer) are supported: the pruner then reads and writes
``weight_orig`` and the mask buffer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

import woodfisher_kernels as wk

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class PrunableLayer:
    """One prunable weight.

    Attributes:
        name: module name, e.g. ``"fc1"`` or ``"layer1.0.conv1"``.
        module: the module.
        block_size: ``c``, entries per Fisher block (``numel`` for a whole-layer block).
    """

    name: str
    module: nn.Module
    block_size: int

    @property
    def param_name(self) -> str:
        """Name of the pruned weight, ``"<module>.weight"`` (the key of masks)."""
        return f"{self.name}.weight" if self.name else "weight"

    @property
    def reparametrised(self) -> bool:
        """True when torch.nn.utils.prune holds the weight as weight_orig * weight_mask."""
        return hasattr(self.module, "weight_orig") and hasattr(self.module, "weight_mask")

    @property
    def attr(self) -> str:
        return "weight_orig" if self.reparametrised else "weight"

    @property
    def key(self) -> str:
        """Key of the differentiated parameter in ``model.named_parameters()``."""
        return f"{self.name}.{self.attr}" if self.name else self.attr

    @property
    def param(self) -> torch.Tensor:
        return getattr(self.module, self.attr)

    @property
    def shape(self) -> torch.Size:
        return self.param.shape

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def num_blocks(self) -> int:
        return wk.num_blocks(self.numel, self.block_size)

    @property
    def row_length(self) -> int:
        """Entries per output row / filter: ``numel // out``."""
        return self.numel // self.shape[0]

    def effective_weight(self) -> torch.Tensor:
        """The weight the module computes with (orig * mask when reparametrised)."""
        w = self.param.detach()
        return w * self.module.weight_mask if self.reparametrised else w

    def keep_mask(self) -> torch.Tensor:
        """Current keep-mask: the prune buffer if there is one, else ``weight != 0``.

        Entries that are exactly zero count as already pruned: they stay pruned and
        their gradients are masked before the Fisher is built.
        """
        return self.effective_weight() != 0

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Weight-shaped (or flat numel) tensor -> (B, c), zero (False) padded."""
        flat = x.reshape(self.numel)
        if flat.dtype == torch.bool:
            return wk.to_blocks(flat.to(torch.uint8), self.block_size).bool()
        return wk.to_blocks(flat, self.block_size)

    def grad_blocks(self, grads: torch.Tensor) -> torch.Tensor:
        """Gradients (m, numel) -> (B, m, c) contiguous, the layout of the kernel ops."""
        return wk.to_blocks(grads.reshape(grads.shape[0], self.numel), self.block_size) \
            .transpose(0, 1).contiguous()

    def unblock(self, xb: torch.Tensor) -> torch.Tensor:
        """(B, c) -> weight shape, dropping the padding."""
        return wk.from_blocks(xb, self.numel).reshape(self.shape)

    @torch.no_grad()
    def write(self, weight: torch.Tensor, keep: torch.Tensor) -> None:
        """Store new weights (pruned entries forced to exactly 0) and the keep-mask."""
        weight = weight.reshape(self.shape).to(self.param.dtype) * keep.reshape(self.shape)
        self.param.copy_(weight)
        if self.reparametrised:
            self.module.weight_mask.copy_(keep.reshape(self.shape).to(self.module.weight_mask.dtype))
            # torch.nn.utils.prune recomputes .weight in a forward pre-hook; refresh it now too.
            setattr(self.module, "weight", self.param * self.module.weight_mask)


def _check_block_size(block_size) -> Optional[int]:
    if block_size is None:
        return None
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be None (whole layers) or an int >= 1, got {block_size!r}")
    return block_size


def resolve_layers(model: nn.Module, modules: Optional[Iterable[str]] = None,
                   block_size: Optional[int] = None) -> List[PrunableLayer]:
    """The prunable layers of ``model`` in module order.

    Args:
        model: the network.
        modules: module names (``"fc1"``) or weight names (``"fc1.weight"``) to prune;
            None = every Linear / Conv{1,2,3}d weight.
        block_size: entries per Fisher block (>= 1), or None for whole-layer blocks.
    Raises:
        ValueError: unknown module name (named), a named module that is not a
            Linear / Conv layer, no prunable module, or a bad block_size.
    """
    block_size = _check_block_size(block_size)
    named: Dict[str, nn.Module] = dict(model.named_modules())
    if modules is None:
        chosen = [n for n, m in named.items() if isinstance(m, PRUNABLE_TYPES)]
    else:
        if isinstance(modules, str):
            modules = [modules]
        chosen = []
        for raw in modules:
            if not isinstance(raw, str):
                raise ValueError(f"modules must hold module names (str), got {raw!r}")
            name = raw[: -len(".weight")] if raw.endswith(".weight") and raw not in named else raw
            if name not in named:
                raise ValueError(f"modules: no module named {raw!r} in the model")
            if not isinstance(named[name], PRUNABLE_TYPES):
                raise ValueError(f"modules: {raw!r} is a {type(named[name]).__name__}; only Linear and "
                                 "Conv1d/2d/3d weights can be pruned")
            if name not in chosen:
                chosen.append(name)
    if not chosen:
        raise ValueError("the model has no prunable module (Linear / Conv1d/2d/3d)")
    layers = []
    for name in chosen:
        mod = named[name]
        numel = getattr(mod, "weight_orig", mod.weight).numel()
        layers.append(PrunableLayer(name, mod, numel if block_size is None else min(block_size, numel)))
    return layers
