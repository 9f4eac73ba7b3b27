"""An N:M pattern on the default targets of a vision model: the weights whose runs of M input channels do not exist
(a 3-channel stem conv, a depthwise conv) are left dense with one warning, the rest pruned 2:4; named explicitly,
such a weight is still a ValueError."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import woodfisher as wf
from woodfisher.export import pattern_violations

PRUNED, DENSE = ("pw.weight", "fc.weight"), ("stem.weight", "dw.weight")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.pw(torch.relu(self.dw(torch.relu(self.stem(x))))))
        return self.fc(self.pool(x).flatten(1))


def _case():
    torch.manual_seed(0)
    model = Net().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (32,), generator=g)
    return model, [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]


OPTIONS = dict(pattern="2:4", num_grads=32, block_size=8, damp=1e-3, progress=False)


def _params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _check_pruned(model, before):
    params = {name: model.get_submodule(name.rsplit(".", 1)[0]).weight for name in DENSE + PRUNED}  # masks applied
    for name in DENSE:   # left as they were, bit for bit
        assert torch.equal(params[name], before[name])
    for name in PRUNED:  # exactly 2 of every 4 input channels / features kept
        w = params[name].detach()
        assert pattern_violations(w) == 0 and int((w == 0).sum()) == w.numel() // 2


def test_default_targets_leave_the_weights_nm_does_not_fit_dense_with_one_warning():
    model, loader = _case()
    before = _params(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = wf.prune_one_shot(model, loader, **OPTIONS)
    said = [str(w.message) for w in caught if "left dense" in str(w.message)]
    assert len(said) == 1
    assert all(repr(name) in said[0] for name in DENSE) and not any(repr(name) in said[0] for name in PRUNED)
    assert "3 input channels per group" in said[0] and "1 input channels per group" in said[0]
    _check_pruned(model, before)
    assert sorted(res.config["modules"]) == sorted(PRUNED)


def test_two_phase_and_gradual_prune_the_same_weights():
    model, loader = _case()
    reference = _params(model)
    with pytest.warns(UserWarning, match="left dense"):
        wf.prune_one_shot(model, loader, **OPTIONS)
    want = _params(model)

    model, loader = _case()
    with pytest.warns(UserWarning, match="left dense"):
        curvature = wf.estimate_curvature(model, loader, **OPTIONS)
    wf.prune_with(model, curvature, 0.5)
    _check_pruned(model, reference)
    for name, value in _params(model).items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=1e-12)

    model, loader = _case()
    with pytest.warns(UserWarning, match="left dense"):
        pruner = wf.GradualPruner(model, loader, final_sparsity=0.5, initial_sparsity=0.5, start_step=0, end_step=0,
                                  frequency=1, **OPTIONS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # said once, at construction
        pruner.step(0)
    _check_pruned(model, reference)


def test_a_weight_named_explicitly_that_nm_does_not_fit_is_a_value_error_and_nothing_changes():
    model, loader = _case()
    before = _params(model)
    with pytest.raises(ValueError, match="'stem.weight' has 3 input channels per group"):
        wf.prune_one_shot(model, loader, modules=["stem", "pw"], **OPTIONS)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_a_model_nm_fits_nowhere_is_a_value_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()
    # the Linear (64 features) fits: only the stem is left dense; a lone stem conv is refused
    lone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()).double()
    data = [(torch.randn(4, 3, 6, 6, dtype=torch.float64), torch.randint(0, 3, (4,)))]
    with pytest.raises(ValueError, match="3 input channels per group"):
        wf.prune_one_shot(lone, data, loss_fn=lambda out, t: out.sum(), **OPTIONS)
    with pytest.warns(UserWarning, match="left dense"):
        wf.prune_one_shot(model, data, **dict(OPTIONS, num_grads=4))
