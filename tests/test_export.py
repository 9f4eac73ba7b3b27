"""Exports of a pruned model (woodfisher.export): every format computes what the dense pruned model computes.

Round trips compare with the dense pruned model (float64 for the CPU formats, the same half
precision for 2:4); validation errors are ValueErrors naming the argument, raised before
anything is converted or written, and the caller's model is never modified.
"""
import argparse

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from woodfisher import prune_one_shot
from woodfisher.checkpoint import save_state_dict
from woodfisher.export import (
    SparseConv2d,
    SparseLinear,
    add_export_arguments,
    check_semi_structured,
    load_sparse,
    onnx_available,
    pattern_violations,
    to_dense,
    to_onnx,
    to_semi_structured,
    to_sparse,
)
from woodfisher.gradual import apply_masks
from woodfisher.models import CifarResNet, digits_mlp


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _random_masks(model, sparsity, seed=0, types=(nn.Linear, nn.Conv2d)):
    gen = _gen(seed)
    return {f"{name}.weight": torch.rand(module.weight.shape, generator=gen) >= sparsity
            for name, module in model.named_modules() if isinstance(module, types)}


def _state(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def _mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return digits_mlp((64, 32)).to(dtype).eval()


# ---- dense export --------------------------------------------------------------------

def test_to_dense_folds_masks_and_prune_reparametrisation_without_touching_the_model():
    model = _mlp()
    masks = _random_masks(model, 0.8)
    held = _mlp()
    apply_masks(held, masks)                       # torch.nn.utils.prune: weight_orig * weight_mask
    before = _state(held)
    for exported in (to_dense(model, masks), to_dense(held)):
        assert sorted(exported.state_dict()) == sorted(model.state_dict())
        for name, keep in masks.items():
            weight = exported.get_parameter(name)
            assert torch.equal(weight == 0, ~keep | (model.get_parameter(name) == 0)), name
    inputs = torch.randn(5, 64, dtype=torch.float64, generator=_gen(1))
    torch.testing.assert_close(to_dense(held)(inputs), held(inputs), rtol=0, atol=0)
    _assert_unchanged(held, before)
    assert hasattr(held.layers[0], "weight_orig")


@pytest.mark.parametrize("bad, match", [
    ({"nope.weight": torch.ones(3, dtype=torch.bool)}, "not the weight"),
    ({"layers.0.weight": torch.ones(64, 64)}, "bool tensor of shape"),
    ({"layers.0.weight": torch.ones(3, 3, dtype=torch.bool)}, r"shape \(64, 64\)"),
])
def test_masks_are_validated(bad, match):
    model = _mlp()
    before = _state(model)
    with pytest.raises(ValueError, match=r"masks.*" + match):
        to_sparse(model, bad)
    _assert_unchanged(model, before)


# ---- CSR / BSR -----------------------------------------------------------------------

@pytest.mark.parametrize("layout, blocksize", [("csr", None), ("bsr", 2)])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.97])
def test_sparse_linear_round_trip_float64(layout, blocksize, sparsity):
    model = _mlp()
    masks = _random_masks(model, sparsity, seed=int(100 * sparsity))
    before = _state(model)
    sparse = to_sparse(model, masks, layout=layout, blocksize=blocksize, min_sparsity=0.0)
    dense = to_dense(model, masks)
    assert all(isinstance(layer, SparseLinear) for layer in sparse.layers)
    for rows in (1, 7):                                     # one row (matrix-vector), several rows
        inputs = torch.randn(rows, 64, dtype=torch.float64, generator=_gen(2))
        torch.testing.assert_close(sparse(inputs), dense(inputs), rtol=1e-12, atol=1e-12)
        with torch.inference_mode():
            torch.testing.assert_close(sparse(inputs), dense(inputs), rtol=1e-12, atol=1e-12)
    layer = sparse.layers[0]
    inputs = torch.randn(2, 3, 64, dtype=torch.float64, generator=_gen(3))              # leading dimensions
    torch.testing.assert_close(layer(inputs), dense.layers[0](inputs), rtol=1e-12, atol=1e-12)
    assert layer.weight.layout == {"csr": torch.sparse_csr, "bsr": torch.sparse_bsr}[layout]
    torch.testing.assert_close(layer.weight.to_dense(), dense.layers[0].weight, rtol=0, atol=0)
    if layout == "csr":
        assert layer.weight.values().numel() == int(torch.count_nonzero(dense.layers[0].weight))
    _assert_unchanged(model, before)


def test_sparse_masks_from_the_pruner_float32():
    """A WoodFisher-pruned model (random data, tiny Fisher): CSR output = the pruned model's (float32).

    The OBS update changes the kept weights too, so the pruned model (not dense weights + masks) is exported.
    """
    data = [(torch.randn(16, 64, generator=_gen(i)), torch.randint(0, 10, (16,), generator=_gen(i)))
            for i in range(2)]
    pruned = _mlp(dtype=torch.float32)
    result = prune_one_shot(pruned, data, sparsity=0.9, num_grads=16, block_size=64, progress=False)
    sparse = to_sparse(pruned, min_sparsity=0.0)
    assert all(isinstance(layer, SparseLinear) for layer in sparse.layers)
    for name, keep in result.masks.items():
        assert sparse.get_buffer(name).values().numel() <= int(keep.sum())
    inputs = torch.randn(9, 64, generator=_gen(3))
    torch.testing.assert_close(sparse(inputs), pruned(inputs), rtol=1e-5, atol=1e-5)


def test_sparse_conv_and_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    model = CifarResNet(1, (8, 16, 16)).double().eval()       # ResNet-8: strided, 1x1 and 3x3 convs
    for module in model.modules():                           # non-trivial BN statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    masks = _random_masks(model, 0.9, types=(nn.Conv2d,))
    sparse = to_sparse(model, masks, conv=True)
    dense = to_dense(model, masks)
    convs = [module for module in sparse.modules() if isinstance(module, SparseConv2d)]
    assert len(convs) == 9 and isinstance(sparse.fc, nn.Linear)     # fc has no zeros: stays dense
    inputs = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=_gen(4))
    torch.testing.assert_close(sparse(inputs), dense(inputs), rtol=1e-10, atol=1e-10)
    image = torch.randn(8, 9, 9, dtype=torch.float64, generator=_gen(5))   # stride 2, odd size, unbatched
    torch.testing.assert_close(sparse.layer2[0].conv1(image), dense.layer2[0].conv1(image), rtol=1e-12, atol=1e-12)
    assert "layer1.0.conv1.weight" in sparse.state_dict()
    path = tmp_path / "sparse.pt"
    save_state_dict(sparse, path)
    assert torch.load(path, weights_only=True)["layer1.0.conv1.weight"].layout == torch.sparse_csr
    loaded = load_sparse(CifarResNet(1, (8, 16, 16)).double().eval(), path)
    torch.testing.assert_close(loaded(inputs), dense(inputs), rtol=1e-10, atol=1e-10)
    loaded = load_sparse(CifarResNet(1, (8, 16, 16)).double(), to_sparse(model, masks, conv=False).state_dict())
    assert not any(isinstance(module, SparseConv2d) for module in loaded.modules())


def test_transformer_layer_fast_path_and_attention_projections():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).double().eval()
    masks = _random_masks(layer, 0.9, types=(nn.Linear,))
    sparse = to_sparse(layer, masks)
    assert isinstance(sparse.linear1, SparseLinear) and isinstance(sparse.linear2, SparseLinear)
    assert type(sparse.self_attn.out_proj) is not SparseLinear     # read directly by attention: stays dense
    inputs = torch.randn(2, 5, 32, dtype=torch.float64, generator=_gen(5))
    with torch.no_grad():                                     # eval + no_grad = the fused fast path when dense
        torch.testing.assert_close(sparse(inputs), to_dense(layer, masks)(inputs), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="MultiheadAttention"):
        to_sparse(layer, masks, names=["self_attn.out_proj"])


def test_sparse_validation_errors():
    model = _mlp()
    with pytest.raises(ValueError, match="layout"):
        to_sparse(model, layout="coo")
    with pytest.raises(ValueError, match="blocksize applies"):
        to_sparse(model, layout="csr", blocksize=4)
    with pytest.raises(ValueError, match="blocksize 3 must divide"):
        to_sparse(model, layout="bsr", blocksize=3, min_sparsity=0.0, names=["layers.0"])
    with pytest.raises(ValueError, match=r"blocksize 4 must divide .*'layers.2' \(weight as a matrix: 10 x 32\)"):
        to_sparse(model, layout="bsr", min_sparsity=0.0, names=["layers.2"])  # default 4 x 4 blocks, named
    # chosen by default: the layers the blocks tile are converted, the 10-class head stays dense
    default = to_sparse(model, layout="bsr", min_sparsity=0.0)
    kinds = {name: type(module).__name__ for name, module in default.named_modules() if name.startswith("layers.")}
    assert kinds["layers.0"] == "SparseLinear" and kinds["layers.2"] == "Linear", kinds
    with pytest.raises(ValueError, match="names: 'fc9'"):
        to_sparse(model, names=["fc9"])
    with pytest.raises(ValueError, match="min_sparsity"):
        to_sparse(model, min_sparsity=1.5)
    with pytest.raises(ValueError, match="float32 or float64"):
        to_sparse(model.half(), min_sparsity=0.0)
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups=1"):
        to_sparse(grouped, conv=True, min_sparsity=0.0)
    with pytest.raises(ValueError, match="not a Linear module"):
        to_sparse(grouped, names=["0"])
    with pytest.raises(ValueError, match="sparse CSR/BSR"):
        SparseLinear(torch.eye(3))


def test_min_sparsity_keeps_denser_layers_dense():
    model = _mlp()
    masks = _random_masks(model, 0.9)
    masks["layers.1.weight"] = torch.ones(32, 64, dtype=torch.bool)
    masks["layers.2.weight"] = torch.rand(10, 32, generator=_gen(10)) >= 0.6       # 60% zeros: below 0.7
    sparse = to_sparse(model, masks)                                   # default min_sparsity 0.7
    assert [type(module).__name__ for module in sparse.layers] == ["SparseLinear", "Linear", "Linear"]
    assert isinstance(to_sparse(model, masks, min_sparsity=0.5).layers[2], SparseLinear)


# ---- 2:4 semi-structured -------------------------------------------------------------

def _two_four_model(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32)).to(dtype)
    prune_one_shot(model, None, sparsity=0.5, method="magnitude", pattern="2:4", progress=False)
    return model


def test_pruner_two_four_masks_pass_the_pattern_check():
    model = _two_four_model()
    assert pattern_violations(model[0].weight) == 0
    assert check_semi_structured(model) == ["0", "2"]


def test_semi_structured_pattern_is_validated_before_the_device():
    model = _two_four_model()
    with torch.no_grad():
        model[2].weight[0, :3] = 1.0                         # a run of 4 with 3 non-zeros
    before = _state(model)
    for device in ("cpu", "cuda"):
        with pytest.raises(ValueError, match=r"'2': 1 of 512 runs of 4 weights hold more than 2"):
            to_semi_structured(model, device=device)
    _assert_unchanged(model, before)
    assert check_semi_structured(model, names=["0"]) == ["0"]
    unstructured = _mlp(dtype=torch.float32)
    with pytest.raises(ValueError, match="pattern='2:4'"):
        check_semi_structured(unstructured, _random_masks(unstructured, 0.6), names=["layers.0"])


def test_semi_structured_tile_and_dtype_are_validated():
    model = nn.Sequential(nn.Linear(64, 24))                # 24 rows: not a multiple of the minimum tile
    model[0].weight.data.mul_(torch.tensor([1.0, 1.0, 0.0, 0.0]).repeat(16))
    with pytest.raises(ValueError, match=r"minimum .* tile.*names=\[\.\.\.\], CLI: --names,"):  # the way out, both ways
        check_semi_structured(model)
    with pytest.raises(ValueError, match="dtype must be torch.float16 or torch.bfloat16"):
        to_semi_structured(_two_four_model(), dtype=torch.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU exists")
def test_semi_structured_refuses_a_device_without_sparse_tensor_cores():
    model = _two_four_model()
    before = _state(model)
    with pytest.raises(ValueError, match="device: 2:4 semi-structured weights need an NVIDIA GPU"):
        to_semi_structured(model, device="cpu")
    with pytest.raises(ValueError, match="torch.cuda is not available"):
        to_semi_structured(model, device="cuda")
    _assert_unchanged(model, before)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi_structured_on_gpu_matches_dense(dtype):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs compute capability >= 8.0")
    model = _two_four_model()
    sparse = to_semi_structured(model, dtype=dtype)
    assert type(sparse[0].weight).__name__.startswith("SparseSemiStructuredTensor")
    dense = to_dense(model).to("cuda", dtype)
    inputs = torch.randn(64, 128, generator=_gen(6)).to("cuda", dtype)
    ref64 = to_dense(model).double()(inputs.double().cpu())
    with torch.no_grad():
        got = sparse(inputs)
        torch.testing.assert_close(got, dense(inputs), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got.double().cpu(), ref64, rtol=3e-2, atol=3e-2)


# ---- ONNX ----------------------------------------------------------------------------

@pytest.mark.skipif(not onnx_available(), reason="onnx / onnxscript not installed (pip install .[onnx])")
def test_onnx_keeps_the_zeros_and_matches_onnxruntime(tmp_path):
    import onnx
    import onnxruntime
    from onnx import numpy_helper

    model = _mlp(dtype=torch.float32)
    masks = _random_masks(model, 0.9)
    path = to_onnx(model, torch.randn(2, 64), tmp_path / "m.onnx", masks)
    weights = {init.name: torch.from_numpy(numpy_helper.to_array(init).copy())
               for init in onnx.load(path).graph.initializer}
    for name, keep in masks.items():
        assert torch.equal(weights[name] == 0, ~keep | (model.get_parameter(name) == 0)), name
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    dense = to_dense(model, masks)
    for rows in (1, 5):                                      # dynamic batch
        inputs = torch.randn(rows, 64, generator=_gen(rows))
        got = torch.from_numpy(session.run(None, {"input": inputs.numpy()})[0])
        torch.testing.assert_close(got, dense(inputs).detach(), rtol=1e-5, atol=1e-5)


def test_onnx_errors_write_nothing(tmp_path, monkeypatch):
    model = _mlp(dtype=torch.float32)
    with pytest.raises(ValueError, match="example_inputs"):
        to_onnx(model, [], tmp_path / "a.onnx")
    with pytest.raises(ValueError, match="path: folder"):
        to_onnx(model, torch.randn(2, 64), tmp_path / "missing" / "a.onnx")
    monkeypatch.setattr("woodfisher.export.onnx_export.onnx_available", lambda: False)
    with pytest.raises(ImportError, match=r"pip install"):
        to_onnx(model, torch.randn(2, 64), tmp_path / "a.onnx")
    assert list(tmp_path.iterdir()) == []


# ---- command line --------------------------------------------------------------------

def _cli(*argv):
    parser = add_export_arguments(argparse.ArgumentParser(prog="woodfisher export"))
    args = parser.parse_args([str(arg) for arg in argv])
    return args.func(args)


@pytest.fixture()
def pruned_files(tmp_path):
    torch.manual_seed(0)
    model = digits_mlp()
    masks = _random_masks(model, 0.9)
    dense_path, masks_path = tmp_path / "dense.pt", tmp_path / "masks.pt"
    save_state_dict(model, dense_path)
    torch.save(masks, masks_path)
    pruned = to_dense(model, masks)
    save_state_dict(pruned, tmp_path / "pruned.pt")
    return tmp_path, pruned.eval()


@pytest.mark.parametrize("fmt", ["dense", "csr", "bsr", "onnx"])
def test_cli_export_formats(pruned_files, fmt, capsys):
    folder, pruned = pruned_files
    if fmt == "onnx" and not onnx_available():
        pytest.skip("onnx / onnxscript not installed")
    out = folder / ("out.onnx" if fmt == "onnx" else "out.pt")
    extra = ["--blocksize", "2"] if fmt == "bsr" else []
    assert _cli("--model", "digits_mlp", "--checkpoint", folder / "dense.pt", "--masks", folder / "masks.pt",
                "--format", fmt, "--out", out, *extra) == 0
    assert f"wrote {out} (format {fmt}; max |output - dense output| =" in capsys.readouterr().out
    inputs = torch.randn(4, 64, generator=_gen(7))
    if fmt == "dense":
        state = torch.load(out, weights_only=True)
        assert all(torch.equal(state[key], value) for key, value in pruned.state_dict().items())
    elif fmt in ("csr", "bsr"):
        loaded = load_sparse(digits_mlp(), out)
        torch.testing.assert_close(loaded(inputs), pruned(inputs).detach(), rtol=1e-5, atol=1e-5)
    if fmt == "onnx":
        return
    # the pruned.pt input (no masks) and a 'module:factory' model name give the same file
    again = folder / f"again_{out.name}"
    assert _cli("--model", "woodfisher.models:digits_mlp", "--input-shape", "64", "--checkpoint",
                folder / "pruned.pt", "--format", fmt, "--out", again, *extra) == 0
    first, second = (torch.load(path, weights_only=True) for path in (out, again))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key].to_dense(), second[key].to_dense()) for key in first)


def test_cli_bad_input_writes_nothing(pruned_files, monkeypatch):
    folder, _ = pruned_files
    out = folder / "sub" / "out.pt"
    common = ["--checkpoint", folder / "pruned.pt", "--out", out]
    with pytest.raises(ValueError, match="--model 'nomodule:nothing': cannot import module 'nomodule'"):
        _cli("--model", "nomodule:nothing", "--format", "csr", *common)
    with pytest.raises(ValueError, match="--model must be one of"):
        _cli("--model", "vgg16", "--format", "csr", *common)
    with pytest.raises(ValueError, match="--blocksize applies"):
        _cli("--model", "digits_mlp", "--format", "csr", "--blocksize", "4", *common)
    for fmt in ("dense", "2:4", "onnx"):  # a flag of other formats: refused, not ignored
        with pytest.raises(ValueError, match=r"^--conv applies to --format csr / bsr only"):
            _cli("--model", "digits_mlp", "--format", fmt, "--conv", *common)
    with pytest.raises(ValueError, match="masks"):
        torch.save({"layers.0.weight": torch.ones(2, 2, dtype=torch.bool)}, folder / "bad.pt")
        _cli("--model", "digits_mlp", "--format", "dense", "--masks", folder / "bad.pt", *common)
    with pytest.raises(ValueError, match="runs of 4"):                 # pattern first, even on a CPU
        _cli("--model", "digits_mlp", "--format", "2:4", "--device", "cpu", *common)
    with pytest.raises(ValueError, match="names: 'nope'"):
        _cli("--model", "digits_mlp", "--format", "csr", "--names", "nope", *common)
    monkeypatch.setattr("woodfisher.export.onnx_export.onnx_available", lambda: False)
    with pytest.raises(ValueError, match="pip install"):
        _cli("--model", "digits_mlp", "--format", "onnx", *common)
    assert not (folder / "sub").exists()


def test_sparse_forward_matches_f_linear_for_bias_free_layers():
    weight = torch.randn(6, 8, dtype=torch.float64, generator=_gen(8))
    weight[weight.abs() < 0.8] = 0
    layer = SparseLinear(weight.to_sparse_csr())
    inputs = torch.randn(3, 8, dtype=torch.float64, generator=_gen(9))
    torch.testing.assert_close(layer(inputs), F.linear(inputs, weight), rtol=1e-12, atol=1e-12)


# ---- the benchmark script ------------------------------------------------------------

def test_inference_benchmark_quick_writes_results(tmp_path):
    import json

    from benchmarks import inference_speedup

    assert inference_speedup.main(["--quick", "--samples", "1", "--min-sample-ms", "0", "--sparsities", "0.9",
                                   "--batches", "1", "3", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "inference_cpu.json").read_text())
    formats = {"mlp": ("csr", "bsr4"), "transformer": ("csr", "bsr4", "dense, fused path off"), "resnet20": ("csr",)}
    assert {(row["model"], row["batch"], row["format"]) for row in result["rows"]} == {
        (model, batch, fmt) for batch in (1, 3) for model, fmts in formats.items() for fmt in fmts}
    assert all(row["max_rel_err"] < 1e-5 and row["dense_ms"] > 0 for row in result["rows"])
    text = (tmp_path / "inference_cpu.md").read_text()
    assert result["device"]["device_name"] in text and "Where sparsity does not pay" in text
