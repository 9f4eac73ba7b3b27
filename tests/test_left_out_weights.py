"""A default call names the Linear / Conv weights it leaves out because they are recomputed on every forward.

weight_norm / spectral_norm (the hook-based functions and the parametrizations) make ``module.weight`` a function of
other parameters: zeros written to it would not last, so it is not a default target. The call used to leave such a
layer dense without a word while reporting the target sparsity; it now warns once, at the caller's line, naming the
weight. Masks held by torch.nn.utils.prune and a LM head tied to its embedding are not reported (the first is pruned,
the second is left out by design and documented).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations
from torch.nn.utils import prune as torch_prune

import woodfisher as wf

NOTE = "recomputed from other parameters on every forward"


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 2, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]


def _calls(model, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = wf.prune_one_shot(model, _data(), sparsity=0.5, num_grads=32, num_steps=1, progress=False, **options)
    return res, [w for w in caught if NOTE in str(w.message)]


@pytest.mark.parametrize("reparam", [
    lambda m: torch.nn.utils.spectral_norm(m),
    lambda m: torch.nn.utils.weight_norm(m),
    lambda m: parametrizations.weight_norm(m),
    lambda m: parametrizations.spectral_norm(m),
], ids=["spectral_norm hook", "weight_norm hook", "weight_norm parametrization", "spectral_norm parametrization"])
def test_a_recomputed_weight_is_named_in_one_warning_and_left_as_it_was(reparam):
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        reparam(model[0])
    params = {n: p.detach().clone() for n, p in model[0].named_parameters()}
    res, notes = _calls(model)
    assert len(notes) == 1 and notes[0].filename == __file__
    assert "['0.weight (" in str(notes[0].message)
    assert list(res.masks) == ["3.weight"] and res.sparsity == pytest.approx(0.5, abs=1 / 48)
    assert float((model[3].weight == 0).float().mean()) == pytest.approx(0.5, abs=1 / 48)
    assert all(torch.equal(p, params[n]) for n, p in model[0].named_parameters())  # what the weight comes from


def test_no_warning_for_prune_masks_a_tied_head_or_named_modules():
    model = _model()
    torch_prune.l1_unstructured(model[0], "weight", amount=0.25)   # pruned through its mask: a default target
    res, notes = _calls(model)
    assert notes == [] and sorted(res.masks) == ["0.weight", "3.weight"]

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.body, self.head = nn.Embedding(10, 6), nn.Linear(6, 6), nn.Linear(6, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.relu(self.body(self.emb(ids))).mean(1))

    g = torch.Generator().manual_seed(2)
    loader = [(torch.randint(0, 10, (8, 5), generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(4)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wf.prune_one_shot(Tied(), loader, sparsity=0.5, num_grads=32, num_steps=1, progress=False)
    assert not [w for w in caught if NOTE in str(w.message)]
    model = _model()
    parametrizations.weight_norm(model[0])
    _, notes = _calls(model, modules=["3"])   # the caller chose the weights: nothing to report
    assert notes == []


def test_estimate_curvature_warns_the_same():
    model = _model()
    parametrizations.weight_norm(model[0])
    with pytest.warns(UserWarning, match=NOTE):
        curv = wf.estimate_curvature(model, _data(), num_grads=32, progress=False)
    assert list(curv.layouts) == ["3.weight"]


def test_a_transposed_convolution_is_named_in_one_warning_and_pruned_when_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(), nn.ConvTranspose2d(4, 2, 2, stride=2),
                          nn.Flatten(), nn.Linear(32, 3))
    up = model[2].weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = wf.prune_one_shot(model, _data(), sparsity=0.5, num_grads=32, num_steps=1, progress=False)
    notes = [w for w in caught if "are not pruned by default" in str(w.message)]
    assert len(notes) == 1 and notes[0].filename == __file__
    assert "transposed-convolution layers ['2 (ConvTranspose2d)']" in str(notes[0].message)
    assert "modules=[..., '2.weight']" in str(notes[0].message)
    assert sorted(res.masks) == ["0.weight", "4.weight"] and torch.equal(model[2].weight, up)
    res = wf.prune_one_shot(model, _data(), sparsity=0.6, modules=["0", "2.weight", "4"], num_grads=32, num_steps=1,
                            progress=False)
    assert sorted(res.masks) == ["0.weight", "2.weight", "4.weight"]
    zeros = sum(int((p == 0).sum()) for p in (model[0].weight, model[2].weight, model[4].weight))
    assert res.sparsity == pytest.approx(zeros / (72 + 32 + 96))


class _MyConv(nn.Module):
    """A layer of its own type calling F.conv2d on its weight (not a default target)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 2, 3, 3) * 0.3)

    def forward(self, x):
        return nn.functional.conv2d(x, self.weight, padding=1)


def test_a_custom_layer_weight_is_named_in_one_warning_and_pruned_when_named():
    torch.manual_seed(0)
    model = nn.Sequential(_MyConv(), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3), nn.LayerNorm(3))
    custom = model[0].weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = wf.prune_one_shot(model, _data(), sparsity=0.5, num_grads=32, num_steps=1, progress=False)
    notes = [w for w in caught if "are not pruned by default" in str(w.message)]
    assert len(notes) == 1 and "custom layers ['0 (_MyConv)']" in str(notes[0].message)
    assert "modules=[..., '0.weight']" in str(notes[0].message)
    assert list(res.masks) == ["3.weight"] and torch.equal(model[0].weight, custom)
    res = wf.prune_one_shot(model, _data(), sparsity=0.6, modules=["0.weight", "3"], num_grads=32, num_steps=1,
                            progress=False)
    assert sorted(res.masks) == ["0.weight", "3.weight"] and bool((model[0].weight == 0).any())
