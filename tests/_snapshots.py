"""Bitwise, NaN-aware snapshots of everything a pruning call could change on a model.

:func:`snapshot` records, for the model as the caller sees it: every parameter (name, object
identity, order, dtype, shape and raw bytes, so NaN payloads compare equal and -0.0 differs
from 0.0), every buffer (masks included), every ``.grad``, plain tensor attributes such as the
derived ``weight`` of ``torch.nn.utils.prune``, the train/eval flag and the hooks of every
module. :func:`assert_unchanged` compares two snapshots and names the first difference.
"""
from __future__ import annotations

import torch
from torch import nn


def bits(t: torch.Tensor):
    """(dtype, shape, raw bytes) of ``t``: equal exactly when the tensors are bitwise equal (meta: no bytes)."""
    if t.is_meta:
        return t.dtype, tuple(t.shape), torch.empty(0, dtype=torch.uint8)
    t = t.detach().cpu().contiguous()
    return t.dtype, tuple(t.shape), t.reshape(-1).view(torch.uint8).clone()


def _same_bits(a, b) -> bool:
    return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def snapshot(model: nn.Module) -> dict:
    out = {"params": [], "buffers": [], "grads": [], "attrs": [], "modules": []}
    for name, p in model.named_parameters():
        out["params"].append((name, id(p), bits(p)))
        out["grads"].append((name, None if p.grad is None else bits(p.grad)))
    for name, b in model.named_buffers():
        out["buffers"].append((name, bits(b)))
    for mname, m in model.named_modules():
        for key, value in vars(m).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                out["attrs"].append((f"{mname}.{key}", bits(value)))
        out["modules"].append((mname, m.training, len(m._forward_pre_hooks), len(m._forward_hooks),
                               len(m._backward_hooks), tuple(m._parameters), tuple(m._buffers)))
    return out


def assert_unchanged(before: dict, after: dict) -> None:
    """Every entry of the two snapshots equal (bitwise for tensors); names the first difference."""
    for kind in ("modules", "params", "buffers", "grads", "attrs"):
        a, b = before[kind], after[kind]
        assert [x[0] for x in a] == [x[0] for x in b], f"{kind}: names or order changed"
        for x, y in zip(a, b):
            if kind == "modules":
                assert x == y, f"module {x[0]!r} changed: {x} -> {y}"
                continue
            if kind == "params":
                assert x[1] == y[1], f"parameter {x[0]!r} is another object"
            vx, vy = x[-1], y[-1]
            if vx is None or vy is None:
                assert vx is None and vy is None, f"{kind} {x[0]!r} changed (None vs tensor)"
            else:
                assert _same_bits(vx, vy), f"{kind} {x[0]!r} changed"
