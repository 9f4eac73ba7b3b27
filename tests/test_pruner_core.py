"""One-shot WoodFisher against a from-scratch float64 dense OBS computation, and its options."""
from __future__ import annotations

import copy

import pytest
import torch
from _pruner_shared import per_sample_grads, tiny_data, tiny_mlp
from torch import nn

import woodfisher as wf
from woodfisher.batches import sample_targets

NAMES = ["0.weight", "2.weight"]


def dense_obs_reference(model, loader, m, damp, sparsity, mode, block=None, woodtaylor=False):
    """Masks and weights of Eqs. 10/11 (and 21/23) from a dense float64 F per layer.

    F = damp I + G^T G / m with G the masked per-sample gradients; with ``block`` the
    Fisher keeps only the entries of the same block of ``block`` consecutive weights.
    """
    params = dict(model.named_parameters())
    w = {n: params[n].detach().flatten() for n in NAMES}
    keep0 = {n: w[n] != 0 for n in NAMES}
    grads = per_sample_grads(model, loader, NAMES, m)
    inv, rho, h = {}, {}, {}
    for n in NAMES:
        g = grads[n] * keep0[n]
        d = g.shape[1]
        f = g.T @ g / m
        if block is not None:
            idx = torch.arange(d) // block
            f = f * (idx[:, None] == idx[None, :])
        inv[n] = torch.linalg.inv(damp * torch.eye(d, dtype=torch.float64) + f)
        h[n] = inv[n] @ g.mean(0) if woodtaylor else torch.zeros(d, dtype=torch.float64)
        rho[n] = (w[n] - h[n]) ** 2 / (2 * torch.diagonal(inv[n]))
        rho[n] = rho[n].masked_fill(~keep0[n], -float("inf"))
    prune = {}
    if mode == "global":
        allr = torch.cat([rho[n] for n in NAMES])
        k = int(round(sparsity * allr.numel()))
        flags = torch.zeros_like(allr, dtype=torch.bool)
        flags[torch.argsort(allr)[:k]] = True
        prune = dict(zip(NAMES, flags.split([w[n].numel() for n in NAMES])))
    else:
        for n in NAMES:
            flags = torch.zeros_like(rho[n], dtype=torch.bool)
            flags[torch.argsort(rho[n])[: int(round(sparsity * rho[n].numel()))]] = True
            prune[n] = flags
    new = {}
    for n in NAMES:
        v = torch.where(prune[n], (w[n] - h[n]) / torch.diagonal(inv[n]), torch.zeros_like(w[n]))
        new[n] = (w[n] - inv[n] @ v - h[n]).masked_fill(prune[n], 0.0)
    return prune, new


def _check_against_reference(model, loader, kwargs, ref_kwargs):
    ref_model = copy.deepcopy(model)
    prune, new = dense_obs_reference(ref_model, loader, **ref_kwargs)
    res = wf.prune_one_shot(model, loader, progress=False, **kwargs)
    params = dict(model.named_parameters())
    for n in NAMES:
        assert torch.equal(~res.masks[n].flatten(), prune[n]), n
        torch.testing.assert_close(params[n].detach().flatten(), new[n], rtol=1e-7, atol=1e-9)
        assert torch.all(params[n].detach().flatten()[prune[n]] == 0.0)
    for n in ("0.bias", "2.bias"):  # biases are never pruned or updated
        assert torch.equal(params[n], dict(ref_model.named_parameters())[n])
    return res


@pytest.mark.parametrize("mode", ["global", "layerwise"])
@pytest.mark.parametrize("pre_pruned", [False, True])
def test_whole_layer_woodfisher_matches_dense_obs(mode, pre_pruned):
    model, loader = tiny_mlp(), tiny_data()
    if pre_pruned:  # exact zeros count as pruned: gradients masked, they stay pruned
        with torch.no_grad():
            model[0].weight[0, :3] = 0.0
            model[2].weight[1, 1] = 0.0
    res = _check_against_reference(  # the paper's settings: whole-layer blocks, one step
        model, loader, dict(sparsity=0.6, mode=mode, num_grads=24, damp=1e-3, block_size=None, num_steps=1),
        dict(m=24, damp=1e-3, sparsity=0.6, mode=mode))
    if mode == "layerwise":
        assert [layer["nnz"] for layer in res.layers] == [30 - 18, 20 - 12]
    assert res.sparsity == pytest.approx(0.6, abs=0.01)
    assert res.damp == 1e-3 and set(res.timings) >= {"gradients", "inverse", "select", "update", "total"}


def test_blocked_woodfisher_matches_block_diagonal_dense_obs():
    """block_size=7: blocks never span layers, padding of the last block is never pruned."""
    model, loader = tiny_mlp(seed=3), tiny_data(seed=4)
    _check_against_reference(model, loader, dict(sparsity=0.5, block_size=7, num_grads=20, damp=1e-2),
                             dict(m=20, damp=1e-2, sparsity=0.5, mode="global", block=7))


def test_woodtaylor_matches_dense_reference():
    model, loader = tiny_mlp(seed=5), tiny_data(seed=6)
    _check_against_reference(model, loader, dict(sparsity=0.4, woodtaylor=True, num_grads=32, damp=1e-1),
                             dict(m=32, damp=1e-1, sparsity=0.4, mode="global", woodtaylor=True))


def test_woodtaylor_reduces_to_plain_when_loss_gradient_is_zero():
    """Pairs (x, y), (x, -y) under a linear loss have opposite gradients: mean exactly ~0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 6, generator=g, dtype=torch.float64)
    y = torch.randn(16, 4, generator=g, dtype=torch.float64)
    xs, ys = torch.cat([x, x]), torch.cat([y, -y])
    perm = torch.arange(32).view(2, 16).T.flatten()  # interleave each pair
    loader = [(xs[perm][i:i + 8], ys[perm][i:i + 8]) for i in range(0, 32, 8)]
    loss = lambda out, t: (out * t).sum(1).mean()  # noqa: E731
    plain, taylor = tiny_mlp(seed=7), tiny_mlp(seed=7)
    kw = dict(sparsity=0.5, num_grads=32, damp=1e-2, loss_fn=loss, progress=False)
    r1 = wf.prune_one_shot(plain, loader, **kw)
    r2 = wf.prune_one_shot(taylor, loader, woodtaylor=True, **kw)
    for n in NAMES:
        assert torch.equal(r1.masks[n], r2.masks[n])
    for p, q in zip(plain.parameters(), taylor.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_obd_mode_only_masks():
    base, loader = tiny_mlp(seed=2), tiny_data(seed=2)
    obs, obd = copy.deepcopy(base), copy.deepcopy(base)
    kw = dict(sparsity=0.5, num_grads=16, damp=1e-3, progress=False)
    r_obs = wf.prune_one_shot(obs, loader, **kw)
    r_obd = wf.prune_one_shot(obd, loader, obs_update=False, **kw)
    for n, p in dict(obd.named_parameters()).items():
        orig = dict(base.named_parameters())[n]
        if n in NAMES:
            keep = r_obd.masks[n]
            assert torch.equal(keep, r_obs.masks[n])  # same statistic, same masks
            assert torch.equal(p[keep], orig[keep]) and torch.all(p[~keep] == 0)
            assert not torch.allclose(dict(obs.named_parameters())[n][keep], orig[keep])
        else:
            assert torch.equal(p, orig)


def test_multi_step_equals_successive_one_shot_calls_and_keeps_pruned():
    """The paper's recomputation: linear schedule, each step with its share of num_grads."""
    base, loader = tiny_mlp(seed=4), tiny_data(seed=5)
    with torch.no_grad():
        base[0].weight[2] = 0.0  # 6 of 50 weights already pruned: s0 = 0.12
    multi, single = copy.deepcopy(base), copy.deepcopy(base)
    kw = dict(damp=1e-2, block_size=None, progress=False)
    res = wf.prune_one_shot(multi, loader, sparsity=0.7, num_steps=3, num_grads=48, step_schedule="linear", **kw)
    for target in (0.12 + 0.58 / 3, 0.12 + 2 * 0.58 / 3, 0.7):
        wf.prune_one_shot(single, loader, sparsity=target, num_grads=16, num_steps=1, **kw)
    for p, q in zip(multi.parameters(), single.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    assert torch.all(multi[0].weight[2] == 0)
    assert not res.masks["0.weight"][2].any()
    assert res.sparsity == pytest.approx(0.7, abs=0.01)
    assert res.config["steps"] == [[pytest.approx(t), 16] for t in (0.12 + 0.58 / 3, 0.12 + 2 * 0.58 / 3, 0.7)]


def test_auto_schedule_is_geometric_with_the_gradients_split():
    """Defaults: num_steps="auto" from 12% to 80% with 200 gradients -> 3 steps (at least 64 gradients
    each), densities 0.88 * (0.2 / 0.88) ** (i / 3), split 67 + 67 + 66, block size 4 m of the step."""
    base, loader = tiny_mlp(seed=4), tiny_data(n=200, batch=8, seed=5)
    with torch.no_grad():
        base[0].weight[2] = 0.0
    multi, single = copy.deepcopy(base), copy.deepcopy(base)
    res = wf.prune_one_shot(multi, loader, sparsity=0.8, num_grads=200, progress=False)
    targets = [1 - 0.88 * (0.2 / 0.88) ** (i / 3) for i in (1, 2, 3)]
    assert res.config["steps"] == [[pytest.approx(t), m] for t, m in zip(targets, (67, 67, 66))]
    for target, m in zip(targets, (67, 67, 66)):
        wf.prune_one_shot(single, loader, sparsity=target, num_grads=m, num_steps=1, block_size=4 * m,
                          progress=False)
    for p, q in zip(multi.parameters(), single.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    assert res.config["fisher_block_size"] == 4 * 67 and res.damp is not None


def _run_both(kw_a, kw_b, seed=8, **common):
    a, b = tiny_mlp(seed=seed), tiny_mlp(seed=seed)
    loader = tiny_data(seed=seed)
    ra = wf.prune_one_shot(a, loader, progress=False, **common, **kw_a)
    rb = wf.prune_one_shot(b, loader, progress=False, **common, **kw_b)
    for n in NAMES:
        assert torch.equal(ra.masks[n], rb.masks[n])
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)
    return ra, rb


def test_streaming_matches_kept_gradients():
    """A memory_budget too small for 24 kept gradients streams them 3 at a time."""
    ra, rb = _run_both({}, {"memory_budget": (30 ** 2 + 20 ** 2 + 3 * 50) * 8},
                       sparsity=0.6, num_grads=24, damp=1e-3, block_size=None, num_steps=1)
    assert [layer["inverse"] for layer in rb.layers] == ["stream", "stream"]
    assert [layer["inverse"] for layer in ra.layers] != ["stream", "stream"]


def test_streaming_auto_damp_matches_kept():
    ra, rb = _run_both({}, {"inverse_form": "stream"}, sparsity=0.5, num_grads=24, damp="auto")
    assert ra.damp == pytest.approx(rb.damp, rel=1e-12)


def test_lowrank_matches_sequential():
    ra, rb = _run_both({"inverse_form": "lowrank"}, {"inverse_form": "sequential"},
                       sparsity=0.5, num_grads=12, damp=1e-3, block_size=10)
    assert ra.layers[0]["inverse"] == "lowrank" and rb.layers[0]["inverse"] == "sequential"


def test_sampled_fisher_draws_labels_from_the_model():
    """A model certain of class 2: sampled labels are all 2, whatever the loader says."""
    base = tiny_mlp(seed=9)
    with torch.no_grad():
        base[2].bias.copy_(torch.tensor([0.0, 0.0, 80.0, 0.0]))
    loader = tiny_data(seed=9)
    loader2 = [(x, torch.full_like(y, 2)) for x, y in loader]
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    ra = wf.prune_one_shot(a, loader, sparsity=0.5, num_grads=16, damp=1e-3, sampled_fisher=True, progress=False)
    rb = wf.prune_one_shot(b, loader2, sparsity=0.5, num_grads=16, damp=1e-3, progress=False)
    for n in NAMES:
        assert torch.equal(ra.masks[n], rb.masks[n])
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_sampled_labels_follow_the_predictive_distribution():
    """Label frequencies of a fixed predictive distribution match it (chi-square-free bound)."""
    model = nn.Sequential(nn.Linear(3, 3, bias=True)).double()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.log(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)))
    x = torch.zeros(4000, 3, dtype=torch.float64)
    with torch.no_grad():
        labels = sample_targets(model(x), torch.Generator().manual_seed(3))
    freq = torch.bincount(labels.flatten(), minlength=3).double() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64), atol=0.03, rtol=0)


def test_fisher_minibatch_gradients_cross_loader_batches():
    """fisher_batch_size=4 over loader batches of 6: each gradient is the mean over 4 samples."""
    model = tiny_mlp(seed=10)
    loader = tiny_data(n=24, batch=6, seed=10)
    layers = wf.resolve_layers(model)
    got = wf.GradientCollector(model, loader, layers, num_grads=5, fisher_batch_size=4, progress=False).collect()
    per = per_sample_grads(model, loader, NAMES, 20)
    for n in NAMES:
        torch.testing.assert_close(got[n], per[n].view(5, 4, -1).mean(1), rtol=1e-10, atol=1e-12)
    fallback = wf.GradientCollector(model, loader, layers, num_grads=5, fisher_batch_size=4, progress=False)
    fallback._use_vmap = False
    for n, g in fallback.collect().items():
        torch.testing.assert_close(g, got[n], rtol=1e-10, atol=1e-12)


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _conv_setup():
    torch.manual_seed(11)
    model = _ConvNet().double()
    g = torch.Generator().manual_seed(11)
    x = torch.randn(32, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=g)
    return model, [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]


def test_flops_aware_beta_shifts_sparsity_to_expensive_layers():
    model, loader = _conv_setup()
    layers = wf.resolve_layers(model)
    assert wf.layer_flops_per_param(model, loader, layers) == {"conv.weight": 36.0, "fc.weight": 1.0}
    conv_sparsity = []
    for beta in (0.0, 0.5):
        m = copy.deepcopy(model)
        res = wf.prune_one_shot(m, loader, sparsity=0.5, beta=beta, num_grads=16, block_size=36,
                                damp=1e-3, progress=False)
        conv_sparsity.append(res.layers[0]["sparsity"])
        assert res.sparsity == pytest.approx(0.5, abs=0.01)
    assert conv_sparsity[1] > conv_sparsity[0]


def test_batchnorm_model_eval_mode_collection_leaves_bn_untouched():
    model, loader = _conv_setup()
    model.train()
    bn_state = {k: v.clone() for k, v in model.bn.state_dict().items()}
    res = wf.prune_one_shot(model, loader, sparsity=0.3, num_grads=16, block_size=50, progress=False)
    assert model.training and model.bn.training  # train/eval flags restored
    for k, v in model.bn.state_dict().items():  # running stats not updated, BN never pruned
        assert torch.equal(v, bn_state[k]), k
    assert set(res.masks) == {"conv.weight", "fc.weight"}


def test_diag_fisher_is_obs_with_a_diagonal_fisher():
    model, loader = tiny_mlp(seed=12), tiny_data(seed=12)
    ref = copy.deepcopy(model)
    res = wf.prune_one_shot(model, loader, sparsity=0.5, method="diag_fisher", num_grads=16, damp=1e-3,
                            progress=False)
    grads = per_sample_grads(ref, loader, NAMES, 16)
    params = dict(ref.named_parameters())
    # closed form: rho = w^2 / (2 [F^-1]_qq) with F = damp + mean g^2 per weight
    rho = torch.cat([params[n].detach().flatten().square() * (1e-3 + grads[n].square().mean(0)) / 2.0
                     for n in NAMES])
    prune = torch.zeros_like(rho, dtype=torch.bool)
    prune[torch.argsort(rho)[:25]] = True
    got = torch.cat([~res.masks[n].flatten() for n in NAMES])
    assert torch.equal(got, prune)
    for n, p in dict(model.named_parameters()).items():  # diagonal OBS update = zeroing only
        orig = params[n].detach()
        keep = res.masks.get(n, torch.ones_like(orig, dtype=torch.bool))
        assert torch.equal(p[keep], orig[keep])


@pytest.mark.parametrize("method,mode", [("magnitude", "layerwise"), ("global_magnitude", "global")])
def test_magnitude_baselines(method, mode):
    model = tiny_mlp(seed=13)
    w = torch.cat([p.detach().abs().flatten() for n, p in model.named_parameters() if n in NAMES])
    res = wf.prune_one_shot(model, None, sparsity=0.5, method=method, progress=False)
    if mode == "global":
        got = torch.cat([~res.masks[n].flatten() for n in NAMES])
        assert torch.equal(got, w <= w.kthvalue(25).values)
    else:
        assert [layer["nnz"] for layer in res.layers] == [15, 10]


def _float32_vs_float64(device):
    base, loader = tiny_mlp(seed=14), tiny_data(seed=14)
    ref = copy.deepcopy(base)
    r64 = wf.prune_one_shot(ref, loader, sparsity=0.5, num_grads=24, damp=1e-2, progress=False)
    m32 = copy.deepcopy(base).float().to(device)
    loader32 = [(x.float().to(device), y.to(device)) for x, y in loader]
    r32 = wf.prune_one_shot(m32, loader32, sparsity=0.5, num_grads=24, damp=1e-2, progress=False)
    agree = sum(int((r32.masks[n].cpu() == r64.masks[n]).sum()) for n in NAMES) / 50
    assert agree >= 0.96  # at most one pair of near-tied weights may swap across the threshold
    if agree == 1.0:
        for p, q in zip(m32.parameters(), ref.parameters()):
            torch.testing.assert_close(p.detach().cpu().double(), q.detach(), rtol=1e-3, atol=1e-4)
    assert r32.sparsity == pytest.approx(0.5, abs=0.01)


def test_float32_model_agrees_with_float64():
    _float32_vs_float64("cpu")


@pytest.mark.gpu
def test_cuda_float32_model_agrees_with_cpu_float64():
    _float32_vs_float64("cuda")


def test_result_and_curvature_print_as_short_summaries():
    """``print(res)`` / ``print(curv)`` (or a notebook cell ending in one) show what was done in one line,
    not every mask and inverse: the length does not grow with the model."""
    lines = {}
    for width in (8, 256):
        model = tiny_mlp(sizes=(6, width, 4))
        curvature = wf.estimate_curvature(model, tiny_data(), num_grads=16, block_size=8, progress=False)
        result = wf.prune_with(model, curvature, 0.5)
        total = 6 * width + width * 4
        kept = sum(int(m.sum()) for m in result.masks.values())
        lines[width] = (repr(result), repr(curvature))
        assert f"sparsity={result.sparsity:.4f}" in lines[width][0]
        assert f"({kept}/{total} entries kept)" in lines[width][0] and "method='woodfisher'" in lines[width][0]
        assert f"damp={curvature.damp:.3g}" in lines[width][1] and "weights=2" in lines[width][1]
        assert all("tensor(" not in text and "\n" not in text for text in lines[width])
    assert all(abs(len(a) - len(b)) <= 8 for a, b in zip(lines[8], lines[256]))
