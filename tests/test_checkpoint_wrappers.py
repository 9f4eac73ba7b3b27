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



def test_a_checkpoint_saved_with_masks_attached_loads_as_the_masked_weights(tmp_path, capsys):
    """A state dict saved while ``torch.nn.utils.prune`` masks are attached (``keep_masks=True``, mid fine-tuning)
    holds ``weight_orig`` / ``weight_mask``: it loads into the bare model as ``weight_orig * weight_mask`` (also
    under a wrapper's prefix), and ``woodfisher report`` counts those zeros."""
    import woodfisher as wf

    torch.manual_seed(0)
    masked = digits_mlp()
    masks = {name: torch.rand_like(p) < 0.4 for name, p in masked.named_parameters() if name.endswith("weight")}
    wf.attach_masks(masked, masks)
    with torch.no_grad():  # fine-tuning moves the hidden originals, pruned entries included
        for name in masks:
            masked.get_parameter(name + "_orig").add_(0.5)
    state = masked.state_dict()
    assert {name + "_orig" for name in masks} | {name + "_mask" for name in masks} <= set(state)
    torch.save({"module." + key: value for key, value in state.items()}, tmp_path / "masked.pt")
    torch.manual_seed(1)
    loaded = load_checkpoint(digits_mlp(), tmp_path / "masked.pt")
    wf.make_permanent(masked)
    assert loaded.state_dict().keys() == masked.state_dict().keys()
    for name, value in masked.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert main(["report", "--model", "digits_mlp", "--checkpoint", str(tmp_path / "masked.pt")]) == 0
    kept = sum(int(keep.sum()) for keep in masks.values())
    assert f"| {kept:,} |" in capsys.readouterr().out.split("| total |")[1]


class _KeepMask(nn.Module):
    """A mask parametrization whose mask is a (persistent) buffer of the state dict."""

    def __init__(self, keep):
        super().__init__()
        self.register_buffer("mask", keep)

    def forward(self, weight):
        return weight * self.mask


def test_parametrized_mask_checkpoints_load_as_the_masked_weights(tmp_path):
    from torch.ao.pruning.sparsifier.utils import FakeSparsity
    from torch.nn.utils import parametrize

    source = _model(0)
    linear = next(m for m in source.modules() if isinstance(m, nn.Linear))
    keep = torch.rand(linear.weight.shape, generator=torch.Generator().manual_seed(1)) >= 0.6
    expected = linear.weight.detach() * keep
    parametrize.register_parametrization(linear, "weight", _KeepMask(keep.float()))
    torch.save(source.state_dict(), tmp_path / "masked.pt")
    loaded = load_checkpoint(_model(5), tmp_path / "masked.pt")
    weight = next(m for m in loaded.modules() if isinstance(m, nn.Linear)).weight
    assert torch.equal(weight.detach(), expected)                   # zeros where the mask is False, exactly
    parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape) + 5)   # nowhere zero: the saved mask is all there is
    parametrize.register_parametrization(linear, "weight", FakeSparsity(keep.float()))
    torch.save(source.state_dict(), tmp_path / "fake_sparsity.pt")
    with pytest.raises(ValueError, match=r"parametrizations\.weight\.original.*no mask for it.*make_permanent"):
        load_checkpoint(_model(5), tmp_path / "fake_sparsity.pt")


def test_another_architecture_names_the_shapes_too(tmp_path):
    torch.save(nn.Sequential(nn.Linear(3, 5)).state_dict(), tmp_path / "other.pt")
    expected = (r"missing keys \['1\.bias', '1\.weight'\], unexpected keys \[\]; "
                r"shapes that differ \(file vs model\): \['0\.weight: \(5, 3\) vs \(5, 5\)'\]")
    with pytest.raises(ValueError, match=expected):
        load_checkpoint(nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 2)), tmp_path / "other.pt")
