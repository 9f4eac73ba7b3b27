"""Pieces of woodfisher.distributed that need no process group: block ownership, keys, selection.

The distributed selection is checked here with ranks simulated by threads: each thread holds
a contiguous part of every weight's scores and the per-round histograms are summed across
threads (what ``all_reduce`` does across processes).
"""
from __future__ import annotations

import threading

import pytest
import torch

from woodfisher import PruneConfig
from woodfisher.distributed import active_group, plan_shards, select_sharded
from woodfisher.distributed.estimate import check_sharded
from woodfisher.distributed.select import order_keys
from woodfisher.distributed.sharding import block_cost
from woodfisher.masks import _keep_top, select_masks


def _layers():
    return [("a", 37, 16), ("b", 5, 64), ("c", 2, 128), ("d", 1, 300), ("e", 11, 7)]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 16])
def test_plan_partitions_every_weight_contiguously_and_balances_cost(world):
    layers = _layers()
    costs = {n: block_cost("sequential", c, 64) for n, _, c in layers}
    plans = [plan_shards(layers, costs, world, r) for r in range(world)]
    assert all(p.counts == plans[0].counts for p in plans)     # every rank computes the same plan
    plan = plans[0]
    for name, blocks, _ in layers:
        ranges = [plan.range(name, r) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == blocks
        assert all(ranges[r][1] == ranges[r + 1][0] for r in range(world - 1))   # contiguous, rank order
        assert all(plan.owned(name, r) >= blocks // world for r in range(world))  # the base share
    loads = [plan.load(r) for r in range(world)]
    assert sum(loads) == plan.total
    assert max(loads) <= plan.total / world + plan.max_block       # total / world plus one block
    if world > sum(b for _, b, _ in layers):
        assert min(loads) == 0                                    # more ranks than blocks: empty shards


def test_cost_is_c_squared_for_dense_and_factors_for_lowrank():
    assert block_cost("sequential", 128, 1000) == 128 ** 2
    assert block_cost("lowrank", 1000, 64) == 64 * 1000 + 64 ** 2
    # one expensive block and many cheap ones: the expensive one alone on a rank
    plan = plan_shards([("big", 1, 100), ("small", 10, 10)], {"big": 100 ** 2, "small": 100}, 2, 0)
    assert plan.owned("big", 0) + plan.owned("big", 1) == 1
    big = 0 if plan.owned("big", 0) else 1
    assert plan.owned("small", big) == 5 and plan.owned("small", 1 - big) == 5


def test_order_keys_are_monotonic_and_identify_signed_zeros():
    values = torch.tensor([float("-inf"), -1e300, -2.5, -1e-310, -0.0, 0.0, 1e-310, 3.0, 1e300, float("inf")],
                          dtype=torch.float64)
    signed = order_keys(values) ^ (-(2 ** 63))   # back to a signed order for comparison
    assert torch.all(signed[1:] >= signed[:-1])
    assert signed[4] == signed[5]
    assert torch.all(signed[[0, 1, 2, 3, 5, 6, 7, 8]] < signed[[1, 2, 3, 4, 6, 7, 8, 9]])
    rand = torch.randn(1000, dtype=torch.float64) * torch.logspace(-300, 300, 1000, dtype=torch.float64)
    assert torch.equal(torch.argsort(order_keys(rand) ^ (-(2 ** 63)), stable=True), torch.argsort(rand, stable=True))


def test_keep_top_breaks_ties_toward_the_lower_index():
    score = torch.tensor([1.0, 2.0, 2.0, 0.0, 2.0, -0.0, 0.0])
    assert _keep_top(score, 2).tolist() == [False, True, True, False, False, False, False]
    assert _keep_top(score, 4).tolist() == [True, True, True, False, True, False, False]
    assert _keep_top(score, 6).tolist() == [True, True, True, True, True, True, False]   # -0.0 ties with 0.0
    assert _keep_top(score, 0).sum() == 0 and _keep_top(score, 7).all()


def _threaded(world, fn):
    """Run fn(rank, reduce) on ``world`` threads whose ``reduce`` sums a tensor over all of them."""
    barrier = threading.Barrier(world)
    box = {}
    lock = threading.Lock()

    def reduce(t):
        with lock:
            box["sum"] = t.clone() if "sum" not in box else box["sum"] + t
        barrier.wait()
        out = box["sum"].clone()
        barrier.wait()
        box.pop("sum", None)
        barrier.wait()
        return out

    out = [None] * world
    errors = []

    def work(rank):
        try:
            out[rank] = fn(rank, reduce)
        except Exception as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return out


@pytest.mark.parametrize("trial", range(12))
def test_distributed_selection_equals_select_masks(trial):
    g = torch.Generator().manual_seed(trial)
    world = 1 + trial % 4
    shapes = [(7, 5), (3, 11), (13,), (2, 3, 4)]
    kind = trial % 3
    scores = {}
    for i, shape in enumerate(shapes):
        if kind == 0:
            x = torch.randint(-3, 4, shape, generator=g).double()            # many exact ties
        elif kind == 1:
            x = torch.randn(shape, generator=g, dtype=torch.float64)
        else:
            x = torch.randint(0, 2, shape, generator=g).double() * -0.0       # only -0.0 and 0.0
        scores[f"w{i}"] = x
    keep = {n: torch.rand(s.shape, generator=g) > 0.3 for n, s in scores.items()}
    prepared = {n: s.masked_fill(~keep[n], float("-inf")).flatten() for n, s in scores.items()}
    bounds = {}
    for n, s in prepared.items():
        cuts = sorted(torch.randint(0, s.numel() + 1, (world - 1,), generator=g).tolist())
        bounds[n] = [0] + cuts + [s.numel()]
    numels = [s.numel() for s in prepared.values()]
    for mode, sparsity, floor in (("global", 0.5, 0.0), ("global", 0.3, 0.2), ("layerwise", 0.9, 0.05),
                                  ("global", 0.0, 0.0)):
        ref = select_masks(scores, sparsity, mode, floor, pruned=keep)

        def one(rank, reduce):
            parts = [prepared[n][bounds[n][rank]:bounds[n][rank + 1]] for n in prepared]
            index = [torch.arange(bounds[n][rank], bounds[n][rank + 1]) for n in prepared]
            return select_sharded(parts, index, numels, sparsity, mode, floor, reduce=reduce)

        got = _threaded(world, one)
        for i, name in enumerate(prepared):
            flat = torch.cat([got[r][i] for r in range(world)]).view_as(scores[name])
            assert torch.equal(flat, ref[name]), (trial, mode, name)


def test_group_option_is_validated_and_reported():
    with pytest.raises(ValueError, match="group"):
        PruneConfig(sparsity=0.5, group="world")
    assert PruneConfig(sparsity=0.5).as_dict()["group"] == "auto"
    assert PruneConfig(sparsity=0.5, group=None).as_dict()["group"] is None
    assert active_group("auto") is None and active_group(None) is None   # no process group initialised


def test_methods_without_a_distributed_path_are_refused():
    with pytest.raises(ValueError, match="kfac"):
        check_sharded(PruneConfig(sparsity=0.5, method="kfac"))
    check_sharded(PruneConfig(sparsity=0.5, pattern="2:4", block_size=8))   # N:M and rows: group_step
    check_sharded(PruneConfig(sparsity=0.5, pattern="rows"))
    check_sharded(PruneConfig(sparsity=0.5, method="diag_fisher"))


@pytest.mark.parametrize("rank,shown", [("0", True), ("1", False)])
def test_notes_under_torchrun_are_printed_by_rank_0_only(monkeypatch, capsys, rank, shown):
    """Every rank holds the same model and result: rank 0 prints the notes, the others would repeat them."""
    import warnings

    from woodfisher.cli import _notes

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    _notes(warnings.showwarning, {})("layer collapse: ['fc.weight']", UserWarning, __file__, 1)
    assert ("note: layer collapse" in capsys.readouterr().err) == shown


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_weight_digest_tells_apart_changed_moved_and_sliced_weights(dtype, monkeypatch):
    from woodfisher.distributed import consistent
    w = torch.randn(40, 9, generator=torch.Generator().manual_seed(0)).to(dtype)
    whole = consistent._word_sums(w)
    assert whole == consistent._word_sums(w.clone()) == consistent._word_sums(w.t().contiguous().t())
    nudged = w.clone()
    bits = nudged.view(-1).view(consistent._WORDS[nudged.element_size()])
    bits[123] ^= 1                                         # one ulp: the lowest bit of one entry
    swapped = w.clone()
    swapped[[0, 1]] = w[[1, 0]]
    assert consistent._word_sums(nudged) != whole and consistent._word_sums(swapped) != whole
    monkeypatch.setattr(consistent, "_SLICE", 7)           # the same sums over many slices (wrapping int64)
    assert consistent._word_sums(w) == whole


def test_mask_digest_sees_where_the_kept_entries_are():
    from woodfisher.distributed.consistent import _word_sums
    keep = torch.ones(13, dtype=torch.bool)
    one, other = keep.clone(), keep.clone()
    one[2], other[7] = False, False
    assert len({_word_sums(keep), _word_sums(one), _word_sums(other)}) == 3
