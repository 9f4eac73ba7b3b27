"""Linear / Conv subclasses whose forward transforms the weight (weight standardization as in timm's StdConv2d):
a pruned zero of ``weight`` is not a zero of the weight the forward computes with, so the OBS maths does not hold.
The default targets leave them out (one warning naming them), naming one in ``modules=`` is a ValueError, and a
subclass that keeps the base class's forward is pruned as before."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _snapshots import assert_unchanged, snapshot
from torch import nn

import woodfisher as wf


class StdConv(nn.Conv2d):
    """Weight standardization: every output filter shifted to mean 0 and scaled to unit variance."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class PlainSubclass(nn.Linear):
    """A subclass with the base class's forward (a type tag): its weight is used as it is."""


class MatmulLinear(nn.Linear):
    """A forward of its own that uses the weight as it is (HuggingFace's FalconLinear): an ordinary layer."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class FakeQuantLinear(nn.Linear):
    """Computes with the weight rounded to a grid of 0.05: a pruned zero stays zero, but other entries move."""

    def forward(self, x):
        return F.linear(x, torch.round(self.weight / 0.05) * 0.05, self.bias)


def _model(conv=StdConv):
    torch.manual_seed(0)
    return nn.Sequential(conv(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), PlainSubclass(4 * 25, 6), nn.ReLU(),
                         nn.Linear(6, 3)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 2, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, 16, 8)]


def _messages(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught]


def test_default_targets_leave_out_a_layer_whose_forward_transforms_its_weight():
    model = _model()
    std = model[0].weight.detach().clone()
    names = [t.name for t in wf.resolve_targets(model)]
    assert names == ["3.weight", "5.weight"]
    res, messages = _messages(lambda: wf.prune_one_shot(model, _data(), sparsity=0.5, num_grads=16, block_size=8,
                                                        progress=False))
    assert torch.equal(model[0].weight, std)   # untouched: no zero written where it would not last
    zeros = sum(int((model[i].weight == 0).sum()) for i in (3, 5))
    assert res.sparsity == pytest.approx(zeros / (model[3].weight.numel() + model[5].weight.numel()))
    said = [m for m in messages if "computes with a transform of the weight" in m]
    assert len(said) == 1 and "'0.weight (StdConv)'" in said[0] and "3.weight" not in said[0]


@pytest.mark.parametrize("named", ["0", "0.weight", ["0", "3"]])
def test_naming_it_is_refused_before_anything_changes(named):
    model = _model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"modules: '0.weight' belongs to a StdConv, a subclass of Conv2d whose "
                                         r"forward computes with a transform"):
        wf.prune_one_shot(model, _data(), sparsity=0.5, num_grads=16, modules=named, progress=False)
    assert_unchanged(before, snapshot(model))


def test_weight_norm_parametrization_is_left_out_and_refused_when_named():
    model = _model(nn.Conv2d)
    nn.utils.parametrizations.weight_norm(model[0])
    assert [t.name for t in wf.resolve_targets(model)] == ["3.weight", "5.weight"]
    _, messages = _messages(lambda: wf.prune_one_shot(model, _data(), sparsity=0.5, num_grads=16, progress=False))
    assert sum("weight_norm" in m for m in messages) == 1
    assert not any("computes with a transform of the weight" in m for m in messages)
    with pytest.raises(ValueError, match=r"modules: '0' is reparametrised by torch.nn.utils.parametrize without a "
                                         r"'mask' \(weight recomputed"):
        wf.resolve_targets(model, ["0"])


def test_a_plain_conv_and_subclasses_that_use_the_weight_as_it_is_are_pruned():
    assert [t.name for t in wf.resolve_targets(_model(nn.Conv2d))] == ["0.weight", "3.weight", "5.weight"]
    own = wf.targets.own_forward
    assert not own(PlainSubclass(2, 2)) and not own(MatmulLinear(3, 2)) and not own(MatmulLinear(5, 4).double())
    assert own(StdConv(1, 1, 1)) and own(StdConv(3, 2, (3, 1), dilation=2)) and own(FakeQuantLinear(8, 4))
    torch.manual_seed(0)
    model = nn.Sequential(MatmulLinear(6, 8), nn.ReLU(), FakeQuantLinear(8, 3)).double()
    assert [t.name for t in wf.resolve_targets(model)] == ["0.weight"]


def test_huggingface_subclasses():
    """BiT's WeightStandardizedConv2d is left out; Falcon's FalconLinear (x @ weight.T + bias) is pruned."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    falcon = transformers.FalconForCausalLM(transformers.FalconConfig(vocab_size=32, hidden_size=16,
                                                                      num_hidden_layers=1, num_attention_heads=2))
    assert [t.name for t in wf.resolve_targets(falcon)] == [
        "transformer.h.0.self_attention.query_key_value.weight", "transformer.h.0.self_attention.dense.weight",
        "transformer.h.0.mlp.dense_h_to_4h.weight", "transformer.h.0.mlp.dense_4h_to_h.weight"]
    bit = transformers.BitForImageClassification(transformers.BitConfig(
        embedding_size=32, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8, num_labels=3,
        layer_type="preactivation"))
    assert [t.name for t in wf.resolve_targets(bit)] == ["classifier.1.weight"]
    with pytest.raises(ValueError, match="WeightStandardizedConv2d, a subclass of Conv2d"):
        wf.resolve_targets(bit, ["bit.embedder.convolution"])


@pytest.mark.parametrize("named", ["0", "0.weight"])
def test_naming_a_hook_based_weight_norm_layer_says_why(named):
    """The hook-based torch.nn.utils.weight_norm: the Conv2d was called 'a module without a Conv weight' and
    '0.weight' 'no parameter' (did you mean '0.weight_v'?)."""
    model = _model(nn.Conv2d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch's deprecation of the hook-based weight_norm
        nn.utils.weight_norm(model[0])
    with pytest.raises(ValueError, match=rf"modules: '{named}': the weight of this Conv2d is recomputed from "
                                         r"\['weight_g', 'weight_v'\] .*remove_weight_norm"):
        wf.resolve_targets(model, [named])


def test_the_probe_leaves_a_qat_layer_as_it_was():
    """torch.ao's QAT Linear fake-quantizes its weight (left out), and its observers, which every forward updates
    (and resizes), are as they were after the probe."""
    import torch.ao.nn.qat as qat
    import torch.ao.quantization as tq
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), qat.Linear(8, 3, qconfig=tq.get_default_qat_qconfig("fbgemm")))
    before = snapshot(model)
    assert [t.name for t in wf.resolve_targets(model)] == ["0.weight"]
    assert_unchanged(before, snapshot(model))


def test_the_probe_leaves_the_global_random_state():
    class DropConnect(nn.Linear):
        def forward(self, x):
            return F.linear(x, F.dropout(self.weight, 0.5, training=True), self.bias)

    model = nn.Sequential(DropConnect(4, 4), nn.Linear(4, 2))
    torch.manual_seed(3)
    state = torch.get_rng_state()
    assert [t.name for t in wf.resolve_targets(model)] == ["1.weight"]
    assert torch.equal(torch.get_rng_state(), state)
