"""FLOPs of Linear / Conv layers, dense and sparse, measured with forward hooks.

Convention: one multiply-accumulate = one FLOP (the convention under which ResNet-50
has ~4.1 GFLOPs, as in the pruning literature); biases, BN, activations and pooling
are not counted. For a layer whose weight has ``numel`` entries, every entry is used
``uses`` times per sample (``uses`` = output positions: H_out*W_out for a 2-d conv, 1
for a Linear on a vector), so

    dense FLOPs = numel * uses,   sparse FLOPs = nnz(weight) * uses.

``uses`` is also the FLOPs-per-parameter factor of the FLOPs-aware statistic
rho / flops_per_param^beta (paper Sec. 5.4).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["FLOP_MODULES", "layer_flops", "count_flops", "flops_per_param"]

FLOP_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@torch.no_grad()
def layer_flops(model: nn.Module, input_shape: Sequence[int],
                device: Optional[Union[str, torch.device]] = None) -> Dict[str, Dict[str, object]]:
    """Per-layer FLOPs for ONE sample of shape ``input_shape`` (without the batch dim).

    Returns:
        {module name: {"weight": param name, "shape": tuple, "params": numel, "nnz": int,
         "uses": int, "flops_dense": int, "flops_sparse": int}} in forward order.
    """
    if not input_shape or any(int(s) <= 0 for s in input_shape):
        raise ValueError(f"input_shape must be a non-empty sequence of positive ints, got {input_shape!r}")
    first = next(model.parameters(), None)
    if first is None:
        raise ValueError("model has no parameters")
    device = torch.device(device) if device is not None else first.device
    names = {m: n for n, m in model.named_modules()}
    stats: Dict[str, Dict[str, object]] = {}

    def hook(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        name = names[module]
        channels = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        uses = output.numel() // channels  # batch of one sample
        w = module.weight
        entry = stats.setdefault(name, {"weight": f"{name}.weight" if name else "weight",
                                        "shape": tuple(w.shape), "params": w.numel(),
                                        "nnz": int(torch.count_nonzero(w)), "uses": 0})
        entry["uses"] = int(entry["uses"]) + int(uses)  # a module called twice counts twice

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, FLOP_MODULES)]
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros((1, *[int(s) for s in input_shape]), dtype=first.dtype, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    for entry in stats.values():
        entry["flops_dense"] = int(entry["params"]) * int(entry["uses"])
        entry["flops_sparse"] = int(entry["nnz"]) * int(entry["uses"])
    return stats


def count_flops(model: nn.Module, input_shape: Sequence[int], sparse: bool = False) -> Dict[str, int]:
    """{module name: FLOPs for one sample}; ``sparse=True`` counts only nonzero weights."""
    key = "flops_sparse" if sparse else "flops_dense"
    return {name: int(s[key]) for name, s in layer_flops(model, input_shape).items()}


def flops_per_param(model: nn.Module, input_shape: Sequence[int]) -> Dict[str, int]:
    """{weight param name: FLOPs each of its entries costs per sample} (``uses`` above)."""
    return {str(s["weight"]): int(s["uses"]) for s in layer_flops(model, input_shape).values()}
