"""``sparsity=0`` prunes nothing: no gradient pass, the model bit for bit as it was, one warning saying so.

The loader raises if it is iterated, so a test passes only if no gradient (nor FLOPs measurement) was taken.
WoodTaylor is the exception: its update also takes the Newton step ``-F^-1 g`` (WoodFisher paper, Eqs. 21-23),
which moves the weights when nothing is pruned, so it keeps its gradient pass.
"""
from __future__ import annotations

import json
import textwrap
import warnings

import pytest
import torch
from _snapshots import assert_unchanged, snapshot
from torch import nn
from torch.nn.utils import prune as torch_prune

import woodfisher as wf
from woodfisher.cli import main

NOTE = "sparsity=0 prunes nothing"


class MustNotIterate:
    """A loader that fails the test if anything reads it."""

    def __iter__(self):
        raise AssertionError("the loader was read at sparsity=0")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))


def _data(n=32):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 2, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, n, 8)]


@pytest.mark.parametrize("options", [
    dict(), dict(method="diag_fisher"), dict(method="kfac"), dict(method="global_magnitude"),
    dict(pattern="rows"), dict(mode="layerwise", num_steps=4), dict(beta=1.0),
    dict(woodtaylor=True, obs_update=False),   # without the OBS update WoodTaylor only scores: nothing moves
])
def test_sparsity_zero_reads_no_data_and_changes_nothing(options):
    model = _model().train()
    before = snapshot(model)
    with pytest.warns(UserWarning, match=NOTE) as caught:
        res = wf.prune_one_shot(model, MustNotIterate(), sparsity=0.0, num_grads=16, progress=False, **options)
    assert [w.filename for w in caught if NOTE in str(w.message)] == [__file__]  # once, at the caller's line
    assert_unchanged(before, snapshot(model))
    assert res.sparsity == 0.0 and res.damp is None and res.config["steps"] == []
    assert res.timings["gradients"] == 0.0 and res.timings["inverse"] == 0.0
    weights = {"0.weight": model[0].weight, "4.weight": model[4].weight}
    assert set(res.masks) == set(weights)
    assert all(bool(res.masks[n].all()) for n in weights)


def test_sparsity_zero_keeps_the_zeros_already_there_and_attaches_masks_on_request():
    model = _model()
    wf.prune_one_shot(model, None, sparsity=0.5, method="global_magnitude", progress=False)
    keep = {"0.weight": model[0].weight != 0, "4.weight": model[4].weight != 0}
    zeros = sum(int((~k).sum()) for k in keep.values()) / sum(k.numel() for k in keep.values())
    before = snapshot(model)
    with pytest.warns(UserWarning, match=NOTE):
        res = wf.prune_one_shot(model, MustNotIterate(), sparsity=0.0, progress=False)
    assert_unchanged(before, snapshot(model))
    assert res.sparsity == pytest.approx(zeros) and all(torch.equal(res.masks[n], k) for n, k in keep.items())
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.warns(UserWarning, match=NOTE):
        wf.prune_one_shot(model, MustNotIterate(), sparsity=0.0, keep_masks=True, progress=False)
    assert torch_prune.is_pruned(model)
    assert torch.equal(model[0].weight_mask.bool(), keep["0.weight"]) and torch.equal(model[0].weight,
                                                                                     weights["0.weight"])


def test_sparsity_zero_still_refuses_bad_input_before_anything():
    model = _model()
    with pytest.raises(ValueError, match="loader is required"):
        wf.prune_one_shot(model, None, sparsity=0.0, progress=False)
    with torch.no_grad():
        model[4].weight[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match="4.weight"):
        wf.prune_one_shot(model, MustNotIterate(), sparsity=0.0, progress=False)
    assert_unchanged(before, snapshot(model))


def test_woodtaylor_still_takes_its_newton_step_at_sparsity_zero():
    """WoodTaylor's update at sparsity 0 is w - F^-1 g: checked against an independent float64 solve on the
    same gradients (one block per weight, damp fixed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3)).double()
    data = [(x.double().flatten(1)[:, :5], y) for x, y in _data()]
    w0 = model[0].weight.detach().clone()
    damp, m = 1e-1, 32
    grads = []
    for x, y in data:
        for i in range(x.shape[0]):
            loss = nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
            grads.append(torch.autograd.grad(loss, model[0].weight)[0].flatten())
    g = torch.stack(grads)
    fisher = damp * torch.eye(g.shape[1], dtype=torch.float64) + g.T @ g / m
    expected = w0.flatten() - torch.linalg.solve(fisher, g.mean(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = wf.prune_one_shot(model, data, sparsity=0.0, woodtaylor=True, num_grads=m, block_size=None,
                                damp=damp, num_steps=1, progress=False)
    assert not [w for w in caught if NOTE in str(w.message)]  # it does something: no "prunes nothing" note
    assert res.damp == damp and res.timings["gradients"] > 0
    assert torch.allclose(model[0].weight.detach().flatten(), expected, rtol=1e-8, atol=1e-10)
    assert not torch.equal(model[0].weight.detach(), w0)


def test_cli_prune_at_sparsity_zero_writes_the_checkpoint_unchanged(tmp_path, monkeypatch, capsys):
    (tmp_path / "zero_models.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn


        def build():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


        class _Fails:
            def __iter__(self):
                raise RuntimeError("the loader was read")


        def loader():
            return _Fails()
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from zero_models import build

    ckpt = tmp_path / "w.pt"
    torch.save(build().state_dict(), ckpt)
    out = tmp_path / "run"
    assert main(["prune", "--model", "zero_models.py:build", "--checkpoint", str(ckpt), "--data",
                 "zero_models.py:loader", "--sparsity", "0", "--no-progress", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "note: --sparsity 0 prunes nothing" in captured.err and "0 step(s)" in captured.out
    saved = torch.load(out / "pruned.pt", weights_only=True)
    for name, value in torch.load(ckpt, weights_only=True).items():
        assert torch.equal(saved[name], value), name
    assert json.loads((out / "report.json").read_text())["sparsity"] == 0.0
