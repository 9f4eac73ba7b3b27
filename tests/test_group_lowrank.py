"""Group OBS (N:M, rows) on the low-rank inverse, without forming rows of F^-1.

The low-rank path used to gather the groups' rows of F^-1, (B, G, q, c): for whole-row groups of a whole-layer
block that is c x c per block (a 576 x 1024 Linear asked for 1.4 TB; ``pattern="rows"`` on a MobileNet was killed by
the OS). Now the statistic comes from the factor (q x q subblocks, or by the Woodbury identity one m x m system per
group when q > m) and the update is one product F^-1 v per block. Checked against float64 dense group OBS.
"""
from __future__ import annotations

import copy

import pytest
import torch
from _shared import dense_inverse, inverse_tolerance, rel_err
from torch import nn

import woodfisher as wf
import woodfisher_kernels as wk
from woodfisher.memory import TensorMemoryMeter

DAMP = 0.05


def _case(b, m, c, q, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(b, m, c, generator=gen, dtype=torch.float64)
    w = torch.randn(b, c, generator=gen, dtype=torch.float64)
    groups = torch.stack([torch.randperm(c, generator=gen).view(c // q, q) for _ in range(b)])
    prune = torch.rand(b, c // q, generator=gen) < 0.5
    return grads.to(dtype), w, groups, prune


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("q", [3, 12, 48])          # q <= m (subblocks) and q > m (Woodbury, m x m systems)
@pytest.mark.parametrize("exact", [True, False])
def test_lowrank_group_obs_matches_float64_dense(dtype, q, exact):
    grads, w, groups, prune = _case(2, 8, 96, q, dtype)
    low = wk.lowrank_inverse(grads, DAMP)
    ref = dense_inverse(grads.double(), DAMP)                  # float64 (B, c, c)
    fisher = torch.linalg.inv(ref)
    tol = 1e-12 if dtype == torch.float64 else 100 * inverse_tolerance(fisher, torch.float32)
    rho = wk.group_obs_saliency(low, w.to(dtype), groups, exact=exact)
    assert rel_err(rho, wk.group_obs_saliency(ref, w, groups, exact=exact)) <= tol
    new = wk.group_obs_update(low, w.to(dtype), groups, prune, exact=exact)
    assert rel_err(new, wk.group_obs_update(ref, w, groups, prune, exact=exact)) <= tol
    assert rel_err(wk.gather_subblocks(low, groups), wk.gather_subblocks(ref, groups)) <= tol


def test_whole_row_groups_never_form_rows_of_the_inverse():
    b, m, c, q = 1, 16, 4096, 512                          # rows of F^-1 for every group: b * c * c * 4 = 64 MiB
    grads, w, groups, prune = _case(b, m, c, q, torch.float32)
    low = wk.lowrank_inverse(grads, DAMP)
    w = w.float()
    with TensorMemoryMeter() as meter:
        wk.group_obs_saliency(low, w, groups)
        wk.group_obs_update(low, w, groups, prune)
    factor = b * m * c * 4
    assert meter.peak <= 8 * factor < b * c * c * 4 // 8, (meter.peak, factor)


def test_pattern_rows_with_whole_layer_low_rank_blocks_agrees_with_the_dense_form():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 6)).double()
    g = torch.Generator().manual_seed(1)
    loader = [(torch.randn(8, 48, generator=g, dtype=torch.float64), torch.randint(0, 6, (8,), generator=g))
              for _ in range(2)]
    opts = dict(sparsity=0.4, pattern="rows", num_grads=16, damp=1e-2, min_density=0.1, progress=False)
    low, dense = model, copy.deepcopy(model)
    res_low = wf.prune_one_shot(low, loader, **opts)                              # m = 16 < c: low rank
    res_dense = wf.prune_one_shot(dense, loader, inverse_form="sequential", **opts)
    assert {r["inverse"] for r in res_low.layers} == {"lowrank"}
    assert all(torch.equal(res_low.masks[n], res_dense.masks[n]) for n in res_low.masks)
    for a, b in zip(low.parameters(), dense.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
