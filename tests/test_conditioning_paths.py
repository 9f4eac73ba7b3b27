"""Every blockwise path gives the in-memory conditioning contract: kappa / refined as in memory, inverses
within the stated float32 bound of a float64 reference, ill-conditioned blocks recomputed in float64
(offloaded, streamed with a second pass, streamed with damp='auto'); a streamed layer whose gradients
cannot be read again is warned about with its Frobenius bound. The sharded path: tests/test_distributed.py."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import woodfisher as wf
import woodfisher_kernels as wk
from woodfisher.conditioning import EPS32, WARN_LEVEL

OPTS = dict(num_grads=64, block_size=16, num_steps=1, progress=False)   # m = 64 >= c = 16: dense blocks
ILL = 1e-2   # damp: inputs x100 give kappa 1e3..1e5 (beyond eps32 kappa > 1e-3; float32 updates still succeed)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))


def _data(scale=100.0, n=64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 20, generator=g) * scale
    y = torch.randint(0, 4, (n,), generator=g)
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


def _reference(grads, damp):
    """float64 inverses (B, c, c) and exact kappa (B,) of F = damp I + G^T G / N from kept gradients."""
    g = grads.double()
    gram = g.transpose(1, 2) @ g / g.shape[1]
    eye = torch.eye(gram.shape[-1], dtype=torch.float64)
    return torch.linalg.inv(gram + damp * eye), torch.linalg.eigvalsh(gram)[:, -1] / damp


def _dense(inv):
    return inv.host_inverse if isinstance(inv, wf.offload.OffloadedInverse) else inv


def _assert_within_bound(curv, memory):
    """Every block within error_bound(kappa) of float64; the blocks beyond the level at float64 accuracy."""
    for name, grads in memory.grads.items():
        ref, kappa = _reference(grads, curv.damp)
        got = _dense(curv.inverses[name]).double()
        err = torch.linalg.matrix_norm(got - ref, ord=2) / torch.linalg.matrix_norm(ref, ord=2)
        assert bool((err <= wk.error_bound(kappa)).all()), (name, err.max())
        beyond = EPS32 * kappa > 1.1 * WARN_LEVEL   # clear of the level (the estimates are within ~10%)
        assert not beyond.any() or float(err[beyond].max()) < 1e-5, (name, err[beyond].max())


def _assert_same_report(curv, memory):
    assert curv.refined == memory.refined and curv.refined
    assert set(curv.kappa) == set(memory.kappa)
    for name, kappa in memory.kappa.items():
        assert curv.kappa[name] == pytest.approx(kappa, rel=1e-5), name


@pytest.fixture(scope="module")
def memory():
    return wf.estimate_curvature(_model(), _data(), damp=ILL, **OPTS)


def test_offloaded_blocks_are_checked_and_recomputed_like_in_memory(memory):
    curv = wf.estimate_curvature(_model(), _data(), damp=ILL, inverse_form="offload", memory_budget=10 ** 7, **OPTS)
    assert set(curv.forms.values()) == {"offload-sequential"}
    _assert_same_report(curv, memory)
    _assert_within_bound(curv, memory)


def test_streamed_blocks_are_recomputed_from_a_second_pass(memory):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        curv = wf.estimate_curvature(_model(), _data(), damp=ILL, inverse_form="stream", **OPTS)
    assert not [w for w in rec if "ill-conditioned" in str(w.message)]
    _assert_same_report(curv, memory)
    _assert_within_bound(curv, memory)


class _Shuffled:
    """A loader that gives its batches in another order on every pass (as DataLoader(shuffle=True))."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        perm = torch.randperm(len(self.batches), generator=torch.Generator().manual_seed(self.passes))
        return iter([self.batches[i] for i in perm.tolist()])


@pytest.mark.parametrize("loader", ["single_pass", "shuffled"])
def test_streamed_blocks_that_cannot_be_read_again_are_warned_with_their_bound(memory, loader):
    # shuffled: another 64 of 128 samples on each pass (the same 64 in another order give the same Fisher)
    data = iter(_data()) if loader == "single_pass" else _Shuffled(_data(n=128))
    with pytest.warns(UserWarning, match=r"ill-conditioned.*'1.weight'.*streamed.*upper bound") as rec:
        curv = wf.estimate_curvature(_model(), data, damp=ILL, inverse_form="stream", **OPTS)
    assert len([w for w in rec if "ill-conditioned" in str(w.message)]) == 1
    assert curv.refined == {} and set(curv.kappa) == {"1.weight", "3.weight"}
    assert all(EPS32 * k > WARN_LEVEL for k in curv.kappa.values())
    if loader == "single_pass":   # the recorded kappa is the Frobenius bound: above the exact kappa
        for name, grads in memory.grads.items():
            assert curv.kappa[name] >= float(_reference(grads, ILL)[1].max()) * (1 - 1e-6)


def test_streamed_well_conditioned_layers_record_the_bound_without_a_second_pass():
    loader = _Shuffled(_data(scale=1e-2))
    curv = wf.estimate_curvature(_model(), loader, damp=1e-1, inverse_form="stream", **OPTS)
    memory = wf.estimate_curvature(_model(), _data(scale=1e-2), damp=1e-1, **OPTS)
    assert loader.passes == 1 and curv.refined == {} == memory.refined
    assert set(curv.kappa) == set(memory.kappa)
    for name, kappa in curv.kappa.items():
        _, exact = _reference(memory.grads[name], 1e-1)
        assert float(exact.max()) * (1 - 1e-6) <= kappa and EPS32 * kappa <= WARN_LEVEL


def _auto_case():
    """damp='auto' too small for the second layer (its Fisher far above the model's mean)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2000, 16), nn.ReLU(), nn.Linear(16, 4))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 2000, generator=g) * 1e-3
    y = torch.randint(0, 4, (64,), generator=g)
    return model, [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]


def test_streamed_auto_damp_blocks_are_float64_and_counted_like_in_memory():
    model, data = _auto_case()
    memory = wf.estimate_curvature(model, data, damp="auto", **OPTS)
    curv = wf.estimate_curvature(model, data, damp="auto", inverse_form="stream", **OPTS)
    assert curv.damp == pytest.approx(memory.damp, rel=1e-9)
    _assert_within_bound(curv, memory)
    assert curv.refined == memory.refined and "2.weight" in curv.refined
    assert set(curv.kappa) == set(memory.kappa)
    for name, kappa in curv.kappa.items():   # the block of the largest bound, exact here, estimated in memory
        grads = memory.grads[name]
        exact = float(_reference(grads, curv.damp)[1][int(grads.square().sum((1, 2)).argmax())])
        assert kappa == pytest.approx(exact, rel=1e-6) and 0.9 * exact <= memory.kappa[name] <= exact * (1 + 1e-6)


def test_a_blocks_kappa_estimate_does_not_depend_on_the_other_blocks():
    gen = torch.Generator().manual_seed(5)
    grads = torch.randn(10, 24, 8, generator=gen) * torch.logspace(-1, 1, 10).reshape(10, 1, 1)
    whole = wk.condition_estimate(grads, 1e-2)
    parts = torch.cat([wk.condition_estimate(grads[i:i + 3], 1e-2) for i in range(0, 10, 3)])
    subset = wk.condition_estimate(grads[[7, 2]], 1e-2)
    assert torch.equal(whole, parts) and torch.equal(subset, whole[[7, 2]])


def test_streamed_layer_beyond_float32_is_rebuilt_from_a_second_pass():
    """At damp 1e-5 (kappa ~1e7) the float32 streaming update is refused: the layer is rebuilt from all its
    gradients as in memory when the loader can be read again, else the refusal is the error (nothing changed)."""
    memory = wf.estimate_curvature(_model(), _data(), damp=1e-5, **OPTS)
    curv = wf.estimate_curvature(_model(), _data(), damp=1e-5, inverse_form="stream", **OPTS)
    _assert_same_report(curv, memory)
    _assert_within_bound(curv, memory)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer '1.weight', damp=1e-05: woodbury_update_.*kappa"):
        wf.prune_one_shot(model, iter(_data()), sparsity=0.5, damp=1e-5, inverse_form="stream", **OPTS)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
