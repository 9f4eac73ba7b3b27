"""An N:M pattern fixes the sparsity at 1 - N/M: an explicit sparsity that contradicts it (0 included) is a
ValueError naming the argument at every entry point, an equal value is accepted, an omitted one is the pattern's
(prune_with takes it from the curvature's pattern), and a refused call changes nothing."""
import copy
import re
import warnings

import pytest
import torch
from torch import nn

import woodfisher as wf
from woodfisher.cli import main

NUM_GRADS = 16


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).double()


def _loader():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (8,), generator=g))
            for _ in range(4)]


def _refused(call, name, fixed="0.5"):
    """``call`` raises a ValueError naming ``name``, saying the fixed sparsity and that it may be left out."""
    with pytest.raises(ValueError) as info:
        call()
    text = str(info.value)
    assert text.startswith(f"{name}=") and f"fixes the sparsity at {fixed}" in text and "leave it out" in text, text


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.8])
def test_prune_one_shot_and_config_refuse_a_sparsity_the_pattern_contradicts(sparsity):
    model, loader = _model(), _loader()
    before = copy.deepcopy(model.state_dict())
    _refused(lambda: wf.PruneConfig(sparsity=sparsity, pattern="2:4"), "sparsity")
    _refused(lambda: wf.PruneConfig(sparsity=0.5).replace(sparsity=sparsity, pattern="2:4"), "sparsity")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _refused(lambda: wf.prune_one_shot(model, loader, sparsity=sparsity, pattern="2:4", progress=False),
                 "sparsity")
        _refused(lambda: wf.estimate_curvature(model, loader, sparsity=sparsity, pattern="2:4", progress=False),
                 "sparsity")
        _refused(lambda: wf.search_damp(model, loader, loader, sparsity=sparsity, pattern="2:4", grid=[1e-3],
                                        num_grads=NUM_GRADS, progress=False), "sparsity")
        _refused(lambda: wf.GradualPruner(model, loader, final_sparsity=sparsity, pattern="2:4"), "final_sparsity")
    assert not caught
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_equal_or_omitted_sparsity_is_the_patterns_and_gives_the_same_masks():
    loader = _loader()
    assert wf.PruneConfig(pattern="2:4").sparsity == 0.5 == wf.PruneConfig(sparsity=0.5, pattern="2:4").sparsity
    assert wf.PruneConfig(sparsity=0.666667, pattern="1:3").sparsity == 1 - 1 / 3   # 6 digits: accepted
    results = [wf.prune_one_shot(_model(), loader, num_grads=NUM_GRADS, progress=False, pattern="2:4", **extra)
               for extra in ({}, {"sparsity": 0.5})]
    assert results[0].sparsity == 0.5 == results[1].sparsity
    for name, keep in results[0].masks.items():
        assert torch.equal(keep, results[1].masks[name])
        assert torch.all(keep.reshape(-1, 4).sum(1) == 2)   # 2 of every 4: the pattern's 0.5, not "0 pruned"
    pruner = wf.GradualPruner(_model(), loader, pattern="2:4", num_grads=NUM_GRADS, progress=False)
    assert pruner.final_sparsity == 0.5
    with pytest.raises(ValueError, match="final_sparsity is required"):
        wf.GradualPruner(_model(), loader)
    with pytest.raises(ValueError, match="sparsity is required"):   # an explicit None without a pattern: not 0
        wf.prune_one_shot(_model(), loader, sparsity=None, progress=False)
    hook = wf.FisherHook(_model(), num_grads=4, damp=1e-3, pattern="2:4")
    assert hook.config.sparsity == 0.5


def test_prune_with_takes_the_sparsity_from_the_curvatures_pattern():
    model, loader = _model(), _loader()
    curvature = wf.estimate_curvature(model, loader, pattern="2:4", num_grads=NUM_GRADS, progress=False)
    assert curvature.config.sparsity == 0.5
    omitted, given = wf.clone_model(model), wf.clone_model(model)
    res = wf.prune_with(omitted, curvature)
    ref = wf.prune_with(given, curvature, 0.5)
    assert res.sparsity == 0.5 == ref.sparsity
    for a, b in zip(omitted.parameters(), given.parameters()):
        assert torch.equal(a, b)
    trial = wf.clone_model(model)
    before = copy.deepcopy(trial.state_dict())
    with pytest.raises(ValueError, match=r"^sparsity=0: the curvature was estimated with pattern='2:4'.*omit sparsity"):
        wf.prune_with(trial, curvature, 0.0)   # was: silently pruned 50%
    assert all(torch.equal(before[k], v) for k, v in trial.state_dict().items())
    with pytest.raises(ValueError, match="sparsity is required"):
        wf.prune_with(wf.clone_model(model), curvature, pattern=None)   # unstructured: no sparsity to take
    plain = wf.estimate_curvature(model, loader, num_grads=NUM_GRADS, progress=False)
    assert wf.prune_with(wf.clone_model(model), plain, pattern="2:4").sparsity == 0.5   # this call's pattern


def test_cli_refuses_a_sparsity_the_pattern_contradicts_in_the_users_spelling(tmp_path, capsys):
    factory = tmp_path / "factory.py"
    factory.write_text("import torch\nfrom torch import nn\n"
                       "def build():\n    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))\n"
                       "def data():\n    g = torch.Generator().manual_seed(0)\n"
                       "    return [(torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g))"
                       " for _ in range(4)]\n")
    base = ["prune", "--model", f"{factory}:build", "--data", f"{factory}:data", "--out", str(tmp_path / "out"),
            "--no-progress", "--pattern", "2:4"]
    assert main(base + ["--sparsity", "0"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: --sparsity 0 contradicts --pattern 2:4, which fixes the sparsity at 0\.5", err), err
    assert "pass --sparsity 0.5 or leave it out" in err and not (tmp_path / "out").exists()
