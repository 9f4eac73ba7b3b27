"""After one-shot pruning: masks kept for fine-tuning, BatchNorm recalibration (woodfisher.finetune)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from _pruner_shared import same_state, state_copy, tiny_data
from torch import nn

import woodfisher.finetune as finetune
from woodfisher import attach_masks, clone_model, make_permanent, prune_one_shot, recalibrate_bn


class Net(nn.Module):
    """Linear + MHA (in_proj read directly) + a head tied to the first layer's weight."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 6)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.mid = nn.Linear(6, 6)
        self.mid2 = nn.Linear(6, 6)
        self.mid2.weight = self.mid.weight
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.tanh(self.inp(x)).unsqueeze(1)
        h = self.attn(h, h, h, need_weights=False)[0].squeeze(1)
        return self.head(torch.tanh(self.mid2(torch.tanh(self.mid(h)))))


def _train_steps(model, loader, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
    for _ in range(steps):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return opt


def test_keep_masks_holds_every_mask_through_fine_tuning():
    torch.manual_seed(0)
    model = Net().double()
    loader = tiny_data(n=16, features=6)
    params = list(model.parameters())
    order = [k for k, _ in model.named_parameters()]
    result = prune_one_shot(model, loader, sparsity=0.6, num_grads=16, progress=False, keep_masks=True)
    assert set(result.masks) == {"inp.weight", "attn.in_proj_weight", "attn.out_proj.weight", "mid.weight",
                                 "head.weight"}
    assert list(model.parameters()) == params  # same objects, same order: an optimizer built before still works
    assert [k.replace("_orig", "") for k, _ in model.named_parameters()] == order
    assert model.mid2.weight_mask is not model.mid.weight_mask and torch.equal(model.mid2.weight_mask,
                                                                                model.mid.weight_mask)
    _train_steps(model, loader)  # momentum and weight decay move the storage, the masks hold
    effective = {"inp.weight": model.inp.weight, "attn.in_proj_weight": model.attn.in_proj_weight,
                 "attn.out_proj.weight": model.attn.out_proj.weight, "mid.weight": model.mid.weight,
                 "head.weight": model.head.weight}
    for name, keep in result.masks.items():
        assert torch.all(effective[name][~keep] == 0) and torch.all(effective[name][keep] != 0), name
    assert torch.equal(model.mid2.weight, model.mid.weight)
    clone = clone_model(model)  # copies under masks (after a training step: derived weights are non-leaves)
    with torch.no_grad():
        clone.attn.out_proj.weight_orig.fill_(3.0)
    clone(loader[0][0])  # the clone's attention recomputes its own out_proj weight, not the original's
    assert torch.equal(clone.attn.out_proj.weight != 0, result.masks["attn.out_proj.weight"])
    assert torch.all(model.attn.out_proj.weight != 3.0)
    copy.deepcopy(make_permanent(model))
    assert [k for k, _ in model.named_parameters()] == order and list(model.parameters()) == params
    assert all(not m._forward_pre_hooks for m in model.modules())
    for name, keep in result.masks.items():
        assert torch.all(model.get_parameter(name)[~keep] == 0)


def test_without_keep_masks_fine_tuning_revives_the_zeros():
    torch.manual_seed(0)
    model = Net().double()
    loader = tiny_data(n=16, features=6)
    result = prune_one_shot(model, loader, sparsity=0.6, num_grads=16, progress=False)
    _train_steps(model, loader, steps=1)
    assert torch.any(model.inp.weight[~result.masks["inp.weight"]] != 0)


def test_attach_masks_on_a_wrapped_model_and_refusals_change_nothing():
    torch.manual_seed(0)
    model = nn.DataParallel(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)))
    keep = torch.rand(5, 6) > 0.5
    attach_masks(model, {"module.0.weight": keep})
    assert torch.equal(model.module[0].weight != 0, keep & (model.module[0].weight_orig != 0))
    before = state_copy(model)
    with pytest.raises(ValueError, match="shape"):
        attach_masks(model, {"module.2.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="^masks: no module or parameter named '9.weight'"):  # the argument named
        attach_masks(model, {"module.9.weight": keep})
    with pytest.raises(ValueError, match=r"^masks: '1' is a ReLU"):
        attach_masks(model, {"module.1": keep})
    assert same_state(model, before) and not hasattr(model.module[2], "weight_mask")


@pytest.mark.parametrize("wrap", [nn.DataParallel, torch.compile])
def test_attach_masks_takes_names_with_or_without_the_wrappers_prefix(wrap):
    """resolve_targets accepts a wrapped model's names without the prefix; attach_masks used to refuse them as
    "the same weight as another entry"."""
    torch.manual_seed(0)
    model = wrap(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)))
    inner = model.module if isinstance(model, nn.DataParallel) else model._orig_mod
    keep = {"0.weight": torch.rand(5, 6) > 0.5, "2.weight": torch.rand(4, 5) > 0.5}
    weights = {n: inner[int(n[0])].weight.detach().clone() for n in keep}
    attach_masks(model, keep)
    for name, k in keep.items():
        layer = inner[int(name[0])]
        assert torch.equal(layer.weight_mask.bool(), k) and torch.equal(layer.weight, weights[name] * k)
    before = state_copy(model)
    with pytest.raises(ValueError, match=r"^masks: \['0', '0.weight'\] name the same weight"):
        attach_masks(model, {"0": keep["0.weight"], "0.weight": keep["0.weight"]})
    assert same_state(model, before)


def test_a_failure_half_way_leaves_no_mask_behind(monkeypatch):
    torch.manual_seed(0)
    model = Net().double()
    before = state_copy(model)
    order = [k for k, _ in model.named_parameters()]
    calls = []
    real = finetune._hold

    def failing(module, attr, keep):
        calls.append(attr)
        if len(calls) == 3:
            raise RuntimeError("simulated failure while attaching the third mask")
        real(module, attr, keep)
    monkeypatch.setattr(finetune, "_hold", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        prune_one_shot(model, tiny_data(n=16, features=6), sparsity=0.6, num_grads=16, progress=False,
                       keep_masks=True)
    assert same_state(model, before) and [k for k, _ in model.named_parameters()] == order
    assert all(not m._forward_pre_hooks for m in model.modules())


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.drop(F.relu(self.bn(self.conv(x))).mean((2, 3))))


def _image_batches(n=24, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 5, 5, generator=g, dtype=torch.float64)
    return [(x[i:i + batch], torch.zeros(batch, dtype=torch.long)) for i in range(0, n, batch)]


def test_recalibrate_bn_sets_the_statistics_of_the_pruned_model():
    torch.manual_seed(0)
    model = BNNet().double()
    model.train()
    model.drop.eval()  # a flag of the caller's that must survive
    batches = _image_batches()
    prune_one_shot(model, None, sparsity=0.7, method="global_magnitude", progress=False)
    momentum = model.bn.momentum
    seen = recalibrate_bn(model, batches, num_batches=2)
    assert seen == 16 and model.bn.momentum == momentum
    assert [m.training for m in model.modules()] == [True, True, True, False, True]
    with torch.no_grad():  # reference: mean of the per-batch means and unbiased variances of the conv outputs
        acts = [model.conv(x) for x, _ in batches[:2]]
    mean = torch.stack([a.mean((0, 2, 3)) for a in acts]).mean(0)
    var = torch.stack([a.var((0, 2, 3), unbiased=True) for a in acts]).mean(0)
    torch.testing.assert_close(model.bn.running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.bn.running_var, var, rtol=1e-12, atol=1e-12)
    assert int(model.bn.num_batches_tracked) == 2


def test_recalibrate_bn_refusals_keep_the_statistics():
    model = BNNet().double()
    model(_image_batches()[0][0])
    before = state_copy(model)
    with pytest.raises(ValueError, match="num_batches"):
        recalibrate_bn(model, _image_batches(), num_batches=0)
    with pytest.raises(ValueError, match="no batch"):
        recalibrate_bn(model, [], num_batches=3)

    def broken():
        yield _image_batches()[0]
        raise RuntimeError("loader failed")
    with pytest.raises(RuntimeError, match="loader failed"):
        recalibrate_bn(model, broken(), num_batches=3)
    assert same_state(model, before)
    assert recalibrate_bn(nn.Linear(2, 2), [torch.zeros(1, 2)]) == 0  # no BatchNorm: nothing to do
