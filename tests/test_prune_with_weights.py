"""``prune_with(model, curvature, ...)`` checks that ``model`` holds the weights ``curvature`` was estimated on.

Copies (``copy.deepcopy``, ``wf.clone_model``, the same seed) pass and give the masks of the original; another
instance of the same architecture, other weights loaded, or the model pruned since estimating are refused with a
ValueError naming ``curvature``, before anything is written. A FisherHook's curvature (gathered while training) is
not compared.
"""
from __future__ import annotations

import copy

import pytest
import torch
from _pruner_shared import tiny_data, tiny_mlp
from _snapshots import assert_unchanged, snapshot
from torch import nn

import woodfisher as wf
from woodfisher.state import FINGERPRINT_RTOL, changed_weights, fingerprint
from woodfisher.targets import resolve_targets

OPTS = dict(num_grads=16, block_size=8, damp=1e-2, progress=False)


def _model(seed=0):
    return tiny_mlp(seed, sizes=(6, 10, 4))


def _data():
    return tiny_data()


@pytest.mark.parametrize("method", ["woodfisher", "diag_fisher", "kfac"])
def test_copies_pass_and_give_the_masks_of_the_original(method):
    model = _model()
    curvature = wf.estimate_curvature(model, _data(), method=method, **OPTS)
    masks = [wf.prune_with(copy_of, curvature, 0.5).masks
             for copy_of in (copy.deepcopy(model), wf.clone_model(model), _model(), model)]
    for other in masks[1:]:
        assert all(torch.equal(other[n], masks[0][n]) for n in masks[0])


@pytest.mark.parametrize("change", ["other instance", "other weights loaded", "pruned since", "one entry nudged"])
def test_other_weights_are_refused_naming_curvature_and_nothing_changes(change):
    model = _model()
    curvature = wf.estimate_curvature(model, _data(), **OPTS)
    if change == "other instance":
        model = _model(seed=1)
    elif change == "other weights loaded":
        model.load_state_dict(_model(seed=2).state_dict())
    elif change == "pruned since":
        wf.prune_with(model, curvature, 0.3)
    else:
        with torch.no_grad():
            model[2].weight[0, 0] += 1e-3
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^curvature was estimated on other weights .*'(0|2)\.weight'"):
        wf.prune_with(model, curvature, 0.5)
    assert_unchanged(before, snapshot(model))


def test_the_fingerprint_tolerates_rounding_of_the_same_values_only():
    """The same weights summed in another order (float64) stay within FINGERPRINT_RTOL; the largest of a million
    entries moved by 1% (less than one SGD step usually moves it) does not."""
    torch.manual_seed(0)
    layer = nn.Linear(1000, 1000)
    targets = resolve_targets(nn.Sequential(layer), None)
    numel = {t.name: t.numel for t in targets}
    ref = fingerprint(targets)
    w = layer.weight.detach().double().reshape(-1)
    reordered = {"0.weight": (float(w.flip(0).sum()), float(w.flip(0).square().sum()))}
    assert changed_weights(ref, reordered, numel) == []
    total, squares = ref["0.weight"]
    assert changed_weights(ref, {"0.weight": (total, squares * (1 + 10 * FINGERPRINT_RTOL))}, numel) == ["0.weight"]
    with torch.no_grad():
        layer.weight.view(-1)[layer.weight.abs().argmax()] *= 1.01
    assert changed_weights(ref, fingerprint(targets), numel) == ["0.weight"]


def test_a_fisher_hook_curvature_is_not_compared():
    model = _model()
    hook = wf.FisherHook(model, num_grads=8, damp=1e-2, block_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook.attach(opt)
    for x, y in _data() * 2:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert hook.ready and not hook.curvature().fingerprint
    assert wf.prune_with(model, hook.curvature(), 0.5).sparsity == pytest.approx(0.5, abs=0.02)


def test_a_model_wrapped_otherwise_or_of_other_shapes_is_refused_naming_curvature():
    """It used to be a KeyError ('module.0.weight') from inside prune_with."""
    model = _model()
    curvature = wf.estimate_curvature(model, _data(), **OPTS)
    wrapped = nn.DataParallel(copy.deepcopy(model))
    before = snapshot(wrapped)
    with pytest.raises(ValueError, match=r"^curvature: estimated for \['0.weight', '2.weight'\].*'module.0.weight'"):
        wf.prune_with(wrapped, curvature, 0.5)
    assert_unchanged(before, snapshot(wrapped))
    wider = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4))
    with pytest.raises(ValueError, match=r"^curvature: weight '0.weight' has shape \(12, 6\)"):
        wf.prune_with(wider, curvature, 0.5)
    on_wrapped = wf.estimate_curvature(nn.DataParallel(_model()), _data(), **OPTS)  # wrapped the same way: fine
    masks = wf.prune_with(copy.deepcopy(wrapped), on_wrapped, 0.5).masks
    plain = wf.prune_with(copy.deepcopy(model), curvature, 0.5).masks
    assert all(torch.equal(masks["module." + n], m) for n, m in plain.items())
