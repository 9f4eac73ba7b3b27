"""Every public op on every available backend against dense float64 references.

Shape matrix of the issue: c in {1, 7, 50, 64, 128, 200, 257}, k = m in {1, 16, 130},
B in {1, 3, 1000}. B = 1000 runs on the compiled backends and the torch backend for
c <= 64 (the float64 reference for 1000 blocks of 257 adds nothing but minutes); the
Triton interpreter on CPU gets B <= 3 (it executes every program instance in NumPy).
"""
from __future__ import annotations

import itertools
import os
import shutil

import pytest
import torch
from _shared import (
    backend_params,
    dense_fisher,
    dense_inverse,
    device_marks,
    inverse_tolerance,
    is_interpreted,
    marked_backend_params,
    rel_err,
)

import woodfisher_kernels as wk
from woodfisher_kernels import _dispatch

BLOCK_SIZES = (1, 7, 50, 64, 128, 200, 257)
NUM_GRADS = (1, 16, 130)
NUM_BLOCKS = (1, 3, 1000)
DAMP = 0.5


def _cases():
    for (backend, device), c, m, b in itertools.product(backend_params(), BLOCK_SIZES, NUM_GRADS, NUM_BLOCKS):
        if b == 1000 and (is_interpreted(backend, device) or (device == "cpu" and c > 64)):
            continue
        if is_interpreted(backend, device) and c >= 128 and m == 130 and b > 1:
            continue
        yield pytest.param(backend, device, c, m, b, marks=device_marks(device),
                           id=f"{backend}-{device}-c{c}-m{m}-B{b}")


def _grads(b, m, c, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, m, c, generator=gen).to(device)


def _sample_blocks(b):
    """At most 16 blocks are compared against the float64 reference."""
    return torch.linspace(0, b - 1, min(b, 16)).long().unique()


@pytest.mark.parametrize("backend,device,c,m,b", list(_cases()))
def test_fisher_inverse_matches_dense_float64(backend, device, c, m, b):
    grads = _grads(b, m, c, device)
    inv = wk.fisher_inverse(grads, DAMP, backend=backend)
    assert inv.shape == (b, c, c) and inv.dtype == torch.float32
    idx = _sample_blocks(b)
    fisher = dense_fisher(grads[idx].cpu(), DAMP)
    assert rel_err(inv[idx].cpu(), torch.linalg.inv(fisher)) <= inverse_tolerance(fisher, torch.float32)


@pytest.mark.parametrize("backend,device,c,k,b", list(_cases()))
def test_woodbury_update_matches_dense_float64(backend, device, c, k, b):
    """Start from a non-trivial SPD inverse, apply k updates with N != k, compare."""
    prior = _grads(b, 8, c, device, seed=1)
    inv = wk.fisher_inverse(prior, DAMP, num_samples=8.0, backend="torch")
    grads = _grads(b, k, c, device, seed=2)
    num_samples = 3.0 * k
    out = wk.woodbury_update_(inv, grads, num_samples, backend=backend)
    assert out is inv
    idx = _sample_blocks(b)
    fisher = dense_fisher(prior[idx].cpu(), DAMP, 8.0) + dense_fisher(grads[idx].cpu(), 0.0, num_samples)
    assert rel_err(inv[idx].cpu(), torch.linalg.inv(fisher)) <= inverse_tolerance(fisher, torch.float32)


@pytest.mark.parametrize("c,m", [(7, 16), (64, 130), (257, 16)])
def test_float64_torch_reference_is_exact(c, m):
    grads = _grads(3, m, c, "cpu").double()
    fisher = dense_fisher(grads, DAMP)
    inv = wk.fisher_inverse(grads, DAMP, backend="torch")
    assert inv.dtype == torch.float64
    assert rel_err(inv, torch.linalg.inv(fisher)) <= inverse_tolerance(fisher, torch.float64)


@pytest.mark.parametrize("backend,device", marked_backend_params())
def test_sequential_rank_one_loop_equals_op(backend, device):
    """The op equals the paper's Eq. 2 applied one gradient at a time (float64 loop)."""
    grads = _grads(2, 20, 9, device)
    inv = wk.fisher_inverse(grads, DAMP, backend=backend).cpu().double()
    g64 = grads.cpu().double()
    ref = torch.eye(9, dtype=torch.float64).repeat(2, 1, 1) / DAMP
    for i in range(20):
        for blk in range(2):
            u = ref[blk] @ g64[blk, i]
            ref[blk] -= torch.outer(u, u) / (20 + g64[blk, i] @ u)
    assert rel_err(inv, ref) <= 1e-5


# ----------------------------------------------------------------- real gradients


@pytest.fixture(scope="module")
def digits_grads():
    """Per-sample gradients (n, 2048) of a trained 64-32-10 MLP's first layer on digits."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi[None],))
        return torch.nn.functional.cross_entropy(out, yi[None])

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x[:300], y[:300])
    return grads["0.weight"].flatten(1)


@pytest.mark.parametrize("backend,device", marked_backend_params())
@pytest.mark.parametrize("c,m", [(50, 130), (64, 16), (257, 130)])
def test_real_gradients_blocks(digits_grads, backend, device, c, m):
    """Blocks of real per-sample gradients (last block padded); damp at 1% of the mean
    Fisher diagonal, a realistic relative damping that keeps cond(F) ~ 1e2-1e4."""
    if is_interpreted(backend, device) and c == 257:
        m = 16
    g = wk.to_blocks(digits_grads[:m], c).transpose(0, 1).contiguous()       # (B, m, c)
    damp = 0.01 * g.square().mean().item()
    inv = wk.fisher_inverse(g.to(device), damp, backend=backend).cpu()
    fisher = dense_fisher(g, damp)
    assert rel_err(inv, torch.linalg.inv(fisher)) <= inverse_tolerance(fisher, torch.float32)
    lowrank = wk.lowrank_inverse(g, damp)
    assert rel_err(lowrank.dense(), torch.linalg.inv(fisher)) <= inverse_tolerance(fisher, torch.float32)


# ----------------------------------------------------------------- padding


@pytest.mark.parametrize("backend,device", marked_backend_params())
def test_padded_entries_stay_decoupled(backend, device):
    d, c = 23, 10                                 # 3 blocks, the last one with 7 padded entries
    flat = torch.randn(16, d)
    g = wk.to_blocks(flat, c).transpose(0, 1).contiguous()
    inv = wk.fisher_inverse(g.to(device), DAMP, backend=backend).cpu().double()
    real = d - 2 * c
    ref_last = dense_inverse(flat[None, :, 2 * c:], DAMP)[0]
    assert rel_err(inv[2, :real, :real], ref_last) <= 1e-5
    assert torch.all(inv[2, real:, :real] == 0) and torch.all(inv[2, :real, real:] == 0)
    assert torch.allclose(inv[2, real:, real:], torch.eye(c - real, dtype=torch.float64) / DAMP)
    assert wk.valid_mask(d, c).sum() == d and not wk.valid_mask(d, c)[2, real:].any()


# ----------------------------------------------------------------- statistics / update


def _spd_inverse(b, c, device, seed=3):
    grads = _grads(b, 2 * c + 3, c, device, seed)
    return wk.fisher_inverse(grads, DAMP, backend="torch"), dense_inverse(grads.cpu(), DAMP)


@pytest.mark.parametrize("backend,device", marked_backend_params())
@pytest.mark.parametrize("c", [1, 7, 64, 200])
@pytest.mark.parametrize("taylor", [False, True])
def test_obs_saliency_and_update_match_float64(backend, device, c, taylor):
    b = 3
    inv, inv64 = _spd_inverse(b, c, device)
    w = torch.randn(b, c).to(device)
    g = torch.randn(b, c).to(device) * 0.1 if taylor else None
    mask = (torch.rand(b, c, generator=torch.Generator().manual_seed(4)) < 0.4).to(device)
    mask[:, 0] = True
    rho = wk.obs_saliency(inv, w, g, backend=backend)
    new = wk.obs_update(inv, w, mask, g, backend=backend)

    w64 = w.cpu().double()
    diag = torch.diagonal(inv64, dim1=1, dim2=2)
    h = torch.zeros_like(w64) if g is None else (inv64 @ g.cpu().double()[..., None])[..., 0]
    rho_ref = (w64 - h) ** 2 / (2 * diag)
    v = torch.where(mask.cpu(), (w64 - h) / diag, torch.zeros_like(w64))
    new_ref = (w64 - (inv64 @ v[..., None])[..., 0] - h).masked_fill(mask.cpu(), 0.0)
    assert rel_err(rho.cpu(), rho_ref) <= 1e-4
    assert rel_err(new.cpu(), new_ref) <= 1e-4
    assert torch.all(new[mask] == 0)


def test_single_weight_obs_update_is_the_constrained_minimiser():
    """Removing one weight q: F dw must be parallel to e_q (KKT) and w_q + dw_q = 0, and
    rho_q must equal the quadratic cost dw^T F dw / 2 (Eqs. 10-11)."""
    c = 12
    inv, inv64 = _spd_inverse(1, c, "cpu")
    fisher = torch.linalg.inv(inv64)[0]
    w = torch.randn(1, c, dtype=torch.float64)
    for q in (0, 5, 11):
        mask = torch.zeros(1, c, dtype=torch.bool)
        mask[0, q] = True
        dw = (wk.obs_update(inv64, w, mask) - w)[0]
        grad = fisher @ dw
        off = torch.cat([grad[:q], grad[q + 1:]])
        assert off.abs().max() <= 1e-9 * grad.abs().max()
        assert abs((w[0, q] + dw[q]).item()) <= 1e-12
        cost = 0.5 * dw @ fisher @ dw
        assert torch.isclose(cost, wk.obs_saliency(inv64, w)[0, q], rtol=1e-9)


# ----------------------------------------------------------------- group OBS


def _groups(b, c, num_groups, q, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(c, generator=gen)[: num_groups * q].view(num_groups, q)
                        for _ in range(b)])


def test_gathers_match_dense_indexing():
    inv, _ = _spd_inverse(3, 20, "cpu")
    idx = _groups(3, 20, 4, 3)
    rows = wk.gather_rows(inv, idx)
    sub = wk.gather_subblocks(inv, idx)
    for blk in range(3):
        for grp in range(4):
            q = idx[blk, grp]
            assert torch.equal(rows[blk, grp], inv[blk][q])
            assert torch.equal(sub[blk, grp], inv[blk][q][:, q])


@pytest.mark.parametrize("exact", [True, False])
def test_group_obs_satisfies_its_constraints(exact):
    """Exact: w_Q + dw_Q = 0 and F dw vanishes off Q, cost = rho_Q. Eq. 18: the single
    constraint 1_Q^T (w + dw) = 0 and F dw parallel to 1_Q."""
    c = 15
    inv, inv64 = _spd_inverse(1, c, "cpu")
    fisher = torch.linalg.inv(inv64)[0]
    w = torch.randn(1, c, dtype=torch.float64)
    groups = _groups(1, c, 3, 4)
    rho = wk.group_obs_saliency(inv64, w, groups, exact=exact)
    for grp in range(3):
        prune = torch.zeros(1, 3, dtype=torch.bool)
        prune[0, grp] = True
        q = groups[0, grp]
        new = wk.group_obs_update(inv64, w, groups, prune, exact=exact)
        assert torch.all(new[0, q] == 0)
        dw = new[0] - w[0]
        if not exact:                 # the update before zeroing Q: dw = -(1^T w_Q) F^-1 1_Q / s
            ones = torch.zeros(c, dtype=torch.float64)
            ones[q] = 1.0
            dw = -(w[0, q].sum()) * (inv64[0] @ ones) / (ones @ inv64[0] @ ones)
            assert abs((ones @ (w[0] + dw)).item()) <= 1e-10
        off = torch.ones(c, dtype=torch.bool)
        off[q] = False
        grad = fisher @ dw
        assert grad[off].abs().max() <= 1e-8 * grad.abs().max()
        if exact:
            assert torch.isclose(0.5 * dw @ fisher @ dw, rho[0, grp], rtol=1e-8)
        else:
            assert torch.allclose(grad[q], grad[q][0].expand(len(q)), rtol=1e-8)


def test_group_of_one_equals_single_weight_obs():
    inv, _ = _spd_inverse(2, 9, "cpu")
    w = torch.randn(2, 9)
    groups = torch.arange(9).view(1, 9, 1).repeat(2, 1, 1)
    for exact in (True, False):
        assert torch.allclose(wk.group_obs_saliency(inv, w, groups, exact=exact), wk.obs_saliency(inv, w))


# ----------------------------------------------------------------- low rank


@pytest.mark.parametrize("c,m", [(40, 8), (40, 60), (1, 3)])
def test_lowrank_and_sequential_forms_agree(c, m):
    grads = _grads(4, m, c, "cpu")
    dense = wk.fisher_inverse(grads, DAMP, num_samples=2.0 * m)
    low = wk.lowrank_inverse(grads, DAMP, num_samples=2.0 * m)
    fisher = dense_fisher(grads, DAMP, 2.0 * m)
    tol = inverse_tolerance(fisher, torch.float32)
    assert rel_err(low.dense(), dense) <= tol
    assert rel_err(wk.inverse_diagonal(low), wk.inverse_diagonal(dense)) <= tol
    w, g = torch.randn(4, c), torch.randn(4, c)
    mask = torch.rand(4, c) < 0.5
    assert rel_err(wk.obs_saliency(low, w, g), wk.obs_saliency(dense, w, g)) <= 100 * tol
    assert rel_err(wk.obs_update(low, w, mask, g), wk.obs_update(dense, w, mask, g)) <= 100 * tol
    if c >= 4:
        idx = _groups(4, c, 1, 2)
        assert rel_err(wk.gather_rows(low, idx), wk.gather_rows(dense, idx)) <= tol


def test_lowrank_accurate_with_tiny_damp():
    """damp = 1e-5 (the paper's): the float64 factorisation keeps the diagonal accurate."""
    grads = _grads(2, 30, 300, "cpu") * 1e-2
    low = wk.lowrank_inverse(grads, 1e-5)
    ref = torch.diagonal(dense_inverse(grads, 1e-5), dim1=1, dim2=2)
    assert rel_err(low.diag(), ref) <= 1e-5


def test_choose_form_and_blockwise_inverse():
    assert wk.choose_form(1024, 50) == "sequential"
    assert wk.choose_form(80, 1000) == "lowrank"
    assert wk.choose_form(400, 10000) == "lowrank"
    # m slightly below c: low-rank is cheaper in flops but needs more memory than c^2
    assert wk.choose_form(90, 100, num_blocks=10) == "lowrank"
    assert wk.choose_form(90, 100, num_blocks=10, memory_budget=10 * 100 * 100 * 4) == "sequential"
    with pytest.raises(ValueError, match="memory_budget"):
        wk.choose_form(64, 64, num_blocks=10, memory_budget=100)
    grads = _grads(2, 5, 30, "cpu")
    assert isinstance(wk.blockwise_inverse(grads, DAMP), wk.LowRankInverse)
    assert isinstance(wk.blockwise_inverse(grads, DAMP, form="sequential"), torch.Tensor)


# ----------------------------------------------------------------- dispatch


def test_auto_backend_on_cpu_is_the_c_kernel_for_float32_within_its_block_size_else_torch():
    from woodfisher_kernels import _cpu, reference

    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler here, so `pip install -e .` did not build the C kernel")
    assert _cpu.available(), "a C compiler is present, so `pip install -e .` must have built the C kernel"
    assert _dispatch.select("fisher_inverse", "auto", torch.zeros(1, 1, 1)) is _cpu.fisher_inverse
    assert _dispatch.select("woodbury_update_", "auto", torch.zeros(1, 8, 8)) is _cpu.woodbury_update_
    too_wide = torch.zeros(1, 1, _cpu.MAX_BLOCK_SIZE + 1)
    assert _dispatch.select("fisher_inverse", "auto", too_wide) is reference.fisher_inverse
    assert _dispatch.select("fisher_inverse", "auto", torch.zeros(1, 1, 1, dtype=torch.float64)) \
        is reference.fisher_inverse
    with pytest.raises(ValueError, match="float32"):
        _dispatch.select("fisher_inverse", "cpu", torch.zeros(1, 1, 1, dtype=torch.float64))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only dispatch rules")
def test_triton_backend_is_registered_and_interpreted_on_cpu():
    """The Triton kernels exist and execute here (under TRITON_INTERPRET=1), not skipped."""
    assert "triton" in wk.available_backends("fisher_inverse")
    impl = _dispatch.select("fisher_inverse", "triton", torch.zeros(1, 1, 1))
    assert "triton" in impl.__module__


def test_block_size_limit_of_a_backend_is_enforced(monkeypatch):
    """A backend with a block-size limit refuses larger blocks explicitly."""
    monkeypatch.setattr(_dispatch.backend_module("torch"), "max_block_size", lambda op: 4, raising=False)
    with pytest.raises(ValueError, match="handles block sizes up to 4"):
        _dispatch.select("fisher_inverse", "torch", torch.zeros(1, 2, 5))
    assert _dispatch._fits("fisher_inverse", "torch", torch.zeros(1, 2, 4))
