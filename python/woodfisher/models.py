"""Models used by the demo, the CLI and the benchmarks.

- :class:`MLPNet`: 784-40-20-10 MLP for MNIST (ReLU, no biases, log-softmax output),
  the architecture of the WoodFisher paper's MNIST experiments.
- :func:`resnet20`: ResNet-20 for CIFAR-10 (16-32-64 channels, 3 basic blocks per
  stage, 1x1 conv + BN downsample shortcut), parameter names matching the public
  WoodFisher checkpoint once its ``module.`` prefix is stripped.
- :func:`digits_mlp`: a small MLP for scikit-learn's 8x8 digits (demo).

:data:`MODEL_SPECS` tells the CLI, for every model name, its factory, its input
shape, the dataset it goes with, its loss and its default prunable weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .targets import resolve_targets

__all__ = ["MLPNet", "BasicBlock", "CifarResNet", "resnet20", "digits_mlp", "DigitsMLP",
           "RESNET20_PRUNABLE", "MLPNET_PRUNABLE", "ModelSpec", "MODEL_SPECS", "build_model",
           "prunable_weights"]


class MLPNet(nn.Module):
    """784-40-20-10 MLP without biases; returns log-probabilities.

    Input (N, 1, 28, 28) or (N, 784) -> output (N, 10) log-softmax.
    """

    def __init__(self, in_features: int = 784, hidden: Sequence[int] = (40, 20), num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden[0], bias=False)
        self.fc2 = nn.Linear(hidden[0], hidden[1], bias=False)
        self.fc3 = nn.Linear(hidden[1], num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return F.log_softmax(self.fc3(x), dim=1)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with an identity or 1x1 conv + BN shortcut; ReLU after the add."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: conv3x3(16) + 3 stages of basic blocks + 8x8 avg pool + fc.

    Input (N, 3, 32, 32) -> logits (N, num_classes).
    """

    def __init__(self, blocks_per_stage: int = 3, widths: Sequence[int] = (16, 32, 64), num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for stage, planes in enumerate(widths, start=1):
            layers = []
            for i in range(blocks_per_stage):
                stride = 2 if (stage > 1 and i == 0) else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 for CIFAR (~270k conv/fc weights)."""
    return CifarResNet(3, (16, 32, 64), num_classes)


#: The 18 3x3 convolutions of ResNet-20's residual blocks (the paper's one-shot setting:
#: not the first conv, the 1x1 shortcut convs or the fc).
RESNET20_PRUNABLE: List[str] = [f"layer{s}.{b}.conv{c}.weight"
                                for s in (1, 2, 3) for b in (0, 1, 2) for c in (1, 2)]

#: MLPNet's three weight matrices (pruned jointly in the paper).
MLPNET_PRUNABLE: List[str] = ["fc1.weight", "fc2.weight", "fc3.weight"]


class DigitsMLP(nn.Module):
    """MLP for 8x8 digits: (N, 64) -> logits (N, 10); ReLU hidden layers with biases."""

    def __init__(self, hidden: Sequence[int] = (64, 32), in_features: int = 64, num_classes: int = 10):
        super().__init__()
        if not hidden or any(int(h) <= 0 for h in hidden):
            raise ValueError(f"hidden must be a non-empty sequence of positive ints, got {hidden!r}")
        sizes = [in_features, *[int(h) for h in hidden], num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


def digits_mlp(hidden: Sequence[int] = (64, 32)) -> DigitsMLP:
    """Small MLP for scikit-learn's digits (64 inputs, 10 classes)."""
    return DigitsMLP(hidden)


def prunable_weights(model: nn.Module) -> List[str]:
    """Names of the weights the pruner prunes by default (:func:`woodfisher.resolve_targets`: Linear / Conv /
    attention projection weights, each tied Parameter once; no biases, no BN)."""
    return [target.name for target in resolve_targets(model)]


@dataclass(frozen=True)
class ModelSpec:
    """What the CLI needs to know about a named model.

    factory builds it; input_shape is one sample's shape; dataset is the data it goes
    with; log_probs tells whether forward returns log-probabilities (loss: nll_loss)
    or logits (loss: cross_entropy); prunable lists the default pruned weights
    (None = every Linear/Conv weight).
    """

    factory: Callable[[], nn.Module]
    input_shape: Tuple[int, ...]
    dataset: str
    log_probs: bool
    prunable: Optional[Tuple[str, ...]] = None

    @property
    def loss_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return F.nll_loss if self.log_probs else F.cross_entropy


MODEL_SPECS: Dict[str, ModelSpec] = {
    "mlpnet": ModelSpec(MLPNet, (1, 28, 28), "mnist", True, tuple(MLPNET_PRUNABLE)),
    "resnet20": ModelSpec(resnet20, (3, 32, 32), "cifar10", False, tuple(RESNET20_PRUNABLE)),
    "digits_mlp": ModelSpec(digits_mlp, (64,), "digits", False, None),
}


def build_model(name: str) -> nn.Module:
    """A freshly initialised model by name (one of :data:`MODEL_SPECS`)."""
    if name not in MODEL_SPECS:
        raise ValueError(f"model must be one of {sorted(MODEL_SPECS)}, got {name!r}")
    return MODEL_SPECS[name].factory()
