"""Linear / Conv subclasses whose forward transforms the weight (weight standardization as in timm's StdConv2d):
a pruned zero of ``weight`` is not a zero of the weight the forward computes with, so the OBS maths does not hold.
The default targets leave them out (one warning naming them), naming one in ``modules=`` is a ValueError, and a
subclass that keeps the base class's forward is pruned as before."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import woodfisher as wf


class StdConv(nn.Conv2d):
    """Weight standardization: every output filter shifted to mean 0 and scaled to unit variance."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class PlainSubclass(nn.Linear):
    """A subclass with the base class's forward (a type tag): its weight is used as it is."""


def _model(conv=StdConv):
    torch.manual_seed(0)
    return nn.Sequential(conv(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), PlainSubclass(4 * 25, 6), nn.ReLU(),
                         nn.Linear(6, 3)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 2, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, 16, 8)]


def _messages(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught]


def test_default_targets_leave_out_a_layer_whose_forward_transforms_its_weight():
    model = _model()
    std = model[0].weight.detach().clone()
    names = [t.name for t in wf.resolve_targets(model)]
    assert names == ["3.weight", "5.weight"]
    res, messages = _messages(lambda: wf.prune_one_shot(model, _data(), sparsity=0.5, num_grads=16, block_size=8,
                                                        progress=False))
    assert torch.equal(model[0].weight, std)   # untouched: no zero written where it would not last
    zeros = sum(int((model[i].weight == 0).sum()) for i in (3, 5))
    assert res.sparsity == pytest.approx(zeros / (model[3].weight.numel() + model[5].weight.numel()))
    said = [m for m in messages if "forward of its own" in m]
    assert len(said) == 1 and "'0.weight (StdConv)'" in said[0] and "3.weight" not in said[0]


@pytest.mark.parametrize("named", ["0", "0.weight", ["0", "3"]])
def test_naming_it_is_refused_before_anything_changes(named):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"modules: '0.weight' belongs to a StdConv, a subclass of Conv2d"):
        wf.prune_one_shot(model, _data(), sparsity=0.5, num_grads=16, modules=named, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_weight_norm_parametrization_is_left_out_and_refused_when_named():
    model = _model(nn.Conv2d)
    nn.utils.parametrizations.weight_norm(model[0])
    assert [t.name for t in wf.resolve_targets(model)] == ["3.weight", "5.weight"]
    _, messages = _messages(lambda: wf.prune_one_shot(model, _data(), sparsity=0.5, num_grads=16, progress=False))
    assert sum("weight_norm" in m for m in messages) == 1 and not any("forward of its own" in m for m in messages)
    with pytest.raises(ValueError, match=r"modules: '0' is reparametrised by torch.nn.utils.parametrize without a "
                                         r"'mask' \(weight recomputed"):
        wf.resolve_targets(model, ["0"])


def test_a_plain_conv_and_a_subclass_with_the_base_forward_are_pruned():
    assert [t.name for t in wf.resolve_targets(_model(nn.Conv2d))] == ["0.weight", "3.weight", "5.weight"]
    assert not wf.targets.own_forward(PlainSubclass(2, 2)) and wf.targets.own_forward(StdConv(1, 1, 1))
