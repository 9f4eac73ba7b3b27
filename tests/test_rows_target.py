"""pattern="rows": as many pruned entries as the sparsity target allows, never more (brute-force counts).

The target is unstructured pruning's ``round(sparsity * n)`` entries (n: all pruned weights in global mode,
each weight in layerwise mode). Rows are taken cheapest first and a row that would overshoot is skipped, so
when the selection ends no remaining row fits in what is left of the target. The rule before stopped at the
first row that did not fit: with rows of several lengths, a long row ranked next left room for one (or more)
shorter rows unpruned, i.e. one row short of what the target allows.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import woodfisher as wf
from woodfisher.structured import select_rows

SPARSITIES = [i / 20 for i in range(1, 19)]


def _mlp(sizes, seed):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b, bias=False), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).double()


def _conv(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 5, 3, bias=False), nn.ReLU(), nn.Conv2d(5, 4, 1, bias=False), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 16, 3, bias=False)).double()


def _data(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (48,), generator=g)
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)]


CASES = [(lambda s: _mlp((4, 9, 3), s), (4,)), (lambda s: _mlp((10, 3, 5, 3), s), (10,)),
         (lambda s: _mlp((6, 5, 4), s), (6,)), (lambda s: _mlp((5, 5, 5, 3), s), (5,)), (_conv, (2, 6, 6))]


def _check_counts(masks, sparsity: float, mode: str):
    """Within the target, and no kept row fits in what is left of it (per weight layerwise, over all globally)."""
    scopes = [[n] for n in masks] if mode == "layerwise" else [list(masks)]
    for names in scopes:
        total = sum(masks[n].numel() for n in names)
        target = round(sparsity * total)
        rows = {n: masks[n].reshape(masks[n].shape[0], -1) for n in names}
        for n in names:   # whole rows only
            assert torch.equal(rows[n].all(1), rows[n].any(1)), n
        removed = sum(int((~rows[n]).sum()) for n in names)
        assert removed <= target, (names, sparsity, removed, target)
        kept_sizes = [rows[n].shape[1] for n in names for r in range(rows[n].shape[0]) if rows[n][r].all()]
        assert all(removed + size > target for size in kept_sizes), (names, sparsity, removed, target, kept_sizes)
        if len({rows[n].shape[1] for n in names}) == 1:   # equal rows: exactly the largest count within the target
            assert removed == target // rows[names[0]].shape[1] * rows[names[0]].shape[1]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("mode", ["global", "layerwise"])
def test_rows_reach_the_largest_count_within_the_target(case, mode):
    factory, shape = CASES[case]
    for seed in range(2):
        base, loader = factory(seed), _data(shape, seed)
        for sparsity in SPARSITIES:
            model = copy.deepcopy(base)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # collapsed-layer warnings at high sparsity
                res = wf.prune_one_shot(model, loader, sparsity=sparsity, pattern="rows", mode=mode, num_grads=16,
                                        damp=1e-2, block_size=None, progress=False)
            _check_counts(res.masks, sparsity, mode)


def test_select_rows_is_first_fit_in_the_order_of_the_statistic_per_entry():
    """Random statistics: the chosen rows are, in each weight, its cheapest ones (a prefix of its own ranking),
    and the brute-force reference (walk the rows by rho / |Q|, take each that fits) picks the same set."""
    g = torch.Generator().manual_seed(0)
    sizes = {"a": 4, "b": 9, "c": 3}
    for trial in range(50):
        scores = {n: torch.rand(int(torch.randint(1, 7, (1,), generator=g)), generator=g, dtype=torch.float64)
                  for n in sizes}
        sparsity = float(torch.rand(1, generator=g))
        got = select_rows(scores, sizes, sparsity, "global")
        rows = sorted(((float(scores[n][r]) / sizes[n], n, r) for n in sizes for r in range(scores[n].numel())))
        room = round(sparsity * sum(sizes[n] * scores[n].numel() for n in sizes))
        expect = {n: torch.zeros(scores[n].numel(), dtype=torch.bool) for n in sizes}
        for _, n, r in rows:
            if sizes[n] <= room:
                expect[n][r], room = True, room - sizes[n]
        for n in sizes:
            assert torch.equal(got[n], expect[n]), (trial, n)
            order = torch.argsort(scores[n])
            assert not got[n][order].int().diff().gt(0).any(), (trial, n)   # True ... True False ... False
