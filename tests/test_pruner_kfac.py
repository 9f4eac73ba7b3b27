"""K-FAC baseline: Kronecker order against the dense per-sample Fisher, and OBS from the factors."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import woodfisher as wf
from woodfisher.kfac import kfac_factors, kfac_inverse

DAMP = 1e-2


def _one_sample_fisher(model, x, y, name):
    """Dense per-sample Fisher vec_row(dL/dW) vec_row(dL/dW)^T (exact, float64)."""
    loss = nn.functional.cross_entropy(model(x), y)
    g = torch.autograd.grad(loss, [dict(model.named_parameters())[name]])[0].flatten()
    return torch.outer(g, g)


def _linear_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3, bias=False)).double()


def test_linear_kfac_is_exact_for_one_sample_with_out_factor_first():
    model = _linear_model()
    x, y = torch.randn(1, 4, dtype=torch.float64), torch.tensor([1])
    f = kfac_factors(model, [(x, y)], wf.resolve_layers(model), num_samples=1, progress=False)["0.weight"]
    dense = _one_sample_fisher(model, x, y, "0.weight")
    torch.testing.assert_close(torch.kron(f.S, f.A), dense, rtol=1e-12, atol=1e-14)
    assert f.S.shape == (3, 3) and f.A.shape == (4, 4)
    assert not torch.allclose(torch.kron(f.A, f.S), dense)  # the wrong (column-major) order


def test_conv2d_unfolding_is_exact_for_one_sample_and_one_position():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten()).double()  # 3x3 input -> 1 position
    x, y = torch.randn(1, 2, 3, 3, dtype=torch.float64), torch.tensor([2])
    f = kfac_factors(model, [(x, y)], wf.resolve_layers(model), num_samples=1, progress=False)["0.weight"]
    torch.testing.assert_close(torch.kron(f.S, f.A), _one_sample_fisher(model, x, y, "0.weight"),
                               rtol=1e-12, atol=1e-14)


def test_kfac_obs_matches_dense_kronecker_obs():
    """prune_one_shot(method='kfac') = dense OBS with F = (S + sqrt(l)/pi I) (x) (A + pi sqrt(l) I)."""
    model = _linear_model()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    ref = copy.deepcopy(model)
    res = wf.prune_one_shot(model, [(x, y)], sparsity=0.5, method="kfac", num_grads=6, damp=DAMP,
                            progress=False)
    # independent factors: per-sample output gradients g_i = dl_i/ds and inputs a_i
    w = ref[0].weight.detach()
    s = ref[0](x).detach().requires_grad_(True)
    go = torch.autograd.grad(nn.functional.cross_entropy(s, y, reduction="sum"), s)[0]
    a_f, s_f = x.T @ x / 6, go.T @ go / 6
    pi = math.sqrt((torch.trace(a_f) / 4) / (torch.trace(s_f) / 3))
    fisher = torch.kron(s_f + math.sqrt(DAMP) / pi * torch.eye(3, dtype=torch.float64),
                        a_f + pi * math.sqrt(DAMP) * torch.eye(4, dtype=torch.float64))
    inv = torch.linalg.inv(fisher)
    wf_ = w.flatten()
    rho = wf_ ** 2 / (2 * torch.diagonal(inv))
    prune = torch.zeros(12, dtype=torch.bool)
    prune[torch.argsort(rho)[:6]] = True
    assert torch.equal(~res.masks["0.weight"].flatten(), prune)
    v = torch.where(prune, wf_ / torch.diagonal(inv), torch.zeros_like(wf_))
    expect = (wf_ - inv @ v).masked_fill(prune, 0.0)
    torch.testing.assert_close(model[0].weight.detach().flatten(), expect, rtol=1e-8, atol=1e-12)
    s_inv, a_inv = kfac_inverse(kfac_factors(ref, [(x, y)], wf.resolve_layers(ref), num_samples=6,
                                             progress=False)["0.weight"], DAMP)
    torch.testing.assert_close(torch.kron(s_inv, a_inv), inv, rtol=1e-8, atol=1e-10)


def test_kfac_refuses_conv1d_naming_the_layer():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6, 3)).double()
    before = copy.deepcopy(model.state_dict())
    x, y = torch.randn(4, 1, 8, dtype=torch.float64), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="'0'.*Conv1d"):
        wf.prune_one_shot(model, [(x, y)], sparsity=0.5, method="kfac", progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
