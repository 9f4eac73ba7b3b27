"""After pruning: exports of models whose masks are still attached as ``torch.ao.pruning`` mask
parametrizations, copies of the exported sparse models, and example inputs a user has at hand.

Values are checked against float64 references computed independently (weight * mask).
"""
import copy

import pytest
import torch
from torch import nn
from torch.ao.pruning.sparsifier.utils import FakeSparsity
from torch.nn.utils import parametrize

from woodfisher import make_permanent
from woodfisher.export import check_semi_structured, load_sparse, onnx_available, to_dense, to_onnx, to_sparse


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _fake_sparse_mlp():
    """A float64 MLP whose Linear weights (no zeros of their own) are held by FakeSparsity masks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).double().eval()
    masks = {}
    for name in ("0", "2"):
        layer = model.get_submodule(name)
        keep = torch.rand(layer.weight.shape, generator=_gen(int(name))) >= 0.75
        masks[f"{name}.weight"] = keep
        parametrize.register_parametrization(layer, "weight", FakeSparsity(keep.double()))
    return model, masks


def _reference(model, masks, inputs):
    """float64 forward with weight * mask, computed without the parametrizations."""
    hidden = torch.relu(inputs @ (model[0].parametrizations.weight.original * masks["0.weight"]).T + model[0].bias)
    return hidden @ (model[2].parametrizations.weight.original * masks["2.weight"]).T + model[2].bias


def test_make_permanent_folds_mask_parametrizations_keeping_the_parameter():
    model, masks = _fake_sparse_mlp()
    original = model[0].parametrizations.weight.original
    expected = original.detach() * masks["0.weight"]
    make_permanent(model)
    assert not parametrize.is_parametrized(model[0]) and type(model[0]) is nn.Linear
    assert model[0].weight is original                              # same Parameter: optimizers keep working
    assert torch.equal(model[0].weight.detach(), expected)
    assert set(model.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_make_permanent_leaves_weight_norm_alone():
    layer = nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))
    make_permanent(layer)
    assert parametrize.is_parametrized(layer, "weight")


def test_exports_fold_mask_parametrizations():
    model, masks = _fake_sparse_mlp()
    inputs = torch.randn(5, 16, dtype=torch.float64, generator=_gen(3))
    expected = _reference(model, masks, inputs).detach()
    dense = to_dense(model)
    assert set(dense.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    for name, keep in masks.items():
        assert torch.equal(dense.get_parameter(name).detach() != 0, keep), name
    torch.testing.assert_close(dense(inputs), expected, rtol=1e-12, atol=1e-12)
    sparse = to_sparse(model, min_sparsity=0.5)
    assert all(sparse.get_submodule(name).weight.layout == torch.sparse_csr for name in ("0", "2"))
    assert sparse[0].weight.values().numel() == int(masks["0.weight"].sum())
    torch.testing.assert_close(sparse(inputs), expected, rtol=1e-12, atol=1e-12)
    assert parametrize.is_parametrized(model[0], "weight")          # the caller's model is untouched
    torch.testing.assert_close(model(inputs), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("masks", [[torch.ones(4, 8, dtype=torch.bool)], torch.ones(4, 8, dtype=torch.bool)])
def test_masks_that_are_not_a_dict_are_a_value_error(masks):
    with pytest.raises(ValueError, match="masks must be a dict"):
        to_dense(nn.Sequential(nn.Linear(8, 4)), masks)


def test_a_named_layer_under_weight_norm_is_refused_saying_why():
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(8, 4)))
    with pytest.raises(ValueError, match=r"names: '0' is a Linear whose weight is recomputed .* weight_norm"):
        to_sparse(model, names=["0"])


def test_semi_structured_check_sees_through_mask_parametrizations():
    model = nn.Sequential(nn.Linear(64, 32))
    keep = torch.zeros(32, 64, dtype=torch.bool)
    keep[:, 0::4] = keep[:, 1::4] = True                            # exactly 2:4
    parametrize.register_parametrization(model[0], "weight", FakeSparsity(keep.float()))
    assert check_semi_structured(model) == ["0"]


def test_sparse_export_deep_copies():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight[layer.weight.abs() < 0.3] = 0
    inputs = torch.randn(3, 8, dtype=torch.float64, generator=_gen(1))
    for layout, blocksize in (("csr", None), ("bsr", 2)):
        sparse = to_sparse(model, layout=layout, blocksize=blocksize, min_sparsity=0.0)
        twin = copy.deepcopy(sparse)
        assert twin[0].weight is not sparse[0].weight and twin[0].weight.layout == sparse[0].weight.layout
        torch.testing.assert_close(twin(inputs), model(inputs).detach(), rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            twin[0].weight.values().zero_()                          # the copy owns its storage
        torch.testing.assert_close(sparse(inputs), model(inputs).detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not onnx_available(), reason="onnx / onnxscript not installed")
def test_onnx_takes_an_example_input_that_carries_a_grad(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    with torch.no_grad():
        model[0].weight[:, ::2] = 0
    inputs = torch.randn(2, 8, requires_grad=True)
    model(inputs).sum().backward()                                  # a batch that went through training
    path = to_onnx(model, inputs, tmp_path / "m.onnx")
    weights = [onnx.numpy_helper.to_array(init) for init in onnx.load(path).graph.initializer]
    matrix = next(w for w in weights if w.shape in ((4, 8), (8, 4)))
    assert int((matrix == 0).sum()) == int((model[0].weight == 0).sum())


def test_gpt2_conv1d_layers_become_sparse_and_load_back(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=8,
                                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    conv1d = [name for name, module in model.named_modules() if type(module).__name__ == "Conv1D"]
    assert len(conv1d) == 4
    with torch.no_grad():
        for index, name in enumerate(conv1d):
            weight = model.get_submodule(name).weight                    # (in, out)
            weight.mul_(torch.rand(weight.shape, generator=_gen(index), dtype=torch.float64) >= 0.8)
    ids = torch.randint(0, 32, (2, 8), generator=_gen(9))
    expected = model(ids).logits.detach()
    sparse = to_sparse(model, min_sparsity=0.5)
    for name in conv1d:
        layer, weight = sparse.get_submodule(name), model.get_submodule(name).weight
        assert layer.weight.layout == torch.sparse_csr and tuple(layer.weight.shape) == tuple(weight.shape[::-1])
        assert torch.equal(layer.weight.to_dense(), weight.detach().t())
    torch.testing.assert_close(sparse(ids).logits, expected, rtol=1e-12, atol=1e-12)
    torch.save(sparse.state_dict(), tmp_path / "gpt2_csr.pt")
    fresh = transformers.GPT2LMHeadModel(config).double().eval()
    loaded = load_sparse(fresh, tmp_path / "gpt2_csr.pt")
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-12, atol=1e-12)


def test_semi_structured_says_gpt2_conv1d_layers_are_not_converted():
    transformers = pytest.importorskip("transformers")
    model = nn.Sequential(transformers.pytorch_utils.Conv1D(8, 16))
    with torch.no_grad():
        model[0].weight[::2] = 0
    with pytest.raises(ValueError, match=r"no nn\.Linear layer .*HuggingFace Conv1D layers \('0', \.\.\.\) are not"):
        check_semi_structured(model)


@pytest.mark.parametrize("wrap", [nn.DataParallel, torch.compile])
def test_wrapped_models_export_the_model_they_wrap(wrap, tmp_path):
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).double().eval()
    model = wrap(inner)
    prefix = "module." if wrap is nn.DataParallel else "_orig_mod."
    masks = {f"{prefix}{i}.weight": torch.rand(inner[i].weight.shape, generator=_gen(i)) >= 0.75 for i in (0, 2)}
    inputs = torch.randn(3, 8, dtype=torch.float64, generator=_gen(5))
    hidden = torch.relu(inputs @ (inner[0].weight * masks[f"{prefix}0.weight"]).T + inner[0].bias)
    expected = (hidden @ (inner[2].weight * masks[f"{prefix}2.weight"]).T + inner[2].bias).detach()
    dense = to_dense(model, masks)
    assert type(dense) is nn.Sequential and set(dense.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    torch.testing.assert_close(dense(inputs), expected, rtol=1e-12, atol=1e-12)
    sparse = to_sparse(model, masks, names=[f"{prefix}0"])
    assert type(sparse) is nn.Sequential and sparse[0].weight.layout == torch.sparse_csr
    torch.testing.assert_close(sparse(inputs), expected, rtol=1e-12, atol=1e-12)
    assert all(type(layer) is nn.Linear for layer in (inner[0], inner[2]))    # the caller's model is untouched
