"""Vision-style models and batches: structured outputs (dataclass, namedtuple, torchvision's ``{"out", "aux"}``),
dict batches for a model whose forward takes a positional image, and FLOPs of a ``torch.compile`` model.

The reference for every structured output is the same network returning its logits tensor: the masks and
the pruned weights must be identical (the loss and hence every gradient is the same)."""
from __future__ import annotations

import collections
import dataclasses
import re
import warnings

import pytest
import torch
from _snapshots import assert_unchanged, snapshot
from torch import nn

import woodfisher as wf
from woodfisher.flops import layer_flops

OPTS = dict(sparsity=0.6, num_grads=32, progress=False)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 5))


def _data(n=4, batch=8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, 6, 6, generator=g), torch.randint(0, 5, (batch,), generator=g)) for _ in range(n)]


@dataclasses.dataclass
class _Out:
    features: torch.Tensor
    logits: torch.Tensor


_Pair = collections.namedtuple("_Pair", "features logits")  # logits not first: found by name, not position


class _Wrap(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.net, self.kind = _net(), kind

    def forward(self, x):
        logits = self.net(x)
        features = x.mean((1, 2, 3))
        if self.kind == "dataclass":
            return _Out(features, logits)
        if self.kind == "namedtuple":
            return _Pair(features, logits)
        return {"out": logits, "aux": features}  # torchvision segmentation style: no 'logits' key


def _reference():
    model = _net()
    res = wf.prune_one_shot(model, _data(), **OPTS)
    return model, res


def _assert_same(wrapped, res, ref_model, ref_res):
    assert {k.removeprefix("net."): v for k, v in res.masks.items()}.keys() == ref_res.masks.keys()
    for name, keep in res.masks.items():
        assert torch.equal(keep, ref_res.masks[name.removeprefix("net.")]), name
    ref = dict(ref_model.named_parameters())
    for name, p in wrapped.net.named_parameters():
        assert torch.equal(p, ref[name]), name


@pytest.mark.parametrize("kind", ["dataclass", "namedtuple"])
def test_logits_found_by_name_in_dataclass_and_namedtuple_outputs(kind):
    ref_model, ref_res = _reference()
    model = _Wrap(kind)
    res = wf.prune_one_shot(model, _data(), **OPTS)
    _assert_same(model, res, ref_model, ref_res)


def test_loss_fn_receives_outputs_without_logits_as_returned():
    ref_model, ref_res = _reference()
    model = _Wrap("dict")
    seen = []

    def loss_fn(outputs, target):
        seen.append(type(outputs))
        return nn.functional.cross_entropy(outputs["out"], target)

    res = wf.prune_one_shot(model, _data(), loss_fn=loss_fn, **OPTS)
    assert seen and all(issubclass(t, dict) for t in seen)
    _assert_same(model, res, ref_model, ref_res)


def test_outputs_without_predictions_and_no_loss_fn_are_refused_naming_loss_fn():
    model = _Wrap("dict")
    before = snapshot(model)
    with pytest.raises(ValueError, match="pass loss_fn, which then receives the outputs"):
        wf.prune_one_shot(model, _data(), **OPTS)
    assert_unchanged(before, snapshot(model))


def test_dict_batch_for_a_positional_forward_gets_an_adapter_that_works():
    ref_model, ref_res = _reference()
    loader = [{"pixel_values": x, "labels": y} for x, y in _data()]
    model = _net()
    with pytest.raises(ValueError) as info:
        wf.prune_one_shot(model, loader, **OPTS)
    found = re.search(r"batch_adapter=(lambda b: woodfisher\.Batch\(.*\))$", str(info.value))
    assert found, str(info.value)
    adapter = eval(found.group(1), {"woodfisher": wf})  # the text the message asks the user to paste
    res = wf.prune_one_shot(model, loader, batch_adapter=adapter, **OPTS)
    for name, keep in res.masks.items():
        assert torch.equal(keep, ref_res.masks[name]), name


def test_flops_of_a_compiled_model_are_those_of_the_model_it_wraps():
    model = _net()
    compiled = torch.compile(model)
    stats = layer_flops(compiled, (3, 6, 6))
    assert set(stats) == {"_orig_mod.0", "_orig_mod.4"}
    # by hand: a 3x3 'same' conv on 6x6 uses each of its 4*3*3*3 weights at 36 positions; the Linear once
    assert stats["_orig_mod.0"]["flops_dense"] == 4 * 3 * 3 * 3 * 36
    assert stats["_orig_mod.4"]["flops_dense"] == 4 * 5
    assert stats["_orig_mod.0"]["weight"] == "_orig_mod.0.weight"


FROZEN = "are frozen (requires_grad=False"


def test_frozen_backbone_named_in_a_warning_whose_modules_prune_the_head_only():
    model = _net()
    model[0].requires_grad_(False)  # frozen backbone, trainable head
    with pytest.warns(UserWarning, match=re.escape(FROZEN)) as record:
        wf.prune_one_shot(model, _data(), **OPTS)
    msg = next(str(w.message) for w in record if FROZEN in str(w.message))
    assert "['0.weight']" in msg and "modules=['4.weight']" in msg, msg
    model = _net()
    model[0].requires_grad_(False)
    backbone = model[0].weight.detach().clone()
    res = wf.prune_one_shot(model, _data(), modules=["4.weight"], **OPTS)  # the fix the warning gives
    assert list(res.masks) == ["4.weight"]
    assert torch.equal(model[0].weight, backbone)  # the frozen weight is left bit for bit


@pytest.mark.parametrize("frozen", ["none", "all"])
def test_no_frozen_warning_unless_frozen_and_trainable_weights_mix(frozen):
    model = _net()
    model.requires_grad_(frozen == "none")  # a model frozen for deployment: every weight pruned, no warning
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        wf.prune_one_shot(model, _data(), **OPTS)
    assert not [w for w in record if FROZEN in str(w.message)]


def _pasted(message: str, name: str):
    """The ``name=...`` expression a message asks the user to paste (up to its balanced closing parenthesis),
    evaluated."""
    start = message.index(name + "=") + len(name) + 1
    depth, end = 0, start
    for end in range(start, len(message)):
        depth += {"(": 1, ")": -1}.get(message[end], 0)
        if message[end] == ")" and depth == 0:
            break
    return eval(message[start:end + 1], {"woodfisher": wf, "torch": torch})


@pytest.mark.parametrize("keys", [("pixel_values", "label"), ("image", "target")])
def test_dict_batch_with_a_target_key_gets_an_adapter_that_works_for_a_positional_forward(keys):
    ref_model, ref_res = _reference()
    loader = [{keys[0]: x, keys[1]: y} for x, y in _data()]
    with pytest.raises(ValueError) as info:
        wf.prune_one_shot(_net(), loader, **OPTS)
    model = _net()
    res = wf.prune_one_shot(model, loader, batch_adapter=_pasted(str(info.value), "batch_adapter"), **OPTS)
    for name, keep in res.masks.items():
        assert torch.equal(keep, ref_res.masks[name]), name


class _Seg(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.cls = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.cls(torch.relu(self.conv(x)))


def test_segmentation_ignore_label_gets_the_loss_that_skips_it():
    g = torch.Generator().manual_seed(2)
    loader = []
    for _ in range(4):
        x, t = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 4, (8, 6, 6), generator=g)
        loader.append((x, torch.where(torch.rand(t.shape, generator=g) < 0.2, 255, t)))
    model = _Seg()
    before = snapshot(model)
    with pytest.raises(ValueError, match="ignore_index=255") as info:
        wf.prune_one_shot(model, loader, **OPTS)
    assert_unchanged(before, snapshot(model))
    loss_fn = _pasted(str(info.value), "loss_fn")
    res = wf.prune_one_shot(model, loader, loss_fn=loss_fn, **OPTS)
    # reference: the same loss written out (mean over the labelled pixels only)
    ref = _Seg()
    ref_res = wf.prune_one_shot(ref, loader, loss_fn=lambda out, t: nn.functional.cross_entropy(
        out.permute(0, 2, 3, 1)[t != 255], t[t != 255]), **OPTS)
    for name, keep in res.masks.items():
        assert torch.equal(keep, ref_res.masks[name]), name


def test_recalibrate_bn_names_the_loader_and_the_adapter_and_restores_the_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 5))
    loader = [{"pixel_values": x, "labels": y} for x, y in _data()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^loader: the model or the loss failed .*batch_adapter=") as info:
        wf.recalibrate_bn(model, loader, num_batches=2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    seen = wf.recalibrate_bn(model, loader, num_batches=2, batch_adapter=_pasted(str(info.value), "batch_adapter"))
    assert seen == 16
    # reference: the running mean of the conv outputs over the 16 samples (momentum None: the plain mean)
    with torch.no_grad():
        feats = torch.cat([model[0](x) for x, _ in _data()[:2]])
    torch.testing.assert_close(model[1].running_mean, feats.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)


def test_recalibrate_bn_casts_the_inputs_to_a_half_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to(torch.bfloat16)
    assert wf.recalibrate_bn(model, _data(), num_batches=1) == 8  # float32 images, bfloat16 weights
    assert model[1].running_mean.dtype == torch.bfloat16 and bool(model[1].running_mean.ne(0).any())


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
@pytest.mark.parametrize("options", [dict(), dict(fisher_batch_size=2, num_grads=16)], ids=["per-sample", "groups"])
def test_integer_class_targets_of_any_dtype_give_the_int64_masks(dtype, options):
    options = {**OPTS, **options}
    ref_res = wf.prune_one_shot(_net(), _data(), **options)
    model = _net()
    res = wf.prune_one_shot(model, [(x, y.to(dtype)) for x, y in _data()], **options)
    for name, keep in res.masks.items():
        assert torch.equal(keep, ref_res.masks[name]), name


def test_uint8_images_the_model_refuses_get_the_conversion_to_float_and_change_nothing():
    model = _net()
    before = snapshot(model)
    loader = [((x.clamp(-2, 2) * 60 + 128).to(torch.uint8), y) for x, y in _data()]
    with pytest.raises(ValueError, match=r"the inputs hold uint8 images \['uint8\(8, 3, 6, 6\)'\]: convert them to "
                                         r"float before the model"):
        wf.prune_one_shot(model, loader, **OPTS)
    assert_unchanged(before, snapshot(model))


class _Squeezed(nn.Module):
    def __init__(self, fixed=False):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc, self.fixed = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 5), fixed

    def forward(self, x):
        pooled = torch.relu(self.conv(x)).mean((2, 3), keepdim=True)
        return self.fc(pooled.flatten(1) if self.fixed else pooled.squeeze())  # squeeze() drops a batch of one


def test_a_forward_that_squeezes_the_batch_of_one_is_named_with_the_fix():
    model = _Squeezed()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"on a batch of one sample it returns outputs of shape \(5,\), without the "
                                         r"batch dimension \(a \.squeeze\(\) in forward\?\)"):
        wf.prune_one_shot(model, _data(), **OPTS)
    assert_unchanged(before, snapshot(model))
    res = wf.prune_one_shot(_Squeezed(fixed=True), _data(), **OPTS)
    assert res.sparsity == pytest.approx(0.6, abs=1 / 128)


def test_transposed_convolution_flops_count_input_positions_by_hand():
    """A stride-2 ConvTranspose2d(8, 4, 2) on 8 x 8 inputs: each of its 128 weights multiplies each input pixel
    once (64 uses; its 16 x 16 outputs would say 256)."""
    from woodfisher.flops import flops_per_param_of_batch
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.ConvTranspose2d(8, 4, 2, 2), nn.Conv2d(4, 4, 1))
    targets = wf.resolve_targets(model, ["0", "2.weight", "3"])
    batch = wf.Batch((torch.randn(2, 3, 16, 16),), {}, None)
    assert flops_per_param_of_batch(model, batch, targets) == {"0.weight": 64.0, "2.weight": 64.0, "3.weight": 256.0}
    stats = layer_flops(model, (3, 16, 16))
    assert stats["2"]["flops_dense"] == 128 * 64 and stats["3"]["flops_dense"] == 16 * 256


def test_torch_batching_rule_notes_do_not_reach_the_caller():
    """HuggingFace's Swin runs an operator without a vmap batching rule: torch warns 'There is a performance
    drop ... file us an issue' from inside the gradient pass, which the caller cannot act on."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.SwinConfig(image_size=16, patch_size=4, embed_dim=8, depths=[1], num_heads=[1],
                                     window_size=2, num_labels=3)
    model = transformers.SwinForImageClassification(config)
    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(4, 3, 16, 16, generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
            for _ in range(2)]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        res = wf.prune_one_shot(model, data, sparsity=0.5, num_grads=8, progress=False)
    assert not [w for w in record if "batching rule" in str(w.message)]
    assert res.sparsity == pytest.approx(0.5, abs=0.01)


class _FromBytes(nn.Module):
    """Converts uint8 images itself, then fails for another reason (a wrong feature count)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 5)

    def forward(self, x):
        return self.fc(x.float().flatten(1) / 255)


def test_the_uint8_hint_is_given_for_dtype_errors_only():
    loader = [((x.clamp(-2, 2) * 60 + 128).to(torch.uint8), y) for x, y in _data()]
    with pytest.raises(ValueError) as info:
        wf.prune_one_shot(_FromBytes(), loader, **OPTS)
    assert "mat1 and mat2 shapes cannot be multiplied" in str(info.value)
    assert "uint8 images" not in str(info.value)
