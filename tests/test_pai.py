"""Pruning at initialization (woodfisher.pai): estimators, criteria, warm-up, collapse.

References are float64: exact Hessians from torch.autograd.functional.hessian,
per-sample gradients from a plain loop, closed forms for SynFlow / SNIP.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from woodfisher.pai import (
    attach_masks,
    compute_scores,
    fisher_diagonal,
    hutchinson_diagonal,
    prune_at_init,
    synflow_scores,
)
from woodfisher.pai.estimators import hessian_gradient_product, loss_gradient


def tiny_mlp(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)]
    if bn:
        layers = [nn.BatchNorm1d(5)] + layers
    return nn.Sequential(*layers).double()


def tiny_data(seed=0, sizes=(10, 6), dim=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, dim, generator=g, dtype=torch.float64), torch.randint(0, 3, (b,), generator=g))
            for b in sizes]


def exact_hessian(model, x, y, names):
    """Dense float64 Hessian of the mean cross-entropy w.r.t. the flattened ``names``."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    flat0 = torch.cat([params[n].detach().flatten() for n in names])

    def loss(flat):
        parts, off = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = flat[off:off + s.numel()].view(s)
            off += s.numel()
        return F.cross_entropy(functional_call(model, parts, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat0)


def flat(d, names):
    return torch.cat([d[n].flatten() for n in names])


NAMES = ["0.weight", "2.weight"]


def _exact_stats(model, data):
    """Exact diag(H) of the mean loss over ``data`` and the per-entry std of one probe."""
    n = sum(x.shape[0] for x, _ in data)
    diag, var = 0, 0
    for x, y in data:
        h = exact_hessian(model, x, y, NAMES)
        off = h - torch.diag(torch.diag(h))
        diag = diag + x.shape[0] / n * torch.diag(h)
        var = var + (x.shape[0] / n) ** 2 * off.square().sum(1)  # Var(z_i (Hz)_i) = sum_{j!=i} H_ij^2
    return diag, var.sqrt()


def test_hutchinson_unbiased_over_batches():
    model, data = tiny_mlp(), tiny_data()
    exact, sigma = _exact_stats(model, data)
    probes = 2000
    est = hutchinson_diagonal(model, data, params=NAMES, num_probes=probes, probe_batch=500,
                              generator=torch.Generator().manual_seed(1))
    err = (flat(est.diag, NAMES) - exact).abs()
    # unbiased: every entry within 5 standard errors (sigma_i / sqrt(P)); entries with
    # sigma_i = 0 (none here, but allowed) must be exact to rounding.
    assert torch.all(err <= 5 * sigma / math.sqrt(probes) + 1e-12), (err / (sigma / math.sqrt(probes))).max()
    assert est.num_samples == 16 and est.num_probes == probes


def test_hutchinson_error_falls_like_inverse_sqrt_probes():
    model, data = tiny_mlp(1), tiny_data(1, sizes=(12,))
    exact, sigma = _exact_stats(model, data)
    gen = torch.Generator().manual_seed(2)
    probe_counts, repeats, rms = [1, 4, 16, 64], 40, []
    for p in probe_counts:
        sq = [(flat(hutchinson_diagonal(model, data, params=NAMES, num_probes=p, probe_batch=p,
                                        generator=gen).diag, NAMES) - exact).square().sum() for _ in range(repeats)]
        rms.append(torch.stack(sq).mean().sqrt().item())
    theory = [sigma.square().sum().sqrt().item() / math.sqrt(p) for p in probe_counts]
    for r, t in zip(rms, theory):  # 40 repeats: the RMS estimate is within ~25% (a few std) of theory
        assert 0.7 * t < r < 1.3 * t, (rms, theory)
    slope = (math.log(rms[-1]) - math.log(rms[0])) / (math.log(probe_counts[-1]) - math.log(probe_counts[0]))
    assert -0.6 < slope < -0.4, slope


@pytest.mark.parametrize("probe_batch", [1, 3])
def test_hutchinson_func_matches_double_backward(probe_batch):
    model, data = tiny_mlp(), tiny_data()
    a = hutchinson_diagonal(model, data, params=NAMES, num_probes=3, probe_batch=probe_batch,
                            generator=torch.Generator().manual_seed(5))
    b = hutchinson_diagonal(model, data, params=NAMES, num_probes=3, hvp="func", probe_batch=probe_batch,
                            generator=torch.Generator().manual_seed(5))
    for n in NAMES:
        torch.testing.assert_close(a.diag[n], b.diag[n], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a.grad[n], b.grad[n], rtol=1e-10, atol=1e-12)


def _loop_fisher(model, data, names):
    params = dict(model.named_parameters())
    sq, n = 0, 0
    for x, y in data:
        for i in range(x.shape[0]):
            g = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), [params[k] for k in names])
            sq = sq + torch.cat([t.flatten() for t in g]).square()
            n += 1
    return sq / n


@pytest.mark.parametrize("train_mode", [False, True])
def test_fisher_diagonal_equals_loop(train_mode):
    """Per-sample gradients use the running BatchNorm statistics whatever the model's mode
    (batch statistics would couple the samples); the mode flags are left as they were."""
    model, names, data = tiny_mlp(bn=True), ["1.weight", "3.weight"], tiny_data()
    with torch.no_grad():
        model[0].running_mean.copy_(torch.linspace(-1, 1, 5))
        model[0].running_var.copy_(torch.linspace(0.5, 2, 5))
    model.train(train_mode)
    model[0].train(not train_mode)
    flags = [m.training for m in model.modules()]
    est = fisher_diagonal(model, data, params=names, chunk_size=4)
    assert [m.training for m in model.modules()] == flags
    model.eval()
    torch.testing.assert_close(flat(est.diag, names), _loop_fisher(model, data, names), rtol=1e-10, atol=1e-14)
    # the mean of per-sample gradients is the gradient of the mean loss
    g = loss_gradient(model, data, params=names)
    torch.testing.assert_close(flat(est.grad, names), flat(g, names), rtol=1e-10, atol=1e-14)
    assert est.num_samples == sum(x.shape[0] for x, _ in data)


def test_snip_matches_closed_form_softmax_regression():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 3, bias=False)).double()
    data = tiny_data(3)
    x = torch.cat([d[0] for d in data])
    y = torch.cat([d[1] for d in data])
    w = model[0].weight.detach()
    grad = (torch.softmax(x @ w.T, 1) - F.one_hot(y, 3).double()).T @ x / x.shape[0]
    scores = compute_scores(model, data, "snip")
    torch.testing.assert_close(scores["0.weight"], (w * grad).abs(), rtol=1e-10, atol=1e-14)


def test_grasp_matches_exact_hessian_times_gradient():
    model, data = tiny_mlp(4), tiny_data(4, sizes=(16,))
    x, y = data[0]
    h = exact_hessian(model, x, y, NAMES)
    g = flat(loss_gradient(model, data, params=NAMES), NAMES)
    w = torch.cat([dict(model.named_parameters())[n].detach().flatten() for n in NAMES])
    scores = compute_scores(model, data, "grasp", params=NAMES)
    torch.testing.assert_close(flat(scores, NAMES), w * (h @ g), rtol=1e-9, atol=1e-13)
    hg = hessian_gradient_product(model, data, loss_gradient(model, data, params=NAMES), params=NAMES)
    torch.testing.assert_close(flat(hg, NAMES), h @ g, rtol=1e-9, atol=1e-13)


def test_second_order_criteria_formulas():
    model, data = tiny_mlp(6), tiny_data(6)
    w = {n: p.detach() for n, p in model.named_parameters() if n in NAMES}
    fisher = fisher_diagonal(model, data, params=NAMES)
    hutch = hutchinson_diagonal(model, data, params=NAMES, num_probes=4, generator=torch.Generator().manual_seed(0))
    for crit, d in [("fisher", fisher), ("hutchinson", hutch), ("obd_hutchinson", hutch)]:
        s = compute_scores(model, data, crit, params=NAMES, num_probes=4, generator=torch.Generator().manual_seed(0))
        diag = {n: d.diag[n].abs() if crit == "hutchinson" else d.diag[n] for n in NAMES}
        torch.testing.assert_close(flat(s, NAMES), flat({n: 0.5 * w[n] ** 2 * diag[n] for n in NAMES}, NAMES))
    s = compute_scores(model, data, "fisher_taylor", params=NAMES)
    ref = {n: (-fisher.grad[n] * w[n] + 0.5 * w[n] ** 2 * fisher.diag[n]).abs() for n in NAMES}
    torch.testing.assert_close(flat(s, NAMES), flat(ref, NAMES))


def test_synflow_closed_form_two_layer_linear():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 4, bias=False), nn.ReLU(), nn.Linear(4, 3, bias=False))
    w1, w2 = model[0].weight.detach().double().abs(), model[2].weight.detach().double().abs()
    s = synflow_scores(model, (6,))
    # R = 1^T |W2| |W1| 1:  dR/d|W1|_ij = sum_k |W2|_ki ;  dR/d|W2|_ki = sum_j |W1|_ij
    torch.testing.assert_close(s["0.weight"].double(), w1 * w2.sum(0)[:, None], rtol=1e-6, atol=0)
    torch.testing.assert_close(s["2.weight"].double(), w2 * w1.sum(1)[None, :], rtol=1e-6, atol=0)
    # conservation: each layer's scores sum to R
    r = (w2 @ w1).sum()
    for n in ("0.weight", "2.weight"):
        assert torch.allclose(s[n].double().sum(), r, rtol=1e-6)


@pytest.mark.parametrize("mode", ["global", "layerwise"])
def test_synflow_iterative_reaches_target(mode):
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 30), nn.ReLU(), nn.Linear(30, 5))
    res = prune_at_init(model, None, sparsity=0.9, criterion="synflow", mode=mode, input_shape=(20,),
                        synflow_iterations=20, progress=False)
    total = sum(m.numel() for m in res.masks.values())
    assert abs(res.sparsity - 0.9) <= 3 / total
    for n, p in model.named_parameters():  # pruned weights are exactly zero
        if n in res.masks:
            assert torch.all(p[~res.masks[n]] == 0)


def bn_net():
    torch.manual_seed(9)
    return nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()


def test_warmup_updates_bn_stats_and_is_switchable():
    data = [(3.0 + 2.0 * x, y) for x, y in tiny_data(10, sizes=(8, 8, 8, 8))]
    off = bn_net()
    prune_at_init(off, data, sparsity=0.5, criterion="snip", warmup_batches=0, progress=False)
    assert torch.all(off[0].running_mean == 0) and torch.all(off[0].running_var == 1)
    on = bn_net()
    res = prune_at_init(on, data, sparsity=0.5, criterion="snip", warmup_batches=3, progress=False)
    x = torch.cat([d[0] for d in data[:3]])  # cumulative average over the 3 warm-up batches
    torch.testing.assert_close(on[0].running_mean, x.mean(0), rtol=1e-10, atol=1e-12)
    assert res.config["warmup_samples"] == 24 and on.training  # mode restored
    assert not torch.equal(on[2].running_mean, off[2].running_mean)


def test_train_mode_scoring_restores_bn_buffers():
    model, data = bn_net(), tiny_data(11, sizes=(8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    prune_at_init(model, data, sparsity=0.5, criterion="hutchinson", warmup_batches=0, train_mode=True,
                  num_probes=2, progress=False)
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k


def collapse_net():
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 3))
    with torch.no_grad():
        model[2].weight.mul_(1e-3)  # a layer of tiny weights: global magnitude removes all of it
    return model


def test_layer_collapse_detected_and_min_density_prevents_it():
    res = prune_at_init(collapse_net(), None, sparsity=0.7, criterion="magnitude", progress=False)
    assert "2.weight" in res.collapsed
    row = next(r for r in res.layers if r["name"] == "2.weight")
    assert row["nnz"] == 0 and row["sparsity"] == 1.0
    res = prune_at_init(collapse_net(), None, sparsity=0.7, criterion="magnitude", min_density=0.05, progress=False)
    assert res.collapsed == []
    assert res.masks["2.weight"].sum() >= round(0.05 * 400)
    assert abs(res.sparsity - 0.7) < 2e-3


def test_masks_stay_zero_during_training():
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    data = [(x.float(), y) for x, y in tiny_data(13, sizes=(8, 8))]
    res = prune_at_init(model, data, sparsity=0.8, criterion="hutchinson", num_probes=2, progress=False)
    attach_masks(model, res.masks)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    for x, y in data * 3:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for n, m in res.masks.items():
        mod = model[int(n.split(".")[0])]
        assert torch.all(mod.weight[~m] == 0) and hasattr(mod, "weight_mask")


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity=1.0), "sparsity"), (dict(sparsity=-0.1), "sparsity"),
    (dict(sparsity=0.5, criterion="obs"), "criterion"), (dict(sparsity=0.5, num_probes=0), "num_probes"),
    (dict(sparsity=0.5, mode="blocks"), "mode"), (dict(sparsity=0.5, warmup_batches=-1), "warmup_batches"),
    (dict(sparsity=0.5, min_density=1.5), "min_density"), (dict(sparsity=0.5, params=["nope"]), "params"),
])
def test_bad_inputs_raise_before_modifying(kwargs, match):
    model, data = bn_net(), tiny_data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        prune_at_init(model, data, **{"criterion": "hutchinson", **kwargs}, progress=False)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("criterion", ["hutchinson", "snip", "synflow"])
def test_empty_loader_raises(criterion):
    with pytest.raises(ValueError, match="empty"):
        prune_at_init(tiny_mlp(), [], sparsity=0.5, criterion=criterion, progress=False)
    with pytest.raises(ValueError, match="empty"):
        hutchinson_diagonal(tiny_mlp(), [], params=NAMES)


def test_cli_pai_writes_outputs(tmp_path):
    import json

    from woodfisher.cli import main
    out = tmp_path / "pai"
    code = main(["pai", "--model", "digits_mlp", "--sparsity", "0.8", "--criterion", "fisher", "--score-samples",
                 "64", "--train-epochs", "0.2", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert abs(report["sparsity"] - 0.8) < 1e-3 and report["collapsed"] == [] and report["criterion"] == "fisher"
    masks = torch.load(out / "masks.pt", weights_only=True)
    state = torch.load(out / "pruned.pt", weights_only=True)
    for n, m in masks.items():  # pruned weights saved as exact zeros, after training
        assert torch.all(state[n][~m] == 0)
    assert (out / "layer_sparsity.png").exists() and (out / "sparsity.md").exists()
    assert main(["pai", "--model", "digits_mlp", "--sparsity", "0.5", "--score-samples", "0", "--out", str(out)]) == 2
    with pytest.raises(SystemExit):  # argparse rejects the sparsity before anything runs
        main(["pai", "--model", "digits_mlp", "--sparsity", "1.5", "--out", str(out)])


def test_cli_pai_prunes_the_initial_weights_of_a_checkpoint(tmp_path):
    """--checkpoint: the given initial weights are scored and pruned (no training: pruned.pt is
    the checkpoint with the masked entries set to 0)."""
    from woodfisher.cli import main
    from woodfisher.models import MODEL_SPECS
    torch.manual_seed(123)
    init = {k: v.clone() for k, v in MODEL_SPECS["digits_mlp"].factory().state_dict().items()}
    torch.save(init, tmp_path / "init.pt")
    out = tmp_path / "pai"
    assert main(["pai", "--model", "digits_mlp", "--checkpoint", str(tmp_path / "init.pt"), "--sparsity", "0.7",
                 "--criterion", "magnitude", "--out", str(out)]) == 0
    masks = torch.load(out / "masks.pt", weights_only=True)
    state = torch.load(out / "pruned.pt", weights_only=True)
    for n, m in masks.items():
        torch.testing.assert_close(state[n], init[n] * m, rtol=0, atol=0)
    w = torch.cat([init[n].abs().flatten() for n in masks])  # global magnitude: the kept set is the top 30%
    kept = torch.cat([masks[n].flatten() for n in masks])
    assert torch.equal(kept, w >= torch.topk(w, int(kept.sum())).values.min())
