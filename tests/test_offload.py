"""CPU offload of the inverses (woodfisher.offload) and the tensor-memory meter (woodfisher.memory).

On a CPU the "device" and the "host" are the same memory; the meter counts what the run
allocates outside the declared host store, i.e. what would live on the accelerator.
"""
from __future__ import annotations

import pytest
import torch

from woodfisher import PruneConfig, estimate_curvature, prune_one_shot, prune_with
from woodfisher.gradients import GradientCollector
from woodfisher.memory import TensorMemoryMeter, host_allocations
from woodfisher.models import MLPNet
from woodfisher.offload import OffloadedInverse, plan_offload
from woodfisher.plan import plan_memory
from woodfisher.targets import resolve_targets

M = 32


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (M,), generator=g)
    return [(x[i:i + 2], y[i:i + 2]) for i in range(0, M, 2)]


def _model():
    torch.manual_seed(0)
    return MLPNet()


@pytest.mark.parametrize("block_size,budget,form", [(32, 4_000_000, "sequential"), (1000, 7_000_000, "lowrank")])
def test_offload_gives_the_in_memory_masks_under_the_budget(block_size, budget, form):
    loader = _data()
    opts = dict(sparsity=0.7, num_grads=M, block_size=block_size, damp=1e-4, progress=False)
    with pytest.raises(ValueError, match="memory_budget"):  # neither keeping nor streaming fits
        plan_memory(resolve_targets(_model(), None, block_size), M, 4, budget)
    ref = _model()
    ref_res = prune_one_shot(ref, loader, **opts)
    model = _model()
    with TensorMemoryMeter() as meter:
        res = prune_one_shot(model, loader, inverse_form="offload", memory_budget=budget, **opts)
    assert meter.peak <= budget, (meter.peak, budget)
    assert all(row["inverse"] == f"offload-{form}" for row in res.layers)
    for name, keep in ref_res.masks.items():
        assert torch.equal(res.masks[name], keep)
    for (name, w), w_ref in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(w, w_ref, rtol=0, atol=1e-6 * float(w_ref.detach().abs().max())), name


def test_offloaded_curvature_is_reusable_and_reports_its_plan():
    loader = _data()
    curv = estimate_curvature(_model(), loader, num_grads=M, block_size=32, damp=1e-4, progress=False,
                              inverse_form="offload", memory_budget=4_000_000)
    inv = curv.inverses["fc1.weight"]
    assert isinstance(inv, OffloadedInverse) and inv.form == "sequential"
    plan = inv.plan
    assert plan.device_bytes <= plan.budget == 4_000_000
    assert plan.layers["fc1.weight"]["chunk"] < plan.layers["fc1.weight"]["blocks"]  # really streamed
    assert plan.host_bytes == sum(v["host_grads"] + v["host_inverse"] for v in plan.layers.values())
    text = plan.describe()
    for name in ("fc1.weight", "fc2.weight", "fc3.weight", "host", "budget"):
        assert name in text
    # host store = the dense inverse (up to the rounding of per-sample gradients taken in other chunk sizes)
    full = estimate_curvature(_model(), loader, num_grads=M, block_size=32, damp=1e-4, progress=False)
    torch.testing.assert_close(inv.host_inverse, full.inverses["fc1.weight"], rtol=0,
                               atol=1e-6 * float(full.inverses["fc1.weight"].abs().max()))
    a, b = _model(), _model()
    ra = prune_with(a, curv, 0.5)
    rb = prune_with(b, full, 0.5)
    assert all(torch.equal(ra.masks[k], rb.masks[k]) for k in ra.masks)


def test_offload_refusals_change_nothing():
    with pytest.raises(ValueError, match="memory_budget"):
        PruneConfig(sparsity=0.5, inverse_form="offload")
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="too small to offload"):
        prune_one_shot(model, _data(), sparsity=0.5, num_grads=M, block_size=32, progress=False,
                       inverse_form="offload", memory_budget=200_000)
    with pytest.raises(ValueError, match="pattern"):
        prune_one_shot(model, _data(), sparsity=0.5, num_grads=M, block_size=8, progress=False, pattern="2:4",
                       inverse_form="offload", memory_budget=5_000_000)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_plan_offload_chunks_fit_the_budget():
    targets = resolve_targets(_model(), None, 32)
    plan = plan_offload(targets, M, 4, 6_000_000, batch_groups=4)
    for v in plan.layers.values():
        assert 1 <= v["chunk"] <= v["blocks"]
        assert plan.reserve + v["chunk"] * v["per_block"] <= 6_000_000
    with pytest.raises(ValueError, match="too small"):
        plan_offload(targets, M, 4, plan.reserve, batch_groups=4)


def test_meter_counts_new_storage_until_its_last_view_dies():
    with TensorMemoryMeter() as meter:
        a = torch.empty(1000)
        view = a[:10]
        del a
        assert meter.current == 4000  # the view keeps the storage alive
        del view
        assert meter.current == 0
        with host_allocations():
            host = torch.empty(5000)
        b = host[:100] * 2  # a new storage of 100 floats; the host store is not counted
        assert meter.current == 400
        del b, host
    assert meter.peak == 4000


@pytest.mark.gpu
def test_offload_is_chosen_on_a_gpu_when_the_budget_requires_it():
    loader = [(x.cuda(), y.cuda()) for x, y in _data()]
    model = _model().cuda()
    ref = _model().cuda()
    opts = dict(sparsity=0.7, num_grads=M, block_size=32, damp=1e-4, progress=False)
    ref_res = prune_one_shot(ref, loader, **opts)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    res = prune_one_shot(model, loader, memory_budget=4_000_000, **opts)
    assert all(row["inverse"].startswith("offload") for row in res.layers)
    assert torch.cuda.max_memory_allocated() - base <= 4_000_000
    assert all(torch.equal(res.masks[k], ref_res.masks[k]) for k in res.masks)


@pytest.mark.parametrize("block_size", [16, 96])  # sequential (c <= m) and low-rank (c > m) blocks
def test_offload_of_a_float64_model_builds_the_float64_reference_inverse(block_size):
    """Offload squared a float64 model's gradients in place while summing their squares (``.double()`` of a
    float64 row is the row itself): its inverses were off by up to 690 on entries of 900. They now equal the
    dense float64 inverse of the gradients the collector gives, as the in-memory path's do."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 12, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (64,), generator=g)
    loader = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 64, 8)]
    opts = dict(sparsity=0.5, num_grads=M, block_size=block_size, damp=1e-3, num_steps=1, progress=False)
    mem = estimate_curvature(model, loader, **opts)
    off = estimate_curvature(model, loader, inverse_form="offload", memory_budget=10 ** 7, **opts)
    assert off.stats.sum_sq == pytest.approx(mem.stats.sum_sq, rel=1e-12)
    grads = GradientCollector(model, loader, resolve_targets(model, None, block_size), num_grads=M,
                              progress=False).collect()
    for target in resolve_targets(model, None, block_size):
        blocks = target.grad_blocks(grads[target.name])
        eye = torch.eye(target.block_size, dtype=torch.float64)
        ref = torch.linalg.inv(1e-3 * eye + blocks.transpose(1, 2) @ blocks / M)
        got = torch.cat([inv.dense() if hasattr(inv, "dense") else inv
                         for _, _, inv in off.inverses[target.name].chunks()])
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))
