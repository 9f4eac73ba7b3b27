"""Failed blocks: float64 recomputation or a ValueError, and transactional in-place updates.

Snapshots compare bit patterns (``.view(torch.int32)``), so NaN and -0.0 count too.
A failed block is simulated by a backend that writes NaN into one block of its output
(as a Triton / CUDA kernel can at kappa ~ 1e8), or that raises after writing.
"""
from __future__ import annotations

import pytest
import torch

import woodfisher_kernels as wk
from woodfisher_kernels import _dispatch, testing

B, C = 4, 16
DAMP = 1e-2


def _grads(m=24, seed=0, scale=1.0):
    return torch.randn(B, m, C, generator=torch.Generator().manual_seed(seed)) * scale


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.clone().view(torch.int32)


def _poisoning(op, block=1, raise_after=False):
    """A backend implementation of ``op`` that runs torch, then writes NaN into one block."""
    ref = testing.implementation(op, "torch")

    def impl(*args):
        if op == "woodbury_update_":
            ref(*args)
            args[0][block, 0, 0] = float("nan")
            if raise_after:
                raise RuntimeError("kernel launch failed")
            return None
        out = ref(*args)
        out[block].fill_(float("nan"))
        return out
    return impl


@pytest.fixture
def fake_backend(monkeypatch):
    """Install a poisoned implementation as the torch backend of ``op`` (no ``checked`` fast path)."""
    def install(op, **kw):
        monkeypatch.setitem(_dispatch.backend_module("torch").IMPLS, op, _poisoning(op, **kw))
    return install


def test_build_recomputes_failed_blocks_in_float64(fake_backend):
    grads = _grads()
    fake_backend("fisher_inverse")
    inv = wk.fisher_inverse(grads, DAMP, backend="torch")
    ref = testing.svd_inverse(grads, DAMP)
    assert bool(torch.isfinite(inv).all())
    assert bool((testing.spectral_error(inv, ref.inverse) <= wk.error_bound(ref.kappa)).all())


def test_build_raises_with_damp_and_kappa(fake_backend):
    fake_backend("fisher_inverse")
    with pytest.raises(ValueError, match=r"1 of 4 blocks \(first: \[1\]\).*damp=0\.01.*kappa = .*damp='auto'"):
        wk.fisher_inverse(_grads(), DAMP, backend="torch", on_failure="raise")


@pytest.mark.parametrize("on_failure", ["raise", "recompute"])
def test_update_is_transactional_when_a_kernel_fails(fake_backend, on_failure):
    inv = wk.fisher_inverse(_grads(seed=1), DAMP)
    before = _bits(inv)
    fake_backend("woodbury_update_", raise_after=True)
    with pytest.raises(RuntimeError, match="kernel launch failed"):
        wk.woodbury_update_(inv, _grads(8, seed=2), 32.0, backend="torch", on_failure=on_failure)
    assert torch.equal(_bits(inv), before)


def test_update_with_a_nan_block_raises_and_leaves_inv_untouched(fake_backend):
    inv = wk.fisher_inverse(_grads(seed=1), DAMP)
    before = _bits(inv)
    fake_backend("woodbury_update_")
    with pytest.raises(ValueError, match=r"woodbury_update_: 1 of 4 blocks.*damp of the inverse.*kappa"):
        wk.woodbury_update_(inv, _grads(8, seed=2), 32.0, backend="torch", on_failure="raise")
    assert torch.equal(_bits(inv), before)


def test_update_with_a_nan_block_is_recomputed(fake_backend):
    first, more = _grads(seed=1), _grads(8, seed=2)
    inv = wk.fisher_inverse(first, DAMP, num_samples=32.0)
    fake_backend("woodbury_update_")
    wk.woodbury_update_(inv, more, 32.0, backend="torch")
    ref = testing.svd_inverse(torch.cat([first, more], dim=1), DAMP, 32.0)
    assert bool((testing.spectral_error(inv, ref.inverse) <= wk.error_bound(ref.kappa)).all())


def test_update_refused_in_float64_changes_nothing():
    """A float64 update whose blocks fail cannot be recomputed: ValueError, inv as it was."""
    inv = wk.fisher_inverse(_grads(seed=1).double(), DAMP)
    inv[0] = -inv[0]                                         # not positive definite: the update fails
    before = inv.clone()
    with pytest.raises(ValueError, match="float64"):
        wk.woodbury_update_(inv, _grads(8, seed=2).double(), 32.0, backend="torch")
    torch.testing.assert_close(inv, before, rtol=0, atol=0, equal_nan=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_real_triton_kernel_nan_is_caught_at_op_level():
    """At kappa ~ 1e8 the Triton kernel's float32 recurrence yields NaN (interpreted on CPU)."""
    if "triton" not in testing.backends("fisher_inverse"):
        pytest.skip("triton is not installed")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    g = (torch.randn(1, 32, 1, generator=gen) * torch.randn(1, 1, 64, generator=gen)).to(device)
    raw = testing.implementation("fisher_inverse", "triton")(g.contiguous(), 1e-8, 32.0)
    inv = wk.fisher_inverse(g, 1e-8, backend="triton")
    ref = testing.svd_inverse(g.cpu(), 1e-8)
    assert not bool(torch.isfinite(raw).all()) or bool((raw.diagonal(dim1=1, dim2=2) <= 0).any()) or \
        bool((testing.diag_error(raw.cpu(), ref.diag) <= wk.error_bound(ref.kappa)).all())
    assert bool((testing.diag_error(inv.cpu(), ref.diag) <= wk.error_bound(ref.kappa)).all())
    stream = torch.eye(64, device=device).div(1e-8).unsqueeze(0).contiguous()
    before = _bits(stream)
    try:
        wk.woodbury_update_(stream, g, 32.0, backend="triton", on_failure="raise")
    except ValueError:
        assert torch.equal(_bits(stream), before)


def test_lowrank_with_more_gradients_than_block_size_is_correct():
    """Forced low-rank with m > c (was a relative error of 1.6): dense internals, stated bound."""
    g = _grads(m=3 * C + 1, seed=3)
    w = torch.randn(B, C, generator=torch.Generator().manual_seed(4))
    mask = torch.rand(B, C, generator=torch.Generator().manual_seed(5)) < 0.5
    for damp in (1e-3, 1e-1):
        low = wk.blockwise_inverse(g, damp, form="lowrank")
        ref = testing.svd_inverse(g, damp)
        bound = wk.error_bound(ref.kappa)
        assert low.factor is None and bool((bound < 1e-2).all())
        v = torch.where(mask, w.double() / ref.diag, 0)
        want = (w.double() - (ref.inverse @ v.unsqueeze(-1)).squeeze(-1)).masked_fill(mask, 0)
        err = (wk.obs_update(low, w, mask).double() - want).norm(dim=1)
        scale = torch.linalg.matrix_norm(ref.inverse, 2) * v.norm(dim=1)
        assert bool((err <= 2 * bound * scale).all())
        assert bool((testing.diag_error(low.diag(), ref.diag) <= bound).all())


def test_lowrank_raise_mode_names_damp():
    g = torch.randn(2, 3, 1) * torch.randn(2, 1, 40) * 1e6
    with pytest.raises(ValueError, match="lowrank_inverse.*damp=1e-08"):
        wk.lowrank_inverse(g, 1e-8, on_failure="raise")


def test_on_failure_is_validated():
    with pytest.raises(ValueError, match="on_failure must be one of"):
        wk.fisher_inverse(_grads(), DAMP, on_failure="ignore")
    with pytest.raises(ValueError, match="on_failure"):
        wk.woodbury_update_(torch.eye(C).expand(B, C, C).contiguous(), _grads(), 1.0, on_failure=None)
    with pytest.raises(ValueError, match="iters"):
        wk.condition_estimate(_grads(), DAMP, iters=0)
