"""``backend=`` other than "auto" is checked against the weights' device and compute dtype before any gradient is
read: it used to be ignored where a step used low-rank blocks (no kernel) and refused only at the first blockwise
inverse otherwise, after the gradient pass."""
from __future__ import annotations

import pytest
import torch
from _snapshots import assert_unchanged, snapshot
from torch import nn

import woodfisher as wf
from woodfisher_kernels import _cpu


class _Counted:
    """A re-iterable loader that counts the items it hands out."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.items = [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]
        self.read = 0

    def __iter__(self):
        for item in self.items:
            self.read += 1
            yield item


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).to(dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("block_size", [8, "auto"], ids=["blockwise", "low-rank"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_a_backend_the_weights_cannot_use_is_refused_before_reading_the_loader(backend, block_size, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model, loader = _model(), _Counted()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"^backend='{backend}' cannot prune weights of torch.float32 on cpu"):
        wf.prune_one_shot(model, loader, sparsity=0.5, num_grads=16, block_size=block_size, backend=backend,
                          progress=False)
    assert loader.read == 0
    assert_unchanged(before, snapshot(model))
    with pytest.raises(ValueError, match=rf"^backend='{backend}'"):
        wf.estimate_curvature(model, loader, num_grads=16, backend=backend, progress=False)
    assert loader.read == 0


def test_the_cpu_kernel_refuses_float64_weights_up_front_and_torch_takes_them():
    loader = _Counted()
    with pytest.raises(ValueError, match=r"^backend='cpu' cannot prune weights of torch.float64.*float32 only"):
        wf.prune_one_shot(_model(torch.float64), loader, sparsity=0.5, num_grads=16, backend="cpu", progress=False)
    assert loader.read == 0
    ref = wf.prune_one_shot(_model(torch.float64), loader, sparsity=0.5, num_grads=16, progress=False)
    res = wf.prune_one_shot(_model(torch.float64), loader, sparsity=0.5, num_grads=16, backend="torch",
                            progress=False)
    assert all(torch.equal(res.masks[name], ref.masks[name]) for name in ref.masks)


def test_magnitude_methods_use_no_kernel_and_accept_any_backend():
    res = wf.prune_one_shot(_model(), None, sparsity=0.5, method="global_magnitude", backend="cuda", progress=False)
    assert res.sparsity == pytest.approx(0.5, abs=1 / 144)


def test_a_dataset_given_as_the_loader_is_refused_with_the_dataloader_to_wrap_it():
    data = torch.utils.data.TensorDataset(torch.randn(16, 6), torch.randint(0, 3, (16,)))
    with pytest.raises(ValueError, match=r"^loader must be an iterable.*got TensorDataset; a Dataset yields single "
                                         r"samples: pass torch\.utils\.data\.DataLoader\(dataset, batch_size=\.\.\.\)"):
        wf.prune_one_shot(_model(), data, sparsity=0.5, num_grads=16, progress=False)
    res = wf.prune_one_shot(_model(), torch.utils.data.DataLoader(data, batch_size=8), sparsity=0.5, num_grads=16,
                            progress=False)
    assert res.sparsity == pytest.approx(0.5, abs=1 / 144)


@pytest.mark.parametrize("convert", ["script", "trace"])
def test_a_torchscript_model_is_refused_saying_to_prune_before_scripting(convert):
    model = _model()
    scripted = torch.jit.script(model) if convert == "script" else torch.jit.trace(model, torch.randn(2, 6))
    for options in (dict(), dict(modules=["0.weight"])):
        with pytest.raises(ValueError, match=r"^model: a TorchScript module .* prune the nn\.Module, then script"):
            wf.prune_one_shot(scripted, _Counted(), sparsity=0.5, num_grads=16, progress=False, **options)


@pytest.mark.skipif(not _cpu.available(), reason="the C kernel is not built here (no C compiler)")
@pytest.mark.parametrize("woodtaylor", [False, True], ids=["defaults", "woodtaylor_one_step"])
def test_cpu_and_torch_backends_give_the_same_masks_and_weights_to_float32_rounding(woodtaylor):
    """The README's claim: identical masks, weights within 1e-5 of the largest weight with the defaults (4e-4
    measured with one-step WoodTaylor, whose Newton step amplifies float32 rounding: 2e-3 asserted)."""
    def conv():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                             nn.Flatten(), nn.Linear(8 * 64, 10))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(8)]
    options = dict(woodtaylor=True, num_steps=1) if woodtaylor else {}
    runs = []
    for backend in ("torch", "cpu"):
        model = conv()
        res = wf.prune_one_shot(model, data, sparsity=0.8, num_grads=128, backend=backend, progress=False, **options)
        runs.append((model, res))
    (ref, ref_res), (got, got_res) = runs
    assert all(torch.equal(got_res.masks[k], ref_res.masks[k]) for k in ref_res.masks)
    tol = 2e-3 if woodtaylor else 1e-5
    for p, q in zip(got.parameters(), ref.parameters()):
        assert float((p - q).abs().max()) <= tol * float(q.abs().max())
