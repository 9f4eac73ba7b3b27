"""Bad inputs of the public API: a ValueError naming the argument and quoting the value passed, with
nothing modified; layer collapse reported (warning + ``PruneResult.collapsed``)."""
from __future__ import annotations

import warnings

import pytest
import torch
from _pruner_shared import tiny_data, tiny_mlp
from _snapshots import assert_unchanged, snapshot
from torch import nn

import woodfisher as wf
from woodfisher.masks import COLLAPSE_DENSITY, check_keeps_weights, collapsed
from woodfisher.pai import prune_at_init

OPTS = dict(num_grads=8, progress=False)


def refused(model, loader, match, **options):
    """prune_one_shot refuses with a ValueError matching ``match`` and leaves ``model`` bitwise unchanged."""
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        wf.prune_one_shot(model, loader, **{**OPTS, **options})
    assert_unchanged(before, snapshot(model))


def test_collapsed_rule():
    masks = {"a": torch.zeros(10, dtype=torch.bool), "b": torch.ones(10, dtype=torch.bool),
             "c": torch.tensor([True] + [False] * 1999)}
    assert collapsed(masks) == ["a", "c"]  # c keeps 1/2000 < COLLAPSE_DENSITY
    assert 1 / 2000 < COLLAPSE_DENSITY < 1 / 10
    assert collapsed(masks, 0.0) == ["a"]
    with pytest.raises(ValueError, match="collapse_density"):
        collapsed(masks, 1.0)


def test_keeps_weights_rule():
    check_keeps_weights(0.98, {"a": 30, "b": 20})  # keeps 1 of 50
    with pytest.raises(ValueError, match=r"sparsity=0\.99 would prune every weight.*sparsity < 0\.99"):
        check_keeps_weights(0.99, {"a": 30, "b": 20})
    check_keeps_weights(0.98, {"a": 30, "b": 20}, mode="layerwise")  # a keeps 1, b collapses
    with pytest.raises(ValueError, match="layerwise"):
        check_keeps_weights(0.99, {"a": 30, "b": 20}, mode="layerwise")
    check_keeps_weights(0.99, {"a": 30, "b": 20}, min_density=0.05)  # floors keep 2 + 1


@pytest.mark.parametrize("method", ["woodfisher", "magnitude", "kfac"])
@pytest.mark.parametrize("sparsity", [0.999999, 0.99])
def test_sparsity_pruning_every_weight_is_refused(sparsity, method):
    refused(tiny_mlp(), tiny_data(), rf"sparsity={sparsity}\b.*every weight", sparsity=sparsity, method=method)


def test_collapse_is_warned_and_reported_and_the_model_can_be_pruned_again():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 2)).double()
    with torch.no_grad():
        model[2].weight.mul_(1e-3)  # tiny last layer: global ranking empties it
    data = [(torch.randn(8, 40, dtype=torch.float64), torch.randint(0, 2, (8,))) for _ in range(2)]
    with pytest.warns(UserWarning, match=r"layer collapse: \['2.weight'\].*sparsity=0.9\b"):
        res = wf.prune_one_shot(model, data, sparsity=0.9, method="global_magnitude", progress=False)
    assert res.collapsed == ["2.weight"] and not res.masks["2.weight"].any()
    with warnings.catch_warnings(record=True):  # the collapsed layer stays empty: warned again
        again = wf.prune_one_shot(model, data, sparsity=0.5, method="woodfisher", **OPTS)
    assert again.sparsity >= res.sparsity and again.collapsed == ["2.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 2)).double()
        ok = wf.prune_one_shot(fresh, data, sparsity=0.9, method="global_magnitude", min_density=0.05,
                               progress=False)
    assert ok.collapsed == []


def test_contradictory_min_density():
    refused(tiny_mlp(), tiny_data(), r"min_density=0\.9 cannot be kept at sparsity=0\.5", sparsity=0.5,
            min_density=0.9)


def test_unknown_option_is_named_before_the_missing_sparsity():
    with pytest.raises(ValueError, match="sparsty"):
        wf.prune_one_shot(tiny_mlp(), tiny_data(), sparsty=0.5)


def test_model_inputs():
    with pytest.raises(ValueError, match="model must be a torch.nn.Module, got function"):
        wf.prune_one_shot(lambda x: x, tiny_data(), sparsity=0.5)
    refused(nn.Sequential(), tiny_data(), "no prunable module", sparsity=0.5)
    refused(tiny_mlp().to("meta"), tiny_data(), "model:.*meta device", sparsity=0.5)
    lazy = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.LazyLinear(3)).double()  # never called: no shape yet
    for method in ("woodfisher", "global_magnitude"):
        with pytest.raises(ValueError, match=r"model: \['2\.weight', '2\.bias'\] are uninitialized lazy parameters"):
            wf.prune_one_shot(lazy, tiny_data(), sparsity=0.5, method=method, **OPTS)
        assert isinstance(lazy[2].weight, nn.parameter.UninitializedParameter)  # still lazy: nothing ran
    ints = tiny_mlp()
    ints[0].weight = nn.Parameter(torch.ones(5, 6, dtype=torch.int32), requires_grad=False)
    for method in ("woodfisher", "magnitude"):
        refused(ints, tiny_data(), r"model: weight '0.weight' has dtype torch.int32", sparsity=0.5, method=method)
    zeros = tiny_mlp()
    with torch.no_grad():
        for p in zeros.parameters():
            p.zero_()
    refused(zeros, tiny_data(), "already zero", sparsity=0.5)


@pytest.mark.parametrize("method", ["woodfisher", "magnitude", "kfac"])
def test_nan_weight_is_named(method):
    model = tiny_mlp()
    with torch.no_grad():
        model[2].weight[1, 2] = float("nan")
    refused(model, tiny_data(), r"model: weight '2.weight' holds 1 NaN or Inf", sparsity=0.5, method=method)


@pytest.mark.parametrize("options", [dict(), dict(method="kfac"), dict(beta=1.0), dict(sampled_fisher=True)],
                         ids=["woodfisher", "kfac", "beta", "sampled"])
def test_loader_with_wrong_shapes_midway_is_named(options):
    data = tiny_data(n=32, batch=8)
    data[2] = (torch.randn(8, 7, dtype=torch.float64), data[2][1])  # third batch: 7 features instead of 6
    first = [data[2]] + data[:2] if options.get("beta") else data  # beta reads the first batch
    refused(tiny_mlp(), first,
            r"loader: the model or the loss failed on (item 2 of the loader,|a batch with) args \(8, 7\) float64",
            sparsity=0.5, **{**options, "num_grads": 32})


def test_loader_with_out_of_range_targets_is_named():
    data = tiny_data()
    data[1] = (data[1][0], data[1][1] + 10)
    refused(tiny_mlp(), data, "loader: .*IndexError", sparsity=0.5, num_grads=32)


def test_loader_kinds():
    refused(tiny_mlp(), 5, "loader must be an iterable of batches .* got int", sparsity=0.5)
    refused(tiny_mlp(), "batches.pt", "loader must be an iterable of batches .* got str", sparsity=0.5)
    meta = [(x.to("meta"), y.to("meta")) for x, y in tiny_data()]
    refused(tiny_mlp(), meta, "loader yields tensors on the meta device", sparsity=0.5)


def test_num_grads_larger_than_the_data():
    for method in ("woodfisher", "diag_fisher"):
        refused(tiny_mlp(), tiny_data(n=32), r"num_grads=100 with fisher_batch_size=1 needs 100 samples.*32 "
                r"gradients", sparsity=0.5, num_grads=100, method=method)
    refused(tiny_mlp(), tiny_data(n=32), r"num_grads=9 with fisher_batch_size=4 needs 36", sparsity=0.5,
            num_grads=9, fisher_batch_size=4, inverse_form="stream")


def test_float32_data_for_a_float64_model_is_cast():
    model = tiny_mlp()
    data = [(x.float(), y) for x, y in tiny_data()]
    res = wf.prune_one_shot(model, data, sparsity=0.5, **OPTS)
    ref_model = tiny_mlp()
    ref = wf.prune_one_shot(ref_model, [(x.double(), y) for x, y in data], sparsity=0.5, **OPTS)
    assert all(torch.equal(res.masks[n], ref.masks[n]) for n in res.masks)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters()))


def test_block_size_larger_than_a_weight_is_a_whole_weight_block():
    """Not an error (the paper's c = 1000 on a 432-entry first conv): such a weight is one block."""
    a, b = tiny_mlp(), tiny_mlp()
    ra = wf.prune_one_shot(a, tiny_data(), sparsity=0.5, block_size=10 ** 6, **OPTS)
    rb = wf.prune_one_shot(b, tiny_data(), sparsity=0.5, block_size=None, **OPTS)
    assert all(torch.equal(ra.masks[n], rb.masks[n]) for n in ra.masks)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_gradual_pruner_inputs():
    model = tiny_mlp()
    with pytest.raises(ValueError, match=r"final_sparsity=0\.999999 would prune every weight"):
        wf.GradualPruner(model, tiny_data(), final_sparsity=0.999999, end_step=2, **OPTS)
    pruner = wf.GradualPruner(model, tiny_data(), final_sparsity=0.5, end_step=2, **OPTS)
    before = snapshot(model)
    for bad in ("1", 1.0, True, None):
        with pytest.raises(ValueError, match="step must be an int"):
            pruner.step(bad)
    for state, match in [({"masks": {}}, "not a GradualPruner state_dict"),
                         ({**pruner.state_dict(), "schedule": {"final_sparsity": "0.5"}}, "numbers"),
                         ({**pruner.state_dict(), "last_step": -1}, "last_step"),
                         ({**pruner.state_dict(), "last_step": 1}, "empty exactly when")]:
        with pytest.raises(ValueError, match=match):
            pruner.load_state_dict(state)
    assert_unchanged(before, snapshot(model))


def test_prune_with_refuses_bad_sparsity_without_change():
    model = tiny_mlp()
    curvature = wf.estimate_curvature(model, tiny_data(), **OPTS)
    before = snapshot(model)
    for sparsity, match in [(0.999999, "every weight"), (1.0, r"sparsity must lie in \[0, 1\), got 1\.0")]:
        with pytest.raises(ValueError, match=match):
            wf.prune_with(model, curvature, sparsity)
    assert_unchanged(before, snapshot(model))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_loader_for_a_cuda_model():
    """Batches are moved to the model's device (the usual DataLoader on the CPU, the model on a GPU)."""
    model, ref = tiny_mlp().cuda(), tiny_mlp()
    res = wf.prune_one_shot(model, tiny_data(), sparsity=0.5, method="kfac", **OPTS)
    res_ref = wf.prune_one_shot(ref, tiny_data(), sparsity=0.5, method="kfac", **OPTS)
    assert all(torch.equal(res.masks[n].cpu(), res_ref.masks[n]) for n in res.masks)
    res = wf.prune_one_shot(tiny_mlp().cuda(), tiny_data(), sparsity=0.5, beta=1.0, **OPTS)
    assert res.sparsity == pytest.approx(0.5, abs=0.02)


def test_search_damp_and_prune_with_inputs():
    model = tiny_mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match="heldout must be an iterable of held-out batches, got NoneType"):
        wf.search_damp(model, tiny_data(), None, sparsity=0.5, **OPTS)
    bad = [(torch.randn(8, 7, dtype=torch.float64), torch.zeros(8, dtype=torch.long))]
    with pytest.raises(ValueError, match=r"heldout: the model or the loss failed .* \(8, 7\)"):
        wf.search_damp(model, tiny_data(), bad, sparsity=0.5, grid=[1e-3], **OPTS)
    with pytest.raises(ValueError, match="curvature must be a woodfisher.Curvature"):
        wf.prune_with(model, {}, 0.5)
    assert_unchanged(before, snapshot(model))


def test_adapter_and_loss_failures_are_named():
    refused(tiny_mlp(), tiny_data(), "batch_adapter failed on a loader item", sparsity=0.5,
            batch_adapter=lambda item: item[5])
    per_sample = lambda out, y: nn.functional.cross_entropy(out, y, reduction="none")  # noqa: E731
    for options in (dict(method="kfac"), dict(fisher_batch_size=2)):
        refused(tiny_mlp(), tiny_data(), r"^loss_fn must return the mean loss as a scalar tensor, got \(", sparsity=0.5,
                loss_fn=per_sample, **options)


@pytest.mark.parametrize("method", ["woodfisher", "kfac"])
def test_empty_batches_are_skipped(method):
    data = tiny_data()
    with_empty = [(data[0][0][:0], data[0][1][:0])] + data
    a, b = tiny_mlp(), tiny_mlp()
    ra = wf.prune_one_shot(a, with_empty, sparsity=0.5, method=method, **OPTS)
    rb = wf.prune_one_shot(b, data, sparsity=0.5, method=method, **OPTS)
    assert all(torch.equal(ra.masks[n], rb.masks[n]) for n in ra.masks)


def test_numpy_scalars_are_numbers_and_bools_are_not():
    np = pytest.importorskip("numpy")
    a, b = tiny_mlp(), tiny_mlp()
    ra = wf.prune_one_shot(a, tiny_data(), sparsity=np.float32(0.5), min_density=np.float64(0.1), **OPTS)
    rb = wf.prune_one_shot(b, tiny_data(), sparsity=0.5, min_density=0.1, **OPTS)
    assert all(torch.equal(ra.masks[n], rb.masks[n]) for n in ra.masks)
    refused(tiny_mlp(), tiny_data(), "sparsity must be a number in \\[0, 1\\), got True", sparsity=True)


def test_prune_with_refuses_options_the_curvature_fixed():
    """prune_with cannot change what the curvature was estimated with: a different method, damp,
    block size, WoodTaylor or set of modules is a ValueError naming the option, not a silent no-op
    (or a TypeError deep inside); the curvature's own values and selection options still work."""
    model = tiny_mlp()
    curvature = wf.estimate_curvature(model, tiny_data(), block_size=8, **OPTS)
    before = snapshot(model)
    for option, match in [(dict(method="kfac"), "method='kfac' cannot be changed by prune_with"),
                          (dict(method="diag_fisher"), "method='diag_fisher'"),
                          (dict(damp=0.1), r"damp=0\.1 .*with_damp"),
                          (dict(block_size=4), "block_size=4 .*estimated with block_size=8"),
                          (dict(num_grads=4), "num_grads=4"),
                          (dict(woodtaylor=True), "woodtaylor=True"),
                          (dict(modules=["0"]), "modules="),
                          (dict(num_steps=4), "num_steps=4 .*prune_one_shot")]:
        with pytest.raises(ValueError, match=match):
            wf.prune_with(model, curvature, 0.5, **option)
    assert_unchanged(before, snapshot(model))
    reference = wf.prune_with(tiny_mlp(), curvature, 0.5).masks
    same = dict(method="woodfisher", damp=curvature.damp, block_size=8, num_steps=1, modules=None, progress=False)
    masks = wf.prune_with(tiny_mlp(), curvature, 0.5, **same).masks
    assert masks.keys() == reference.keys() and all(torch.equal(masks[n], reference[n]) for n in masks)
    layerwise = wf.prune_with(tiny_mlp(), curvature, 0.5, mode="layerwise")
    assert all(abs(row["sparsity"] - 0.5) <= 1 / row["numel"] for row in layerwise.layers)


def test_no_prunable_module_names_the_parameters_that_could_be_named():
    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
            self.scale = nn.Parameter(torch.ones(4, dtype=torch.float64))

        def forward(self, x):
            return (x @ self.w) * self.scale

    refused(Raw(), tiny_data(), r"modules: the model has no prunable module .* modules=\['w'\]", sparsity=0.5)
    res = wf.prune_one_shot(Raw(), tiny_data(), sparsity=0.5, modules=["w"], **OPTS)  # the hint works
    assert set(res.masks) == {"w"}


def test_sparsity_below_the_zeros_already_there_warns_and_prunes_nothing_more():
    model = tiny_mlp()
    wf.prune_one_shot(model, tiny_data(), sparsity=0.7, method="magnitude", **OPTS)
    before = snapshot(model)
    with pytest.warns(UserWarning, match=r"sparsity=0.5 is below the 0.7 of zeros .* never revives"):
        res = wf.prune_one_shot(model, tiny_data(), sparsity=0.5, method="magnitude", **OPTS)
    assert res.sparsity == pytest.approx(0.7, abs=1e-3)
    assert_unchanged(before, snapshot(model))


def test_prune_with_below_the_zeros_already_there_warns_at_the_callers_line_as_prune_one_shot_does():
    """One rule for both entry points: the two-phase API warns like prune_one_shot, pointing at the call."""
    model = tiny_mlp()
    wf.prune_one_shot(model, tiny_data(), sparsity=0.7, method="magnitude", **OPTS)
    curvature = wf.estimate_curvature(model, tiny_data(), num_grads=8, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match=r"sparsity=0.5 is below the 0.7 of zeros .* never revives") as record:
        res = wf.prune_with(model, curvature, 0.5)
    assert res.sparsity == pytest.approx(0.7, abs=1e-3)
    assert {w.filename for w in record if "never revives" in str(w.message)} == {__file__}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # values (an OBS step may sign 0)
    with pytest.warns(UserWarning, match="never revives") as record:
        wf.prune_one_shot(model, tiny_data(), sparsity=0.5, method="magnitude", **OPTS)
    assert {w.filename for w in record if "never revives" in str(w.message)} == {__file__}


@pytest.mark.parametrize("call,match", [
    (lambda m: wf.recalibrate_bn(m, None), "^loader must be an iterable of batches .*got NoneType"),
    (lambda m: wf.recalibrate_bn(m, 5), "^loader must be an iterable of batches .*got int"),  # no BN: still checked
    (lambda m: wf.make_permanent(None), "^model must be a torch.nn.Module, got NoneType"),
    (lambda m: wf.clone_model("net"), "^model must be a torch.nn.Module, got str"),
    (lambda m: wf.FisherHook(m, num_grads=4, damp=0.1).attach(None), "^optimizer must be a torch.optim.Optimizer"),
    (lambda m: prune_at_init(m, 5, sparsity=0.5, criterion="snip"), "^loader must be an iterable"),
])
def test_the_helpers_name_their_bad_argument_and_change_nothing(call, match):
    """They raised TypeError / AttributeError from inside (``'NoneType' object is not iterable``)."""
    model = tiny_mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        call(model)
    assert_unchanged(before, snapshot(model))
