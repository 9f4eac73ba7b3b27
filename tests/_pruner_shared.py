"""Tiny models, data and float64 references shared by the tests/test_pruner_*.py files."""
from __future__ import annotations

import torch
from torch import nn


def tiny_mlp(seed: int = 0, sizes=(6, 5, 4), bias: bool = True) -> nn.Module:
    """float64 MLP with ReLU, e.g. 6-5-4 (weights 5x6 and 4x5)."""
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).double()


def tiny_data(n: int = 32, features: int = 6, classes: int = 4, batch: int = 8, seed: int = 1):
    """A list of (x float64 (batch, features), y int64 (batch,)) batches."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def per_sample_grads(model: nn.Module, loader, names, count: int, loss_fn=None) -> dict:
    """{param_name: (count, numel)} per-sample gradients by a plain autograd loop."""
    loss_fn = loss_fn or nn.functional.cross_entropy
    params = dict(model.named_parameters())
    out = {n: [] for n in names}
    done = 0
    for x, y in loader:
        for i in range(x.shape[0]):
            if done == count:
                break
            loss = loss_fn(model(x[i:i + 1]), y[i:i + 1])
            grads = torch.autograd.grad(loss, [params[n] for n in names])
            for n, g in zip(names, grads):
                out[n].append(g.detach().flatten())
            done += 1
    return {n: torch.stack(v) for n, v in out.items()}


def state_copy(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, state: dict) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
