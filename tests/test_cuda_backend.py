"""The CUDA backend (csrc/, loaded as woodfisher_kernels._C).

GPU tests (marked ``gpu``; skipped without CUDA by conftest) run both register-blocked
rank-K Woodbury kernels (block in shared memory, block in global memory) against float64
dense inverses, check padding, exact symmetry, chunk boundaries, unaligned inputs, the
ill-conditioned contract (accurate to eps32 * kappa, or the block is NaN), the limits, and
the OBS ops (plain and WoodTaylor) against reference.py in float64.
With a GPU but without the built extension they fail with the build command (set
WOODFISHER_NO_CUDA=1 to skip them on purpose). CPU tests check that the backend module
imports cleanly without the extension and is then unavailable.
"""
from __future__ import annotations

import importlib
import itertools
import os
import sys

import pytest
import torch
from _shared import EPS32, dense_fisher, inverse_tolerance, rel_err

import woodfisher_kernels as wk
from woodfisher_kernels import _cuda, _dispatch, reference
from woodfisher_kernels.blocking import to_blocks, valid_mask

OPS = ("woodbury_update_", "fisher_inverse", "obs_saliency", "obs_update")
BLOCK_SIZES = (1, 7, 50, 64, 128, 200, 257)
NUM_GRADS = (1, 16, 130)
NUM_BLOCKS = (1, 3, 1000)
MAX_ENTRIES = 1 << 24  # cap on B * c * c so the float64 references stay small
DAMP = 0.5
OBS_TOL = 2e-5  # float32 (w - h)^2 / 2d and w - F v - h vs float64: measured ~2e-7


@pytest.fixture
def ext():
    """The cuda backend module, or a failure explaining how to build it."""
    if not _cuda.AVAILABLE:
        if os.environ.get("WOODFISHER_NO_CUDA") == "1":
            pytest.skip("WOODFISHER_NO_CUDA=1: CUDA extension deliberately not built")
        pytest.fail("a GPU is present but woodfisher_kernels._C is not built; run "
                    "`pip install --no-build-isolation --no-deps -e .` first")
    return _cuda


def _grads(b, m, c, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, m, c, generator=gen).cuda()


def _shape_cases():
    seen = set()
    for c, m, b in itertools.product(BLOCK_SIZES, NUM_GRADS, NUM_BLOCKS):
        b = min(b, max(1, MAX_ENTRIES // (c * c)))
        if (c, m, b) not in seen:
            seen.add((c, m, b))
            yield pytest.param(c, m, b, id=f"c{c}-m{m}-B{b}")


SHAPE_CASES = list(_shape_cases())
# Chunks of 32 gradients (partial, exact, one more), chunk widths padded to 4, the largest
# shared-memory block, a tiled block with 16-byte vector loads.
CHUNK_CASES = [pytest.param(c, m, 3, id=f"chunks-c{c}-m{m}")
               for c, m in [(64, 31), (64, 32), (64, 33), (64, 65), (128, 3), (204, 40), (260, 40)]]


def _skip_if_too_big_for_shared(ext, path, c):
    if path == "shared" and c > ext.limits()[0]:
        pytest.skip(f"c={c} exceeds the shared-memory kernel on this device")


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["shared", "tiled"])
@pytest.mark.parametrize("c, m, b", SHAPE_CASES + CHUNK_CASES)
def test_fisher_inverse_matches_dense_inverse(ext, path, c, m, b):
    _skip_if_too_big_for_shared(ext, path, c)
    grads = _grads(b, m, c)
    inv = ext.fisher_inverse(grads, DAMP, float(m), path)
    fisher = dense_fisher(grads, DAMP)
    assert rel_err(inv, torch.linalg.inv(fisher)) <= inverse_tolerance(fisher, torch.float32)
    # Both kernels subtract the same rounded products for (r, j) and (j, r).
    assert torch.equal(inv, inv.transpose(1, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["shared", "tiled"])
@pytest.mark.parametrize("c, m, b", SHAPE_CASES)
def test_woodbury_update_continues_an_inverse(ext, path, c, m, b):
    _skip_if_too_big_for_shared(ext, path, c)
    first, more = _grads(b, m, c, seed=1), _grads(b, m, c, seed=2)
    n = 2.0 * m
    inv64 = torch.linalg.inv(dense_fisher(first, DAMP, n))
    # exactly symmetric input; contiguous (linalg.inv on CUDA returns column-major batches)
    inv = (0.5 * (inv64 + inv64.transpose(1, 2))).float().contiguous()
    ext.woodbury_update_(inv, more, n, path)
    fisher = dense_fisher(torch.cat([first, more], dim=1), DAMP, n)
    assert rel_err(inv, torch.linalg.inv(fisher)) <= inverse_tolerance(fisher, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["shared", "tiled"])
@pytest.mark.parametrize("c", [64, 257])
def test_padding_stays_decoupled(ext, path, c):
    _skip_if_too_big_for_shared(ext, path, c)
    numel, m, damp = 1000, 40, 0.3
    flat = torch.randn(m, numel, generator=torch.Generator().manual_seed(3)).cuda()
    grads = to_blocks(flat, c).transpose(0, 1).contiguous()  # (B, m, c)
    real = valid_mask(numel, c, device="cuda")
    assert not real[-1].all(), "the last block must be padded"
    inv = ext.fisher_inverse(grads, damp, float(m), path)
    last, keep = inv[-1], real[-1]
    pad_diag = (torch.tensor(1.0) / torch.tensor(damp)).item()  # float32 1/damp, as in the kernel
    npad = int((~keep).sum())
    assert torch.equal(last[~keep][:, ~keep], torch.eye(npad, device="cuda") * pad_diag)
    assert not last[~keep][:, keep].any() and not last[keep][:, ~keep].any()
    fisher = dense_fisher(grads[-1:, :, keep], damp)
    assert rel_err(last[keep][:, keep][None], torch.linalg.inv(fisher)) <= inverse_tolerance(
        fisher, torch.float32)

    weights = to_blocks(torch.randn(numel, generator=torch.Generator().manual_seed(4)).cuda(), c)
    loss_grad = to_blocks(0.1 * torch.randn(numel, generator=torch.Generator().manual_seed(5)).cuda(), c)
    mask = (torch.rand(weights.shape, generator=torch.Generator().manual_seed(6)) < 0.3).cuda() & real
    for g in (None, loss_grad):
        assert not ext.obs_saliency(inv, weights, g)[~real].any()
        assert not ext.obs_update(inv, weights, mask, g)[~real].any()


def _obs_inputs(b, c, seed=7):
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(b, c, generator=gen).cuda()
    loss_grad = 0.1 * torch.randn(b, c, generator=gen).cuda()
    mask = (torch.rand(b, c, generator=gen) < 1 / 3).cuda()
    return weights, loss_grad, mask


@pytest.mark.gpu
@pytest.mark.parametrize("taylor", [False, True], ids=["plain", "woodtaylor"])
@pytest.mark.parametrize("c, b", [(1, 1000), (7, 3), (50, 1000), (64, 3), (128, 300), (200, 3),
                                  (257, 200)])
def test_obs_ops_match_reference(ext, c, b, taylor):
    inv = ext.fisher_inverse(_grads(b, 16, c), DAMP, 16.0)
    weights, loss_grad, mask = _obs_inputs(b, c)
    g = loss_grad if taylor else None
    g64 = loss_grad.double() if taylor else None
    rho = ext.obs_saliency(inv, weights, g)
    assert rel_err(rho, reference.obs_saliency(inv.double(), weights.double(), g64)) <= OBS_TOL
    new = ext.obs_update(inv, weights, mask, g)
    want = reference.obs_update(inv.double(), weights.double(), mask, g64)
    assert rel_err(new, want) <= OBS_TOL
    assert not new[mask].any() and not torch.signbit(new[mask]).any()  # exactly +0


@pytest.mark.gpu
def test_public_ops_dispatch_to_cuda(ext):
    grads = _grads(3, 16, 50)
    assert _dispatch.select("fisher_inverse", "auto", grads) is ext.fisher_inverse
    inv = wk.fisher_inverse(grads, DAMP)
    assert torch.equal(inv, ext.fisher_inverse(grads, DAMP, 16.0))
    weights, _, mask = _obs_inputs(3, 50)
    assert torch.equal(wk.obs_update(inv, weights, mask, backend="cuda"),
                       ext.obs_update(inv, weights, mask))


@pytest.mark.gpu
def test_runs_on_the_current_stream(ext):
    grads = _grads(64, 130, 64)
    expected = ext.fisher_inverse(grads, DAMP, 130.0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        inv = ext.fisher_inverse(grads, DAMP, 130.0)
        ext.woodbury_update_(inv, grads, 130.0)
    stream.synchronize()
    again = expected.clone()
    ext.woodbury_update_(again, grads, 130.0)
    assert torch.equal(inv, again)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["shared", "tiled"])
@pytest.mark.parametrize("c, m, b, damp", [(64, 64, 50, DAMP), (128, 130, 7, DAMP), (7, 33, 3, DAMP),
                                           (68, 100, 2, 1e-9)])  # the last: NaN-poisoned blocks
def test_block_wide_cholesky_gives_the_same_bits(ext, monkeypatch, path, c, m, b, damp):
    """WOODFISHER_CUDA_CHOL=block (experimental: the K x K Cholesky on the whole CTA) computes
    every entry with the same operations in the same order as the default one-warp factorisation."""
    _skip_if_too_big_for_shared(ext, path, c)
    grads = _grads(b, m, c, seed=5)
    monkeypatch.delenv("WOODFISHER_CUDA_CHOL", raising=False)
    warp = ext.fisher_inverse(grads, damp, float(m), path)
    monkeypatch.setenv("WOODFISHER_CUDA_CHOL", "block")
    block = ext.fisher_inverse(grads, damp, float(m), path)
    both_nan = warp.isnan() & block.isnan()
    assert torch.equal(torch.where(both_nan, 0.0, warp), torch.where(both_nan, 0.0, block))


@pytest.mark.gpu
def test_limits_and_refusals(ext):
    shared_max, woodbury_max, obs_max = ext.limits()
    assert 128 <= shared_max < woodbury_max <= obs_max
    assert ext.max_block_size("fisher_inverse") == woodbury_max and ext.max_block_size("obs_update") == obs_max
    grads = _grads(1, 1, shared_max + 1)
    # the numbers in the message too: formatting them crashed once (bindings.cpp, num())
    with pytest.raises(ValueError, match=f"shared-memory kernel holds blocks up to c={shared_max}, "
                                         f"got c={shared_max + 1}"):
        ext.fisher_inverse(grads, DAMP, 1.0, "shared")
    assert ext.fisher_inverse(grads, DAMP, 1.0, "auto").shape == (1, shared_max + 1, shared_max + 1)
    with pytest.raises(ValueError, match=f"block size {woodbury_max + 1} exceeds the CUDA backend's limit "
                                         f"{woodbury_max} "):
        ext.fisher_inverse(_grads(1, 1, woodbury_max + 1), DAMP, 1.0)
    with pytest.raises(ValueError, match="handles block sizes up to"):
        wk.fisher_inverse(_grads(1, 1, woodbury_max + 1), DAMP, backend="cuda")
    with pytest.raises(ValueError, match=r"grads must have 3 dimensions, got shape \(4, 5\)"):
        ext.fisher_inverse(torch.ones(4, 5, device="cuda"), DAMP, 1.0)
    with pytest.raises(ValueError, match="grads must have dtype Float, got Double"):
        ext.fisher_inverse(torch.ones(1, 4, 5, device="cuda", dtype=torch.float64), DAMP, 1.0)
    with pytest.raises(ValueError, match="num_samples must be > 0, got -2.5"):
        ext.fisher_inverse(_grads(1, 1, 8), DAMP, -2.5)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["shared", "tiled"])
def test_unaligned_inputs_take_the_scalar_path(ext, path):
    """c % 4 == 0 but tensors that start 4 bytes past a 16-byte boundary: same results."""
    c, m = 64, 20
    flat = torch.randn(3 * m * c + 1, generator=torch.Generator().manual_seed(11)).cuda()
    grads = flat[1:].view(3, m, c)
    assert grads.data_ptr() % 16 != 0
    inv = ext.fisher_inverse(grads, DAMP, float(m), path)
    assert torch.equal(inv, ext.fisher_inverse(grads.clone(), DAMP, float(m), path))
    storage = torch.empty(3 * c * c + 1, device="cuda")
    shifted = storage[1:].view(3, c, c)
    shifted.copy_(inv)
    ext.woodbury_update_(shifted, grads, 2.0 * m, path)
    again = inv.clone()
    ext.woodbury_update_(again, grads.clone(), 2.0 * m, path)
    assert torch.equal(shifted, again)


def _lambda_max(grads, num_samples):
    g = grads.double().cpu()
    return torch.linalg.eigvalsh(g.transpose(1, 2) @ g / num_samples)[:, -1]


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["shared", "tiled"])
@pytest.mark.parametrize("c, m", [(64, 40), (68, 100)])
@pytest.mark.parametrize("damp", [1e-5, 1e-9])
def test_ill_conditioned_blocks_are_accurate_or_nan(ext, path, c, m, damp):
    """kappa = lambda_max(G^T G / N) / damp up to ~1e9 (issue 9): every block is within
    eps32 * kappa of the float64 inverse, or entirely NaN (the K x K factorisation found the
    block no longer positive definite in float32) -- never finite garbage."""
    grads = _grads(4, m, c, seed=m)
    inv = ext.fisher_inverse(grads, damp, float(m), path).cpu()
    want = torch.linalg.inv(dense_fisher(grads.cpu(), damp))
    kappa = _lambda_max(grads, m) / damp
    for b in range(4):
        if torch.isnan(inv[b]).all():
            continue
        assert rel_err(inv[b:b + 1], want[b:b + 1]) <= EPS32 * kappa[b].item()


@pytest.mark.skipif(_cuda.AVAILABLE, reason="the CUDA extension is built here")
def test_without_extension_nothing_is_registered():
    assert "woodfisher_kernels._C" not in sys.modules
    for op in OPS:
        assert "cuda" not in wk.available_backends(op)
        with pytest.raises(ValueError, match="backend='cuda' is not available"):
            _dispatch.select(op, "cuda", torch.zeros(1, 2, 2))


def test_unloadable_extension_warns_and_is_unavailable(monkeypatch):
    """A stale _C (e.g. built for another torch) must not break `import woodfisher_kernels`."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setitem(sys.modules, "woodfisher_kernels._C", None)  # import -> ImportError
    monkeypatch.delattr(wk, "_C", raising=False)
    try:
        with pytest.warns(RuntimeWarning, match="failed to load"):
            importlib.reload(_cuda)
        assert _cuda.AVAILABLE is False and _cuda.available() is False
    finally:
        monkeypatch.undo()
        importlib.reload(_cuda)  # back to the real state
