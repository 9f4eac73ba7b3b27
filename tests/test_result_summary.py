"""What a user reads off a PruneResult: the one-line summary stays short for deep models."""
from __future__ import annotations

import warnings

import torch
from torch import nn

import woodfisher as wf
from woodfisher.masks import COLLAPSE_DENSITY


def _deep_pruned(depth: int) -> tuple:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(depth)])
    loader = [(torch.randn(8, 8), torch.randint(0, 8, (8,)))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the collapse warning itself is tested elsewhere
        result = wf.prune_one_shot(model, loader, sparsity=0.99, method="global_magnitude", progress=False)
    return model, result


def test_summary_of_many_collapsed_weights_stays_short_and_the_list_stays_whole():
    """At 99% global magnitude most of 300 small layers collapse: ``repr`` names the first few and counts the
    rest (its length does not grow with depth), while ``.collapsed`` keeps every name, counted from the weights."""
    lengths = []
    for depth in (30, 300):
        model, result = _deep_pruned(depth)
        expected = [name for name, w in model.named_parameters()
                    if name.endswith("weight") and int(w.count_nonzero()) < COLLAPSE_DENSITY * w.numel()]
        assert len(expected) > 10 and result.collapsed == expected
        text = repr(result)
        assert "\n" not in text and f"+{len(expected) - 3} more]" in text
        assert all(repr(name) in text for name in expected[:3]) and repr(expected[3]) not in text
        lengths.append(len(text))
    assert abs(lengths[0] - lengths[1]) <= 8


def _phases(result) -> float:
    return sum(seconds for phase, seconds in result.timings.items() if phase != "total")


def test_timings_total_covers_the_phases_one_shot_and_prune_with():
    """``total`` is at least the sum of the phases it reports, also from ``prune_with``, whose gradients and
    inverse were spent in ``estimate_curvature`` (before: its total counted only selection and update)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    loader = [(torch.randn(8, 12), torch.randint(0, 3, (8,))) for _ in range(4)]
    result = wf.prune_one_shot(wf.clone_model(model), loader, sparsity=0.6, num_grads=32, num_steps=2,
                               progress=False)
    assert set(result.timings) == {"gradients", "inverse", "select", "update", "total"}
    assert result.timings["total"] >= _phases(result)
    curvature = wf.estimate_curvature(model, loader, num_grads=32, progress=False)
    for sparsity in (0.5, 0.7):
        swept = wf.prune_with(wf.clone_model(model), curvature, sparsity)
        assert swept.timings["gradients"] == curvature.timings["gradients"] > 0
        assert swept.timings["inverse"] == curvature.timings["inverse"]
        assert swept.timings["total"] >= _phases(swept)
