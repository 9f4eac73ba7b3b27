"""Module types of today's models: depthwise / grouped convs (MobileNetV2-like), Conv1d, nn.TransformerEncoder.

WoodFisher is checked against an independent float64 reference (per-sample gradients by
autograd, dense whole-layer Fisher blocks, the OBS statistic and update of the paper's
Eqs. 10-11) and against global magnitude on the same weights: on the Fisher's quadratic
model of the loss, ``dw^T F dw / 2``, its change must cost less. The caller's objects (every
flag, BN statistics, ``requires_grad``, parameter identity and order) are left as they were.
"""
import pytest
import torch
import torch.nn.functional as F
from _pruner_shared import per_sample_grads
from torch import nn

from woodfisher import Batch, prune_one_shot, resolve_targets
from woodfisher.flops import flops_per_param_of_batch


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (optionally grouped) -> 3x3 depthwise -> 1x1 project, residual add."""

    def __init__(self, channels, expand, groups=1):
        super().__init__()
        hidden = channels * expand
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1, groups=groups, bias=False),
                                    nn.BatchNorm2d(hidden), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
                                nn.BatchNorm2d(hidden), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return x + self.project(self.dw(self.expand(x)))


class MobileNetish(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(8, 2, groups=2), InvertedResidual(8, 3))
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class Conv1dNet(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 5, padding=2)
        self.c2 = nn.Conv1d(6, 6, 3, stride=2)
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).mean(2))


class Encoder(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.enc(self.inp(x)).mean(1))


MODELS = {"mobilenet": (MobileNetish, (3, 8, 8)), "conv1d": (Conv1dNet, (3, 12)), "encoder": (Encoder, (5, 6))}


def _setup(name, n=48, seed=0):
    """float64 model in eval mode with BN statistics that are not the defaults, and labelled batches."""
    factory, shape = MODELS[name]
    torch.manual_seed(seed)
    model = factory().double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    with torch.no_grad():  # running statistics of real activations
        model.train()
        model(x)
    model.eval()
    with torch.no_grad():
        y = torch.multinomial(torch.softmax(model(x), 1), 1, generator=g).squeeze(1)
    return model, [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


def _reference(model, loader, names, n, damp, sparsity):
    """Global WoodFisher with whole-weight blocks in float64 by hand: masks, new weights, Fisher blocks."""
    grads = per_sample_grads(model, loader, names, n)
    params = dict(model.named_parameters())
    fishers, finv, scores = {}, {}, {}
    for name in names:
        g = grads[name]
        fishers[name] = damp * torch.eye(g.shape[1], dtype=torch.float64) + g.T @ g / n
        finv[name] = torch.linalg.inv(fishers[name])
        w = params[name].detach().flatten()
        scores[name] = w.square() / (2 * torch.diagonal(finv[name]))
    flat = torch.cat([scores[k] for k in names])
    keep_flat = torch.zeros_like(flat, dtype=torch.bool)
    keep_flat[torch.topk(flat, flat.numel() - round(sparsity * flat.numel())).indices] = True
    masks, new, start = {}, {}, 0
    for name in names:
        w = params[name].detach().flatten()
        keep = keep_flat[start:start + w.numel()]
        start += w.numel()
        v = torch.where(keep, torch.zeros_like(w), w / torch.diagonal(finv[name]))
        new[name] = (w - finv[name] @ v).masked_fill(~keep, 0.0)
        masks[name] = keep.view_as(params[name])
    return masks, new, fishers


@pytest.mark.parametrize("name", sorted(MODELS))
def test_woodfisher_matches_the_dense_reference_and_beats_global_magnitude(name):
    model, loader = _setup(name)
    names = [t.name for t in resolve_targets(model)]
    before = {k: v.detach().clone().flatten() for k, v in model.named_parameters() if k in names}
    masks, new, fishers = _reference(model, loader, names, 48, 1e-3, 0.5)
    wf = prune_one_shot(model, loader, sparsity=0.5, num_grads=48, damp=1e-3, block_size=None, num_steps=1,
                        progress=False)  # the reference's setting: whole-weight blocks, one step
    params = dict(model.named_parameters())
    for k in names:
        assert torch.equal(wf.masks[k], masks[k]), k
        torch.testing.assert_close(params[k].detach().flatten(), new[k], rtol=1e-7, atol=1e-9)
    mag_model, _ = _setup(name)
    mag = prune_one_shot(mag_model, None, sparsity=0.5, method="global_magnitude", modules=names, progress=False)
    assert list(mag.masks) == list(wf.masks) and mag.sparsity == wf.sparsity == pytest.approx(0.5, abs=1e-2)

    def quadratic(m):  # dw^T F dw / 2 over the pruned weights, F the reference Fisher blocks
        p = dict(m.named_parameters())
        return sum(float(0.5 * (d := p[k].detach().flatten() - before[k]) @ fishers[k] @ d) for k in names)
    assert quadratic(model) < quadratic(mag_model)


def test_depthwise_and_grouped_convs_flops_and_kfac():
    model, loader = _setup("mobilenet")
    targets = resolve_targets(model)
    flops = flops_per_param_of_batch(model, Batch((loader[0][0],), {}, None), targets)
    assert flops["stem.0.weight"] == 16.0  # stride 2: 4 x 4 output positions
    assert flops["blocks.0.dw.0.weight"] == flops["blocks.0.expand.0.weight"] == 16.0 and flops["head.weight"] == 1.0
    with pytest.raises(ValueError, match="blocks.0.expand.0"):  # grouped: K-FAC does not model it
        prune_one_shot(model, loader, sparsity=0.5, method="kfac", num_grads=16, progress=False)
    plain = [t.name for t in targets if t.module.__class__ is nn.Linear or t.module.groups == 1]
    result = prune_one_shot(model, loader, sparsity=0.5, method="kfac", num_grads=32, progress=False, modules=plain)
    assert list(result.masks) == plain and result.sparsity == pytest.approx(0.5, abs=1e-2)
    result = prune_one_shot(model, loader, sparsity=0.6, beta=1.0, num_grads=32, progress=False)
    assert result.sparsity == pytest.approx(0.6, abs=1e-2)


def test_conv1d_and_encoder_flops_per_weight():
    model, loader = _setup("conv1d")
    flops = flops_per_param_of_batch(model, Batch((loader[0][0],), {}, None), resolve_targets(model))
    assert flops == {"c1.weight": 12.0, "c2.weight": 5.0, "fc.weight": 1.0}  # (12 + 0 - 3) // 2 + 1 = 5
    model, loader = _setup("encoder")
    flops = flops_per_param_of_batch(model, Batch((loader[0][0],), {}, None), resolve_targets(model))
    assert set(flops.values()) == {5.0, 1.0} and flops["head.weight"] == 1.0  # 5 positions per sample


def _mixed_state_model():
    """MobileNet-like in train mode with a frozen (eval) BN, frozen stem weights and a dropout-free head."""
    model, loader = _setup("mobilenet")
    model.train()
    model.blocks[0].expand[1].eval()
    model.stem[0].weight.requires_grad_(False)
    return model, loader


@pytest.mark.parametrize("options", [dict(method="woodfisher"), dict(method="kfac", modules=["stem.0", "head"]),
                                     dict(method="diag_fisher", beta=1.0), dict(method="woodfisher", keep_masks=True),
                                     dict(method="woodfisher", sampled_fisher=True, num_steps=2)],
                         ids=["woodfisher", "kfac", "diag-beta", "keep_masks", "sampled-2steps"])
def test_the_callers_objects_are_left_as_they_were(options):
    model, loader = _mixed_state_model()
    flags = [m.training for m in model.modules()]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    params = list(model.parameters())
    requires = [p.requires_grad for p in params]
    keys = [k for k, _ in model.named_parameters()]
    prune_one_shot(model, loader, sparsity=0.5, num_grads=16, progress=False, **options)
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers() if k in buffers)
    assert list(model.parameters()) == params and [p.requires_grad for p in params] == requires
    renamed = [k[:-len("_orig")] if k.endswith("_orig") else k for k, _ in model.named_parameters()]
    assert renamed == keys  # same order; keep_masks renames weight -> weight_orig in place
    assert all(p.grad is None for p in params)
