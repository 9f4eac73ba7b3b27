"""The default loss (cross-entropy) on data it does not fit: refused with a ValueError naming ``loss_fn``
before anything is written, never a silent magnitude pruning; and a Fisher of all-zero gradients is warned
about at the caller's line."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _snapshots import assert_unchanged, snapshot
from torch import nn

import woodfisher as wf
from woodfisher.losses import check_probabilities, default_loss

OPTS = dict(num_grads=32, num_steps=1, progress=False)


def _data(target_of, n=32, batch=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    return [(x[i:i + batch], target_of(x[i:i + batch])) for i in range(0, n, batch)]


def _model(outputs):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, outputs)).double()


REGRESSIONS = {
    "1d float target, (N,) outputs": (lambda x: x.sum(1), lambda: nn.Sequential(_model(1), nn.Flatten(0))),
    "2d float targets": (lambda x: x[:, :3] * 2.0, lambda: _model(3)),
    "one logit, binary float target": (lambda x: (x[:, :1] > 0).double(), lambda: _model(1)),
    "one logit, class indices": (lambda x: torch.zeros(len(x), dtype=torch.long), lambda: _model(1)),
}


@pytest.mark.parametrize("method", ["woodfisher", "diag_fisher", "kfac"])
@pytest.mark.parametrize("case", list(REGRESSIONS))
def test_default_cross_entropy_refuses_targets_it_does_not_fit(case, method):
    target_of, build = REGRESSIONS[case]
    model, data = build(), _data(target_of)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"loss_fn.*cross-entropy.*mse_loss"):
        wf.prune_one_shot(model, data, sparsity=0.5, method=method, **OPTS)
    assert_unchanged(before, snapshot(model))
    loss = F.binary_cross_entropy_with_logits if "binary" in case else F.mse_loss
    if "indices" not in case:  # the same data with the right loss prunes
        res = wf.prune_one_shot(model, data, sparsity=0.5, method=method, loss_fn=loss, **OPTS)
        assert res.sparsity == pytest.approx(0.5, abs=0.02)


def test_class_probabilities_are_targets_of_the_default_loss():
    """One-hot float targets are the class indices' cross-entropy: the same masks and weights (float64)."""
    labels = lambda x: (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # noqa: E731
    hard, soft = _model(3), _model(3)
    a = wf.prune_one_shot(hard, _data(labels), sparsity=0.6, **OPTS)
    b = wf.prune_one_shot(soft, _data(lambda x: F.one_hot(labels(x), 3).double()), sparsity=0.6, **OPTS)
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    for p, q in zip(hard.parameters(), soft.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    smooth = _data(lambda x: F.one_hot(labels(x), 3).double() * 0.9 + 0.1 / 3)  # label smoothing
    wf.prune_one_shot(_model(3), smooth, sparsity=0.6, **OPTS)


def test_probability_and_shape_rules():
    logits = torch.randn(4, 7, 11, dtype=torch.float64)
    tokens = torch.randint(0, 11, (4, 7))
    check_probabilities(torch.tensor([1, 2]))  # class indices
    check_probabilities(torch.softmax(torch.randn(4, 3, 5), dim=1))  # per-position probabilities, class dim 1
    for bad in (torch.rand(4), torch.rand(4, 3) + 1, torch.tensor([[1.5, -0.5]])):
        with pytest.raises(ValueError, match="loss_fn.*not class probabilities"):
            check_probabilities(bad)
    per_token = torch.softmax(torch.randn(4, 7, 11, dtype=torch.float64), dim=-1)  # (N, T, V) distillation targets
    with pytest.raises(ValueError, match=r"probabilities over the last dim.*classes on dim 1") as err:
        check_probabilities(per_token)
    hint = err.value.args[0].split("loss_fn=", 1)[1]
    loss_fn = eval(hint, {"torch": torch})  # the loss the message shows: class dim last
    ref = -(per_token * torch.log_softmax(logits, -1)).sum(-1).mean()
    torch.testing.assert_close(loss_fn(logits, per_token), ref)
    ref = F.cross_entropy(logits.reshape(-1, 11), tokens.reshape(-1))
    torch.testing.assert_close(default_loss(logits, tokens), ref)  # (N, T, V) with (N, T): class dim last
    with pytest.raises(ValueError, match=r"loss_fn.*\(4, 1\).*fewer than 2 classes"):
        default_loss(torch.randn(4, 1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"loss_fn.*probabilities of the outputs' shape \(4, 3\), got \(4,\)"):
        default_loss(torch.randn(4, 3), torch.rand(4))


def test_all_zero_gradients_warn_at_the_callers_line_and_give_magnitude_pruning():
    data = _data(lambda x: (x[:, 0] > 0).long())
    zero_loss = lambda out, y: out.sum() * 0.0  # noqa: E731 - a loss that ignores the weights
    model, ref = _model(2), _model(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = wf.prune_one_shot(model, data, sparsity=0.5, loss_fn=zero_loss, **OPTS)
    notes = [w for w in caught if "exactly zero" in str(w.message)]
    assert len(notes) == 1 and notes[0].filename == __file__, [(w.filename, str(w.message)) for w in caught]
    assert "loss_fn" in str(notes[0].message)
    mag = wf.prune_one_shot(ref, data, sparsity=0.5, method="global_magnitude", progress=False)
    assert all(torch.equal(res.masks[k], mag.masks[k]) for k in res.masks)


class _AuxHead(nn.Module):
    """Returns (logits, aux): the loss (of the first output) never reaches ``aux``."""

    def __init__(self):
        super().__init__()
        self.body, self.head, self.aux = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.head(h), self.aux(h)


@pytest.mark.parametrize("method", ["woodfisher", "diag_fisher"])
def test_weights_the_loss_never_reaches_are_named_in_a_warning_at_the_callers_line(method):
    torch.manual_seed(0)
    model = _AuxHead().double()
    data = _data(lambda x: (x[:, 0] > 0).long() + (x[:, 1] > 0).long())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        curv = wf.estimate_curvature(model, data, method=method, block_size=8, **OPTS)
    notes = [w for w in caught if "exactly zero gradient" in str(w.message)]
    assert len(notes) == 1 and notes[0].filename == __file__ and "['aux.weight']" in str(notes[0].message)
    assert curv.stats.zero_layers == ("aux.weight",)
    inv = curv.inverses["aux.weight"]  # damp * I alone: its inverse is I / damp (float64)
    eye = torch.eye(inv.shape[-1], dtype=torch.float64).expand_as(inv) / curv.damp
    torch.testing.assert_close(inv.double(), eye, rtol=1e-12, atol=0.0)
    with warnings.catch_warnings(record=True) as caught:  # named out: no warning
        warnings.simplefilter("always")
        wf.estimate_curvature(model, data, method=method, modules=["body", "head"], **OPTS)
    assert not [w for w in caught if "exactly zero" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:  # several steps: one warning for the call
        warnings.simplefilter("always")
        wf.prune_one_shot(model, data, sparsity=0.6, method=method, **{**OPTS, "num_steps": 3})
    notes = [w for w in caught if "exactly zero gradient" in str(w.message)]
    assert len(notes) == 1 and notes[0].filename == __file__


def test_a_weight_the_loss_never_reaches_that_already_holds_zeros_is_collected():
    """vmap returns a broadcast zero gradient for it; masking it in place raised a RuntimeError."""
    torch.manual_seed(0)
    model = _AuxHead().double()
    with torch.no_grad():
        model.aux.weight[0].zero_()
    data = _data(lambda x: (x[:, 0] > 0).long())
    targets = wf.resolve_targets(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grads = wf.GradientCollector(model, data, targets, num_grads=32, progress=False,
                                     keep_masks={t.name: t.keep_mask() for t in targets}).collect()
    assert torch.equal(grads["aux.weight"], torch.zeros(32, 24, dtype=torch.float64))
    assert all(g.is_contiguous() for g in grads.values())
    assert grads["head.weight"].abs().sum() > 0
