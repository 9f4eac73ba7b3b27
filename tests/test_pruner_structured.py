"""N:M patterns and whole-row group OBS against float64 dense references."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from _pruner_shared import per_sample_grads, tiny_data, tiny_mlp

import woodfisher as wf
import woodfisher.structured as st

NAMES = ["0.weight", "2.weight"]
DAMP = 1e-2


def _dense_inverses(model, loader, m):
    grads = per_sample_grads(model, loader, NAMES, m)
    return {n: torch.linalg.inv(DAMP * torch.eye(g.shape[1], dtype=torch.float64) + g.T @ g / m)
            for n, g in grads.items()}


def _group_stat(inv, w, q, exact):
    sub = inv[q][:, q]
    if exact:
        return 0.5 * w[q] @ torch.linalg.solve(sub, w[q])
    return w[q].sum() ** 2 / (2 * sub.sum())


@pytest.mark.parametrize("exact", [True, False])
def test_two_four_pattern_is_exact_and_minimises_group_statistic(exact):
    model, loader = tiny_mlp(seed=0, sizes=(8, 4, 4)), tiny_data(features=8, seed=0)
    ref = copy.deepcopy(model)
    res = wf.prune_one_shot(model, loader, sparsity=0.5, pattern="2:4", group_exact=exact, num_grads=24,
                            damp=DAMP, block_size=None, progress=False)
    invs = _dense_inverses(ref, loader, 24)
    params, new_params = dict(ref.named_parameters()), dict(model.named_parameters())
    for n in NAMES:
        keep = res.masks[n].flatten()
        assert torch.all(keep.view(-1, 4).sum(1) == 2)  # every run of 4 keeps exactly 2
        w, inv = params[n].detach().flatten(), invs[n]
        dw, summed, chosen = torch.zeros_like(w), torch.zeros_like(w), []
        for start in range(0, w.numel(), 4):
            pairs = [torch.tensor([start + a, start + b]) for a, b in itertools.combinations(range(4), 2)]
            stats = torch.stack([_group_stat(inv, w, q, exact) for q in pairs])
            best = pairs[int(stats.argmin())]
            assert set((~keep).nonzero().flatten().tolist()) >= set(best.tolist())
            chosen.append(best)
            summed -= inv[:, best] @ torch.linalg.solve(inv[best][:, best], w[best])
            if not exact:
                e = inv[:, best].sum(1)
                dw -= w[best].sum() * e / inv[best][:, best].sum()
        if exact:  # every removed entry of the (whole-layer) block at once: Sec. 4.2 for |Q| weights
            q = torch.cat(chosen)
            dw = -inv[:, q] @ torch.linalg.solve(inv[q][:, q], w[q])
            fisher = torch.linalg.inv(inv)
            summed = (w + summed).masked_fill(~keep, 0.0) - w  # the groups' updates summed, then masked
            assert dw @ fisher @ dw <= summed @ fisher @ summed * (1 + 1e-12)  # the joint update is the optimum
        expect = (w + dw).masked_fill(~keep, 0.0)
        torch.testing.assert_close(new_params[n].detach().flatten(), expect, rtol=1e-7, atol=1e-10)


def test_magnitude_two_four_prunes_smallest_pair():
    model = tiny_mlp(seed=1, sizes=(8, 4, 4))
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = wf.prune_one_shot(model, None, sparsity=0.5, pattern="2:4", method="magnitude", progress=False)
    for n in NAMES:
        runs = w[n].abs().view(-1, 4)
        pruned = ~res.masks[n].view(-1, 4)
        assert torch.all(pruned.sum(1) == 2)
        assert torch.all(runs[pruned].view(-1, 2).max(1).values <= runs[~pruned].view(-1, 2).min(1).values)


def test_nm_needs_rows_multiple_of_m():
    model = tiny_mlp(seed=1)  # rows of 6 and 5 entries
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="not a multiple of 4"):
        wf.prune_one_shot(model, tiny_data(), sparsity=0.5, pattern="2:4", progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_rows_layerwise_removes_cheapest_rows_with_group_update():
    model, loader = tiny_mlp(seed=2, sizes=(6, 6, 4)), tiny_data(seed=2)
    ref = copy.deepcopy(model)
    res = wf.prune_one_shot(model, loader, sparsity=0.5, pattern="rows", mode="layerwise", num_grads=24,
                            damp=DAMP, progress=False)
    invs = _dense_inverses(ref, loader, 24)
    params = dict(ref.named_parameters())
    for n in NAMES:
        w = params[n].detach()
        rows, cols = w.shape
        stats = torch.stack([_group_stat(invs[n], w.flatten(), torch.arange(r * cols, (r + 1) * cols), True)
                             for r in range(rows)])
        expect_rows = set(torch.argsort(stats)[: rows // 2].tolist())
        pruned_rows = {r for r in range(rows) if not res.masks[n][r].any()}
        assert pruned_rows == expect_rows
        assert all(res.masks[n][r].all() for r in range(rows) if r not in pruned_rows)


def test_nm_pattern_fixes_the_sparsity_when_it_is_omitted():
    """pattern="N:M" alone is a complete request (sparsity 1 - N/M, the same call as with it); a
    pattern that fixes no sparsity ("rows") still needs one."""
    loader = tiny_data(features=8, seed=0)
    for method in ("woodfisher", "magnitude"):
        model, ref = tiny_mlp(seed=0, sizes=(8, 4, 4)), tiny_mlp(seed=0, sizes=(8, 4, 4))
        options = dict(pattern="1:4", method=method, num_grads=24, progress=False)
        res = wf.prune_one_shot(model, loader, **options)
        expected = wf.prune_one_shot(ref, loader, sparsity=0.75, **options)
        assert res.sparsity == 0.75 and res.masks.keys() == expected.masks.keys()
        for n in NAMES:
            assert torch.all(res.masks[n].view(-1, 4).sum(1) == 1)
            assert torch.equal(res.masks[n], expected.masks[n])
            assert torch.equal(model.get_parameter(n), ref.get_parameter(n))
    assert wf.PruneConfig.from_options(pattern="2:4").sparsity == 0.5
    model = tiny_mlp(seed=0, sizes=(8, 4, 4))
    before = copy.deepcopy(model.state_dict())
    for options in (dict(pattern="rows"), dict()):
        with pytest.raises(ValueError, match="sparsity is required"):
            wf.prune_one_shot(model, loader, **options)
    with pytest.raises(ValueError, match="pattern must be None, 'N:M'"):
        wf.prune_one_shot(model, loader, pattern="2-4")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_nm_refusal_names_every_unfit_weight_and_the_way_out():
    """A CNN stem (3 input channels; conv runs go along them) does not fit 2:4: the error names every weight that
    does not fit, and pruning the others through ``modules=`` (as it says) gives exact 2:4 runs there (a conv's
    along its input channels at each (out, kernel position))."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5), torch.nn.Linear(5, 4)).double()
    loader = [(torch.randn(8, 3, 6, 6, dtype=torch.float64), torch.randint(0, 4, (8,))) for _ in range(4)]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"layer '0\.weight' has 3 input channels per group \(N:M runs go along "
                                         r"the input channels .*\), not a multiple of 4 "
                                         r"\(weights that do not fit: \['0\.weight', '5\.weight'\]\); "
                                         r"modules= naming the other 2"):
        wf.prune_one_shot(model, loader, pattern="2:4", num_grads=16, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    res = wf.prune_one_shot(model, loader, pattern="2:4", num_grads=16, progress=False,
                            modules=["2.weight", "4.weight"])
    assert sorted(res.masks) == ["2.weight", "4.weight"] and res.sparsity == 0.5
    assert all(torch.all(keep.movedim(1, -1).reshape(-1, 4).sum(1) == 2) for keep in res.masks.values())
    assert torch.equal(model[0].weight, before["0.weight"]) and torch.equal(model[5].weight, before["5.weight"])


def _pad(x, c):
    """(..., d) -> (..., B, c), zero-padded (padded entries carry no gradient: decoupled in F)."""
    d = x.shape[-1]
    return torch.nn.functional.pad(x, (0, -d % c)).view(*x.shape[:-1], -1, c)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("num_grads", [24, 4])  # 24 >= c: dense blocks; 4 < c = 18: the low-rank form
def test_rows_update_is_the_joint_obs_optimum_of_each_block(num_grads, chunked, monkeypatch):
    """Blocks of three rows (the last one padded); blocks remove 0-3 rows: each block's update is
    ``-F^-1 E_Q ([F^-1]_QQ)^-1 w_Q`` with Q every entry it removes (paper Sec. 4.2, Eqs. 12-17 for |Q|
    weights), not the sum of the rows' own updates."""
    if chunked:  # one block per chunk of joint systems
        monkeypatch.setattr(st, "JOINT_BYTES", 1)
    model, loader = tiny_mlp(seed=3, sizes=(6, 6, 4)), tiny_data(seed=3)
    ref = copy.deepcopy(model)
    c = 18
    res = wf.prune_one_shot(model, loader, sparsity=0.5, pattern="rows", mode="layerwise", num_grads=num_grads,
                            damp=DAMP, block_size=c, num_steps=1, progress=False)
    grads = per_sample_grads(ref, loader, NAMES, num_grads)
    params, new_params = dict(ref.named_parameters()), dict(model.named_parameters())
    counts = set()
    for n in NAMES:
        gb = _pad(grads[n], c).transpose(0, 1)
        invs = torch.linalg.inv(DAMP * torch.eye(c, dtype=torch.float64) + gb.transpose(1, 2) @ gb / num_grads)
        w = _pad(params[n].detach().flatten(), c)
        prune = ~_pad(res.masks[n].flatten(), c).bool() & _pad(torch.ones(w.numel()), c)[0].bool()
        expect = w.clone()
        for b in range(w.shape[0]):
            q = prune[b].nonzero().flatten()
            counts.add(q.numel())
            if q.numel():
                inv = invs[b]
                expect[b] = (w[b] - inv[:, q] @ torch.linalg.solve(inv[q][:, q], w[b, q])).masked_fill(prune[b], 0.0)
        got = _pad(new_params[n].detach().flatten(), c)
        torch.testing.assert_close(got, expect, rtol=1e-7, atol=1e-9)
    assert 12 in counts and len(counts) > 1, counts  # a block removing 2 of its 3 rows; blocks batched by count
