"""The kernel library used directly with what users pass: numpy / tensor scalars, strided and
expanded tensors, inputs that require grad, in-place targets that share memory, flags and sizes
of the wrong type. Accepted inputs are checked against float64 references within
:func:`woodfisher_kernels.error_bound`; refused ones are a ValueError naming the argument that
changes nothing.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _shared import marked_backend_params

import woodfisher_kernels as wk
from woodfisher_kernels import testing

B, M, C, DAMP = 3, 10, 8, 0.1


def _grads(device="cpu", m=M, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, m, C, generator=gen).to(device)


def _assert_within_bound(inv, grads, damp, num_samples=None):
    ref = testing.svd_inverse(grads, float(damp), None if num_samples is None else float(num_samples))
    bound = wk.error_bound(ref.kappa)
    assert (testing.diag_error(inv, ref.diag) <= bound).all()
    assert (testing.spectral_error(inv, ref.inverse) <= bound).all()


def _layouts(device):
    g = _grads(device)
    return {"transposed": g.transpose(1, 2).contiguous().transpose(1, 2),
            "expanded": g[:1].expand(B, M, C),
            "sliced": torch.cat([g, g], dim=2)[:, :, ::2]}


@pytest.mark.parametrize("backend,device", marked_backend_params())
@pytest.mark.parametrize("damp,num_samples", [(np.float32(DAMP), np.int64(2 * M)), (torch.tensor(DAMP), None),
                                              (1, torch.tensor(2 * M)), (torch.tensor([DAMP]), np.float64(M))])
def test_fisher_inverse_scalars_and_layouts(backend, device, damp, num_samples):
    """numpy / 0-d tensor scalars and non-contiguous gradients match float64 on every backend."""
    for layout, g in _layouts(device).items():
        inv = wk.fisher_inverse(g, damp, num_samples, backend=backend)
        _assert_within_bound(inv.cpu(), g.cpu(), damp, num_samples)


@pytest.mark.parametrize("backend,device", marked_backend_params())
def test_woodbury_update_strided_inverse_in_place(backend, device):
    """A transposed (non-contiguous) inverse is updated in place, to the float64 two-stage Fisher."""
    g, g2 = _grads(device), _grads(device, m=4, seed=1)
    inv = wk.fisher_inverse(g, DAMP).transpose(1, 2)            # symmetric: same values, strided
    out = wk.woodbury_update_(inv, g2, np.int64(14), backend=backend)
    assert out is inv
    fisher = testing.dense_fisher(g.cpu(), DAMP) + g2.cpu().double().transpose(1, 2) @ g2.cpu().double() / 14
    ref = torch.linalg.inv(fisher)
    kappa = torch.linalg.eigvalsh(fisher)[:, -1] / DAMP
    assert (testing.spectral_error(inv.cpu(), ref) <= wk.error_bound(kappa)).all()


def test_woodbury_update_refuses_memory_sharing_inverse_unchanged():
    """An expand()-ed inverse cannot be written in place: ValueError naming inv, storage untouched."""
    base = wk.fisher_inverse(_grads(), DAMP)[:1].clone()
    before = base.clone()
    with pytest.raises(ValueError, match="inv .*share memory"):
        wk.woodbury_update_(base.expand(B, C, C), _grads(m=4), 4.0)
    assert torch.equal(base, before)


def test_requires_grad_inputs_are_constants():
    """Parameters / grads that require grad: same values, outputs do not require grad (no failing backward)."""
    g = _grads()
    w = torch.randn(B, C)
    mask = torch.rand(B, C) < 0.5
    groups = torch.arange(C).view(1, 2, 4).expand(B, 2, 4)
    inv = wk.fisher_inverse(g.clone().requires_grad_(), DAMP)
    assert not inv.requires_grad and torch.equal(inv, wk.fisher_inverse(g, DAMP))
    wg = w.clone().requires_grad_()
    for inverse in (inv, wk.lowrank_inverse(_grads(m=3), DAMP)):
        diag = testing.svd_inverse(g if inverse is inv else _grads(m=3), DAMP).diag
        rho = wk.obs_saliency(inverse, wg)
        assert not rho.requires_grad
        torch.testing.assert_close(rho.double(), w.double() ** 2 / (2 * diag), rtol=1e-5, atol=0)
        for out in (wk.obs_update(inverse, wg, mask), wk.group_obs_saliency(inverse, wg, groups),
                    wk.group_obs_update(inverse, wg, groups, torch.tensor([[True, False]] * B))):
            assert not out.requires_grad
    kappa = wk.condition_estimate(g.clone().requires_grad_(), DAMP)
    assert not kappa.requires_grad


@pytest.mark.parametrize("call,name", [
    (lambda inv, w, grp: wk.group_obs_saliency(inv, w, grp, exact="no"), "exact"),
    (lambda inv, w, grp: wk.group_obs_update(inv, w, grp, torch.zeros(B, 2, dtype=torch.bool), exact=0), "exact"),
    (lambda inv, w, grp: wk.condition_estimate(_grads(), DAMP, upper="yes"), "upper"),
    (lambda inv, w, grp: wk.condition_estimate(_grads(), DAMP, iters=2.5), "iters"),
    (lambda inv, w, grp: wk.fisher_inverse(_grads(), "0.1"), "damp"),
])
def test_flags_and_scalars_of_the_wrong_type(call, name):
    inv = wk.fisher_inverse(_grads(), DAMP)
    with pytest.raises(ValueError, match=name):
        call(inv, torch.randn(B, C), torch.arange(C).view(1, 2, 4).expand(B, 2, 4))


def test_condition_estimate_numpy_iters_matches_float64():
    g = _grads()
    kappa = wk.condition_estimate(g, np.float32(DAMP), iters=np.int64(50))
    torch.testing.assert_close(kappa, testing.svd_inverse(g, DAMP).kappa, rtol=1e-4, atol=0)


def test_blocking_sizes():
    """numpy / tensor integer sizes round-trip; floats, bools, negative and too large counts are refused."""
    x = torch.randn(2, 10)
    for size in (4, np.int64(4), torch.tensor(4)):
        xb = wk.to_blocks(x, size)
        assert xb.shape == (2, 3, 4) and torch.equal(wk.from_blocks(xb, np.int64(10)), x)
        assert wk.valid_mask(10, size).sum().item() == 10
    for call, name in [(lambda: wk.to_blocks(x, 2.5), "block_size"), (lambda: wk.to_blocks(x, True), "block_size"),
                       (lambda: wk.to_blocks(torch.tensor(1.0), 4), "x"),
                       (lambda: wk.from_blocks(wk.to_blocks(x, 4), 13), "numel"),
                       (lambda: wk.from_blocks(wk.to_blocks(x, 4), -1), "numel"),
                       (lambda: wk.valid_mask(10.5, 4), "numel"), (lambda: wk.num_blocks(-3, 4), "numel")]:
        with pytest.raises(ValueError, match=name):
            call()


def test_choose_form_sizes_and_budget():
    assert wk.choose_form(np.int64(10), 100, 1) == wk.choose_form(10, 100, 1) == "lowrank"
    assert wk.choose_form(10, 100, 1, memory_budget=1e9) == wk.choose_form(10, 100, 1, memory_budget="1GB") == "lowrank"
    for kwargs, name in [({"num_grads": "10"}, "num_grads"), ({"num_grads": 10.5}, "num_grads"),
                         ({"itemsize": 0}, "itemsize"), ({"memory_budget": "1 GX"}, "memory_budget")]:
        args = {"num_grads": 10, "block_size": 100, **kwargs}
        with pytest.raises(ValueError, match=name):
            wk.choose_form(**args)
    with pytest.raises(ValueError, match="memory_budget"):
        wk.blockwise_inverse(_grads(m=3), DAMP, memory_budget=-5)


def test_error_bound_inputs():
    kappa = torch.tensor([0.0, 1e5])
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(wk.error_bound(kappa), 8 * eps * (1 + kappa))
    assert wk.error_bound(np.float64(3.0), torch.float64) == pytest.approx(8 * torch.finfo(torch.float64).eps * 4)
    for kappa, name in [(-1.0, "kappa"), (float("nan"), "kappa"), ("1e5", "kappa"), (torch.tensor([-1.0]), "kappa"),
                        (1.0, "dtype")]:
        with pytest.raises(ValueError, match=name):
            wk.error_bound(kappa, torch.int32 if name == "dtype" else torch.float32)


def test_lowrank_inverse_class_used_directly():
    """The public constructor validates like lowrank_inverse; select / matvec refuse bad input and match float64."""
    g = _grads(m=3)
    for args, name in [((g[0], DAMP, 3), "grads"), ((g.half(), DAMP, 3), "grads"), ((g, -1.0, 3), "damp"),
                       ((g, DAMP, 0), "num_samples"), ((g, DAMP, 3, "x"), "on_failure"),
                       ((g, DAMP, 3, "recompute", "gpu"), "backend")]:
        with pytest.raises(ValueError, match=name):
            wk.LowRankInverse(*args)
    inv = wk.LowRankInverse(g.transpose(1, 2).contiguous().transpose(1, 2), np.float32(DAMP), np.int64(3))
    ref = testing.svd_inverse(g, DAMP)
    v = torch.randn(B, C)
    want = (ref.inverse @ v.double().unsqueeze(-1)).squeeze(-1)
    bound = wk.error_bound(ref.kappa).max().item()
    assert ((inv.matvec(v).double() - want).norm(dim=1) <= bound * want.norm(dim=1) * 4).all()
    sub = inv.select(torch.tensor([2, 0]))
    assert (testing.spectral_error(sub.dense(), ref.inverse[[2, 0]]) <= wk.error_bound(ref.kappa[[2, 0]])).all()
    for call in (lambda: inv.select(torch.tensor([B])), lambda: inv.select(torch.tensor([True])),
                 lambda: inv.select(torch.tensor([0.0]))):
        with pytest.raises(ValueError, match="index"):
            call()
    for bad in (torch.randn(B, C - 1), torch.randn(B, C).double(), torch.randn(C)):
        with pytest.raises(ValueError, match="v must"):
            inv.matvec(bad)

