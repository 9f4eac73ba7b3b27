"""A refused call prints no notice: the checks of prune_one_shot, estimate_curvature, GradualPruner and FisherHook
run before their warnings ('left dense' of an N:M pattern, a planned number of steps) are shown, so a user never
sees a notice for a call that then raises; the refused call changes nothing. A call that goes ahead still warns
once, at the caller's line."""
import copy
import warnings

import pytest
import torch
from torch import nn

import woodfisher as wf


def _model(frozen=False, nan=False):
    torch.manual_seed(0)   # a 3-channel stem conv: 2:4 leaves it dense, with a notice
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(128, 4))
    if frozen:
        model[2].weight.requires_grad_(False)
    if nan:
        with torch.no_grad():
            model[4].weight[0, 0] = float("nan")
    return model


def _loader():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(4)]


REFUSED = {
    "prune_one_shot without loader": (lambda m: wf.prune_one_shot(m, None, pattern="2:4", progress=False),
                                      "loader is required"),
    "estimate_curvature without loader": (lambda m: wf.estimate_curvature(m, None, pattern="2:4", progress=False),
                                          "loader is required"),
    "prune_one_shot over budget after a planned-steps notice": (
        lambda m: wf.prune_one_shot(m, _loader(), sparsity=0.99, num_grads=2048, memory_budget=1000, progress=False),
        "memory_budget"),
    "estimate_curvature over budget": (
        lambda m: wf.estimate_curvature(m, _loader(), pattern="2:4", memory_budget=1000, progress=False),
        "memory_budget"),
}
NAN = {  # a weight holding NaN: refused (check_prunable) after the pattern's notice was shown
    "GradualPruner": lambda m: wf.GradualPruner(m, _loader(), pattern="2:4", num_grads=8),
    "prune_one_shot": lambda m: wf.prune_one_shot(m, _loader(), pattern="2:4", num_grads=8, progress=False),
    "estimate_curvature": lambda m: wf.estimate_curvature(m, _loader(), pattern="2:4", num_grads=8, progress=False),
}


@pytest.mark.parametrize("name", list(REFUSED) + [f"{n} on a NaN weight" for n in NAN])
def test_a_refused_call_warns_nothing_and_changes_nothing(name):
    nan = name.endswith(" on a NaN weight")
    call, match = (NAN[name[:-len(" on a NaN weight")]], "NaN") if nan else REFUSED[name]
    model = _model(nan=nan)
    before = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=match):
            call(model)
    assert [str(w.message) for w in caught] == []
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) if not nan else
                                                 torch.equal(before[k].nan_to_num(), after[k].nan_to_num())
                                                 for k in before)


def test_fisher_hook_on_frozen_weights_warns_nothing():
    model = _model(frozen=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="requires_grad=False"):
            wf.FisherHook(model, num_grads=8, damp=1e-3, pattern="2:4")
    assert [str(w.message) for w in caught] == []
    assert model._forward_hooks == {} and model._backward_hooks == {}


def test_a_call_that_goes_ahead_still_warns_once_at_the_callers_line():
    model, loader = _model(), _loader()
    with pytest.warns(UserWarning, match=r"left dense: '0\.weight'") as caught:
        wf.prune_one_shot(model, loader, pattern="2:4", num_grads=8, progress=False)
    dense = [w for w in caught if "left dense" in str(w.message)]
    assert len(dense) == 1 and dense[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the caller's filters apply to the notices held through the checks
        with pytest.raises(UserWarning, match="left dense"):
            wf.estimate_curvature(_model(), loader, pattern="2:4", num_grads=8, progress=False)


def test_estimate_memory_of_a_refused_call_warns_nothing_and_of_a_call_that_runs_warns_as_it():
    model = _model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = wf.estimate_memory(model, pattern="2:4", memory_budget=10)
    assert report["plan"] is None and report["refused"].startswith("memory_budget=10 bytes") and not caught
    with pytest.warns(UserWarning, match=r"left dense: '0\.weight'"):
        assert wf.estimate_memory(model, pattern="2:4")["refused"] is None


@pytest.mark.parametrize("call", [
    lambda m, data: wf.prune_one_shot(m, data, sparsity=0.5, num_grads=8, progress=False),
    lambda m, data: wf.estimate_curvature(m, data, num_grads=8, progress=False),
], ids=["prune_one_shot", "estimate_curvature"])
def test_data_the_model_refuses_drops_the_notices_of_the_call(call):
    """The frozen-weights notice (default targets mixing frozen and trainable weights) was printed, then the model
    refused the first batch: a ValueError naming the loader, and now no notice."""
    model = _model(frozen=True)
    before = copy.deepcopy(model.state_dict())
    bad = [(torch.randn(4, 5, 8, 8), torch.randint(0, 4, (4,)))] * 2   # 5 channels for a 3-channel stem
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="^loader: the model or the loss failed on item 0"):
            call(model, bad)
    assert [str(w.message) for w in caught] == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.warns(UserWarning, match="frozen") as shown:   # the same call on good data: the notice, once
        call(model, _loader()[:1] * 2)
    assert [w.filename for w in shown if "frozen" in str(w.message)] == [__file__]
