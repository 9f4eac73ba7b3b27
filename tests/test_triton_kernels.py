"""Triton backend (woodfisher_kernels._triton) against float64 references.

Runs on CUDA when present, else on CPU under TRITON_INTERPRET=1 (set by conftest.py),
so these tests execute the real kernels in CI; shapes are kept small for the interpreter.

Tolerances:
- inverses: ``64 * eps32 * cond(F)`` relative to max |entry| (``_shared.inverse_tolerance``;
  a backward-stable inversion errs by O(cond * eps)). Gradients ~ N(0, 1) and damp = 0.5
  keep cond(F) between ~2 and ~150 here, so the bound is 2e-5 .. 1e-3.
- OBS statistic / update: a first-order a-priori float32 error bound computed in float64
  from the inputs (a length-c dot product errs by at most gamma_c = c eps |F| |x|, Higham
  Sec. 3.1), times a safety factor 2; see :func:`_saliency_bound`, :func:`_update_bound`.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from _shared import EPS32, dense_fisher, dense_inverse, inverse_tolerance, rel_err  # noqa: E402

import woodfisher_kernels as wk  # noqa: E402
from woodfisher_kernels import _dispatch, reference  # noqa: E402

triton_wb = pytest.importorskip("woodfisher_kernels._triton.woodbury")
triton_obs = pytest.importorskip("woodfisher_kernels._triton.obs")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DAMP = 0.5


def _randn(*shape, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen)).to(DEVICE)


def _check_inverse(out, grads, num_samples=None):
    fisher = dense_fisher(grads.cpu(), DAMP, num_samples)
    tol = inverse_tolerance(fisher, torch.float32)
    assert rel_err(out.cpu(), torch.linalg.inv(fisher)) <= tol
    assert rel_err(out.cpu(), out.cpu().transpose(1, 2)) <= tol      # symmetric up to rounding
    ref = reference.fisher_inverse(grads.cpu().double(), DAMP, float(num_samples or grads.shape[1]))
    assert rel_err(out.cpu(), ref) <= tol


# (block size c, gradients m, tiled): register path for padded c <= 64, tiled above;
# "True" forces the tiled kernel on a small block (one partial tile / 2 x 2 tiles).
INVERSE_CASES = [
    (1, 3, None), (7, 1, None), (7, 20, None), (50, 70, None), (64, 33, None),
    (50, 40, True), (100, 17, True), (200, 3, None), (257, 5, None), (257, 40, None),
]


@pytest.mark.parametrize("c,m,tiled", INVERSE_CASES, ids=[f"c{c}-m{m}-{'tiled' if t or triton_wb.use_tiled(c) else 'reg'}"
                                                          for c, m, t in INVERSE_CASES])
def test_fisher_inverse_from_damp(c, m, tiled):
    """(damp I + G^T G / m)^-1 built from I/damp in one launch, both kernel variants."""
    grads = _randn(2, m, c, seed=c + m)
    out = triton_wb.fisher_inverse(grads, DAMP, float(m), tiled=tiled)
    assert out.shape == (2, c, c) and out.dtype == torch.float32
    _check_inverse(out, grads)


@pytest.mark.parametrize("c,k,tiled", [(7, 1, False), (7, 12, False), (50, 60, False), (50, 1, True),
                                       (20, 45, True), (200, 2, None)])
def test_woodbury_update_in_place(c, k, tiled):
    """inv <- (inv^-1 + G^T G / N)^-1 continues a Fisher built from earlier gradients.

    Covers k = 1 and k > c; N (the total count) differs from k.
    """
    first, grads = _randn(2, 6, c, seed=1), _randn(2, k, c, seed=2)
    total = float(6 + k)
    inv = dense_inverse(first.cpu(), DAMP, total).float().to(DEVICE)
    triton_wb.woodbury_update_(inv, grads, total, tiled=tiled)
    _check_inverse(inv, torch.cat([first, grads], dim=1), total)


@pytest.mark.parametrize("tiled", [False, True], ids=["reg", "tiled"])
def test_padded_coordinates_stay_decoupled(tiled):
    """Zero gradient coordinates (a padded last block) never couple with real ones:
    the real part equals the inverse of the smaller block; the rest stays I/damp exactly."""
    c, real = 40, 27
    grads = _randn(2, 30, c, seed=3)
    grads[..., real:] = 0.0
    out = triton_wb.fisher_inverse(grads, DAMP, 30.0, tiled=tiled).cpu()
    small = dense_fisher(grads[..., :real].cpu(), DAMP)
    assert rel_err(out[:, :real, :real], torch.linalg.inv(small)) <= inverse_tolerance(small, torch.float32)
    assert torch.equal(out[:, real:, :real], torch.zeros(2, c - real, real))
    assert torch.equal(out[:, real:, real:], torch.eye(c - real).expand(2, -1, -1) / DAMP)


def test_tiled_and_register_variants_agree():
    """Both variants compute the same matrix (same chunked algorithm, different tiling)."""
    grads = _randn(3, 45, 33, seed=4)
    reg = triton_wb.fisher_inverse(grads, DAMP, 45.0, tiled=False)
    tiled = triton_wb.fisher_inverse(grads, DAMP, 45.0, tiled=True)
    tol = inverse_tolerance(dense_fisher(grads.cpu(), DAMP), torch.float32)
    assert rel_err(reg.cpu(), tiled.cpu()) <= tol


def _inverse_and_weights(c, seed):
    inv = dense_inverse(_randn(2, 2 * c + 3, c, seed=seed).cpu(), DAMP).float().to(DEVICE)
    weights = _randn(2, c, seed=seed + 1)
    loss_grad = _randn(2, c, seed=seed + 2, scale=0.3)
    gen = torch.Generator().manual_seed(seed + 3)
    mask = (torch.rand(2, c, generator=gen) < 0.4).to(DEVICE)
    return inv, weights, loss_grad, mask


def _gamma(c):
    return c * EPS32 / (1 - c * EPS32)


def _saliency_bound(inv, w, lg):
    """|rho - rho64| <= 2 * (|r| |dr| + 2 eps r^2) / (2 d) with |dr| <= gamma_c |F| |lg| + eps |r|."""
    d = torch.diagonal(inv, dim1=1, dim2=2)
    r = w if lg is None else w - reference._matvec(inv, lg)
    dr = EPS32 * r.abs()
    if lg is not None:
        dr = dr + _gamma(inv.shape[-1]) * reference._matvec(inv.abs(), lg.abs()) + EPS32 * w.abs()
    return 2.0 * (r.abs() * dr + 2 * EPS32 * r.square()) / (2.0 * d)


def _update_bound(inv, w, mask, lg):
    """First-order bound on new = w - F t, t = v + lg, v = (w - h) / d on the pruned set."""
    c = inv.shape[-1]
    absf = inv.abs()
    d = torch.diagonal(inv, dim1=1, dim2=2)
    h = torch.zeros_like(w) if lg is None else reference._matvec(inv, lg)
    dh = torch.zeros_like(w) if lg is None else _gamma(c) * reference._matvec(absf, lg.abs())
    v = torch.where(mask, (w - h) / d, torch.zeros_like(w))
    dv = torch.where(mask, (dh + 2 * EPS32 * ((w - h).abs() + h.abs())) / d + EPS32 * v.abs(), torch.zeros_like(w))
    t = v if lg is None else v + lg
    dt = dv + EPS32 * t.abs()
    bound = _gamma(c + 1) * (reference._matvec(absf, t.abs()) + w.abs()) + reference._matvec(absf, dt)
    return 2.0 * bound


@pytest.mark.parametrize("c", [1, 7, 50, 200])
@pytest.mark.parametrize("taylor", [False, True], ids=["obs", "woodtaylor"])
def test_obs_saliency(c, taylor):
    inv, weights, loss_grad, _ = _inverse_and_weights(c, seed=10 + c)
    lg = loss_grad if taylor else None
    rho = triton_obs.obs_saliency(inv, weights, lg).cpu().double()
    inv64, w64 = inv.cpu().double(), weights.cpu().double()
    lg64 = None if lg is None else lg.cpu().double()
    ref = reference.obs_saliency(inv64, w64, lg64)
    assert rho.shape == (2, c)
    assert ((rho - ref).abs() <= _saliency_bound(inv64, w64, lg64) + 1e-30).all()


@pytest.mark.parametrize("c", [1, 7, 50, 200])
@pytest.mark.parametrize("taylor", [False, True], ids=["obs", "woodtaylor"])
def test_obs_update(c, taylor):
    inv, weights, loss_grad, mask = _inverse_and_weights(c, seed=20 + c)
    mask[0, 0] = True                                          # at least one pruned entry
    lg = loss_grad if taylor else None
    new = triton_obs.obs_update(inv, weights, mask, lg).cpu()
    inv64, w64, m = inv.cpu().double(), weights.cpu().double(), mask.cpu()
    lg64 = None if lg is None else lg.cpu().double()
    ref = reference.obs_update(inv64, w64, m, lg64)
    assert torch.equal(new[m], torch.zeros(int(m.sum())))     # pruned entries exactly 0
    assert ((new.double() - ref).abs() <= _update_bound(inv64, w64, m, lg64) + 1e-30).all()


def test_obs_update_keeps_weights_without_pruning():
    """Empty pruned set: the plain update is the identity, WoodTaylor subtracts h = F g."""
    inv, weights, loss_grad, _ = _inverse_and_weights(50, seed=30)
    none = torch.zeros_like(weights, dtype=torch.bool)
    assert torch.equal(triton_obs.obs_update(inv, weights, none), weights)
    shifted = triton_obs.obs_update(inv, weights, none, loss_grad).cpu().double()
    inv64 = inv.cpu().double()
    expect = weights.cpu().double() - reference._matvec(inv64, loss_grad.cpu().double())
    assert rel_err(shifted, expect) <= 4 * _gamma(50) * torch.linalg.cond(inv64).max().item()


OPS = {
    "fisher_inverse": lambda: wk.fisher_inverse(_randn(2, 9, 20, seed=5), DAMP, backend="triton"),
    "woodbury_update_": lambda: wk.woodbury_update_(torch.eye(20, device=DEVICE).repeat(2, 1, 1),
                                                    _randn(2, 4, 20, seed=6), 4.0, backend="triton"),
    "obs_saliency": lambda: wk.obs_saliency(torch.eye(20, device=DEVICE).repeat(2, 1, 1),
                                            _randn(2, 20, seed=7), backend="triton"),
    "obs_update": lambda: wk.obs_update(torch.eye(20, device=DEVICE).repeat(2, 1, 1), _randn(2, 20, seed=8),
                                        torch.ones(2, 20, dtype=torch.bool, device=DEVICE), backend="triton"),
}
IMPLS = {"fisher_inverse": triton_wb.fisher_inverse, "woodbury_update_": triton_wb.woodbury_update_,
         "obs_saliency": triton_obs.obs_saliency, "obs_update": triton_obs.obs_update}


@pytest.mark.parametrize("op", sorted(OPS))
def test_public_ops_run_the_triton_kernels(op, monkeypatch):
    """backend="triton" selects these kernels and the public op actually calls them."""
    impl = IMPLS[op]
    assert _dispatch.select(op, "triton", torch.zeros(1, 1, 1, device=DEVICE)) is impl
    calls = []

    def spy(*args, **kwargs):
        calls.append(op)
        return impl(*args, **kwargs)

    monkeypatch.setitem(_dispatch.backend_module("triton").IMPLS, op, spy)
    OPS[op]()
    assert calls == [op]


@pytest.mark.parametrize("num_samples", [None, 40.0])
def test_public_fisher_inverse_matches_direct_kernel_call(num_samples):
    grads = _randn(3, 16, 50, seed=9)
    out = wk.fisher_inverse(grads, DAMP, num_samples, backend="triton")
    assert torch.equal(out, triton_wb.fisher_inverse(grads, DAMP, num_samples or 16.0))
    _check_inverse(out, grads, num_samples)


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_spills():
    """The launch configurations compile for an H100/H200 (sm_90) with the installed triton,
    without register spills (compile only: no GPU needed; the interpreter must be off)."""
    import subprocess
    import sys

    import triton.backends

    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this triton has no NVIDIA backend")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run([sys.executable, "-m", "woodfisher_kernels._triton.compile_check", "--quick",
                          "--no-spills"], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("ok ") == 6
