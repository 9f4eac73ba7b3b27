"""The command line on a user's own model and files: the FLOPs columns from --input-shape, and after a
failed run nothing written (not even an empty --out folder) with a one-line ``woodfisher: error: ...``
(exit 2) naming the argument."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from woodfisher.checkpoint import save_state_dict
from woodfisher.cli import main
from woodfisher.models import digits_mlp


@pytest.fixture()
def files(tmp_path):
    torch.manual_seed(0)
    save_state_dict(digits_mlp(), tmp_path / "dense.pt")
    save_state_dict(nn.Sequential(nn.Linear(5, 5)), tmp_path / "other.pt")   # another architecture
    return tmp_path


@pytest.mark.parametrize("command", [
    ["prune", "--model", "digits_mlp", "--sparsity", "0.5", "--no-progress"],
    ["report", "--model", "digits_mlp"],
])
@pytest.mark.parametrize("checkpoint", ["missing.pt", "other.pt"])
def test_failed_run_leaves_no_out_folder(files, capsys, command, checkpoint):
    out = files / "results" / "run1"
    assert main(command + ["--checkpoint", str(files / checkpoint), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("woodfisher: error: ") and checkpoint in err
    assert not (files / "results").exists()


def test_prune_creates_the_out_folder_when_it_writes(files, capsys):
    out = files / "results" / "run1"
    assert main(["prune", "--model", "digits_mlp", "--checkpoint", str(files / "dense.pt"), "--sparsity", "0.5",
                 "--num-grads", "8", "--num-steps", "1", "--eval-samples", "16", "--no-progress",
                 "--out", str(out)]) == 0
    pruned = torch.load(out / "pruned.pt", weights_only=True)
    weights = [value for key, value in pruned.items() if key.endswith("weight")]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros / sum(w.numel() for w in weights) == pytest.approx(0.5, abs=1e-3)


def test_export_to_a_folder_or_with_a_wrong_input_shape_is_an_error(files, capsys):
    common = ["export", "--model", "woodfisher.models:digits_mlp", "--checkpoint", str(files / "dense.pt"),
              "--format", "dense"]
    before = sorted(p.name for p in files.iterdir())
    assert main(common + ["--out", str(files), "--input-shape", "64"]) == 2
    assert f"--out {str(files)!r} is a folder" in capsys.readouterr().err
    assert main(common + ["--out", str(files / "x.pt"), "--input-shape", "3", "8", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("woodfisher: error: --input-shape 3 8 8: the model cannot run a batch of shape (2, 3, 8, 8)")
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in files.iterdir()) == before


def _hand_flops(state, shape):
    """Dense and sparse FLOPs of a stack of Linear layers on one sample (one multiply-accumulate = 1 FLOP):
    every weight entry is used once per sample."""
    weights = [value for key, value in state.items() if key.endswith("weight")]
    assert weights[0].shape[1] == shape[-1]
    return sum(w.numel() for w in weights), sum(int((w != 0).sum()) for w in weights)


def test_own_model_gets_flops_columns_from_input_shape(files, capsys):
    import json

    out = files / "run"
    factory = ["--model", "woodfisher.models:digits_mlp", "--input-shape", "64"]
    assert main(["prune", *factory, "--checkpoint", str(files / "dense.pt"), "--data", "digits", "--sparsity", "0.7",
                 "--num-grads", "8", "--num-steps", "1", "--eval-samples", "16", "--no-progress",
                 "--out", str(out)]) == 0
    dense, sparse = _hand_flops(torch.load(out / "pruned.pt", weights_only=True), (64,))
    totals = json.loads((out / "report.json").read_text())["totals"]
    assert (totals["flops_dense"], totals["flops_sparse"]) == (dense, sparse)
    assert "| FLOPs dense | FLOPs sparse |" in (out / "sparsity.md").read_text()
    capsys.readouterr()
    assert main(["report", *factory, "--checkpoint", str(out / "pruned.pt"), "--out", str(files / "rep")]) == 0
    totals = json.loads((files / "rep" / "report.json").read_text())["totals"]
    assert (totals["flops_dense"], totals["flops_sparse"]) == (dense, sparse)
    capsys.readouterr()
    assert main(["report", "--model", "woodfisher.models:digits_mlp", "--checkpoint", str(out / "pruned.pt")]) == 0
    assert "note: no FLOPs columns in the sparsity table: pass --input-shape" in capsys.readouterr().err


def test_own_model_on_a_builtin_dataset_gets_flops_columns_from_the_dataset(files, capsys):
    import json

    out = files / "run_digits"
    assert main(["prune", "--model", "woodfisher.models:digits_mlp", "--checkpoint", str(files / "dense.pt"),
                 "--data", "digits", "--sparsity", "0.7", "--num-grads", "8", "--num-steps", "1", "--eval-samples",
                 "16", "--no-progress", "--out", str(out)]) == 0  # no --input-shape: digits samples are (64,)
    assert "no FLOPs columns" not in capsys.readouterr().err
    dense, sparse = _hand_flops(torch.load(out / "pruned.pt", weights_only=True), (64,))
    totals = json.loads((out / "report.json").read_text())["totals"]
    assert (totals["flops_dense"], totals["flops_sparse"]) == (dense, sparse)


@pytest.mark.parametrize("command", [
    ["prune", "--sparsity", "0.5", "--data", "digits", "--no-progress"],
    ["report"],
])
def test_input_shape_the_model_cannot_run_fails_before_any_work(files, capsys, command):
    out = files / "never"
    args = [command[0], "--model", "woodfisher.models:digits_mlp", "--checkpoint", str(files / "dense.pt"),
            "--input-shape", "3", "8", "8", "--out", str(out), *command[1:]]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("woodfisher: error: --input-shape 3 8 8: the model cannot run a sample of that shape (")
    assert len(err.strip().splitlines()) == 1 and not out.exists()
