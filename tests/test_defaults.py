"""The defaults (block_size, damp, num_steps = "auto"), the step plan, and the overlap with magnitude pruning."""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings

import pytest
import torch
from _pruner_shared import same_state, state_copy, tiny_data, tiny_mlp
from torch import nn

import woodfisher as wf
from woodfisher.cli import parse_args
from woodfisher.config import AUTO_BLOCK_PER_GRAD, AUTO_MANY_STEPS, AUTO_STEP_GRADS, AUTO_STEP_KEEP, auto_num_steps
from woodfisher.diagnostics import magnitude_overlap


def test_defaults_are_auto_and_documented_values():
    cfg = wf.PruneConfig(sparsity=0.8)
    assert (cfg.block_size, cfg.damp, cfg.num_steps, cfg.step_schedule) == ("auto", "auto", "auto", "geometric")
    assert cfg.fisher_block_size == AUTO_BLOCK_PER_GRAD * cfg.num_grads  # c = 4 m of the step
    assert wf.PruneConfig(sparsity=0.8, block_size=None).fisher_block_size is None
    assert wf.PruneConfig(sparsity=0.8, block_size=50).fisher_block_size == 50


def test_cli_defaults_match_the_api():
    args = parse_args(["prune", "--model", "mlpnet", "--checkpoint", "x.ckpt", "--sparsity", "0.5"])
    defaults = {f.name: f.default for f in dataclasses.fields(wf.PruneConfig) if f.name != "sparsity"}
    for name in ("block_size", "damp", "num_steps", "step_schedule", "num_grads", "fisher_batch_size"):
        assert getattr(args, name) == defaults[name], name
    args = parse_args(["prune", "--model", "mlpnet", "--checkpoint", "x.ckpt", "--sparsity", "0.5",
                       "--num-steps", "4", "--block-size", "layer", "--damp", "1e-5", "--step-schedule", "linear"])
    assert (args.num_steps, args.block_size, args.damp, args.step_schedule) == (4, None, 1e-5, "linear")


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_steps="many"), "num_steps"), (dict(num_steps=0), "num_steps"), (dict(num_steps=True), "num_steps"),
    (dict(num_steps=9, num_grads=8), "num_steps"), (dict(block_size="big"), "block_size"),
    (dict(step_schedule="cubic"), "step_schedule"), (dict(pattern="2:4", num_steps=3), "num_steps"),
])
def test_bad_new_options_raise_before_anything_changes(kwargs, match):
    model, loader = tiny_mlp(), tiny_data()
    before = state_copy(model)
    with pytest.raises(ValueError, match=match):
        wf.prune_one_shot(model, loader, **{"sparsity": 0.5, "num_grads": 8, "progress": False, **kwargs})
    assert same_state(model, before)


@pytest.mark.parametrize("start,final", [(0.0, 0.5), (0.0, 0.8), (0.0, 0.9), (0.0, 0.95), (0.3, 0.9), (0.5, 0.6)])
def test_auto_steps_is_the_fewest_geometric_steps_keeping_the_fraction(start, final):
    n = auto_num_steps(start, final, 10 ** 6, grads_per_step=(1, 10 ** 9))  # gradient bounds never bind
    ratio = (1 - final) / (1 - start)
    assert ratio ** (1 / n) >= AUTO_STEP_KEEP - 1e-12  # every step keeps >= the fraction
    if n > 1:
        assert ratio ** (1 / (n - 1)) < AUTO_STEP_KEEP  # one step fewer would not
    plan = wf.PruneConfig(sparsity=final, num_grads=1000).steps(start)
    assert sum(m for _, m in plan) == 1000 and max(m for _, m in plan) - min(m for _, m in plan) <= 1
    densities = [1 - start] + [1 - s for s, _ in plan]
    ratios = [b / a for a, b in zip(densities, densities[1:])]
    assert all(math.isclose(r, ratios[0], rel_tol=1e-9) for r in ratios) and plan[-1][0] == final


@pytest.mark.parametrize("num_grads,final,steps", [(512, 0.1, 4), (512, 0.5, 4), (512, 0.7, 6), (512, 0.8, 8),
                                                   (512, 0.95, 8), (128, 0.8, 2), (1000, 0.8, 8), (1000, 0.95, 14),
                                                   (40, 0.9, 1)])
def test_auto_steps_keep_the_gradients_of_a_step_within_bounds(num_grads, final, steps):
    plan = wf.PruneConfig(sparsity=final, num_grads=num_grads).steps(0.0)
    fewest, most = AUTO_STEP_GRADS
    assert len(plan) == steps
    grads = [m for _, m in plan]
    assert max(grads) <= max(most, -(-num_grads // steps)) and (min(grads) >= fewest or steps == 1)


def test_step_plan_edge_cases():
    assert wf.PruneConfig(sparsity=0.9, method="global_magnitude").steps(0.0) == [(0.9, 512)]  # no curvature
    assert wf.PruneConfig(sparsity=0.5, pattern="2:4").steps(0.0) == [(0.5, 512)]
    assert wf.PruneConfig(sparsity=0.5).steps(0.7) == [(0.7, 512)]  # nothing to prune: one step
    assert wf.PruneConfig(sparsity=0.5, num_steps=2).steps(0.7) == [(0.7, 256), (0.7, 256)]  # never unprunes
    lin = wf.PruneConfig(sparsity=0.8, num_steps=4, step_schedule="linear", num_grads=10).steps(0.0)
    assert [s for s, _ in lin] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and [m for _, m in lin] == [3, 3, 2, 2]


def _wide_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 60), nn.ReLU(), nn.Linear(60, 5)).double()


def _wide_data(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 40, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (256,), generator=g)
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]


def test_magnitude_overlap_matches_an_independent_count():
    base, loader = _wide_model(), _wide_data()
    model = copy.deepcopy(base)
    res = wf.prune_one_shot(model, loader, sparsity=0.7, num_grads=64, progress=False)
    w = {n: p.detach().abs().flatten() for n, p in base.named_parameters() if n.endswith("weight")}
    flat = torch.cat(list(w.values()))
    k = int(round(0.7 * flat.numel()))
    mag = torch.zeros_like(flat, dtype=torch.bool)
    mag[torch.argsort(flat)[:k]] = True  # global magnitude: the k smallest
    ours = torch.cat([~res.masks[n].flatten() for n in w])
    assert res.magnitude_overlap == pytest.approx(float((mag & ours).sum()) / k, abs=1e-12)
    assert 0.0 < res.magnitude_overlap < 1.0
    gm = copy.deepcopy(base)
    assert wf.prune_one_shot(gm, None, sparsity=0.7, method="global_magnitude").magnitude_overlap == 1.0
    before = {n: p.detach().clone() for n, p in base.named_parameters() if n in w}
    keep0 = {n: torch.ones_like(v, dtype=torch.bool) for n, v in before.items()}
    got, count = magnitude_overlap(before, keep0, res.masks, res.sparsity, "global")
    assert got == res.magnitude_overlap and count == k


def test_degenerate_mask_warns_and_the_defaults_do_not():
    """A damp that swamps the Fisher makes F^-1 ~ I / damp: the mask is global magnitude's."""
    loader = _wide_data()
    with pytest.warns(UserWarning, match="same weights as magnitude pruning"):
        res = wf.prune_one_shot(_wide_model(), loader, sparsity=0.7, num_grads=64, damp=1e6, num_steps=1,
                                progress=False)
    assert res.magnitude_overlap == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = wf.prune_one_shot(_wide_model(), loader, sparsity=0.7, num_grads=64, progress=False)
    assert res.magnitude_overlap < 0.99


def test_auto_steps_with_a_single_pass_loader_prune_in_one_step():
    data = tiny_data(n=128, batch=8)
    assert len(wf.PruneConfig(sparsity=0.8, num_grads=128).steps()) == 2
    ref = wf.prune_one_shot(tiny_mlp(), data, sparsity=0.8, num_grads=128, num_steps=1, progress=False)
    with pytest.warns(UserWarning, match="read only once"):
        got = wf.prune_one_shot(tiny_mlp(), iter(data), sparsity=0.8, num_grads=128, progress=False)
    assert got.config["steps"] == [[0.8, 128]]
    assert all(torch.equal(ref.masks[k], got.masks[k]) for k in ref.masks)


def test_a_large_num_grads_alone_never_plans_more_than_the_many_steps_limit():
    """num_grads is the total over the call: a large one gives larger steps, not hundreds of them."""
    most = AUTO_STEP_GRADS[1]
    for num_grads in ((AUTO_MANY_STEPS + 1) * most, 100000):
        plan = wf.PruneConfig(sparsity=0.8, num_grads=num_grads).steps()
        assert len(plan) == AUTO_MANY_STEPS and sum(m for _, m in plan) == num_grads


def test_auto_steps_warn_when_the_sparsity_needs_many_recomputations():
    """Many steps come only from a very high sparsity (each step keeps >= AUTO_STEP_KEEP): warned once the first
    step's data went through (a call refused by its checks or its data warns nothing)."""
    plan = wf.PruneConfig(sparsity=0.98, num_grads=18 * 64).steps()
    assert len(plan) > AUTO_MANY_STEPS
    with pytest.warns(UserWarning, match=f"{len(plan)} Fisher recomputations.*num_steps="):
        res = wf.prune_one_shot(tiny_mlp(), tiny_data(n=64), sparsity=0.98, num_grads=18 * 64, progress=False)
    assert len(res.config["steps"]) == len(plan)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="ran out after"):   # refused by its data: no notice of its steps
            wf.prune_one_shot(tiny_mlp(), tiny_data(), sparsity=0.98, num_grads=4096, progress=False)
        with pytest.raises(ValueError, match="loader is required"):   # refused by its checks: no notice either
            wf.prune_one_shot(tiny_mlp(), None, sparsity=0.98, num_grads=4096)
        with pytest.raises(ValueError, match="loader is required"):
            wf.prune_one_shot(tiny_mlp(), None, sparsity=0.8, num_grads=10 ** 6)
        with pytest.raises(ValueError, match="loader is required"):   # an explicit num_steps is the user's choice
            wf.prune_one_shot(tiny_mlp(), None, sparsity=0.98, num_grads=4096, num_steps=2)


def test_a_loader_too_short_for_the_steps_is_reported_against_the_calls_num_grads():
    model, loader = tiny_mlp(), tiny_data()
    samples = sum(len(y) for _, y in loader)
    before = state_copy(model)
    with pytest.raises(ValueError, match=rf"num_grads=100000 is the total over the call: {AUTO_MANY_STEPS} steps.*"
                                         rf"ran out after {samples}; pass num_grads <= {samples * AUTO_MANY_STEPS}"):
        wf.prune_one_shot(model, loader, sparsity=0.8, num_grads=100000, progress=False)
    assert same_state(model, before)
