"""Readers for standard on-disk datasets, and accuracy evaluation.

- :func:`load_mnist`: MNIST idx files (``*-idx3-ubyte`` / ``*-idx1-ubyte``, raw or
  ``.gz``) in ``root``, ``root/raw`` or ``root/MNIST/raw`` (torchvision's layout).
- :func:`load_cifar10`: CIFAR-10 python batches (``data_batch_1..5``, ``test_batch``)
  in ``root`` or ``root/cifar-10-batches-py``.
- :func:`load_digits`: scikit-learn's 8x8 digits with a deterministic train/test split.

Nothing here downloads anything: the user gives the directory.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .state import eval_mode

__all__ = ["MNIST_MEAN", "MNIST_STD", "load_mnist", "load_cifar10", "load_digits", "load_dataset",
           "read_idx", "subset", "make_loader", "evaluate", "DATASETS", "DATA_SHAPES"]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
DATASETS = ("mnist", "cifar10", "digits")
#: one sample's input shape per dataset
DATA_SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32), "digits": (64,)}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def _check_dir(root: Union[str, os.PathLike], what: str) -> str:
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{what} data directory not found: {root!r}")
    return root


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """Parse one idx file (raw or gzip) into an array of its stored dtype and shape."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path!r} is not an idx file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(dims)) if dims else 1
    body = data[4 + 4 * ndim:]
    if len(body) != count * dtype.itemsize:
        raise ValueError(f"{path!r}: header says {dims} x {dtype.itemsize} bytes, body has {len(body)} bytes")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _find_file(dirs: Sequence[str], stems: Sequence[str], what: str) -> str:
    for d in dirs:
        for stem in stems:
            for name in (stem, stem + ".gz"):
                p = os.path.join(d, name)
                if os.path.isfile(p):
                    return p
    raise FileNotFoundError(f"{what}: none of {list(stems)} (raw or .gz) found in {list(dirs)}")


def load_mnist(root: Union[str, os.PathLike], split: str = "train") -> TensorDataset:
    """MNIST as TensorDataset(images (N,1,28,28) float32 normalised, labels (N,) int64).

    Images are scaled to [0, 1] then normalised with mean 0.1307, std 0.3081.
    """
    root = _check_dir(root, "MNIST")
    prefix = "train" if _check_split(split) == "train" else "t10k"
    dirs = [root, os.path.join(root, "raw"), os.path.join(root, "MNIST", "raw")]
    images = read_idx(_find_file(dirs, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"],
                                 "MNIST images"))
    labels = read_idx(_find_file(dirs, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"],
                                 "MNIST labels"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"MNIST files in {root!r} disagree: images {images.shape}, labels {labels.shape}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    x = (x - MNIST_MEAN) / MNIST_STD
    return TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))


def load_cifar10(root: Union[str, os.PathLike], split: str = "train") -> TensorDataset:
    """CIFAR-10 as TensorDataset(images (N,3,32,32) float32 in [-1, 1], labels (N,) int64).

    Reads the python pickle batches; images are (x/255 - 0.5) / 0.5 per channel.
    """
    root = _check_dir(root, "CIFAR-10")
    names = [f"data_batch_{i}" for i in range(1, 6)] if _check_split(split) == "train" else ["test_batch"]
    folder = next((d for d in (root, os.path.join(root, "cifar-10-batches-py"))
                   if os.path.isfile(os.path.join(d, names[0]))), None)
    if folder is None:
        raise FileNotFoundError(f"CIFAR-10: {names[0]!r} not found in {root!r} or "
                                f"{os.path.join(root, 'cifar-10-batches-py')!r}")
    xs: List[np.ndarray] = []
    ys: List[np.ndarray] = []
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CIFAR-10 batch file not found: {path!r}")
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
            raise ValueError(f"{path!r} is not a CIFAR-10 python batch (needs 'data' and 'labels')")
        xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch["labels"], dtype=np.int64))
    x = torch.from_numpy(np.concatenate(xs)).float().div_(255.0).sub_(0.5).div_(0.5)
    return TensorDataset(x, torch.from_numpy(np.concatenate(ys)))


def load_digits(split: str = "train", seed: int = 0, test_fraction: float = 0.25) -> TensorDataset:
    """scikit-learn's digits as TensorDataset(x (N,64) float32 in [0,1], labels (N,) int64).

    The split is a fixed permutation drawn with ``seed`` (same seed -> same split).
    """
    _check_split(split)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn") from err
    bunch = _sk_digits()
    x = torch.from_numpy(bunch.data.astype(np.float32) / 16.0)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    perm = torch.from_numpy(np.random.RandomState(seed).permutation(len(y)))
    num_test = int(round(test_fraction * len(y)))
    idx = perm[num_test:] if split == "train" else perm[:num_test]
    return TensorDataset(x[idx], y[idx])


def load_dataset(name: str, root: Optional[Union[str, os.PathLike]], split: str = "train",
                 seed: int = 0) -> Dataset:
    """Dispatch by name: "mnist" / "cifar10" (need ``root``) or "digits" (bundled with scikit-learn)."""
    if name == "digits":
        return load_digits(split, seed=seed)
    if name not in DATASETS:
        raise ValueError(f"data must be one of {list(DATASETS)}, got {name!r}")
    if root is None:
        raise ValueError(f"data_dir is required for {name!r} (the directory holding its files)")
    return load_mnist(root, split) if name == "mnist" else load_cifar10(root, split)


def subset(dataset: Dataset, num: Optional[int], seed: int = 0) -> Dataset:
    """A fixed random subset of ``num`` samples (the whole dataset if num is None or >= len)."""
    n = len(dataset)  # type: ignore[arg-type]
    if num is None or num >= n:
        return dataset
    if num <= 0:
        raise ValueError(f"subset size must be positive, got {num}")
    g = torch.Generator().manual_seed(seed)
    return Subset(dataset, torch.randperm(n, generator=g)[:num].tolist())


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader with a seeded shuffle (deterministic order for a given seed)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    g = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g)


@torch.no_grad()
def evaluate(model: nn.Module, data: Union[Dataset, Iterable[Tuple[torch.Tensor, torch.Tensor]]],
             batch_size: int = 1000, device: Optional[Union[str, torch.device]] = None) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on a Dataset or an iterable of (inputs, targets).

    The model is put in eval mode for the pass; every submodule's own flag is restored.
    """
    loader = make_loader(data, batch_size) if isinstance(data, Dataset) else data
    device = torch.device(device) if device is not None else next(model.parameters()).device
    correct = total = 0
    with eval_mode(model):
        for x, y in loader:
            pred = model(x.to(device)).argmax(dim=1)
            correct += int((pred.cpu() == y).sum())
            total += int(y.numel())
    if total == 0:
        raise ValueError("evaluate: the data is empty")
    return correct / total
