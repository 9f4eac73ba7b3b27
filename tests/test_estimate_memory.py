"""wf.estimate_memory: the plan a call will make, before any gradient; the call stays within its keep_bytes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import woodfisher as wf
from woodfisher.cli import parse_args
from woodfisher.memory import TensorMemoryMeter
from woodfisher.plan import keep_step_bytes, stream_step_bytes
from woodfisher.targets import resolve_targets


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def _loader():
    torch.manual_seed(1)
    return [(torch.randn(8, 96), torch.randint(0, 10, (8,))) for _ in range(8)]


def test_the_estimate_is_the_first_steps_plan_and_the_call_stays_within_it():
    model = _model()
    est = wf.estimate_memory(model, sparsity=0.8, num_grads=64, block_size=16, damp=1e-3)
    steps = wf.PruneConfig(sparsity=0.8, num_grads=64).steps()
    assert (est["num_steps"], est["grads_per_step"], est["block_size"]) == (len(steps), steps[0][1], 16)
    targets = resolve_targets(model, None, 16)
    d = sum(t.numel for t in targets)
    assert est["pruned_weights"] == d == 96 * 128 + 128 * 64 + 64 * 10
    assert est["keep_bytes"] == keep_step_bytes(targets, steps[0][1], 4)
    assert est["keep_bytes"] >= steps[0][1] * d * 4            # at least the kept gradients
    assert est["stream_min_bytes"] == stream_step_bytes(targets, 1, 4)
    assert est["plan"] == "keep" and est["refused"] is None
    with TensorMemoryMeter() as meter:
        wf.prune_one_shot(model, _loader(), sparsity=0.8, num_grads=64, block_size=16, damp=1e-3, progress=False)
    # the weights' snapshot, scores and masks of the selection (a few D) are small next to m D gradients
    assert meter.peak <= est["keep_bytes"] + 8 * d * 4, (meter.peak, est["keep_bytes"])


def test_a_budget_the_call_would_refuse_is_reported_with_what_fits_and_a_streamed_one_with_its_chunk():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    est = wf.estimate_memory(model, sparsity=0.5, num_grads=32, num_steps=1, block_size=16, damp=1e-3,
                             memory_budget=1000)
    assert est["plan"] is None and est["refused"].startswith("memory_budget=1000 bytes (1000 B) is too small")
    targets = resolve_targets(model, None, 16)
    budget = stream_step_bytes(targets, 5, 4)
    est = wf.estimate_memory(model, sparsity=0.5, num_grads=32, num_steps=1, block_size=16, damp=1e-3,
                             memory_budget=budget)
    assert (est["plan"], est["stream_k"]) == ("stream", 5)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))   # nothing computed on the model


@pytest.mark.parametrize("text,expected", [("4GiB", 4 * 2**30), ("1.5 GB", 1_500_000_000), ("2e9", 2 * 10**9),
                                           ("512mib", 512 * 2**20), ("100", 100), ("3 KB", 3000)])
def test_memory_budget_takes_sizes_with_units(text, expected):
    assert wf.PruneConfig(sparsity=0.5, memory_budget=text).memory_budget == expected
    args = parse_args(["prune", "--model", "mlpnet", "--sparsity", "0.5", "--memory-budget", text])
    assert wf.PruneConfig(sparsity=0.5, memory_budget=args.memory_budget).memory_budget == expected


@pytest.mark.parametrize("text", ["4G", "4 bananas", "", "GiB", "-1GiB"])
def test_a_size_that_is_not_one_is_a_value_error_naming_memory_budget_and_the_units(text):
    with pytest.raises(ValueError, match=r"^memory_budget: .* is not a size: .*KiB, MiB, GiB"):
        wf.PruneConfig(sparsity=0.5, memory_budget=text)
