"""Checkpoints saved from wrapped models (DataParallel, torch.compile) or as whole pickled modules load
into the bare model with every tensor equal to the saved one."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from woodfisher.checkpoint import load_checkpoint, read_state_dict
from woodfisher.cli import main
from woodfisher.models import digits_mlp

SIZES = (8, 4)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return digits_mlp(SIZES)


def _saved_forms(model):
    """(name, object to torch.save, needs trust_pickle) for every way a user saves ``model``."""
    compiled = torch.compile(model)
    return [
        ("data_parallel", nn.DataParallel(model).state_dict(), False),
        ("compiled", compiled.state_dict(), False),
        ("parallel_compiled", nn.DataParallel(compiled).state_dict(), False),
        ("compiled_parallel", torch.compile(nn.DataParallel(model)).state_dict(), False),
        ("training_dict", {"epoch": 3, "state_dict": compiled.state_dict()}, False),
        ("whole_module", model, True),
        ("whole_compiled", compiled, True),
        ("module_in_dict", {"model": nn.DataParallel(model), "epoch": 1}, True),
    ]


@pytest.mark.parametrize("index", range(8))
def test_wrapped_or_pickled_checkpoints_load_exactly(tmp_path, index):
    source = _model(0)
    name, obj, pickled = _saved_forms(source)[index]
    path = tmp_path / f"{name}.pt"
    torch.save(obj, path)
    target = _model(1)
    assert any(not torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    if pickled:
        with pytest.raises(ValueError, match="cannot be loaded safely"):
            load_checkpoint(target, path)
        assert all(not torch.equal(a, b) for a, b in zip(source.parameters(), target.parameters()))
    load_checkpoint(target, path, trust_pickle=pickled)
    expected = source.state_dict()
    assert set(target.state_dict()) == set(expected)
    for key, value in target.state_dict().items():
        assert torch.equal(value, expected[key]), (name, key)


def test_a_model_whose_own_keys_start_with_a_wrapper_name_is_read_as_saved(tmp_path):
    """Only a prefix shared by every key is a wrapper's: a model with other keys keeps its names."""
    model = nn.ModuleDict({"module": nn.Linear(3, 2), "head": nn.Linear(2, 1)})
    torch.save(model.state_dict(), tmp_path / "m.pt")
    assert set(read_state_dict(tmp_path / "m.pt")) == set(model.state_dict())


def test_cli_report_reads_a_compiled_models_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    torch.save(torch.compile(digits_mlp()).state_dict(), tmp_path / "c.pt")
    assert main(["report", "--model", "digits_mlp", "--checkpoint", str(tmp_path / "c.pt"),
                 "--out", str(tmp_path / "o")]) == 0
    assert "| total |" in capsys.readouterr().out
