"""Every public entry of the pruner is failure-atomic: a call that fails at a late stage changes nothing.

Failures are injected after part of the work is done (a loader that breaks on its second pass, a
write that fails on the second weight, an interrupt, a mask attachment that fails on the second
module, a state that fits the first layer only, a held-out loader that breaks on the third damp),
and the model is compared bitwise, NaN payloads included, with a snapshot taken before the call:
parameters (identity and order too), buffers and masks, gradients, derived tensors, hooks, flags.
"""
from __future__ import annotations

import pytest
import torch
from _snapshots import assert_unchanged, snapshot
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

import woodfisher as wf
from woodfisher.targets import PruneTarget

OPTS = dict(num_grads=16, progress=False, damp=1e-3)


class Net(nn.Module):
    """Conv + BN + Linear, with an unused parameter and buffer holding NaN payloads."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc1 = nn.Linear(3 * 4 * 4, 10)
        self.fc2 = nn.Linear(10, 4)
        self.unused = nn.Parameter(torch.tensor([float("nan"), -0.0, 1.0]))
        self.register_buffer("junk", torch.tensor([float("nan"), float("inf")]))
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.1, 0.1)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def data(n=32, batch=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 2, 4, 4, generator=g), torch.randint(0, 4, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def model_in_training():
    """The Net in train mode with one frozen (eval) BN and a stale .grad on one weight."""
    model = Net().train()
    model.bn.eval()
    model.fc2.weight.grad = torch.full_like(model.fc2.weight, 0.5)
    return model


class FailsOnPass:
    """A loader whose pass number ``n`` raises at its start (a step reads only its share of the gradients)."""

    def __init__(self, n, error=RuntimeError("disk gone")):
        self.n, self.error, self.passes = n, error, 0

    def __iter__(self):
        self.passes += 1
        for i, batch in enumerate(data()):
            if self.passes == self.n and i == 0:
                raise self.error
            yield batch


@pytest.fixture
def fail_second_write(monkeypatch):
    """PruneTarget.write raises on its second call (after the first weight is written)."""
    calls = []
    original = PruneTarget.write

    def write(self, weight, keep):
        calls.append(self.name)
        if len(calls) == 2:
            raise RuntimeError("write failed")
        return original(self, weight, keep)

    monkeypatch.setattr(PruneTarget, "write", write)
    return calls


METHODS = [dict(method="woodfisher", block_size=16), dict(method="kfac"), dict(method="diag_fisher"),
           dict(method="magnitude"), dict(method="woodfisher", pattern="rows"),
           dict(method="woodfisher", block_size=16, inverse_form="stream", damp="auto")]


@pytest.mark.parametrize("options", METHODS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_prune_one_shot_failing_write_changes_nothing(options, fail_second_write):
    model = model_in_training()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="write failed"):
        wf.prune_one_shot(model, data(), sparsity=0.5, **{**OPTS, **options})
    assert len(fail_second_write) == 2
    assert_unchanged(before, snapshot(model))


@pytest.mark.parametrize("error", [RuntimeError("disk gone"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_prune_one_shot_loader_failing_in_second_step(error):
    model = model_in_training()
    before = snapshot(model)
    with pytest.raises(type(error)):
        wf.prune_one_shot(model, FailsOnPass(2, error), sparsity=0.6, num_steps=3, **OPTS)
    assert_unchanged(before, snapshot(model))


def _masked_model(kind):
    """Net with fc1 held by torch.nn.utils.prune or by a parametrize mask (half its entries pruned)."""
    model = model_in_training()
    keep = torch.rand(model.fc1.weight.shape, generator=torch.Generator().manual_seed(3)) > 0.5
    if kind == "prune":
        torch_prune.custom_from_mask(model.fc1, "weight", keep)
    else:
        class Mask(nn.Module):
            def __init__(self, mask):
                super().__init__()
                self.register_buffer("mask", mask.float())

            def forward(self, w):
                return w * self.mask
        parametrize.register_parametrization(model.fc1, "weight", Mask(keep))
    return model


@pytest.mark.parametrize("kind", ["prune", "parametrize"])
def test_masks_of_reparametrised_weights_are_restored(kind, fail_second_write):
    model = _masked_model(kind)
    model(data()[0][0])  # the prune hook's derived weight now exists
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="write failed"):
        wf.prune_one_shot(model, data(), sparsity=0.7, **OPTS)
    assert_unchanged(before, snapshot(model))


def test_prune_with_failing_write_changes_nothing(fail_second_write):
    model = model_in_training()
    curvature = wf.estimate_curvature(model, data(), **OPTS)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="write failed"):
        wf.prune_with(model, curvature, 0.5)
    assert_unchanged(before, snapshot(model))


def test_estimate_curvature_changes_nothing():
    model = model_in_training()
    before = snapshot(model)
    for method in ("woodfisher", "kfac", "diag_fisher"):
        wf.estimate_curvature(model, data(), method=method, **OPTS)
    assert_unchanged(before, snapshot(model))


def _pruner(model, **kw):
    return wf.GradualPruner(model, data(), final_sparsity=0.8, start_step=0, end_step=2, frequency=1,
                            **{**OPTS, **kw})


@pytest.mark.parametrize("at_step", [0, 1], ids=["first-step", "masks-already-held"])
def test_gradual_step_failing_in_the_method(at_step, monkeypatch):
    model = model_in_training()
    pruner = _pruner(model)
    for step in range(at_step):
        pruner.step(step)
    before, progress = snapshot(model), (pruner.last_step, list(pruner.history))
    method = wf.METHODS["woodfisher"]
    monkeypatch.setattr(type(method), "step", lambda self, ctx: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        pruner.step(at_step)
    assert_unchanged(before, snapshot(model))
    assert (pruner.last_step, pruner.history) == progress


def test_gradual_step_failing_to_attach_the_second_mask(monkeypatch):
    """prune_one_shot succeeded, then holding the masks fails on the second module: all undone."""
    model = model_in_training()
    pruner = _pruner(model)
    before = snapshot(model)
    original, calls = torch_prune.custom_from_mask, []

    def attach(module, name, mask):
        calls.append(module)
        if len(calls) == 2:
            raise RuntimeError("attach failed")
        return original(module, name, mask)

    monkeypatch.setattr(torch_prune, "custom_from_mask", attach)
    with pytest.raises(RuntimeError, match="attach failed"):
        pruner.step(0)
    assert len(calls) == 2
    assert_unchanged(before, snapshot(model))
    assert pruner.last_step is None and pruner.history == []


def test_load_state_dict_fitting_only_the_first_layer_changes_nothing():
    source = model_in_training()
    p1 = _pruner(source)
    p1.step(0)
    state = p1.state_dict()
    state["masks"]["fc2.weight"] = torch.ones(4, 9, dtype=torch.bool)  # a later layer of another shape
    target = model_in_training()
    p2 = _pruner(target)
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"masks\['fc2.weight'\] must be a tensor of the weight's shape "
                                         r"\(4, 10\), got \(4, 9\)"):
        p2.load_state_dict(state)
    state["masks"]["fc2.weight"] = torch.full((4, 10), 2.0)  # right shape, not a mask
    with pytest.raises(ValueError, match="bool keep-mask"):
        p2.load_state_dict(state)
    del state["masks"]["fc2.weight"]
    with pytest.raises(ValueError, match="this pruner prunes"):
        p2.load_state_dict(state)
    assert_unchanged(before, snapshot(target))
    assert p2.last_step is None


def test_attach_masks_and_make_permanent_refuse_before_touching():
    model = model_in_training()
    before = snapshot(model)
    good = torch.ones(10, 48, dtype=torch.bool)
    for masks, match in [({"fc1.weight": good, "fc2.weight": torch.ones(3, 3, dtype=torch.bool)}, "shape"),
                         ({"fc1.weight": good, "fc9.weight": good}, "fc9"),
                         ({"fc1.weight": good, "fc1": good}, "same weight"),
                         ({}, "non-empty")]:
        with pytest.raises(ValueError, match=match):
            wf.attach_masks(model, masks)
        assert_unchanged(before, snapshot(model))
    wf.attach_masks(model, {"conv.weight": torch.ones(3, 2, 3, 3, dtype=torch.bool), "fc1.weight": good})
    model.fc1.weight_mask = torch.ones(5, 5)  # a broken pair in the second module
    before = snapshot(model)
    with pytest.raises(ValueError, match="fc1.weight_mask has shape"):
        wf.make_permanent(model)
    assert_unchanged(before, snapshot(model))


def test_search_damp_leaves_the_model_unchanged_when_heldout_fails():
    model = model_in_training()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="disk gone"):
        wf.search_damp(model, data(), FailsOnPass(3), sparsity=0.5, grid=[1e-4, 1e-3, 1e-2], **{
            k: v for k, v in OPTS.items() if k != "damp"})
    assert_unchanged(before, snapshot(model))
