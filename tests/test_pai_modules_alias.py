"""``woodfisher.pai.prune_at_init(modules=...)``: the name every other pruning call and the CLI use for the weights
to prune (it was a TypeError: the function called it ``params`` only)."""
import pytest
import torch
from torch import nn

from woodfisher.pai import prune_at_init


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6, 8), nn.ReLU(), nn.Linear(8, 3))


def _loader():
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 4, 8, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(2)]


def test_modules_is_params():
    by_params, by_modules = _net(), _net()
    a = prune_at_init(by_params, _loader(), sparsity=0.6, criterion="snip", params=["0", "3"], progress=False)
    b = prune_at_init(by_modules, _loader(), sparsity=0.6, criterion="snip", modules=["0", "3"], progress=False)
    assert sorted(b.masks) == ["0.weight", "3.weight"] == sorted(a.masks)
    for name in a.masks:
        assert torch.equal(a.masks[name], b.masks[name])
    assert torch.equal(by_modules[5].weight, _net()[5].weight)  # not named: untouched


def test_both_names_are_refused_before_anything_changes():
    model = _net()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="params and modules name the same thing"):
        prune_at_init(model, _loader(), sparsity=0.6, criterion="snip", params=["0"], modules=["3"], progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
