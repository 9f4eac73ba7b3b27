"""The low-rank form against float64 where the gradients span every live coordinate of a block.

``F^-1 v = (v - A^T A v) / damp`` cancels for the components of v in the gradients' span, so a
float32 factor gives them a relative error of about eps32 * kappa. Coordinates that carry no
gradient (weights pruned earlier, padding, dead inputs) leave the live ones wholly in that span;
at damp 1e-8 the float32 factor put the OBS update 79% off there while the dense form was exact.
:class:`woodfisher_kernels.LowRankInverse` now keeps a float64 factor for such blocks.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import woodfisher as wf
import woodfisher_kernels as wk

D = torch.float64


def _dense64(grads: torch.Tensor, damp: float) -> torch.Tensor:
    g = grads.double()
    eye = torch.eye(g.shape[2], dtype=D)
    return torch.linalg.inv(damp * eye + g.transpose(1, 2) @ g / g.shape[1])


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).abs().max() / ref.abs().max())


def _support_grads(seed: int = 0) -> torch.Tensor:
    """(2, 16, 64): block 0 has gradient on 8 coordinates only; block 1 everywhere, small (kappa below the level)."""
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(2, 16, 64, generator=gen)
    grads[0, :, 8:] = 0.0
    grads[1] *= 1e-5
    return grads


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("damp", [1e-5, 1e-8])
def test_lowrank_ops_match_float64_when_gradients_span_the_live_coordinates(backend, damp):
    grads = _support_grads()
    ref = _dense64(grads, damp)
    diag = torch.diagonal(ref, dim1=1, dim2=2)
    inv = wk.lowrank_inverse(grads, damp, backend=backend)
    assert inv.refined == 1 and inv.dtype == torch.float32  # block 0 only
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(2, 64, generator=gen)
    lg = 0.1 * torch.randn(2, 64, generator=gen)
    prune = torch.zeros(2, 64, dtype=torch.bool)
    prune[:, [1, 3, 6, 20, 40]] = True
    # Eq. 11 / 23 saliency and the Eq. 10 / 21 update, written out in float64
    h = torch.einsum("bij,bj->bi", ref, lg.double())
    assert _rel(wk.obs_saliency(inv, w), w.double() ** 2 / (2 * diag)) < 1e-5
    assert _rel(wk.obs_saliency(inv, w, lg), (w.double() - h) ** 2 / (2 * diag)) < 1e-5
    for loss_grad, shift in ((None, torch.zeros_like(h)), (lg, h)):
        v = torch.where(prune, (w.double() - shift) / diag, torch.zeros_like(diag))
        expected = (w.double() - torch.einsum("bij,bj->bi", ref, v) - shift).masked_fill(prune, 0.0)
        new = wk.obs_update(inv, w, prune, loss_grad)
        assert new.dtype == torch.float32 and bool((new[prune] == 0).all())
        assert _rel(new, expected) < 1e-5
    # group OBS: rho_Q = w_Q^T ([F^-1]_QQ)^-1 w_Q / 2 and its update, for a group inside the live coordinates
    groups = torch.tensor([[[0, 1]], [[0, 1]]])
    sub = ref[:, :2, :2]
    coef = torch.linalg.solve(sub, w.double()[:, :2].unsqueeze(-1)).squeeze(-1)
    assert _rel(wk.group_obs_saliency(inv, w, groups), 0.5 * (w.double()[:, :2] * coef).sum(-1, keepdim=True)) < 1e-5
    expected = (w.double() - torch.einsum("bij,bj->bi", ref[:, :, :2], coef))
    expected[:, :2] = 0.0
    new = wk.group_obs_update(inv, w, groups, torch.ones(2, 1, dtype=torch.bool))
    assert new.dtype == torch.float32 and _rel(new, expected) < 1e-5
    assert _rel(wk.gather_rows(inv, groups), ref[:, :2].unsqueeze(1)) < 1e-5
    swapped = inv.select(torch.tensor([1, 0]))  # the float64 factor follows its block
    expected = torch.einsum("bij,bj->bi", ref, w.double()).flip(0)
    assert swapped.refined == 1 and _rel(swapped.matvec(w.flip(0)), expected) < 1e-5
    wide = torch.arange(0, 40).view(1, 1, 40).expand(2, 1, 40).contiguous()  # q = 40 > m: the Woodbury route
    sub = ref[:, :40, :40]
    coef = torch.linalg.solve(sub, w.double()[:, :40].unsqueeze(-1)).squeeze(-1)
    assert _rel(wk.group_obs_saliency(inv, w, wide), 0.5 * (w.double()[:, :40] * coef).sum(-1, keepdim=True)) < 1e-4


def test_lowrank_well_conditioned_blocks_stay_float32():
    grads = _support_grads()
    inv = wk.lowrank_inverse(grads, 1.0)
    assert inv.refined == 0 and inv.factor.dtype == torch.float32 and inv._exact is None


def _masked_grads(model, x, y, keep):
    """(m, d) per-sample float64 gradients of the two weights, zero where pruned."""
    m64 = copy.deepcopy(model).double()
    params = dict(m64.named_parameters())
    rows = []
    for i in range(len(x)):
        m64.zero_grad()
        F.cross_entropy(m64(x[i:i + 1].double()), y[i:i + 1]).backward()
        rows.append(torch.cat([(params[n].grad * keep[n]).flatten() for n in keep]))
    return torch.stack(rows)


def test_prune_with_zero_gradient_coordinates_matches_float64_reference():
    """One WoodFisher step on a model already 85% sparse in its first layer (those coordinates carry no
    gradient), blocks of 64 > m = 16 (the low-rank form), damp 1e-8, layerwise: masks and weights as a float64
    dense reference of the paper's Eqs. 2, 10, 11 computes them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 8))
    with torch.no_grad():
        w0 = model[0].weight
        w0.mul_(w0.abs() > w0.abs().flatten().kthvalue(109).values)
    x, y = torch.randn(16, 16), torch.randint(0, 8, (16,))
    loader = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 16, 8)]
    names = ["0.weight", "2.weight"]
    params = dict(model.named_parameters())
    keep = {n: params[n].detach() != 0 for n in names}
    damp, c, sparsity = 1e-8, 64, 0.9
    grads = _masked_grads(model, x, y, keep)
    w = torch.cat([params[n].detach().double().flatten() for n in names])
    sizes = [params[n].numel() for n in names]
    invs, scores, offset = [], [], 0
    for size in sizes:  # blocks never span two weights; both sizes are multiples of c here
        g = grads[:, offset:offset + size].reshape(16, size // c, c).transpose(0, 1)
        inv = _dense64(g, damp)
        invs.append(inv)
        scores.append((w[offset:offset + size].view(-1, c) ** 2 / (2 * torch.diagonal(inv, dim1=1, dim2=2))).flatten())
        offset += size
    kept = []
    for name, score in zip(names, scores):  # mode="layerwise": each weight at the sparsity, pruned stay pruned
        score = score.masked_fill(~keep[name].flatten(), float("-inf"))
        mask = torch.zeros_like(score, dtype=torch.bool)
        mask[torch.argsort(score, descending=True, stable=True)[:len(score) - round(sparsity * len(score))]] = True
        kept.append(mask)
    kept = torch.cat(kept)
    expected, offset = [], 0
    for inv, size in zip(invs, sizes):
        wb, pb = w[offset:offset + size].view(-1, c), ~kept[offset:offset + size].view(-1, c)
        v = torch.where(pb, wb / torch.diagonal(inv, dim1=1, dim2=2), torch.zeros_like(wb))
        expected.append((wb - torch.einsum("bij,bj->bi", inv, v)).masked_fill(pb, 0.0).flatten())
        offset += size
    expected = torch.cat(expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curv = wf.estimate_curvature(model, loader, block_size=c, damp=damp, num_grads=16, progress=False)
        assert curv.forms["0.weight"] == "lowrank" and curv.refined.get("0.weight", 0) >= 1  # reported
        res = wf.prune_one_shot(model, loader, sparsity=sparsity, block_size=c, damp=damp, num_grads=16,
                                num_steps=1, mode="layerwise", progress=False)
    assert wk.choose_form(16, c) == "lowrank"
    got = torch.cat([params[n].detach().double().flatten() for n in names])
    assert torch.equal(torch.cat([res.masks[n].flatten() for n in names]), kept)
    assert float((got - expected).abs().max()) < 1e-5 * float(expected.abs().max())


def test_blocks_with_many_live_coordinates_keep_their_float32_factor_and_its_accuracy():
    """kappa alone flags every block here (damp 1e-6), but each has 4 m live coordinates: most of every
    ``1 - ||a_q||^2`` lies outside the gradients' span, where nothing cancels. The float32 factor is kept
    (no float64 cost) and is within float32 accuracy of float64 for the diagonal and for F^-1 e_q."""
    gen = torch.Generator().manual_seed(3)
    grads = torch.randn(3, 16, 64, generator=gen)
    damp = 1e-6
    assert float(wk.condition_estimate(grads, damp).min()) * 2 ** -23 > 1e-3  # flagged by kappa
    inv = wk.lowrank_inverse(grads, damp)
    assert inv.refined == 0
    ref = _dense64(grads, damp)
    assert _rel(inv.diag(), torch.diagonal(ref, dim1=1, dim2=2)) < 1e-5
    eye = torch.eye(64).expand(3, -1, -1).contiguous()
    assert _rel(inv.matmat(eye), ref) < 1e-4
