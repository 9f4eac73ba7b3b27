"""damp="auto" averages the Fisher diagonal over the LIVE coordinates (entries not pruned yet), on every path.

Reference: float64 per-sample gradients by a plain autograd loop, masked with the model's keep-masks;
lambda = AUTO_ALPHA * sum(live g^2) / (N * live entries). Entries pruned before the call have zero
gradients, so counting them (the old rule) would shrink lambda as sparsity grows.
"""
from __future__ import annotations

import copy

import pytest
import torch
from _pruner_shared import per_sample_grads, tiny_data, tiny_mlp

import woodfisher as wf
from woodfisher import engine
from woodfisher.damping import AUTO_ALPHA, FisherStats, auto_damp, live_coordinates

NAMES = ["0.weight", "2.weight"]


def _pre_pruned(seed: int, fraction: float):
    """A tiny float64 MLP with ``fraction`` of each pruned weight set to exactly 0 (smallest magnitudes)."""
    model = tiny_mlp(seed=seed, sizes=(6, 9, 4))
    with torch.no_grad():
        for name in NAMES:
            w = dict(model.named_parameters())[name]
            k = int(fraction * w.numel())
            w.view(-1)[w.abs().view(-1).argsort()[:k]] = 0.0
    return model


def _reference(model, loader, n: int) -> float:
    """AUTO_ALPHA x the mean over live entries of (1/N) sum_i g_i^2, from autograd per-sample gradients."""
    grads = per_sample_grads(copy.deepcopy(model), loader, NAMES, n)
    params = dict(model.named_parameters())
    keep = {name: params[name].detach().flatten() != 0 for name in NAMES}
    live = sum(int(k.sum()) for k in keep.values())
    assert 0 < live < sum(k.numel() for k in keep.values())   # really pre-pruned, something left
    sum_sq = sum(float((grads[name] * keep[name]).square().sum()) for name in NAMES)
    return AUTO_ALPHA * sum_sq / (n * live)


@pytest.mark.parametrize("options", [{}, {"inverse_form": "stream"}, {"block_size": 3},
                                     {"inverse_form": "offload", "memory_budget": 10**8},
                                     {"method": "diag_fisher"}])
@pytest.mark.parametrize("fraction", [0.3, 0.75])
def test_auto_damp_is_alpha_times_the_mean_over_live_coordinates(options, fraction):
    model, loader = _pre_pruned(seed=3, fraction=fraction), tiny_data(seed=4)
    expect = _reference(model, loader, 20)
    curv = wf.estimate_curvature(model, loader, num_grads=20, damp="auto", progress=False, **options)
    assert curv.damp == pytest.approx(expect, rel=1e-10)
    assert curv.stats.numel == sum(int((dict(model.named_parameters())[n] != 0).sum()) for n in NAMES)


def test_kfac_auto_damp_counts_live_coordinates():
    """With one sample, S (x) A is that sample's exact Fisher g g^T (x) a a^T (Linear layers): its live diagonal
    sum is the sum of the live squared gradient entries."""
    model, loader = _pre_pruned(seed=5, fraction=0.5), tiny_data(seed=6)
    curv = wf.estimate_curvature(model, loader, method="kfac", num_grads=1, damp="auto", progress=False)
    assert curv.damp == pytest.approx(_reference(model, loader, 1), rel=1e-10)


def test_a_pruned_entry_does_not_change_the_damp():
    """Zeroing entries whose gradient is already masked leaves lambda at the live mean: pruning one more entry
    changes sum_sq and the live count together, so lambda follows the curvature of what is left."""
    model, loader = _pre_pruned(seed=7, fraction=0.5), tiny_data(seed=8)
    a = wf.estimate_curvature(model, loader, num_grads=16, damp="auto", progress=False)
    stats_all = FisherStats(a.stats.sum_sq, a.stats.count, sum(p.numel() for n, p in model.named_parameters()
                                                                  if n in NAMES))
    # the old rule (all coordinates) is smaller by exactly the live fraction
    assert auto_damp(stats_all.sum_sq, stats_all.count, stats_all.numel) == pytest.approx(
        a.damp * a.stats.numel / stats_all.numel, rel=1e-12)


def test_every_step_of_a_multi_step_run_damps_with_the_live_mean(monkeypatch):
    """prune_one_shot with 3 steps: each step's lambda is the live mean of the model as that step starts."""
    model, loader = tiny_mlp(seed=9, sizes=(6, 9, 4)), tiny_data(seed=10)
    real, seen = engine._estimate_step, []

    def checked(model, loader, targets, step_config, config, num_steps):
        expect = _reference(model, loader, step_config.num_grads) if seen else None  # step 1: nothing pruned yet
        curvature = real(model, loader, targets, step_config, config, num_steps)
        seen.append((curvature.damp, expect))
        return curvature

    monkeypatch.setattr(engine, "_estimate_step", checked)
    wf.prune_one_shot(model, loader, sparsity=0.8, num_steps=3, num_grads=48, damp="auto", progress=False)
    assert len(seen) == 3
    for damp, expect in seen[1:]:
        assert damp == pytest.approx(expect, rel=1e-10)


def test_live_coordinates_and_an_empty_live_set():
    keep = {"a": torch.tensor([True, False, True]), "b": torch.zeros(2, 2, dtype=torch.bool)}
    assert live_coordinates(keep) == 2
    assert FisherStats.live({"b": keep["b"]}, 0.0, 4).mean_diag == 0.0
    assert auto_damp(0.0, 4, 0) == wf.damping.DEFAULT_DAMP
    with pytest.raises(ValueError, match="count"):
        auto_damp(1.0, 0, 3)


def test_fisher_hook_counts_live_coordinates():
    model = _pre_pruned(seed=11, fraction=0.5)
    hook = wf.FisherHook(model, num_grads=4, damp=1e-3, block_size=None)
    assert hook.stats.numel == sum(int((dict(model.named_parameters())[n] != 0).sum()) for n in NAMES)
