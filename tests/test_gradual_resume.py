"""Resuming gradual pruning with an optimizer's state, and masks held without reordering parameters.

``torch.nn.utils.prune`` alone re-registers a weight as ``weight_orig`` at the end of its module's
parameters; an optimizer built after that (when resuming) lists the tensors in another order than
the saved one, and its state lands on the wrong tensors. Both natural resume orders must give the
uninterrupted run bit for bit:

A. model -> optimizer -> pruner.load_state_dict -> model.load_state_dict -> optimizer.load_state_dict
B. model -> pruner.load_state_dict -> model.load_state_dict -> optimizer -> optimizer.load_state_dict
"""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import woodfisher as wf

SCHEDULE = dict(final_sparsity=0.75, start_step=0, end_step=3, frequency=1, num_grads=16, damp=1e-3,
                progress=False)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))))


def data():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(32, 2, 4, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]


def optimizer(model):
    return torch.optim.Adam(model.parameters(), lr=1e-2)  # state per tensor: a wrong pairing cannot go unseen


def epoch(model, opt):
    model.train()
    for x, y in data():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def run(model, opt, pruner, steps):
    for step in steps:
        pruner.step(step)
        epoch(model, opt)


@pytest.fixture(scope="module")
def interrupted():
    """(state_dict of the uninterrupted 5-epoch run, checkpoint of a run stopped after 2 epochs)."""
    straight = ConvNet()
    opt = optimizer(straight)
    run(straight, opt, wf.GradualPruner(straight, data(), **SCHEDULE), range(5))

    first = ConvNet()
    opt = optimizer(first)
    pruner = wf.GradualPruner(first, data(), **SCHEDULE)
    run(first, opt, pruner, range(2))
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict(), "pruner": pruner.state_dict()}, buf)
    buf.seek(0)
    return straight.state_dict(), buf.getvalue()


@pytest.mark.parametrize("order", ["A", "B"])
def test_resume_with_optimizer_state_in_both_orders(order, interrupted):
    ref, saved = interrupted
    ckpt = torch.load(io.BytesIO(saved), weights_only=True)
    resumed = ConvNet()
    if order == "A":
        opt2 = optimizer(resumed)
    pruner2 = wf.GradualPruner(resumed, data(), **SCHEDULE)
    pruner2.load_state_dict(ckpt["pruner"])
    resumed.load_state_dict(ckpt["model"])
    if order == "B":
        opt2 = optimizer(resumed)
    opt2.load_state_dict(ckpt["opt"])
    run(resumed, opt2, pruner2, range(2, 5))

    assert [h["step"] for h in pruner2.history] == [0, 1, 2, 3]
    got = resumed.state_dict()
    assert list(ref) == list(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_masks_keep_parameter_order_and_identity_and_make_permanent_restores_names():
    model = ConvNet()
    names = [n for n, _ in model.named_parameters()]
    ids = [id(p) for p in model.parameters()]
    pruner = wf.GradualPruner(model, data(), **SCHEDULE)
    pruner.step(0)
    held = [n for n, _ in model.named_parameters()]
    assert held == [n + "_orig" if n in ("conv.weight", "fc.weight", "head.weight") else n for n in names]
    assert [id(p) for p in model.parameters()] == ids
    masks = pruner.masks()
    wf.make_permanent(model)
    assert [n for n, _ in model.named_parameters()] == names
    assert [id(p) for p in model.parameters()] == ids
    assert not any(hasattr(m, "weight_mask") or m._forward_pre_hooks for m in model.modules())
    for n, keep in masks.items():
        assert torch.equal(model.get_parameter(n) != 0, keep)


def test_optimizer_built_before_pruning_keeps_working():
    """Adam built on the dense model trains the masked one; pruned entries stay out of the forward."""
    model = ConvNet()
    opt = optimizer(model)
    pruner = wf.GradualPruner(model, data(), **SCHEDULE)
    previous = None
    for step in range(5):
        pruner.step(step)
        epoch(model, opt)
        masks = {n: model.get_buffer(n + "_mask").bool() for n in ("conv.weight", "fc.weight", "head.weight")}
        for n, keep in masks.items():
            assert torch.equal(model.get_submodule(n[:-7]).weight != 0, keep)
            if previous is not None:
                assert not (keep & ~previous[n]).any(), "a pruned weight came back"
        previous = masks
    assert pruner.history[-1]["sparsity"] == pytest.approx(0.75, abs=0.01)


def test_tied_weights_are_masked_in_every_module_that_holds_them():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a = nn.Linear(6, 6, bias=False)
            self.b = nn.Linear(6, 6, bias=False)
            self.b.weight = self.a.weight
            self.out = nn.Linear(6, 3)

        def forward(self, x):
            return self.out(torch.relu(self.b(torch.relu(self.a(x)))))

    model = Tied()
    keep = torch.rand(6, 6, generator=torch.Generator().manual_seed(0)) > 0.5
    wf.attach_masks(model, {"a.weight": keep})
    assert model.a.weight_orig is model.b.weight_orig
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert torch.equal(model.a.weight != 0, keep) and torch.equal(model.b.weight != 0, keep)
    wf.make_permanent(model)
    assert model.a.weight is model.b.weight and torch.equal(model.a.weight != 0, keep)


def test_attach_masks_on_an_attention_projection():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    keep = torch.rand(24, 8, generator=torch.Generator().manual_seed(0)) > 0.3
    names = [n for n, _ in mha.named_parameters()]
    wf.attach_masks(mha, {"in_proj_weight": keep})
    assert [n for n, _ in mha.named_parameters()][0] == "in_proj_weight_orig" and names[0] == "in_proj_weight"
    x = torch.randn(2, 5, 8)
    out, _ = mha(x, x, x)
    ref = nn.functional.multi_head_attention_forward(
        x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), 8, 2, mha.in_proj_weight_orig * keep,
        mha.in_proj_bias, None, None, False, 0.0, mha.out_proj.weight, mha.out_proj.bias, training=False,
        need_weights=False)[0].transpose(0, 1)
    torch.testing.assert_close(out, ref)
    wf.make_permanent(mha)
    assert [n for n, _ in mha.named_parameters()] == names


def test_load_state_dict_is_idempotent_and_accepts_a_fresh_state():
    model = ConvNet()
    pruner = wf.GradualPruner(model, data(), **SCHEDULE)
    pruner.load_state_dict(wf.GradualPruner(ConvNet(), data(), **SCHEDULE).state_dict())  # nothing done yet
    assert pruner.last_step is None and not hasattr(model.fc, "weight_mask")
    pruner.step(0)
    state = pruner.state_dict()
    names = [n for n, _ in model.named_parameters()]
    pruner.load_state_dict(state)
    pruner.load_state_dict(state)
    assert [n for n, _ in model.named_parameters()] == names
    assert all(torch.equal(a, b) for a, b in zip(pruner.masks().values(), state["masks"].values()))
