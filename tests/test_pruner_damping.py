"""Automatic dampening: the relative rule and the held-out search."""
from __future__ import annotations

import copy

import pytest
import torch
from _pruner_shared import per_sample_grads, same_state, state_copy, tiny_data, tiny_mlp
from torch import nn

import woodfisher as wf
from woodfisher.damping import AUTO_ALPHA

NAMES = ["0.weight", "2.weight"]


def test_auto_damp_is_alpha_times_mean_fisher_diagonal():
    model, loader = tiny_mlp(seed=0), tiny_data(seed=0)
    grads = per_sample_grads(copy.deepcopy(model), loader, NAMES, 20)
    expect = AUTO_ALPHA * torch.cat([g.square().mean(0) for g in grads.values()]).mean()
    res = wf.prune_one_shot(model, loader, sparsity=0.5, num_grads=20, damp="auto", progress=False)
    assert res.damp == pytest.approx(float(expect), rel=1e-12)


def test_auto_damp_carries_a_fixed_share_of_the_fisher_trace():
    """The rule's property: lambda I holds alpha / (1 + alpha) of trace(lambda I + G^T G / N), whatever the
    model's size, the gradients' scale or N (reference: float64 per-sample gradients by an autograd loop)."""
    for seed, n, scale in ((5, 12, 1.0), (6, 30, 1e3)):
        model, loader = tiny_mlp(seed=seed).double(), [(x.double() * scale, y) for x, y in tiny_data(seed=seed)]
        grads = per_sample_grads(copy.deepcopy(model), loader, NAMES, n)
        g = torch.cat(list(grads.values()), dim=1)                    # (N, d), float64
        curv = wf.estimate_curvature(model, loader, num_grads=n, progress=False)
        trace = curv.damp * g.shape[1] + float(g.square().sum()) / n  # trace(lambda I + G^T G / N)
        assert curv.damp * g.shape[1] / trace == pytest.approx(AUTO_ALPHA / (1 + AUTO_ALPHA), rel=1e-9)


def test_auto_damp_is_scale_equivariant():
    """loss x s -> gradients x s -> damp x s^2, and the same masks and weights."""
    base, loader = tiny_mlp(seed=1), tiny_data(seed=1)
    results, models = [], []
    for s in (1.0, 7.0):
        m = copy.deepcopy(base)
        loss = lambda out, y, s=s: s * nn.functional.cross_entropy(out, y)  # noqa: E731
        results.append(wf.prune_one_shot(m, loader, sparsity=0.5, num_grads=20, damp="auto", loss_fn=loss,
                                         progress=False))
        models.append(m)
    assert results[1].damp == pytest.approx(49.0 * results[0].damp, rel=1e-10)
    for n in NAMES:
        assert torch.equal(results[0].masks[n], results[1].masks[n])
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-12)


def test_search_damp_picks_the_grid_value_with_lowest_heldout_loss():
    model, loader = tiny_mlp(seed=2), tiny_data(seed=2)
    heldout = tiny_data(seed=3)
    before = state_copy(model)
    grid = [1e-4, 1e-2, 1.0, 100.0]
    best, losses = wf.search_damp(model, loader, heldout, sparsity=0.6, grid=grid, num_grads=16)
    assert same_state(model, before)  # the search prunes copies only
    assert set(losses) == set(grid) and best in grid
    for d in grid:  # independent recomputation of each held-out loss
        m = copy.deepcopy(model)
        wf.prune_one_shot(m, loader, sparsity=0.6, damp=d, num_grads=16, progress=False)
        with torch.no_grad():
            ce = torch.cat([nn.functional.cross_entropy(m(x), y, reduction="none") for x, y in heldout]).mean()
        assert losses[d] == pytest.approx(float(ce), rel=1e-10)
    assert losses[best] == min(losses.values())


@pytest.mark.parametrize("grid", [[1e-3, -1.0], [], ["x"]])
def test_search_damp_refuses_a_bad_grid_before_reading_the_loader(grid):
    class Untouched:
        def __iter__(self):
            raise AssertionError("the loader was read before the grid was checked")

    with pytest.raises(ValueError, match="grid"):
        wf.search_damp(tiny_mlp(), Untouched(), tiny_data(seed=3), sparsity=0.6, grid=grid, num_grads=16)


def test_search_damp_default_grid_is_relative_to_auto():
    model, loader = tiny_mlp(seed=4), tiny_data(seed=4)
    best, losses = wf.search_damp(model, loader, tiny_data(seed=5), sparsity=0.5, num_grads=12)
    auto = wf.estimate_curvature(copy.deepcopy(model), loader, damp="auto", num_grads=12, progress=False).damp
    assert sorted(losses) == pytest.approx([auto * 10.0 ** k for k in range(-3, 2)], rel=1e-12)


def test_search_damp_warns_once_for_the_chosen_candidate_at_the_callers_line():
    """Damps far above the Fisher make every candidate's mask magnitude's: the search says so once, for the
    damp it returns, pointing at the caller's line (not once per candidate from inside the library)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 5))  # > MIN_WARN_COUNT weights pruned
    loader = [(torch.randn(8, 40), torch.randint(0, 5, (8,))) for _ in range(4)]
    with pytest.warns(UserWarning) as record:
        best, losses = wf.search_damp(model, loader, loader[:1], sparsity=0.5, grid=[1e4, 1e6], num_grads=16,
                                      num_steps=1, progress=False)
    overlap = [w for w in record if "the same weights as magnitude pruning" in str(w.message)]
    assert len(overlap) == 1 and f"damp={best}" in str(overlap[0].message)
    assert {w.filename for w in record} == {__file__}
