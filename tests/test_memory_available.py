"""memory_budget=None: a step that cannot fit in the memory the device has available is refused before any
gradient is computed (a ValueError naming the options), instead of being killed by the OS mid-run."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import woodfisher as wf
import woodfisher.curvature as curvature_module
from woodfisher.curvature import plan_memory, stat_itemsize
from woodfisher.memory import available_bytes
from woodfisher.targets import resolve_targets


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))


class CountingLoader:
    def __init__(self):
        self.items = 0

    def __iter__(self):
        torch.manual_seed(1)
        for _ in range(8):
            self.items += 1
            yield torch.randn(8, 64), torch.randint(0, 10, (8,))


def _need(model, num_grads):
    """Bytes of a kept step by an independent count: m gradients of every pruned entry, plus per block the cheaper
    of the dense c x c inverse and the low-rank factors (m x c and m x m)."""
    targets = resolve_targets(model, None, wf.PruneConfig(sparsity=0.5, num_grads=num_grads).fisher_block_size)
    d = sum(t.numel for t in targets)
    dense = sum(t.num_blocks * t.block_size ** 2 for t in targets)
    low = sum(t.num_blocks * (num_grads * t.block_size + num_grads ** 2) for t in targets)
    return (num_grads * d + min(dense, low)) * stat_itemsize(targets), targets


def test_available_bytes_of_the_cpu_is_positive_and_at_most_the_physical_memory():
    free = available_bytes("cpu")
    if free is None:
        pytest.skip("this platform reports no available memory")
    assert 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert available_bytes("meta") is None


def test_a_step_larger_than_the_available_memory_is_refused_before_reading_the_loader(monkeypatch):
    model = _model()
    need, targets = _need(model, 16)
    assert plan_memory(targets, 16, stat_itemsize(targets), None) == ("keep", None)  # this host has room
    monkeypatch.setattr(curvature_module, "available_bytes", lambda device: need - 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = CountingLoader()
    with pytest.raises(ValueError, match=r"a step of 16 gradients .* more than the .* available on cpu: .*num_grads"
                                         r".*num_steps.*block_size.*memory_budget"):
        wf.prune_one_shot(model, loader, sparsity=0.5, num_grads=16, num_steps=1, progress=False)
    assert loader.items == 0 and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    monkeypatch.setattr(curvature_module, "available_bytes", lambda device: need)  # exactly enough: runs
    assert wf.prune_one_shot(model, CountingLoader(), sparsity=0.5, num_grads=16, num_steps=1,
                             progress=False).sparsity == pytest.approx(0.5, abs=1e-3)


def test_an_explicit_memory_budget_is_the_callers_choice(monkeypatch):
    monkeypatch.setattr(curvature_module, "available_bytes", lambda device: 1)
    model = _model()
    need, _ = _need(model, 16)
    res = wf.prune_one_shot(model, CountingLoader(), sparsity=0.5, num_grads=16, num_steps=1, memory_budget=need,
                            progress=False)
    assert res.sparsity == pytest.approx(0.5, abs=1e-3)
