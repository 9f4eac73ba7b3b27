"""The default cross-entropy in the form ``vmap`` batches with fewer operators (``default_loss(gathered=True)``, used
for per-sample gradients): the value and gradient of ``F.cross_entropy`` in float64, ignored targets included, and
per-sample gradients through it equal a float64 autograd loop."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _dispatch import OperatorCount
from torch import nn
from torch.func import grad, vmap

import woodfisher as wf
from woodfisher.losses import default_loss
from woodfisher.targets import resolve_targets


def _case(name, g):
    if name == "classes":
        return torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randint(0, 5, (7,), generator=g)
    if name == "pixels":  # (N, C, H, W) with (N, H, W) class maps, some ignored
        t = torch.randint(0, 4, (3, 2, 5), generator=g)
        t[0, 1, 2] = t[2, 0, 0] = -100
        return torch.randn(3, 4, 2, 5, generator=g, dtype=torch.float64), t
    if name == "tokens":  # (N, T, V) with (N, T) tokens, padding ignored
        t = torch.randint(0, 9, (2, 6), generator=g)
        t[1, 3:] = -100
        return torch.randn(2, 6, 9, generator=g, dtype=torch.float64), t
    labels = torch.randint(0, 3, (4,), generator=g)
    dtype = torch.uint8 if name == "uint8" else torch.int32
    return torch.randn(4, 3, generator=g, dtype=torch.float64), labels.to(dtype)


@pytest.mark.parametrize("name", ["classes", "pixels", "tokens", "uint8", "int32"])
def test_value_and_gradient_equal_cross_entropy(name):
    out, target = _case(name, torch.Generator().manual_seed(0))
    out.requires_grad_(True)
    got = default_loss(out, target, gathered=True)
    want = default_loss(out, target)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    g_got, = torch.autograd.grad(got, out)
    g_want, = torch.autograd.grad(want, out)
    torch.testing.assert_close(g_got, g_want, rtol=1e-13, atol=1e-15)


def test_all_targets_ignored_is_nan_as_cross_entropy():
    out, target = torch.randn(3, 4, dtype=torch.float64), torch.full((3,), -100)
    assert math.isnan(float(default_loss(out, target, gathered=True)))
    assert math.isnan(float(F.cross_entropy(out, target)))


def test_probability_targets_keep_cross_entropy():
    out = torch.randn(4, 3, dtype=torch.float64)
    probs = torch.softmax(torch.randn(4, 3, dtype=torch.float64), 1)
    assert float(default_loss(out, probs, gathered=True)) == float(F.cross_entropy(out, probs))


def test_fewer_operators_under_vmap():
    """The reason for the form: a sample's forward and backward through the loss dispatch fewer operators."""
    out, target = torch.randn(8, 1, 5), torch.randint(0, 5, (8, 1))
    counts = {}
    for gathered in (False, True):
        per_sample = vmap(grad(lambda o, t: default_loss(o, t, gathered)), in_dims=(0, 0))
        with OperatorCount() as count:
            per_sample(out, target)
        counts[gathered] = sum(count.seen.values())
    assert counts[True] < counts[False]


def test_token_model_per_sample_gradients_equal_a_float64_loop():
    """Per-sample gradients of a token model with padded targets (-100): the collector (vmap, gathered loss) against
    autograd on each sample with F.cross_entropy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 6), nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 11)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 11, (5, 4), generator=g)
    y = torch.randint(0, 11, (5, 4), generator=g)
    y[1, 2:] = -100
    y[3, 1:] = -100
    targets = resolve_targets(model)
    got = wf.GradientCollector(model, [(x, y)], targets, num_grads=5, progress=False).collect()
    for i in range(5):
        model.zero_grad()
        out = model(x[i:i + 1])
        F.cross_entropy(out.reshape(-1, 11), y[i:i + 1].reshape(-1)).backward()
        for t in targets:
            torch.testing.assert_close(got[t.name][i], t.param.grad.flatten(), rtol=1e-10, atol=1e-12)
