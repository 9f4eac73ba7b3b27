"""The per-sample path ``per_sample_grads="expanded"`` (torch's expanded weights) gives the ``vmap`` path's
gradients, and falls back to ``vmap`` where it does not apply; the option travels from the config to the collector."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import woodfisher as wf
from woodfisher import per_sample
from woodfisher.targets import resolve_targets


class Tied(nn.Module):
    """Embedding-free tied weight: the same Linear weight used twice (its gradient sums both uses)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


def _conv_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, groups=4, padding=2, dilation=2), nn.ReLU(),
                         nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def _attention():
    return nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), nn.Flatten(),
                         nn.Linear(32, 3))


CASES = {
    "mlp": (lambda: nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 4)), (10,), 4),
    "conv_bn_grouped_dilated": (_conv_net, (3, 6, 6), 5),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(24, 3)), (2, 8), 3),
    "tied": (Tied, (6,), 3),
    "attention": (_attention, (4, 8), 3),  # in_proj_weight: no expanded-weights rule, vmap is used
}


def _collect(model, data, method, **kw):
    targets = resolve_targets(model, None)
    collector = wf.GradientCollector(model, data, targets, num_grads=kw.pop("num_grads", 12), progress=False,
                                     per_sample=method, **kw)
    return collector.collect(), collector


@pytest.mark.parametrize("case", list(CASES))
def test_expanded_weights_give_the_vmap_gradients(case):
    make, shape, classes = CASES[case]
    torch.manual_seed(0)
    model = make().double().eval()
    x = torch.randn(12, *shape, dtype=torch.float64)
    y = torch.randint(0, classes, (12,))
    data = [(x[i:i + 5], y[i:i + 5]) for i in range(0, 12, 5)]
    ref, _ = _collect(model, data, "vmap")
    got, collector = _collect(model, data, "expanded", want_loss_grad=True)
    assert ref.keys() == got.keys()
    assert collector._use_expanded == (case != "attention")  # used, except where it has no rule
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12)
    ref_sq = sum(float(g.square().sum()) for g in ref.values())
    assert collector.sum_sq == pytest.approx(ref_sq, rel=1e-10)
    for name in ref:  # WoodTaylor's loss gradient: the mean of the per-sample ones
        torch.testing.assert_close(collector.loss_grad[name], ref[name].mean(0), rtol=1e-10, atol=1e-12)


def test_expanded_weights_are_not_used_for_a_token_level_mean():
    """A loss averaged over a batch's tokens is not a mean of per-sample losses when the samples' token counts
    differ: the collector keeps vmap there (and for a caller's loss_fn), so the numbers stay per sample."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5)).double()
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    y = torch.randint(0, 5, (6, 3))
    y[0, 1:] = -100  # sample 0 has one counted token, the others three

    def loss_fn(out, t):
        return nn.functional.cross_entropy(out.reshape(-1, 5), t.reshape(-1), ignore_index=-100)
    ref, _ = _collect(model, [(x, y)], "vmap", loss_fn=loss_fn, num_grads=6)
    got, _ = _collect(model, [(x, y)], "expanded", loss_fn=loss_fn, num_grads=6)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-12, atol=1e-14)


def test_per_sample_grads_option_reaches_the_collector_and_gives_the_same_prune(monkeypatch):
    """prune_one_shot(per_sample_grads="expanded") uses expanded weights and prunes as vmap does: the same mask,
    the same OBS-updated weights (float64), the same damp."""
    make, shape, classes = CASES["conv_bn_grouped_dilated"]
    torch.manual_seed(2)
    dense = make().double().eval()
    x = torch.randn(16, *shape, dtype=torch.float64)
    y = torch.randint(0, classes, (16,))
    data = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)]
    calls = []
    original = per_sample.expanded_grads
    monkeypatch.setattr(per_sample, "expanded_grads", lambda *a: calls.append(1) or original(*a))
    results = {}
    for path in ("vmap", "expanded"):
        model = wf.clone_model(dense)
        res = wf.prune_one_shot(model, data, sparsity=0.5, num_grads=16, block_size=8, num_steps=1,
                                per_sample_grads=path, progress=False)
        results[path] = (model.state_dict(), res)
        assert bool(calls) == (path == "expanded"), path  # the expanded-weights path ran, and only when asked
    (ref, ref_res), (got, got_res) = results["vmap"], results["expanded"]
    assert got_res.config["per_sample_grads"] == "expanded"
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-12)
        if name.endswith("weight") and ref[name].dim() > 1:
            assert torch.equal(got[name] == 0, ref[name] == 0), name
    assert got_res.damp == pytest.approx(ref_res.damp, rel=1e-9)


@pytest.mark.parametrize("bad", ["jacobian", "", None, 1])
def test_per_sample_grads_outside_its_choices_is_a_value_error(bad):
    with pytest.raises(ValueError, match="per_sample_grads"):
        wf.PruneConfig(sparsity=0.5, per_sample_grads=bad)
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="per_sample"):
        wf.GradientCollector(model, [], resolve_targets(model, None), per_sample=bad)
