"""A half-precision model whose forward casts to a fixed dtype (``x.to(torch.bfloat16)``).

Half models are differentiated in float32 (parameters and inputs upcast). Such a forward then mixes bfloat16
activations with float32 weights and failed, reported as "the model or the loss failed on item 0 of the loader"
though the model runs. Now the gradients are computed in the model's own dtype and upcast, with one warning, for
every path that runs the model: WoodFisher / diagonal Fisher gradients, K-FAC factors, FLOPs counting (beta) and
pruning at initialisation; synflow (a float64 copy by design) is a ValueError naming ``criterion``. A model that
fails in its own dtype too still gets the loader's error, and a float32 model gets no fallback.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from _pruner_shared import per_sample_grads
from torch import nn

import woodfisher as wf
from woodfisher.gradients import GradientCollector
from woodfisher.pai import prune_at_init
from woodfisher.targets import resolve_targets

NOTE = "fails when run in float32"


class FixedCast(nn.Module):
    def __init__(self, dtype=torch.bfloat16, broken=False):
        super().__init__()
        self.dtype_in, self.broken = dtype, broken
        self.net = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4))  # smooth: rounding moves no kink

    def forward(self, x):
        if self.broken:
            raise RuntimeError("broken model")
        return self.net(x.to(self.dtype_in))


def _model(dtype=torch.bfloat16, **kw):
    torch.manual_seed(0)
    return FixedCast(dtype, **kw).to(dtype)


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 10, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(4)]


def test_its_gradients_are_its_own_per_sample_gradients_upcast():
    model = _model()
    targets = resolve_targets(model)
    with pytest.warns(UserWarning, match=NOTE) as caught:
        got = GradientCollector(model, _data(), targets, num_grads=32, progress=False).collect()
    assert [w.filename for w in caught if NOTE in str(w.message)] == [__file__]
    ref = per_sample_grads(model, _data(), [t.name for t in targets], 32)   # plain autograd on the bf16 model
    for t in targets:
        assert got[t.name].dtype == torch.float32
        scale = float(ref[t.name].float().abs().max())
        torch.testing.assert_close(got[t.name], ref[t.name].float(), rtol=0, atol=2 ** -6 * scale)


@pytest.mark.parametrize("options", [dict(), dict(method="diag_fisher"), dict(method="kfac"), dict(beta=1.0),
                                     dict(sampled_fisher=True), dict(woodtaylor=True)])
def test_every_method_prunes_it_with_one_warning(options):
    model = _model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        res = wf.prune_one_shot(model, _data(), sparsity=0.5, num_grads=32, num_steps=1, progress=False, **options)
    assert len([w for w in caught if NOTE in str(w.message)]) == 1
    assert res.sparsity == pytest.approx(0.5, abs=1 / 224)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert float((model.net[0].weight == 0).float().mean()) > 0


def test_pruning_at_init_scores_it_and_synflow_says_why_it_cannot():
    with pytest.warns(UserWarning, match=NOTE):
        res = prune_at_init(_model(), _data(), sparsity=0.5, criterion="snip")
    assert sum(int((~m).sum()) for m in res.masks.values()) == 112
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="^criterion='synflow' runs a float64 copy"):
        prune_at_init(model, _data(), sparsity=0.5, criterion="synflow")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_no_fallback_for_a_broken_model_or_a_float32_model():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="^loader: the model or the loss failed .*broken model"):
            wf.prune_one_shot(_model(broken=True), _data(), sparsity=0.5, num_grads=32, progress=False)
        model = _model(torch.float32)
        model.dtype_in = torch.float64  # a float32 model casting to float64: its own error, no retry
        with pytest.raises(ValueError, match="^loader: the model or the loss failed .*dtype"):
            wf.prune_one_shot(model, _data(), sparsity=0.5, num_grads=32, progress=False)
    assert not [w for w in caught if NOTE in str(w.message)]
