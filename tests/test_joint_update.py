"""``joint_update=True``: the joint OBS update of each block's pruned set, against a float64 dense reference."""
from __future__ import annotations

import copy

import pytest
import torch
from _pruner_shared import per_sample_grads, tiny_data, tiny_mlp

import woodfisher as wf
from woodfisher.cli import parse_args

NAMES = ["0.weight", "2.weight"]
SIZES = (16, 12, 6)          # weights 12 x 16 and 6 x 12: 264 entries
C = 32                       # block size: the second weight's 72 entries end in a padded block
DAMP = 1e-2


def _setup(seed=0):
    return tiny_mlp(seed=seed, sizes=SIZES, bias=False), tiny_data(n=64, features=16, classes=6, seed=seed + 1)


def _blocked(x):
    """(..., d) -> (..., B, C), zero-padded (padding carries no gradient: decoupled in F)."""
    d = x.shape[-1]
    return torch.nn.functional.pad(x, (0, -d % C)).view(*x.shape[:-1], -1, C)


def _fishers(model, loader, m):
    """{name: (B, C, C)} float64 dense blockwise Fishers ``DAMP I + G^T G / m`` (the paper's Eq. 2, damped)."""
    grads = per_sample_grads(model, loader, NAMES, m)
    out = {}
    for n in NAMES:
        gb = _blocked(grads[n]).transpose(0, 1)                       # (B, m, C)
        out[n] = DAMP * torch.eye(C, dtype=torch.float64) + gb.transpose(1, 2) @ gb / m
    return out


def _reference(fishers, dense, masks):
    """{name: (B, C) new weights}: per block ``w - F^-1 E_Q ([F^-1]_QQ)^-1 w_Q``, Q = the pruned entries."""
    out = {}
    for n in NAMES:
        inv = torch.linalg.inv(fishers[n])
        w = _blocked(dense[n].flatten())
        real = _blocked(torch.ones(dense[n].numel(), dtype=torch.bool))
        prune = ~_blocked(masks[n].flatten()) & real
        new = w.clone()
        for b in range(w.shape[0]):
            q = prune[b].nonzero().flatten()
            if q.numel():
                new[b] = (w[b] - inv[b][:, q] @ torch.linalg.solve(inv[b][q][:, q], w[b, q])).masked_fill(prune[b], 0)
        out[n] = new
    return out


def _quadratic_loss(fishers, dense, new):
    """Sum over blocks of ``dw^T F dw / 2``: the local quadratic model's loss increase (paper Eq. 4)."""
    total = 0.0
    for n in NAMES:
        dw = _blocked(new[n].flatten() - dense[n].flatten())
        total += 0.5 * float(torch.einsum("bi,bij,bj->", dw, fishers[n], dw))
    return total


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["global", "layerwise"])
@pytest.mark.parametrize("form,m", [("sequential", 48), ("lowrank", 24), ("lowrank", 6)])
def test_joint_update_is_the_float64_optimum_with_the_default_masks(form, m, mode):
    """Same curvature, same sparsity: joint_update keeps the default path's masks, its weights are the joint
    optimum of every block (dense reference), and its quadratic loss is at most the summed update's.
    ``lowrank`` with m = 6 < |Q| solves through the m x m Woodbury system."""
    model, loader = _setup()
    dense = _weights(model)
    curv = wf.estimate_curvature(model, loader, num_grads=m, damp=DAMP, block_size=C, inverse_form=form,
                                 modules=NAMES, progress=False)
    assert set(curv.forms.values()) == {form}
    summed_model, joint_model = copy.deepcopy(model), copy.deepcopy(model)
    summed = wf.prune_with(summed_model, curv, 0.6, mode=mode)
    joint = wf.prune_with(joint_model, curv, 0.6, mode=mode, joint_update=True)
    for n in NAMES:
        assert torch.equal(summed.masks[n], joint.masks[n]), n
    fishers = _fishers(model, loader, m)
    expect = _reference(fishers, dense, joint.masks)
    got, got_summed = _weights(joint_model), _weights(summed_model)
    for n in NAMES:
        assert torch.all(got[n][~joint.masks[n].bool()] == 0), n
        torch.testing.assert_close(_blocked(got[n].flatten()), expect[n], rtol=1e-7, atol=1e-9)
    loss_joint, loss_summed = _quadratic_loss(fishers, dense, got), _quadratic_loss(fishers, dense, got_summed)
    assert loss_joint < loss_summed, (loss_joint, loss_summed)


@pytest.mark.parametrize("mode", ["global", "layerwise"])
def test_multi_step_joint_update_is_each_steps_joint_update(mode):
    """num_steps=3: prune_one_shot equals the chain of (estimate_curvature, prune_with(joint_update=True)) over
    the steps of PruneConfig.steps; pruned entries exactly 0 and the target sparsity reached."""
    opts = dict(damp=DAMP, block_size=C, modules=NAMES, progress=False)
    model, loader = _setup(seed=2)
    chain = copy.deepcopy(model)
    res = wf.prune_one_shot(model, loader, sparsity=0.8, num_grads=48, num_steps=3, mode=mode, joint_update=True,
                            **opts)
    steps = wf.PruneConfig(sparsity=0.8, num_grads=48, num_steps=3).steps()
    assert len(steps) == 3
    for s, m in steps:
        curv = wf.estimate_curvature(chain, loader, num_grads=m, **opts)
        wf.prune_with(chain, curv, s, mode=mode, joint_update=True)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, dict(chain.named_parameters())[n], rtol=1e-10, atol=1e-12)
        assert torch.all(p[~res.masks[n].bool()] == 0)
    assert res.sparsity == pytest.approx(0.8, abs=1e-2)
    if mode == "layerwise":
        for keep in res.masks.values():
            assert 1 - keep.float().mean().item() == pytest.approx(0.8, abs=2e-2)


def test_offloaded_inverse_gives_the_in_memory_joint_update():
    """inverse_form="offload" (inverses on the host, streamed in chunks): the in-memory joint update (float32: a
    float64 model's offloaded inverse differs from the in-memory one on main, reported separately)."""
    model, loader = _setup(seed=4)
    model, loader = model.float(), [(x.float(), y) for x, y in loader]
    ref = copy.deepcopy(model)
    opts = dict(sparsity=0.7, num_grads=48, num_steps=1, damp=DAMP, block_size=C, modules=NAMES, progress=False,
                joint_update=True)
    res = wf.prune_one_shot(model, loader, inverse_form="offload", memory_budget=4_000_000, **opts)
    ref_res = wf.prune_one_shot(ref, loader, **opts)
    assert all(row["inverse"].startswith("offload") for row in res.layers)
    for n, p in model.named_parameters():
        assert torch.equal(res.masks[n], ref_res.masks[n])
        torch.testing.assert_close(p, dict(ref.named_parameters())[n], rtol=1e-5, atol=1e-6)


def test_diagonal_fisher_joint_update_equals_the_summed_one():
    """Blocks of one entry: nothing couples the pruned weights, the two updates agree."""
    model, loader = _setup(seed=5)
    ref = copy.deepcopy(model)
    opts = dict(sparsity=0.5, method="diag_fisher", num_grads=32, num_steps=1, damp=DAMP, progress=False)
    wf.prune_one_shot(model, loader, joint_update=True, **opts)
    wf.prune_one_shot(ref, loader, **opts)
    for p, p_ref in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("options,match", [
    (dict(joint_update="yes"), "joint_update must be True or False"),
    (dict(joint_update=1), "joint_update must be True or False"),
    (dict(joint_update=True, obs_update=False), "joint_update=True needs obs_update=True"),
    (dict(joint_update=True, pattern="2:4", sparsity=0.5), "joint_update=True is for unstructured"),
    (dict(joint_update=True, woodtaylor=True), "joint_update=True does not support woodtaylor"),
    (dict(joint_update=True, method="kfac"), "joint_update=True is not supported by method 'kfac'"),
    (dict(joint_update=True, method="magnitude"), "joint_update=True is not supported by method 'magnitude'"),
])
def test_bad_joint_update_options_are_refused_before_anything_runs(options, match):
    model, loader = _setup()
    before = _weights(model)
    with pytest.raises(ValueError, match=match):
        wf.prune_one_shot(model, loader, **{"sparsity": 0.5, "progress": False, **options})
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_cli_flag_and_config_key(tmp_path):
    assert parse_args(["prune", "--model", "mlpnet", "--sparsity", "0.5"]).joint_update is False
    assert parse_args(["prune", "--model", "mlpnet", "--sparsity", "0.5", "--joint-update"]).joint_update is True
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"sparsity": 0.5, "joint_update": true}')
    assert parse_args(["prune", "--config", str(cfg), "--model", "mlpnet"]).joint_update is True
