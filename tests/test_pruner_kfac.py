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


@pytest.mark.parametrize("conv, shape", [(nn.Conv1d(2, 3, 3), (1, 2, 3)), (nn.Conv3d(2, 3, 2), (1, 2, 2, 2, 2))])
def test_conv1d_conv3d_unfolding_is_exact_for_one_sample_and_one_position(conv, shape):
    torch.manual_seed(1)
    model = nn.Sequential(conv, nn.Flatten()).double()  # input = kernel: one output position
    x, y = torch.randn(*shape, dtype=torch.float64), torch.tensor([2])
    f = kfac_factors(model, [(x, y)], wf.resolve_layers(model), num_samples=1, progress=False)["0.weight"]
    torch.testing.assert_close(torch.kron(f.S, f.A), _one_sample_fisher(model, x, y, "0.weight"),
                               rtol=1e-12, atol=1e-14)


def _factors_via_unfold(conv2d, x4, y, n):
    """A and S of a Conv2d from F.unfold and autograd on the output (independent of the package's unfolding)."""
    out = conv2d(x4)
    g = torch.autograd.grad(nn.functional.cross_entropy(out.flatten(1), y), out)[0] * n
    a = nn.functional.unfold(x4, conv2d.kernel_size, dilation=conv2d.dilation, padding=conv2d.padding,
                             stride=conv2d.stride)
    a = a.transpose(1, 2).reshape(-1, a.shape[1])
    go = g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])
    return a.T @ a / (a.shape[0] // n) / n, go.T @ go / n


def test_conv1d_factors_with_padding_stride_dilation_match_the_conv2d_unfolding():
    """A Conv1d is a Conv2d of height 1: its factors (padding 2, stride 2, dilation 2, several positions) are
    those F.unfold gives for that Conv2d."""
    torch.manual_seed(3)
    conv1 = nn.Conv1d(2, 3, 3, stride=2, padding=2, dilation=2).double()
    model = nn.Sequential(conv1, nn.Flatten()).double()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 2, 9, generator=g, dtype=torch.float64)
    positions = conv1(x).shape[-1]
    y = torch.randint(0, 3 * positions, (5,), generator=g)
    f = kfac_factors(model, [(x, y)], wf.resolve_layers(model), num_samples=5, progress=False)["0.weight"]
    conv2 = nn.Conv2d(2, 3, (1, 3), stride=(1, 2), padding=(0, 2), dilation=(1, 2)).double()
    with torch.no_grad():
        conv2.weight.copy_(conv1.weight.unsqueeze(2))
        conv2.bias.copy_(conv1.bias)
    a_ref, s_ref = _factors_via_unfold(conv2, x.unsqueeze(2), y, 5)
    torch.testing.assert_close(f.A, a_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(f.S, s_ref, rtol=1e-12, atol=1e-14)
    assert positions > 1


def test_conv2d_factors_with_padding_stride_dilation_match_f_unfold():
    torch.manual_seed(6)
    conv = nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)).double()
    model = nn.Sequential(conv, nn.Flatten()).double()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 2, 7, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, conv(x).flatten(1).shape[1], (4,), generator=g)
    f = kfac_factors(model, [(x, y)], wf.resolve_layers(model), num_samples=4, progress=False)["0.weight"]
    a_ref, s_ref = _factors_via_unfold(conv, x, y, 4)
    torch.testing.assert_close(f.A, a_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(f.S, s_ref, rtol=1e-12, atol=1e-14)


def test_kfac_prunes_conv1d_and_conv3d_to_the_sparsity():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8, 3)).double()
    x, y = torch.randn(8, 1, 8, dtype=torch.float64), torch.randint(0, 3, (8,))
    res = wf.prune_one_shot(model, [(x, y)], sparsity=0.5, method="kfac", num_grads=8, progress=False)
    assert res.masks["0.weight"].shape == (4, 1, 3) and (model[0].weight == 0).sum() == (~res.masks["0.weight"]).sum()
    model3 = nn.Sequential(nn.Conv3d(1, 2, 2), nn.Flatten(), nn.Linear(2 * 27, 3)).double()
    x3 = torch.randn(6, 1, 4, 4, 4, dtype=torch.float64)
    res3 = wf.prune_one_shot(model3, [(x3, y[:6])], sparsity=0.5, method="kfac", num_grads=6, progress=False)
    assert float(res3.sparsity) == pytest.approx(0.5, abs=0.02)


def test_kfac_refuses_grouped_conv1d_naming_the_layer():
    model = nn.Sequential(nn.Conv1d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(2 * 6, 3)).double()
    before = copy.deepcopy(model.state_dict())
    x, y = torch.randn(4, 2, 8, dtype=torch.float64), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="groups=1.*layer '0'"):
        wf.prune_one_shot(model, [(x, y)], sparsity=0.5, method="kfac", progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
