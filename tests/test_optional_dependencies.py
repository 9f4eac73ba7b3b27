"""The package installed as the README's Install section says (torch, numpy, tqdm: no matplotlib, no
scikit-learn): the plots are optional outputs, skipped with a note, and the demo's missing scikit-learn is one
line on the command line, not a traceback."""
import sys

import pytest
import torch

from woodfisher.checkpoint import save_state_dict
from woodfisher.cli import main
from woodfisher.demo import DEMO_METHODS, run_demo
from woodfisher.models import digits_mlp


@pytest.fixture()
def no_matplotlib(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError


def test_prune_without_matplotlib_writes_everything_but_the_plot(no_matplotlib, tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = str(save_state_dict(digits_mlp(), tmp_path / "digits.pt"))
    out = tmp_path / "run"
    code = main(["prune", "--model", "digits_mlp", "--checkpoint", ckpt, "--num-grads", "32", "--sparsity", "0.5",
                 "--no-progress", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == ["masks.pt", "pruned.pt", "report.json", "sparsity.md"]
    assert "note: layer_sparsity.png not written: matplotlib is not installed (pip install matplotlib)" in captured.err
    assert "layer_sparsity.png" not in captured.out.split("wrote:")[-1]


def test_demo_without_matplotlib_writes_its_json_and_warns(no_matplotlib, tmp_path):
    methods = {k: v for k, v in DEMO_METHODS.items() if v.get("method") == "global_magnitude"}
    with pytest.warns(UserWarning, match=r"^accuracy_vs_sparsity\.png, layer_sparsity\.png not written: matplotlib"):
        summary = run_demo(str(tmp_path), sparsities=(0.5,), epochs=1, num_grads=16, hidden=(8,), methods=methods)
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"] and summary["accuracy"]


def test_demo_without_scikit_learn_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err == "woodfisher: error: the digits dataset needs scikit-learn: pip install scikit-learn\n"
    assert not (tmp_path / "demo").exists()

