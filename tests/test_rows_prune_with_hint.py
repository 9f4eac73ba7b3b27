"""``prune_with(..., pattern="rows")`` on a curvature whose blocks do not follow the rows says how to get one."""
import copy

import pytest
import torch
from torch import nn

import woodfisher as wf


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(8, 16, 5, padding=2), nn.GELU(), nn.Conv1d(16, 16, 3, padding=2, dilation=2),
                         nn.GELU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, 4))


def _loader():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 8, 30, generator=gen), torch.randint(0, 4, (32,), generator=gen)
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]


def test_rows_on_an_unstructured_curvature_names_the_fix_and_the_fix_works():
    model = _net()
    curv = wf.estimate_curvature(model, _loader(), num_grads=32, progress=False)
    target = copy.deepcopy(model)
    before = [p.clone() for p in target.parameters()]
    with pytest.raises(ValueError, match=r"row length 40 .*estimate_curvature\(\.\.\., pattern='rows'\)"):
        wf.prune_with(target, curv, 0.5, pattern="rows")
    assert all(torch.equal(a, b) for a, b in zip(before, target.parameters()))
    rows = wf.estimate_curvature(model, _loader(), num_grads=32, pattern="rows", progress=False)
    res = wf.prune_with(target, rows, 0.5, mode="layerwise")
    for name, mask in res.masks.items():
        per_row = mask.reshape(mask.shape[0], -1)
        assert torch.equal(per_row.all(1), per_row.any(1)), name      # whole rows kept or removed
        assert abs(1 - mask.float().mean().item() - 0.5) <= 1 / mask.shape[0], name
