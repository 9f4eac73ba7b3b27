"""float16 / bfloat16 models: statistics and inverses in float32, weights written back in the model's dtype.

For every method (WoodFisher with each inverse form, damp "auto", WoodTaylor, FLOPs-aware beta, N:M and
row patterns, several steps, a sampled Fisher; diagonal Fisher; K-FAC; the magnitude baselines):

- the half-precision run equals the float32 run of the same (rounded) weights and data exactly: the
  same masks, and the new weights are the float32 ones rounded to the model's dtype;
- its masks overlap the float32 run of the original float32 model by >= 95%;
- the loss is scaled down so that float16 arithmetic would underflow the squared gradients (the
  smallest float16 subnormal is 6e-8), which computing in float32 avoids;
- a refused call leaves the half-precision model bitwise unchanged.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _snapshots import assert_unchanged, snapshot
from torch import nn

import woodfisher as wf

HALF = [torch.float16, torch.bfloat16]
ONE_STEP = {
    "woodfisher-sequential": dict(block_size=8, inverse_form="sequential"),
    "woodfisher-lowrank": dict(inverse_form="lowrank"),
    "woodfisher-stream": dict(block_size=8, inverse_form="stream"),
    "woodfisher-stream-auto-damp": dict(block_size=8, inverse_form="stream", damp="auto"),
    "woodfisher-auto-damp": dict(block_size=8, damp="auto"),
    "woodtaylor": dict(block_size=8, woodtaylor=True, damp=1e-6),
    "beta": dict(block_size=8, beta=1.0),
    "nm-2:4": dict(block_size=8, pattern="2:4", sparsity=0.5),
    "rows": dict(pattern="rows", sparsity=0.4),
    "sampled-fisher": dict(block_size=8, sampled_fisher=True),
    "diag_fisher": dict(method="diag_fisher"),
    "kfac": dict(method="kfac", damp=1e-6),
    "magnitude": dict(method="magnitude"),
    "global_magnitude": dict(method="global_magnitude"),
    "magnitude-2:4": dict(method="magnitude", pattern="2:4", sparsity=0.5),
}
MULTI_STEP = {"woodfisher-3-steps": dict(block_size=8, num_steps=3)}
REFERENCE = {}


def scaled_loss(outputs, target):
    """Cross-entropy / 1000: per-sample gradients ~1e-4, their squares ~1e-8 (below float16's range)."""
    return 1e-3 * F.cross_entropy(outputs, target)


def base_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4))


def loader(dtype):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)
    return [(x[i:i + 16].to(dtype), y[i:i + 16]) for i in range(0, 64, 16)]


def prune(model, data, options):
    args = dict(sparsity=0.6, num_grads=64, loss_fn=scaled_loss, damp=1e-7, progress=False)
    args.update(options)
    return wf.prune_one_shot(model, data, **args)


def kept(result) -> torch.Tensor:
    return torch.cat([m.flatten() for m in result.masks.values()])


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / float(b.sum())


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", list(ONE_STEP) + list(MULTI_STEP))
def test_half_model_pruned_in_float32_written_in_its_dtype(name, dtype):
    options = {**ONE_STEP, **MULTI_STEP}[name]
    original = base_model()
    half = copy.deepcopy(original).to(dtype)
    same = copy.deepcopy(half).float()  # the float32 model with the half model's (rounded) weights
    result = prune(half, loader(dtype), options)

    assert {p.dtype for p in half.parameters()} == {dtype}
    for n, p in half.named_parameters():
        if n in result.masks:
            assert torch.equal(p != 0, result.masks[n]), "pruned entries are exact zeros, kept ones are not"
    if name not in REFERENCE:  # the float32 run of the original model, shared by both dtypes
        REFERENCE[name] = kept(prune(copy.deepcopy(original), loader(torch.float32), options))
    assert overlap(kept(result), REFERENCE[name]) >= 0.95
    if name in MULTI_STEP:  # later steps start from weights rounded to the model's dtype
        return
    exact = prune(same, [(x.float(), y) for x, y in loader(dtype)], options)
    assert all(torch.equal(result.masks[n], exact.masks[n]) for n in result.masks)
    for (n, p), q in zip(half.named_parameters(), same.parameters()):
        assert torch.equal(p, q.to(dtype)), f"{n}: not the float32 result rounded to {dtype}"
    assert result.damp == exact.damp


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_model_float32_data_and_gradual_pruner(dtype):
    """A float32 loader for a half model works (inputs cast), and GradualPruner keeps the dtype."""
    model = base_model().to(dtype)
    pruner = wf.GradualPruner(model, loader(torch.float32), final_sparsity=0.5, start_step=0, end_step=2,
                              frequency=1, num_grads=32, loss_fn=scaled_loss, damp=1e-7, progress=False)
    for step in range(3):
        pruner.step(step)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert {b.dtype for b in model.buffers()} == {dtype}
    assert pruner.history[-1]["sparsity"] == pytest.approx(0.5, abs=0.01)
    masks = {n: b.bool() for n, b in model.named_buffers() if n.endswith("weight_mask")}
    wf.make_permanent(model)
    assert {p.dtype for p in model.parameters()} == {dtype}
    for n, keep in masks.items():
        assert torch.equal(model.get_parameter(n.replace("_mask", "")) != 0, keep)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("method", ["woodfisher", "kfac", "diag_fisher"])
def test_refused_half_model_is_unchanged(method, dtype):
    """A NaN batch on the second step's pass: the first step is undone bit for bit."""
    class SecondPassNaN:
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            data = loader(dtype)
            if self.passes > 1:
                data[0] = (torch.full_like(data[0][0], float("nan")), data[0][1])
            return iter(data)

    model = base_model().to(dtype)
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN or Inf"):
        prune(model, SecondPassNaN(), dict(method=method, num_steps=2, block_size=8))
    assert_unchanged(before, snapshot(model))


@pytest.mark.parametrize("method", ["woodfisher", "kfac", "diag_fisher"])
def test_curvature_of_a_masked_half_model_changes_nothing(method):
    """The float32 pass must not leave float32 copies of the masked weights behind."""
    model = base_model().to(torch.float16)
    wf.attach_masks(model, {"2.weight": torch.rand(16, 24, generator=torch.Generator().manual_seed(0)) > 0.5})
    before = snapshot(model)
    wf.estimate_curvature(model, loader(torch.float16), method=method, num_grads=16, progress=False)
    assert_unchanged(before, snapshot(model))
    assert model[2].weight.dtype == torch.float16
