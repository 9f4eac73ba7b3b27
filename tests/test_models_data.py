"""Models, checkpoint loading and dataset readers.

The real-data tests read ../shared/data (or $WOODFISHER_DATA) and are skipped with a
reason when it is absent. The format tests write tiny MNIST / CIFAR-10 files in the
real on-disk formats to tmp_path.
"""
import gzip
import math
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from woodfisher.checkpoint import load_checkpoint, normalise_state_dict, read_state_dict, save_state_dict
from woodfisher.data import (
    MNIST_MEAN,
    MNIST_STD,
    evaluate,
    load_cifar10,
    load_dataset,
    load_digits,
    load_mnist,
    read_idx,
    subset,
)
from woodfisher.models import (
    MODEL_SPECS,
    RESNET20_PRUNABLE,
    MLPNet,
    build_model,
    digits_mlp,
    prunable_weights,
    resnet20,
)

DATA = Path(os.environ.get("WOODFISHER_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
MLPNET_CKPT = DATA / "checkpoints" / "mlpnet_mnist.ckpt"
RESNET_CKPT = DATA / "checkpoints" / "resnet20_cifar10.pth.tar"
needs_data = pytest.mark.skipif(not (DATA / "checkpoints").is_dir(),
                                reason=f"real data not found at {DATA} (set WOODFISHER_DATA)")

# Dense test accuracies documented in the data README (measured on the full test sets).
MLPNET_README_ACC = 0.9397
RESNET20_README_ACC = 0.9143


# ---------------------------------------------------------------- models

def test_resnet20_architecture():
    model = resnet20()
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert len(convs) == 1 + 18 + 2  # stem, residual 3x3 convs, two 1x1 shortcuts
    assert len(RESNET20_PRUNABLE) == 18
    params = dict(model.named_parameters())
    for name in RESNET20_PRUNABLE:
        assert params[name].shape[-2:] == (3, 3)
    weights = sum(p.numel() for n, p in params.items() if n.endswith("weight") and p.dim() > 1)
    assert 265_000 < weights < 275_000  # "~270k conv/fc weights"
    out = model.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_mlpnet_and_digits_shapes():
    m = MLPNet()
    assert [tuple(p.shape) for p in m.parameters()] == [(40, 784), (20, 40), (10, 20)]
    out = m(torch.randn(3, 1, 28, 28))
    assert torch.allclose(out.exp().sum(1), torch.ones(3), atol=1e-5)  # log-softmax
    d = digits_mlp((16, 8))
    assert d(torch.randn(5, 64)).shape == (5, 10)
    assert prunable_weights(d) == ["layers.0.weight", "layers.1.weight", "layers.2.weight"]
    with pytest.raises(ValueError, match="model"):
        build_model("vgg")
    for name, spec in MODEL_SPECS.items():
        x = torch.zeros(1, *spec.input_shape)
        assert build_model(name).eval()(x).shape == (1, 10)


# ---------------------------------------------------------------- checkpoints

def test_normalise_state_dict_masks_and_prefixes():
    w = torch.arange(6.0).reshape(2, 3)
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    out = normalise_state_dict({"module.fc1._layer.weight": w, "module.fc1._weight_mask": mask,
                                "module.fc2.bias": torch.ones(2)})
    assert set(out) == {"fc1.weight", "fc2.bias"}
    assert torch.equal(out["fc1.weight"], w * mask)
    with pytest.raises(ValueError, match="mask"):
        normalise_state_dict({"a._weight_mask": torch.ones(2)})


def test_save_load_roundtrip_and_strict_mismatch(tmp_path):
    src = digits_mlp((8, 4))
    path = save_state_dict(src, tmp_path / "m.pt")
    dst = load_checkpoint(digits_mlp((8, 4)), path)
    for (n, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="missing keys"):
        load_checkpoint(MLPNet(), path)
    with pytest.raises(ValueError, match="shapes"):
        load_checkpoint(digits_mlp((8, 5)), path)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(MLPNet(), tmp_path / "nope.pt")


def test_safe_loader_refuses_pickled_objects(tmp_path):
    model = digits_mlp((8, 4))
    path = tmp_path / "ckpt.pt"
    torch.save({"model_state_dict": model.state_dict(), "optimizer": {"type": torch.optim.SGD}}, path)
    fresh = digits_mlp((8, 4))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="trust_pickle=True"):
        load_checkpoint(fresh, path)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # untouched
    load_checkpoint(fresh, path, trust_pickle=True)
    assert torch.equal(fresh.layers[0].weight, model.layers[0].weight)


@needs_data
def test_mlpnet_checkpoint_refused_by_default_then_accuracy():
    with pytest.raises(ValueError, match="--trust-pickle"):
        load_checkpoint(MLPNet(), MLPNET_CKPT)
    model = load_checkpoint(MLPNet(), MLPNET_CKPT, trust_pickle=True)
    acc = evaluate(model, load_mnist(DATA, "test"))  # full test set: 10,000 images, < 1 s
    assert abs(acc - MLPNET_README_ACC) < 5e-4


@needs_data
def test_resnet20_checkpoint_accuracy_on_subset():
    model = load_checkpoint(resnet20(), RESNET_CKPT)  # loads with weights_only=True
    n = 1000
    acc = evaluate(model, subset(load_cifar10(DATA, "test"), n, seed=0), batch_size=500)
    # binomial std of a 1000-sample estimate around the README's full-set accuracy: 3 sigma
    sigma = math.sqrt(RESNET20_README_ACC * (1 - RESNET20_README_ACC) / n)
    assert acc > RESNET20_README_ACC - 3 * sigma
    assert set(RESNET20_PRUNABLE) <= set(read_state_dict(RESNET_CKPT))


# ---------------------------------------------------------------- readers

def _write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(str(path) + (".gz" if gz else ""), "wb").write(data)


@pytest.mark.parametrize("gz,layout", [(True, "MNIST/raw"), (False, ".")])
def test_mnist_reader_on_tiny_idx_files(tmp_path, gz, layout):
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, size=(5, 28, 28)).astype(np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    d = tmp_path / layout
    d.mkdir(parents=True, exist_ok=True)
    _write_idx(d / "t10k-images-idx3-ubyte", images, gz)
    _write_idx(d / "t10k-labels-idx1-ubyte", labels, gz)
    ds = load_mnist(tmp_path, "test")
    x, y = ds.tensors
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    expected = (images.astype(np.float64) / 255.0 - MNIST_MEAN) / MNIST_STD
    np.testing.assert_allclose(x[:, 0].numpy(), expected, atol=1e-5)
    assert y.tolist() == [3, 1, 4, 1, 5] and y.dtype == torch.int64
    with pytest.raises(FileNotFoundError, match="train-images"):
        load_mnist(tmp_path, "train")


def test_idx_reader_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04" + bytes(8))
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    truncated = bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + bytes(3)
    (tmp_path / "short").write_bytes(truncated)
    with pytest.raises(ValueError, match="body"):
        read_idx(tmp_path / "short")


def test_cifar_reader_on_tiny_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.RandomState(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.randint(0, 256, size=(2, 3072)).astype(np.uint8)
        labels = rng.randint(0, 10, size=2).tolist()
        batches[name] = (data, labels)
        with open(folder / name, "wb") as f:  # no 'filenames' key, as in ../shared/data
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, f)
    train = load_cifar10(tmp_path, "train")
    assert len(train) == 10
    x, y = load_cifar10(folder, "test").tensors
    data, labels = batches["test_batch"]
    # row layout: 1024 red, then 1024 green, then 1024 blue values, each 32x32 row-major
    n, c, i, j = 1, 2, 5, 7
    assert x[n, c, i, j].item() == pytest.approx((data[n, c * 1024 + i * 32 + j] / 255.0 - 0.5) / 0.5, abs=1e-6)
    assert x.min() >= -1 and x.max() <= 1 and y.tolist() == labels


def test_missing_directories_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_mnist(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_cifar10(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        load_cifar10(tmp_path, "val")
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("mnist", None)


def test_digits_split_is_deterministic_and_disjoint():
    tr, te = load_digits("train", seed=3), load_digits("test", seed=3)
    assert len(tr) + len(te) == 1797
    assert torch.equal(tr.tensors[0], load_digits("train", seed=3).tensors[0])
    assert not torch.equal(tr.tensors[0][:20], load_digits("train", seed=4).tensors[0][:20])
    rows = {tuple(r.tolist()) for r in tr.tensors[0]}
    overlap = sum(tuple(r.tolist()) in rows for r in te.tensors[0])
    assert overlap < 0.05 * len(te)  # only the few duplicated images of the dataset
    assert 0.0 <= float(tr.tensors[0].min()) and float(tr.tensors[0].max()) <= 1.0


def test_evaluate_counts_exactly_and_restores_mode():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):  # predicts class = first feature
            return nn.functional.one_hot(x[:, 0].long(), 3).float() + self.w

    x = torch.tensor([[0.0], [1.0], [2.0], [1.0]])
    y = torch.tensor([0, 1, 1, 1])
    model = Fixed().train()
    acc = evaluate(model, torch.utils.data.TensorDataset(x, y), batch_size=3)
    assert acc == 3 / 4 and model.training
