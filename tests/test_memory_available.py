"""memory_budget=None: the memory the device has available is the budget. A step whose kept gradients do
not fit streams them (with a warning saying so); one that cannot fit even streamed is refused before any
gradient is computed (a ValueError naming the options), instead of being killed by the OS mid-run."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import woodfisher as wf
import woodfisher.plan as plan_module
from woodfisher.conditioning import REFINE_BYTES
from woodfisher.gradients import CHUNK_BYTES, MAX_CHUNK_SAMPLES
from woodfisher.memory import available_bytes
from woodfisher.plan import plan_memory, stat_itemsize
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


def _need(model, num_grads, block_size=None, fisher_batch_size=1):
    """Bytes of a kept step by an independent count: m gradients of every pruned entry, plus the larger of the
    collection phase (the collector's chunk of gradients: CHUNK_BYTES of whole groups, at most MAX_CHUNK_SAMPLES
    samples, at least one gradient, at most m) and the inversion phase (per block the cheaper of the dense c x c
    inverse and the low-rank factors (m x c and m x m), plus the float64 chunk of REFINE_BYTES (at least one block,
    at most the layer) of the largest float32 weight whose blocks may be dense: c^2 <= m c + m^2)."""
    block_size = block_size or wf.PruneConfig(sparsity=0.5, num_grads=num_grads).fisher_block_size
    targets = resolve_targets(model, None, block_size)
    m, size = num_grads, stat_itemsize(targets)
    d = sum(t.numel for t in targets)
    dense = sum(t.num_blocks * t.block_size ** 2 for t in targets)
    low = sum(t.num_blocks * (m * t.block_size + m ** 2) for t in targets)
    groups = max(1, min(CHUNK_BYTES // (d * size), MAX_CHUNK_SAMPLES // fisher_batch_size))
    chunk = min(m, groups) * d * size
    per_block = [8 * (m * t.block_size + t.block_size ** 2) for t in targets]
    refine = max([min(t.num_blocks, max(1, REFINE_BYTES // b)) * b for t, b in zip(targets, per_block)
                  if t.block_size ** 2 <= m * t.block_size + m ** 2], default=0) if size == 4 else 0
    return m * d * size + max(chunk, min(dense, low) * size + refine), targets


def test_available_bytes_of_the_cpu_is_positive_and_at_most_the_physical_memory():
    free = available_bytes("cpu")
    if free is None:
        pytest.skip("this platform reports no available memory")
    assert 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert available_bytes("meta") is None


def _stream_need(targets):
    """Bytes of a streamed step (fixed damp) by an independent count: the dense c x c inverses, one gradient and
    the blocked copy of the widest weight's share of it."""
    d = sum(t.numel for t in targets)
    widest = max(t.num_blocks * t.block_size for t in targets)
    return (sum(t.num_blocks * t.block_size ** 2 for t in targets) + d + widest) * stat_itemsize(targets)


# blocks of 8 and 32 gradients: keeping (32 gradients per weight) needs more than streaming (8 + 1 per weight)
SMALL = dict(sparsity=0.5, num_grads=32, block_size=8, num_steps=1, damp=1e-2, progress=False)


def test_a_step_larger_than_the_available_memory_streams_with_a_warning(monkeypatch):
    model, ref = _model(), _model()
    need, targets = _need(model, 32, 8)
    assert plan_memory(targets, 32, stat_itemsize(targets), None) == ("keep", None)  # this host has room
    assert _stream_need(targets) < need - 1
    monkeypatch.setattr(plan_module, "available_bytes", lambda device: need - 1)
    with pytest.warns(UserWarning, match=r"a step of 32 gradients .* more than the .* available on cpu: the "
                                         r"gradients are streamed instead") as caught:
        res = wf.prune_one_shot(model, CountingLoader(), **SMALL)
    assert [w.filename for w in caught] == [__file__]  # once, at the caller's line
    assert res.sparsity == pytest.approx(0.5, abs=1e-3)
    monkeypatch.setattr(plan_module, "available_bytes", lambda device: need)  # exactly enough: kept
    kept = wf.prune_one_shot(ref, CountingLoader(), **SMALL)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):  # the same pruning
        assert torch.equal(a == 0, b == 0), name
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name
    assert kept.sparsity == res.sparsity


def test_a_step_that_cannot_fit_even_streamed_is_refused_before_reading_the_loader(monkeypatch):
    model = _model()
    _, targets = _need(model, 32, 8)
    monkeypatch.setattr(plan_module, "available_bytes", lambda device: _stream_need(targets) - 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = CountingLoader()
    with pytest.raises(ValueError, match=r"a step of 32 gradients .* more than the .* available on cpu, and "
                                         r"streaming needs .*num_grads.*num_steps.*block_size.*memory_budget"):
        wf.prune_one_shot(model, loader, **SMALL)
    assert loader.items == 0 and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_an_explicit_memory_budget_is_the_callers_choice(monkeypatch):
    monkeypatch.setattr(plan_module, "available_bytes", lambda device: 1)
    model = _model()
    need, _ = _need(model, 16)
    res = wf.prune_one_shot(model, CountingLoader(), sparsity=0.5, num_grads=16, num_steps=1, memory_budget=need,
                            progress=False)
    assert res.sparsity == pytest.approx(0.5, abs=1e-3)


def _stack(width, depth):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])


@pytest.mark.parametrize("make,num_grads,block_size,fbs,dominant", [
    (lambda: _stack(32, 5), 32, 8, 1, "chunk"),      # five equal layers: the gradient chunk outweighs one layer's
    (lambda: _stack(32, 10), 64, 8, 8, "chunk"),     # groups of 8 samples: the chunk is capped at 256 / 8 = 32
    (_model, 32, 8, 1, "refine"),                    # one large layer: its float64 refinement chunk dominates
])
def test_the_plan_counts_the_gradient_chunk_and_the_float64_refinement_chunk(make, num_grads, block_size, fbs,
                                                                               dominant):
    model = make()
    need, targets = _need(model, num_grads, block_size, fbs)
    size = stat_itemsize(targets)
    d = sum(t.numel for t in targets)
    dense = sum(t.num_blocks * t.block_size ** 2 for t in targets)
    low = sum(t.num_blocks * (num_grads * t.block_size + num_grads ** 2) for t in targets)
    before = (num_grads * d + min(dense, low)) * size
    assert before < need - 1  # the buffers the plan left out: a budget in between used to keep
    chunk = min(num_grads, max(1, min(CHUNK_BYTES // (d * size), MAX_CHUNK_SAMPLES // fbs))) * d * size
    assert (need == num_grads * d * size + chunk) == (dominant == "chunk")
    assert plan_memory(targets, num_grads, size, need, fisher_batch_size=fbs) == ("keep", None)
    stream = _stream_need(targets)
    below = plan_memory(targets, num_grads, size, need - 1, fisher_batch_size=fbs)
    per_grad = (d + max(t.num_blocks * t.block_size for t in targets)) * size  # a gradient + its blocked copy
    assert stream <= need - 1 and below == ("stream", min(num_grads, 1 + (need - 1 - stream) // per_grad))


def test_just_below_the_need_where_streaming_cannot_fit_either_is_refused_naming_memory_budget():
    model = _stack(32, 5)                     # blocks of 64 > 16 gradients: low-rank kept, dense streamed
    need, targets = _need(model, 16, 64)
    size = stat_itemsize(targets)
    assert _stream_need(targets) > need - 1
    assert plan_memory(targets, 16, size, need) == ("keep", None)
    with pytest.raises(ValueError, match=rf"^memory_budget={need - 1} bytes \(720.0 KiB\) is too small: keeping "
                                         rf"the gradients needs {need} \(720.0 KiB\).* at most 15 gradients "
                                         "per step fit"):
        plan_memory(targets, 16, size, need - 1)
