"""Mistakes a user following the README makes: a misspelt option, a frozen weight fed to the
training-loop Fisher, a buffer named as a weight, a schedule outside its domain. Each is a
ValueError naming the argument (and the closest valid name), with the model bitwise unchanged."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from _pruner_shared import tiny_data, tiny_mlp
from _snapshots import assert_unchanged, snapshot
from torch import nn

import woodfisher as wf
from woodfisher.cli import main

OPTS = dict(num_grads=8, progress=False)


@pytest.mark.parametrize("call", [
    lambda model, loader: wf.PruneConfig(sparsity=0.5, num_grad=8),
    lambda model, loader: wf.PruneConfig(sparsity=0.5).replace(num_grad=8),
    lambda model, loader: wf.prune_one_shot(model, loader, sparsity=0.5, num_grad=8, progress=False),
    lambda model, loader: wf.prune_one_shot(model, loader, wf.PruneConfig(sparsity=0.5), num_grad=8),
    lambda model, loader: wf.estimate_curvature(model, loader, num_grad=8),
])
def test_misspelt_option_names_the_closest_field(call):
    model, loader = tiny_mlp(), tiny_data()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"unknown option 'num_grad' \(did you mean 'num_grads'\?\)"):
        call(model, loader)
    assert_unchanged(before, snapshot(model))


def test_prune_config_copies_still_work():
    config = wf.PruneConfig(sparsity=0.5, num_grads=8, num_steps=1)
    assert copy.deepcopy(config) == config and pickle.loads(pickle.dumps(config)) == config
    assert wf.PruneConfig(0.3).sparsity == 0.3  # positional fields pass the name check


def _frozen_first_layer():
    model = tiny_mlp()
    model[0].weight.requires_grad_(False)
    return model


def test_fisher_hook_refuses_a_frozen_weight():
    model = _frozen_first_layer()
    before = snapshot(model)
    frozen = r"^modules: \['0\.weight'\] have requires_grad=False.*modules=\['2\.weight'\]"
    with pytest.raises(ValueError, match=frozen):
        wf.FisherHook(model, num_grads=4, damp=1e-3, block_size=5)
    assert_unchanged(before, snapshot(model))


def test_fisher_hook_on_a_fully_frozen_model_says_to_unfreeze():
    model = tiny_mlp().requires_grad_(False)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^modules: .*none of the tracked weights is trained: set requires_grad=True"):
        wf.FisherHook(model, num_grads=4, damp=1e-3, block_size=5)
    assert_unchanged(before, snapshot(model))


def test_fisher_hook_on_the_trained_weights_of_a_partly_frozen_model():
    """Named as the error suggests, the hook's Fisher of 2.weight is the one of its .grad (not damp * I)."""
    model = _frozen_first_layer()
    hook = wf.FisherHook(model, num_grads=4, damp=1e-3, block_size=None, buffer=2, modules=["2.weight"])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    hook.attach(opt)
    grads = []
    for x, y in tiny_data(n=32, batch=8):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads.append(model[2].weight.grad.reshape(-1).clone())
        opt.step()
    assert hook.ready and list(hook.inverses) == ["2.weight"]
    g = torch.stack(grads)  # (4, 20)
    fisher = 1e-3 * torch.eye(20, dtype=torch.float64) + g.T @ g / 4
    inv = hook.inverses["2.weight"].reshape(20, 20).double()
    torch.testing.assert_close(inv, torch.linalg.inv(fisher), rtol=1e-6, atol=1e-6)


class _BufferNamedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4).double()
        self.scale = nn.Module()
        self.scale.register_buffer("weight", torch.ones(4, dtype=torch.float64))

    def forward(self, x):
        return self.fc(x) * self.scale.weight


def test_buffer_named_like_a_weight():
    model, loader = _BufferNamedWeight(), tiny_data()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^modules: 'scale\.weight' is a buffer, not a Parameter"):
        wf.prune_one_shot(model, loader, sparsity=0.5, modules=["scale.weight"], **OPTS)
    assert_unchanged(before, snapshot(model))
    result = wf.prune_one_shot(model, loader, sparsity=0.5, **OPTS)  # by default the buffer is no target
    assert list(result.masks) == ["fc.weight"] and torch.equal(model.scale.weight, torch.ones(4, dtype=torch.float64))


def test_misspelt_module_name_suggests_the_parameter():
    model, loader = tiny_mlp(), tiny_data()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^modules: no module or parameter named '2\.weigth'.*mean '2\.weight'"):
        wf.prune_one_shot(model, loader, sparsity=0.5, modules=["2.weigth"], **OPTS)
    assert_unchanged(before, snapshot(model))


@pytest.mark.parametrize("options,match", [
    (dict(final_sparsity=1.5), r"^final_sparsity must lie in \[0, 1\), got 1\.5"),
    (dict(final_sparsity=0.9, initial_sparsity=-0.1), r"^initial_sparsity must lie"),
    (dict(final_sparsity=0.9, end_step=3, frequency=2), r"multiple of frequency"),
])
def test_schedule_errors_name_the_argument(options, match):
    schedule = {"start_step": 0, "end_step": 4, "frequency": 1, **options}
    with pytest.raises(ValueError, match=match):
        wf.polynomial_sparsity(2, **schedule)
    model = tiny_mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        wf.GradualPruner(model, tiny_data(), **schedule, **OPTS)
    assert_unchanged(before, snapshot(model))


@pytest.mark.parametrize("command", [
    ["prune", "--model", "digits_mlp", "--checkpoint", "missing.pt", "--sparsity", "0.5"],
    ["pai", "--model", "digits_mlp", "--sparsity", "0.5"],
    ["report", "--model", "digits_mlp", "--checkpoint", "missing.pt"],
])
def test_cli_out_that_cannot_be_a_folder_fails_before_any_work(tmp_path, capsys, command):
    """--out is checked first (before the checkpoint, the data and the pruning or training): exit 2 naming it."""
    taken = tmp_path / "taken"
    taken.write_text("a file")
    assert main(command + ["--out", str(taken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"woodfisher: error: --out {str(taken)!r} is a file") and "missing.pt" not in err
    assert taken.read_text() == "a file"
    assert main(command + ["--out", str(taken / "sub")]) == 2  # below a file: cannot be created
    assert f"--out {str(taken / 'sub')!r}: the folder cannot be created" in capsys.readouterr().err


def test_a_layer_index_that_does_not_exist_gets_no_other_layer_suggested():
    """'9.weight' is not a misspelling of '2.weight' (another layer); 'fc1.wieght' is one of 'fc1.weight'."""
    from woodfisher.names import closest
    assert closest("9.weight", ["0.weight", "2.weight"]) is None
    assert closest("layer4.0.conv1.weight", ["layer1.0.conv1.weight"]) is None
    assert closest("fc1.wieght", ["fc1.weight", "fc2.weight"]) == "fc1.weight"
    assert closest("num_grad", ["num_grads", "num_steps"]) == "num_grads"
