"""``exclude=``: weights taken out of the targets (the default ones, or those ``modules=`` picks), read as
``modules=`` reads its entries (exact names, module names meaning every target they hold, shell-style patterns, tied
aliases, wrapper prefixes); every entry must remove a target and one must be left (ValueErrors naming ``exclude``,
nothing modified); the excluded weights are left bit for bit while the others reach the sparsity; the same option
in GradualPruner, estimate_curvature, prune_at_init, FisherHook and the CLI (flag and config file)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from _pruner_shared import same_state, state_copy
from torch import nn

import woodfisher as wf
from woodfisher.checkpoint import save_state_dict
from woodfisher.cli import main
from woodfisher.models import digits_mlp

ALL = ["conv1.weight", "block.0.weight", "block.2.weight", "head.fc1.weight", "head.fc2.weight"]


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class _Net(nn.Module):
    """conv1 -> block (conv, ReLU, 1x1 conv) -> head (fc1, fc2), float64; input (2, 4, 4)."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
        self.head = _Head()
        self.double()

    def forward(self, x):
        return self.head(self.block(torch.relu(self.conv1(x))).flatten(1))


def _data(n: int = 32, batch: int = 8):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def _names(model, **kwargs):
    return [t.name for t in wf.resolve_targets(model, **kwargs)]


def _zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


@pytest.mark.parametrize("exclude, left", [
    (["head.fc2"], ALL[:4]),                               # a Linear by its module name
    (["head.fc2.weight"], ALL[:4]),                        # ... or its weight's
    ("head.fc2", ALL[:4]),                                 # one name, not a list
    (["*.fc*"], ALL[:3]),                                  # a pattern over full names
    (["block"], [ALL[0], ALL[3], ALL[4]]),                 # a module: every weight it holds
    (["conv1", "head.fc2"], ALL[1:4]),
])
def test_exclude_takes_weights_out_of_the_default_targets(exclude, left):
    model = _Net()
    assert _names(model) == ALL
    assert _names(model, exclude=exclude) == left
    config = wf.PruneConfig(sparsity=0.5, exclude=exclude)
    assert config.exclude == ((exclude,) if isinstance(exclude, str) else tuple(exclude))


def test_exclude_with_modules_and_through_a_wrapper():
    model = _Net()
    assert _names(model, modules=["block", "head"], exclude=["head.fc2"]) == ALL[1:4]
    assert _names(model, modules=["*.fc*", "conv1"], exclude=["head"]) == ALL[:1]
    wrapped = nn.DataParallel(model)
    for exclude in (["module.head.fc2"], ["head.fc2"], ["module.*.fc2"]):
        assert _names(wrapped, exclude=exclude) == ["module." + n for n in ALL[:4]]


def test_a_tied_weight_is_excluded_by_any_of_its_names():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    model = Tied()
    assert _names(model) == ["a.weight", "c.weight"]
    assert _names(model, exclude=["b.weight"]) == _names(model, exclude=["b"]) == ["c.weight"]


@pytest.mark.parametrize("mode", ["global", "layerwise"])
def test_excluded_weights_are_untouched_and_the_others_reach_the_sparsity(mode):
    model, data = _Net(), _data()
    before = state_copy(model)
    result = wf.prune_one_shot(model, data, sparsity=0.6, mode=mode, exclude=["conv1", "*.fc2"], num_grads=16,
                               num_steps=1, block_size=None, progress=False)
    pruned = ALL[1:4]
    assert list(result.masks) == pruned and result.config["exclude"] == ["conv1", "*.fc2"]
    state = model.state_dict()
    for name in ("conv1.weight", "head.fc2.weight"):
        assert torch.equal(state[name], before[name])
    sizes = {n: state[n].numel() for n in pruned}
    if mode == "layerwise":
        for n in pruned:
            assert _zeros(state[n]) == round(0.6 * sizes[n])
    else:
        assert sum(_zeros(state[n]) for n in pruned) == round(0.6 * sum(sizes.values()))
    assert result.sparsity == pytest.approx(sum(_zeros(state[n]) for n in pruned) / sum(sizes.values()))
    # the OBS update moved kept weights of the pruned layers
    assert any(not torch.equal(state[n][result.masks[n]], before[n][result.masks[n]]) for n in pruned)


def test_exclude_gives_the_same_run_as_naming_the_rest_in_modules():
    data = _data()
    a, b = _Net(), _Net()
    options = dict(sparsity=0.5, num_grads=16, num_steps=2, progress=False)
    ra = wf.prune_one_shot(a, data, exclude=["head.fc2"], **options)
    rb = wf.prune_one_shot(b, data, modules=ALL[:4], **options)
    assert list(ra.masks) == list(rb.masks)
    assert all(torch.equal(ra.masks[n], rb.masks[n]) for n in ra.masks)
    assert same_state(a, b.state_dict())


@pytest.mark.parametrize("kwargs, match", [
    (dict(exclude=["fc3"]), "exclude: no module or parameter named 'fc3'"),
    (dict(exclude=["*.nothing*"]), r"exclude: '\*.nothing\*' matches none of the weights to prune"),
    (dict(modules=["block"], exclude=["head.fc1"]), "exclude: 'head.fc1' matches none of the weights to prune"),
    (dict(exclude=["block.1"]), "exclude: 'block.1' matches none"),  # a ReLU: holds no target
    (dict(exclude=["conv1", "block", "head"]), "leaves no weight to prune"),
    (dict(modules=["head.fc1"], exclude=["*fc1*"]), "leaves no weight to prune"),
])
def test_bad_exclude_entries_are_refused_before_anything_changes(kwargs, match):
    model = _Net()
    before = state_copy(model)
    with pytest.raises(ValueError, match=match) as err:
        wf.prune_one_shot(model, _data(), sparsity=0.5, num_grads=8, progress=False, **kwargs)
    assert "exclude" in str(err.value)
    assert same_state(model, before)


@pytest.mark.parametrize("exclude, match", [
    ([3], "exclude must be None or a non-empty list of names"),
    ([], "exclude must be None or a non-empty list of names"),
    (nn.Linear(2, 2), "module objects"),
])
def test_bad_exclude_values_are_refused_by_the_config(exclude, match):
    with pytest.raises(ValueError, match=match):
        wf.PruneConfig(sparsity=0.5, exclude=exclude)


def test_gradual_pruner_and_curvature_take_exclude():
    data = _data()
    model = _Net()
    before = state_copy(model)
    pruner = wf.GradualPruner(model, data, final_sparsity=0.5, start_step=0, end_step=1, frequency=1,
                              exclude=["conv1"], num_grads=8, progress=False)
    pruner.step(0)
    pruner.step(1)
    assert list(pruner.masks()) == ALL[1:]
    wf.make_permanent(model)
    assert torch.equal(model.conv1.weight, before["conv1.weight"])
    other = _Net()
    curvature = wf.estimate_curvature(other, data, exclude=["head"], num_grads=8, progress=False)
    assert list(curvature.layouts) == ALL[:3]
    result = wf.prune_with(other, curvature, 0.5)
    assert list(result.masks) == ALL[:3]
    with pytest.raises(ValueError, match="exclude"):
        wf.prune_with(_Net(), curvature, 0.5, exclude=["conv1"])


def test_prune_at_init_and_fisher_hook_take_exclude():
    from woodfisher.pai import prune_at_init
    model = _Net()
    before = state_copy(model)
    result = prune_at_init(model, _data(), sparsity=0.5, criterion="magnitude", exclude=["*.fc*"], progress=False)
    assert list(result.masks) == ALL[:3]
    assert torch.equal(model.head.fc1.weight, before["head.fc1.weight"])
    with pytest.raises(ValueError, match="exclude: no module or parameter named 'nope'"):
        prune_at_init(_Net(), _data(), sparsity=0.5, criterion="magnitude", exclude=["nope"], progress=False)
    hook = wf.FisherHook(_Net(), num_grads=4, damp=1e-3, exclude=["block"])
    assert list(hook.inverses) == [ALL[0], ALL[3], ALL[4]]


@pytest.fixture(scope="module")
def mlp_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return str(save_state_dict(digits_mlp(), tmp_path_factory.mktemp("ckpt") / "digits.pt"))


def test_the_cli_flag_and_config_key(mlp_ckpt, tmp_path):
    dense = torch.load(mlp_ckpt, weights_only=True)
    common = ["prune", "--model", "digits_mlp", "--checkpoint", mlp_ckpt, "--num-grads", "16", "--sparsity", "0.5",
              "--mode", "layerwise", "--no-progress"]
    out = tmp_path / "flag"
    assert main([*common, "--exclude", "layers.2", "layers.0.weight", "--out", str(out)]) == 0
    masks = torch.load(out / "masks.pt", weights_only=True)
    state = torch.load(out / "pruned.pt", weights_only=True)
    assert list(masks) == ["layers.1.weight"]
    assert _zeros(state["layers.1.weight"]) == round(0.5 * state["layers.1.weight"].numel())
    for name in ("layers.0.weight", "layers.2.weight"):
        assert torch.equal(state[name], dense[name])
    assert json.loads((out / "report.json").read_text())["config"]["exclude"] == ["layers.2", "layers.0.weight"]
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"exclude": ["layers.*[12]"]}))
    out = tmp_path / "config"
    assert main([*common, "--config", str(cfg), "--out", str(out)]) == 0
    assert list(torch.load(out / "masks.pt", weights_only=True)) == ["layers.0.weight"]
    assert main([*common, "--exclude", "nope", "--out", str(tmp_path / "bad")]) == 2


@pytest.mark.parametrize("exclude, pruned, dense", [(["conv1"], ALL[1:], 0), (["head.fc2"], ALL[1:4], 1)])
def test_exclude_with_an_nm_pattern_on_the_default_targets(exclude, pruned, dense):
    # conv1 has 2 input channels: 2:4 leaves it dense by default, with one warning, unless it is excluded
    model = _Net()
    before = state_copy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = wf.prune_one_shot(model, _data(), pattern="2:4", exclude=exclude, num_grads=8, progress=False)
    assert sum("left dense" in str(w.message) for w in caught) == dense
    assert list(result.masks) == pruned
    for name in set(ALL) - set(pruned):
        assert torch.equal(model.state_dict()[name], before[name])


def test_the_pai_command_takes_exclude(tmp_path):
    out = tmp_path / "pai"
    assert main(["pai", "--model", "digits_mlp", "--sparsity", "0.5", "--criterion", "magnitude", "--score-samples",
                 "32", "--exclude", "layers.2", "--no-progress", "--out", str(out)]) == 0
    assert list(torch.load(out / "masks.pt", weights_only=True)) == ["layers.0.weight", "layers.1.weight"]
