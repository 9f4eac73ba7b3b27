"""Running out of memory on a chunk's per-sample gradients (the activations of the samples in flight, which the
memory plan does not count) halves the chunk and retries: the same gradients, one warning, and never the
"vmap cannot run the model" fallback."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import woodfisher as wf
from woodfisher import per_sample
from woodfisher.batches import Batch, loader_errors
from woodfisher.memory import is_out_of_memory
from woodfisher.targets import resolve_targets

CPU_OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 12582912000 bytes. Error code 12 (Cannot allocate memory)")
ERRORS = {"cuda": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB"),
          "cpu": lambda: RuntimeError(CPU_OOM)}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).double()


def _data(n=16, bs=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


def _fits_only(monkeypatch, at_most: int, error, calls: list):
    """vmap runs out of memory on more than ``at_most`` samples (``calls``: the sizes it was given)."""
    real = per_sample.vmap_grads

    def limited(group_loss, sub, flat: Batch):
        calls.append(flat.size)
        if flat.size > at_most:
            raise error()
        return real(group_loss, sub, flat)

    monkeypatch.setattr(per_sample, "vmap_grads", limited)


def _collect(model, **kw):
    targets = resolve_targets(model, None)
    collector = wf.GradientCollector(model, _data(), targets, num_grads=16, progress=False, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads = collector.collect()
    return collector, grads, [str(w.message) for w in caught]


@pytest.mark.parametrize("kind", sorted(ERRORS))
@pytest.mark.parametrize("sampled", [False, True])
def test_out_of_memory_halves_the_chunk_and_gives_the_same_gradients(monkeypatch, kind, sampled):
    model = _model()
    numel = sum(t.numel for t in resolve_targets(model, None))
    # reference: chunks of 4 samples from the start (a memory budget for 4 gradients), nothing runs out
    _, want, quiet = _collect(model, sampled_fisher=sampled, chunk_bytes=4 * numel * 8)
    assert not quiet
    calls = []
    _fits_only(monkeypatch, 4, ERRORS[kind], calls)
    collector, got, messages = _collect(model, sampled_fisher=sampled)
    assert calls == [16, 8, 4, 4, 4, 4]    # halved until it fits; the rest cut at the size that fitted
    assert collector.chunk == 4 and collector.count == 16
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-12)
    oom = [m for m in messages if "ran out of memory" in m]
    assert len(oom) == 1 and "16 samples at a time" in oom[0] and "8 at a time" in oom[0]
    assert not any("vmap cannot run" in m for m in messages)   # not mistaken for an untraceable model


def test_later_chunks_start_at_the_size_that_fitted(monkeypatch):
    model = _model()
    calls = []
    _fits_only(monkeypatch, 8, ERRORS["cuda"], calls)
    targets = resolve_targets(model, None)
    loader = _data(48, 8)
    collector = wf.GradientCollector(model, loader, targets, num_grads=48, progress=False, chunk_bytes=2 ** 30)
    with pytest.warns(UserWarning, match="ran out of memory"):
        collector.collect()
    assert calls == [48, 24, 12] + [6] * 8 and collector.chunk == 6 and collector.count == 48


@pytest.mark.parametrize("kind", sorted(ERRORS))
def test_out_of_memory_on_one_sample_is_raised_as_it_is_and_the_model_is_unchanged(monkeypatch, kind):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    _fits_only(monkeypatch, 0, ERRORS[kind], [])
    with pytest.warns(UserWarning, match="ran out of memory"), pytest.raises(type(ERRORS[kind]())) as info:
        wf.prune_one_shot(model, _data(), sparsity=0.5, num_grads=16, block_size=4, progress=False)
    assert is_out_of_memory(info.value)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    # the note says what is true of one sample: no memory plan option helps (not "pass memory_budget=...")
    notes = getattr(info.value, "__notes__", [])
    assert len(notes) == 2 and "single gradient (1 sample(s)) ran out of memory" in notes[0]
    assert "do not change that" in notes[0] and "memory_budget=<bytes>" not in " ".join(notes)
    assert notes[1] == "woodfisher: out of memory in step 1/1; the model is unchanged (weights restored)"


def test_loader_errors_passes_the_cpu_allocator_failure_through():
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        with loader_errors(Batch((torch.zeros(2, 3),), {}, None), replay=lambda: None):
            raise RuntimeError(CPU_OOM)
    with pytest.raises(ValueError, match="loader"):   # a real failure of the model on the data still is a ValueError
        with loader_errors(Batch((torch.zeros(2, 3),), {}, None)):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")


def test_the_later_steps_of_one_call_start_at_the_size_that_fitted(monkeypatch):
    """A multi-step prune_one_shot learns the size once (the first step), not again in every step; the next call
    starts from the memory budget again."""
    calls = []
    _fits_only(monkeypatch, 4, ERRORS["cuda"], calls)
    model = _model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = wf.prune_one_shot(model, _data(), sparsity=0.6, num_grads=48, num_steps=3, block_size=4,
                                progress=False)
    assert len(res.config["steps"]) == 3
    assert calls == [16, 8] + [4] * 4 + [4] * 4 + [4] * 4   # 16 gradients per step; only the first step halves
    assert sum("ran out of memory" in str(w.message) for w in caught) == 1
    calls.clear()
    with pytest.warns(UserWarning, match="ran out of memory"):
        wf.prune_one_shot(_model(), _data(), sparsity=0.5, num_grads=16, block_size=4, progress=False)
    assert calls[0] == 16   # a new call: the memory budget's size first


def test_a_gradual_pruner_keeps_the_size_that_fitted_across_its_steps(monkeypatch):
    """The size learned at the first pruning step of a GradualPruner (a fake torch.OutOfMemoryError above 4
    samples) is where the second step starts: one halving, one warning, for the pruner's whole schedule."""
    calls = []
    _fits_only(monkeypatch, 4, ERRORS["cuda"], calls)
    model = _model()
    pruner = wf.GradualPruner(model, _data(), final_sparsity=0.6, initial_sparsity=0.3, start_step=0, end_step=1,
                              num_grads=16, block_size=4, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert pruner.step(0) is not None
        first = list(calls)
        assert pruner.step(1) is not None
    assert first == [16, 8] + [4] * 4            # the first step halves twice, then runs at 4
    assert calls[len(first):] == [4] * 4         # the second step starts at 4: no out-of-memory attempt
    assert pruner.fitted_chunks == {1: 4}
    assert sum("ran out of memory" in str(w.message) for w in caught) == 1
    # another pruner (another schedule) starts from the memory budget again
    calls.clear()
    other = wf.GradualPruner(_model(), _data(), final_sparsity=0.5, num_grads=16, block_size=4, progress=False)
    with pytest.warns(UserWarning, match="ran out of memory"):
        other.step(0)
    assert calls[0] == 16


def test_separate_calls_inside_one_fitted_chunks_context_share_the_size(monkeypatch):
    """A caller's own ``with fitted_chunks():`` around several calls (prune_one_shot, estimate_curvature): the
    later calls start at the size the first one learned (each call's own context joins the caller's)."""
    from woodfisher.chunking import fitted_chunks
    calls = []
    _fits_only(monkeypatch, 4, ERRORS["cuda"], calls)
    with fitted_chunks(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wf.prune_one_shot(_model(), _data(), sparsity=0.5, num_grads=16, block_size=4, progress=False)
        wf.estimate_curvature(_model(), _data(), num_grads=16, block_size=4, progress=False)
    assert calls == [16, 8] + [4] * 4 + [4] * 4
    assert sum("ran out of memory" in str(w.message) for w in caught) == 1
