"""BatchNorm without running statistics (``track_running_stats=False``) normalizes every batch with its own
statistics, in eval mode too: a sample's loss depends on the other samples of its batch, so per-sample gradients
(``fisher_batch_size=1``) are undefined and refused (naming the layers, nothing changed); with
``fisher_batch_size`` = g each gradient is that of a group's mean loss with the group's statistics (float64
autograd reference), and methods without gradients (magnitude) are unaffected."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _snapshots import assert_unchanged, snapshot
from torch import nn

import woodfisher as wf


def _model(track=False):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=track), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 25, 3)).double()


def _data(n=16, bs=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


def test_single_sample_gradients_differ_from_the_batched_ones():
    """Why the refusal: the gradient of sample 0 alone is not its share of the batch's gradient."""
    model = _model().eval()
    x, y = _data()[0]
    alone = torch.autograd.grad(F.cross_entropy(model(x[:1]), y[:1]), model[0].weight)[0]
    per = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="none")[0], model[0].weight)[0]
    assert not torch.allclose(alone, per, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("method", ["woodfisher", "diag_fisher"])
def test_per_sample_gradients_are_refused_naming_the_layers(method):
    model = _model()
    before = snapshot(model)
    options = dict(num_grads=16, method=method, progress=False)
    calls = {"prune_one_shot": lambda: wf.prune_one_shot(model, _data(), sparsity=0.5, **options),
             "estimate_curvature": lambda: wf.estimate_curvature(model, _data(), **options),
             # up front, not at the first pruning step
             "GradualPruner": lambda: wf.GradualPruner(model, _data(), final_sparsity=0.5, **options)}
    for call in calls.values():
        with pytest.raises(ValueError, match=r"model: the BatchNorm layers \['1'\] have no running statistics .*"
                                             r"fisher_batch_size=<your training batch size>"):
            call()
        assert_unchanged(before, snapshot(model))


def test_group_gradients_use_the_group_statistics():
    model = _model()
    targets = wf.resolve_targets(model)
    grads = wf.GradientCollector(model, _data(), targets, num_grads=4, fisher_batch_size=4, progress=False).collect()
    x = torch.cat([b[0] for b in _data()])
    y = torch.cat([b[1] for b in _data()])
    for g in range(4):
        loss = F.cross_entropy(model(x[4 * g:4 * g + 4]), y[4 * g:4 * g + 4])
        want = torch.autograd.grad(loss, [t.param for t in targets])
        for target, w in zip(targets, want):
            torch.testing.assert_close(grads[target.name][g], w.reshape(-1), rtol=1e-10, atol=1e-12)


def test_running_statistics_and_magnitude_pruning_are_unaffected():
    wf.prune_one_shot(_model(track=True), _data(), sparsity=0.5, num_grads=16, progress=False)
    res = wf.prune_one_shot(_model(), None, sparsity=0.5, method="magnitude", progress=False)
    assert res.sparsity == pytest.approx(0.5, abs=0.01)


def test_pruning_at_init_offers_its_own_alternatives():
    """woodfisher.pai has no fisher_batch_size: the Fisher criteria name the batched criteria instead; those run."""
    from woodfisher import pai
    with pytest.raises(ValueError, match=r"BatchNorm layers \['1'\].*use a criterion of batched gradients"):
        pai.prune_at_init(_model(), _data(), sparsity=0.5, criterion="fisher", warmup_batches=0, progress=False)
    res = pai.prune_at_init(_model(), _data(), sparsity=0.5, criterion="snip", warmup_batches=0, progress=False)
    assert res.sparsity == pytest.approx(0.5, abs=0.01)
