"""Gradual pruning: the polynomial schedule, masks kept during training, resume, permanence."""
from __future__ import annotations

import io
import warnings

import pytest
import torch
from _pruner_shared import tiny_data, tiny_mlp
from torch import nn

import woodfisher as wf

SCHEDULE = dict(final_sparsity=0.8, start_step=2, end_step=8, frequency=2, initial_sparsity=0.05)


def test_polynomial_schedule_values():
    s = lambda t: wf.polynomial_sparsity(t, **SCHEDULE)  # noqa: E731
    assert s(0) == 0.0 and s(1) == 0.0
    assert s(2) == pytest.approx(0.05) and s(8) == pytest.approx(0.8) and s(20) == pytest.approx(0.8)
    for t in (4, 6):  # Zhu & Gupta: s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3
        assert s(t) == pytest.approx(0.8 + (0.05 - 0.8) * (1 - (t - 2) / 6) ** 3)
    assert s(5) == s(4)  # between pruning steps the last scheduled value holds
    values = [s(t) for t in range(0, 10)]
    assert values == sorted(values)


def _train(model, data, steps, start, pruner):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(start, start + steps):
        pruner.step(step)
        x, y = data[step % len(data)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _pruner(model, data):
    return wf.GradualPruner(model, data, **SCHEDULE, method="woodfisher", num_grads=8, damp=1e-2,
                            progress=False)


def test_gradual_pruner_keeps_masks_during_training_and_reaches_final_sparsity():
    model, data = tiny_mlp(seed=0), tiny_data(seed=0)
    pruner = _pruner(model, data)
    _train(model, data, 10, 0, pruner)
    assert [h["step"] for h in pruner.history] == [2, 4, 6, 8]
    assert [h["target"] for h in pruner.history] == pytest.approx([wf.polynomial_sparsity(t, **SCHEDULE)
                                                                   for t in (2, 4, 6, 8)])
    for layer in (model[0], model[2]):
        assert hasattr(layer, "weight_orig") and hasattr(layer, "weight_mask")
        assert torch.all(layer.weight[layer.weight_mask == 0] == 0)  # training did not revive them
    masks = pruner.masks()
    assert wf.sparsity_of(masks) == pytest.approx(0.8, abs=0.01)
    wf.make_permanent(model)
    names = {n for n, _ in model.named_parameters()}
    assert "0.weight" in names and "0.weight_orig" not in names
    assert int((model[0].weight == 0).sum()) >= int((~masks["0.weight"]).sum())


def test_resume_from_checkpoint_gives_the_same_model():
    data = tiny_data(seed=1)
    straight = tiny_mlp(seed=1)
    _train(straight, data, 10, 0, _pruner(straight, data))

    first = tiny_mlp(seed=1)
    p1 = _pruner(first, data)
    _train(first, data, 5, 0, p1)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "pruner": p1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = tiny_mlp(seed=99)  # different init: everything must come from the checkpoint
    p2 = _pruner(resumed, data)
    p2.load_state_dict(ckpt["pruner"])
    resumed.load_state_dict(ckpt["model"])
    assert p2.last_step == 4
    _train(resumed, data, 5, 5, p2)
    for (n, a), (m, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert n == m
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_gradual_pruner_refuses_bad_schedule():
    model = tiny_mlp()
    with pytest.raises(ValueError, match="frequency"):
        wf.GradualPruner(model, final_sparsity=0.5, start_step=0, end_step=5, frequency=2)
    with pytest.raises(ValueError, match="sparsity"):
        wf.GradualPruner(model, final_sparsity=1.0, start_step=0, end_step=4, frequency=2)
    with pytest.raises(ValueError, match="schedule"):
        other = wf.GradualPruner(model, final_sparsity=0.5, start_step=0, end_step=4, frequency=2)
        state = other.state_dict()
        state["schedule"]["final_sparsity"] = 0.6
        other.load_state_dict(state)


def _collapsing_pruner():
    """One pruning step at 95% with a damp that makes the mask magnitude's: the output layer collapses (warned)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 5))
    loader = [(torch.randn(8, 40), torch.randint(0, 5, (8,))) for _ in range(4)]
    return wf.GradualPruner(model, loader, final_sparsity=0.95, start_step=0, end_step=0, num_grads=16,
                            damp=1e6, num_steps=1, progress=False)


def test_step_warnings_point_at_the_training_loop():
    """A collapsing layer at a pruning step is reported at the caller's line (the loop calling step), once."""
    pruner = _collapsing_pruner()
    with pytest.warns(UserWarning, match="layer collapse") as record:
        pruner.step(0)
    assert {w.filename for w in record} == {__file__}
    assert len([w for w in record if "layer collapse" in str(w.message)]) == 1


def test_step_recorded_before_its_warnings_so_warnings_as_errors_leave_a_consistent_pruner():
    pruner = _collapsing_pruner()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning):
            pruner.step(0)
    assert pruner.last_step == 0 and len(pruner.history) == 1
    assert wf.sparsity_of(pruner.masks()) == pytest.approx(pruner.history[0]["sparsity"])
    assert pruner.step(0) is None  # done: not pruned twice


def test_a_schedule_starting_at_zero_sparsity_does_not_warn_that_it_prunes_nothing():
    """initial_sparsity=0: the first scheduled step prunes nothing by design (no gradient pass, no warning)."""
    model, data = tiny_mlp(), tiny_data()
    pruner = wf.GradualPruner(model, data, **dict(SCHEDULE, initial_sparsity=0.0), method="woodfisher",
                              num_grads=8, damp=1e-2, progress=False)
    weights = lambda: [m.weight.detach().clone() for m in model.modules() if isinstance(m, nn.Linear)]  # noqa: E731
    before = weights()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = pruner.step(2)
    assert result.sparsity == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, weights()))
    assert pruner.step(4).sparsity > 0
