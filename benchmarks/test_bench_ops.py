"""pytest-benchmark microbenchmarks of every public op on every backend of the device.

    pytest benchmarks -q --benchmark-disable          # CI smoke run (< 60 s on 2 cores)
    pytest benchmarks --bench-full                    # GPU: large shapes, cuda/triton/torch

On CPU the C kernel (where built) and the torch backend are benchmarked (the Triton
interpreter is a correctness tool, not a timing). On CUDA each call is followed by ``torch.cuda.synchronize``.
"""
import os

import pytest
import torch

import woodfisher_kernels as wk
from benchmarks import baselines

FULL = os.environ.get("WF_BENCH_FULL", "0") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# (blocks, block size c, gradients m) for the dense and the low-rank forms
DENSE = (8192, 128, 128) if FULL else (64, 32, 16)
LOWRANK = (1024, 1000, 80) if FULL else (16, 96, 8)
DAMP = 1e-5


def backends(op):
    wanted = ("cuda", "triton", "torch") if DEVICE.type == "cuda" else ("cpu", "torch")
    return [b for b in wanted if b in wk.available_backends(op)]


def synced(fn):
    if DEVICE.type != "cuda":
        return fn

    def call(*a, **k):
        out = fn(*a, **k)
        torch.cuda.synchronize()
        return out
    return call


def grads_for(shape, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(*shape, device=DEVICE, generator=gen).mul_(1e-2)


@pytest.fixture(scope="module")
def dense():
    b, c, m = DENSE
    g = grads_for((b, m, c))
    inv = wk.fisher_inverse(g, DAMP, backend="torch")
    w = torch.randn(b, c, device=DEVICE)
    mask = torch.rand(b, c, device=DEVICE) < 0.5
    return g, inv, w, mask


@pytest.fixture(scope="module")
def lowrank():
    b, c, m = LOWRANK
    g = grads_for((b, m, c), seed=1)
    w = torch.randn(b, c, device=DEVICE)
    return g, wk.lowrank_inverse(g, DAMP), w, torch.rand(b, c, device=DEVICE) < 0.5


@pytest.mark.parametrize("backend", backends("fisher_inverse"))
def test_fisher_inverse(benchmark, dense, backend):
    g = dense[0]
    out = benchmark(synced(wk.fisher_inverse), g, DAMP, backend=backend, check_finite=False)
    assert out.shape == (g.shape[0], g.shape[2], g.shape[2]) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("k", [1, 32])
@pytest.mark.parametrize("backend", backends("woodbury_update_"))
def test_woodbury_update(benchmark, dense, backend, k):
    g, inv, _, _ = dense
    target = inv.clone()
    upd = g[:, :min(k, g.shape[1])].contiguous()
    benchmark(synced(wk.woodbury_update_), target, upd, 1e4, backend=backend, check_finite=False)
    assert bool(torch.isfinite(target).all())


def test_lowrank_inverse(benchmark, lowrank):
    g = lowrank[0]
    out = benchmark(synced(wk.lowrank_inverse), g, DAMP, check_finite=False)
    assert bool((out.diag() > 0).all())


@pytest.mark.parametrize("form", ["auto", "sequential", "lowrank"])
def test_blockwise_inverse(benchmark, lowrank, form):
    out = benchmark(synced(wk.blockwise_inverse), lowrank[0], DAMP, form=form)
    assert out.shape[1] == LOWRANK[1]


@pytest.mark.parametrize("backend", backends("obs_saliency"))
def test_obs_saliency(benchmark, dense, backend):
    _, inv, w, _ = dense
    rho = benchmark(synced(wk.obs_saliency), inv, w, backend=backend)
    assert bool((rho >= 0).all())


@pytest.mark.parametrize("backend", backends("obs_update"))
def test_obs_update(benchmark, dense, backend):
    _, inv, w, mask = dense
    new = benchmark(synced(wk.obs_update), inv, w, mask, backend=backend)
    assert bool((new[mask] == 0).all())


@pytest.mark.parametrize("op", ["obs_saliency", "obs_update", "inverse_diagonal"])
def test_lowrank_stats(benchmark, lowrank, op):
    _, inv, w, mask = lowrank
    args = {"obs_saliency": (inv, w), "obs_update": (inv, w, mask), "inverse_diagonal": (inv,)}[op]
    out = benchmark(synced(getattr(wk, op)), *args)
    assert out.shape == w.shape


def _groups(b, c, q=4):
    return torch.arange(c - c % q, device=DEVICE).view(1, -1, q).expand(b, -1, -1).contiguous()


@pytest.mark.parametrize("form", ["dense", "lowrank"])
@pytest.mark.parametrize("op", ["gather_rows", "gather_subblocks", "group_obs_saliency", "group_obs_update"])
def test_group_ops(benchmark, dense, lowrank, form, op):
    _, inv, w, _ = dense if form == "dense" else lowrank
    groups = _groups(w.shape[0], w.shape[1])
    if op == "group_obs_update":
        prune = torch.zeros(groups.shape[:2], dtype=torch.bool, device=DEVICE)
        prune[:, ::2] = True
        args = (inv, w, groups, prune)
    elif op == "group_obs_saliency":
        args = (inv, w, groups)
    else:
        args = (inv, groups)
    out = benchmark(synced(getattr(wk, op)), *args)
    assert bool(torch.isfinite(out).all())


def test_inverse_diagonal_dense(benchmark, dense):
    out = benchmark(synced(wk.inverse_diagonal), dense[1])
    assert bool((out > 0).all())


@pytest.mark.parametrize("form", ["ref_loop", "einsum_baddbmm"])
def test_baselines(benchmark, dense, form):
    g = dense[0][:4] if form == "ref_loop" else dense[0]      # the loop only on a few blocks
    fn = {"ref_loop": baselines.reference_loop_inverse, "einsum_baddbmm": baselines.batched_einsum_inverse}[form]
    out = benchmark(synced(fn), g, DAMP)
    assert bool(torch.isfinite(out).all())
