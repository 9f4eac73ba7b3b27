"""Bad input -> ValueError with a clear message, and the model is left unchanged."""
from __future__ import annotations

import pytest
import torch
from _pruner_shared import same_state, state_copy, tiny_data, tiny_mlp
from torch import nn

import woodfisher as wf

BAD = [
    (dict(sparsity=1.0), "sparsity"),
    (dict(sparsity=-0.1), "sparsity"),
    (dict(sparsity="half"), "sparsity"),
    (dict(num_grads=0), "num_grads"),
    (dict(fisher_batch_size=0), "fisher_batch_size"),
    (dict(block_size=0), "block_size"),
    (dict(num_steps=0), "num_steps"),
    # the message lists every accepted form (the CLI spells whole layers 'layer', the API None)
    (dict(block_size="layer"), r"block_size must be an int >= 1 or 'auto' or None \(whole layers\), got 'layer'"),
    (dict(num_steps=0.5), r"num_steps must be an int >= 1 or 'auto', got 0\.5"),
    (dict(method="hessian"), "method"),
    (dict(mode="joint"), "mode"),
    (dict(damp=-1.0), "damp"),
    (dict(damp="big"), "damp"),
    (dict(beta=-0.5), "beta"),
    (dict(backend="opencl"), "backend"),
    (dict(pattern="4:2"), "pattern"),
    (dict(pattern="two-four"), "pattern"),
    (dict(pattern="1:2", sparsity=0.7), "fixes the sparsity"),
    # a block size that an N:M run would cross is the block size's fault, not the layers'
    (dict(pattern="2:4", block_size=6), r"block_size=6 must be a multiple of M=4 for pattern '2:4'"),
    (dict(modules=["fc9"]), "fc9"),
    (dict(modules=["1"]), "ReLU"),
    (dict(method="kfac", woodtaylor=True), "woodtaylor"),
    (dict(memory_budget=100), "memory_budget"),
    (dict(memory_budget=1.5), r"memory_budget must be an int >= 1, got 1\.5"),
    (dict(memory_budget=float("inf")), "memory_budget"),
    (dict(inverse_form="cholesky"), "inverse_form"),
]


def test_memory_budget_in_float_notation_is_bytes():
    """2e9 (and a JSON config's 2e9) is a whole number of bytes: taken as the int."""
    config = wf.PruneConfig(sparsity=0.5, memory_budget=2e9)
    assert config.memory_budget == 2_000_000_000 and isinstance(config.memory_budget, int)


@pytest.mark.parametrize("kwargs,match", BAD, ids=[str(k) for k, _ in BAD])
def test_bad_arguments_raise_and_change_nothing(kwargs, match):
    model = tiny_mlp()
    before = state_copy(model)
    args = dict(sparsity=0.5, num_grads=8, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        wf.prune_one_shot(model, tiny_data(), **args)
    assert same_state(model, before)


def test_no_prunable_module():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="no prunable module"):
        wf.prune_one_shot(model, [(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))], sparsity=0.5)


@pytest.mark.parametrize("method", ["woodfisher", "diag_fisher", "kfac"])
def test_empty_loader(method):
    model = tiny_mlp()
    before = state_copy(model)
    with pytest.raises(ValueError, match="empty"):
        wf.prune_one_shot(model, [], sparsity=0.5, method=method, progress=False)
    assert same_state(model, before)


def test_missing_loader_for_fisher_methods():
    model = tiny_mlp()
    with pytest.raises(ValueError, match="loader"):
        wf.prune_one_shot(model, None, sparsity=0.5)


def test_nan_gradients_name_the_layer_and_change_nothing():
    model = tiny_mlp()
    with torch.no_grad():
        model[2].bias[0] = float("inf")  # finite inputs, non-finite output -> NaN/Inf gradients
    before = state_copy(model)
    with pytest.raises(ValueError, match="layer '0' contain NaN or Inf"):
        wf.prune_one_shot(model, tiny_data(), sparsity=0.5, num_grads=8, progress=False)
    assert same_state(model, before)


def test_failure_in_a_later_step_restores_the_weights():
    """A loader that breaks on its second pass: the first step's pruning is undone."""
    class Flaky:
        def __init__(self):
            self.passes = 0
            self.data = tiny_data()

        def __iter__(self):
            self.passes += 1
            if self.passes > 1:
                return iter([(torch.full((8, 6), float("nan"), dtype=torch.float64),
                              torch.zeros(8, dtype=torch.long))])
            return iter(self.data)

    model = tiny_mlp()
    before = state_copy(model)
    with pytest.raises(ValueError, match="NaN or Inf"):
        wf.prune_one_shot(model, Flaky(), sparsity=0.5, num_steps=2, num_grads=8, progress=False)
    assert same_state(model, before)


def test_bad_loader_items():
    model = tiny_mlp()
    with pytest.raises(ValueError, match="inputs, targets"):
        wf.prune_one_shot(model, [torch.randn(4, 6)], sparsity=0.5, progress=False)


def test_numpy_scalars_are_accepted_as_numbers_and_stored_as_python_numbers():
    """Options computed with numpy (a sweep, a config library) prune exactly as Python numbers do, and the
    reports stay JSON; numpy floats where an int is needed are still refused."""
    import json

    import numpy as np

    opts = dict(sparsity=0.5, num_grads=8, block_size=16, damp=1e-4, num_steps=2, seed=1, progress=False)
    as_numpy = dict(opts, sparsity=np.float32(0.5), num_grads=np.int64(8), block_size=np.int32(16),
                    damp=np.float32(1e-4), num_steps=np.int64(2), seed=np.uint8(1), beta=np.float64(0.0))
    ref, got = tiny_mlp(), tiny_mlp()
    a = wf.prune_one_shot(ref, tiny_data(), **opts)
    b = wf.prune_one_shot(got, tiny_data(), **as_numpy)
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    json.dumps(b.config)
    config = wf.PruneConfig(**{k: v for k, v in as_numpy.items() if k != "progress"})
    assert all(type(getattr(config, k)) is type(opts[k]) for k in ("num_grads", "block_size", "num_steps", "seed"))
    assert type(config.sparsity) is float
    with pytest.raises(ValueError, match=r"num_grads must be an int >= 1, got np.float64\(8.0\)"):
        wf.PruneConfig(sparsity=0.5, num_grads=np.float64(8))
    pruner = wf.GradualPruner(tiny_mlp(), tiny_data(), final_sparsity=0.5, start_step=np.int64(0),
                              end_step=np.int64(2), frequency=np.int64(1), num_grads=8, progress=False)
    assert pruner.step(np.int64(0)) is not None and pruner.last_step == 0 and type(pruner.last_step) is int
