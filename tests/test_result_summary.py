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
