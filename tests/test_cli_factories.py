"""The CLI on the user's own model and data: factories by import path, a config naming them, one progress line."""
import json
import sys
import textwrap

import pytest
import torch

from woodfisher.cli import build_parser, main

PKG = textwrap.dedent('''
    import torch
    from torch import nn


    class Net(nn.Module):
        """Keyword inputs and HF-style outputs: {"logits", "loss" when labels are given}."""

        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, features, labels=None):
            logits = self.fc2(torch.relu(self.fc1(features)))
            out = {"logits": logits}
            if labels is not None:
                out["loss"] = nn.functional.cross_entropy(logits, labels)
            return out


    def build():
        torch.manual_seed(0)
        return Net()


    def _batches(seed, n=32):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 6, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
        return [{"features": x[i:i + 8], "labels": y[i:i + 8]} for i in range(0, n, 8)]


    def calibration_loader():
        return iter(_batches(1))  # single pass: a generator-like loader


    def val_loader():
        return _batches(2)


    not_a_module = 3
''')


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "stuff.py").write_text(PKG)
    (tmp_path / "models.py").write_text(PKG)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
        del sys.modules[name]


def test_prune_a_factory_model_with_factory_data(user_pkg, capsys):
    from mypkg.stuff import build

    ckpt = user_pkg / "w.pt"
    trained = build()
    with torch.no_grad():
        trained.fc1.bias.add_(1.0)  # the checkpoint differs from the factory's weights
    torch.save(trained.state_dict(), ckpt)
    out = user_pkg / "run"
    code = main(["prune", "--model", "mypkg.stuff:build", "--checkpoint", str(ckpt), "--data",
                 "mypkg.stuff:calibration_loader", "--eval-data", "mypkg.stuff:val_loader", "--sparsity", "0.5",
                 "--num-grads", "32", "--out", str(out), "--progress"])
    assert code == 0
    captured = capsys.readouterr()
    assert "held-out loss before" in captured.out and "time per phase: data" in captured.out
    for phase in ("data", "evaluation", "Fisher gradients", "inverses", "selection", "update", "writing"):
        assert f"woodfisher prune: {phase}" in captured.err, phase  # one line, every phase shown
    report = json.loads((out / "report.json").read_text())
    assert report["metric"] == "loss" and report["loss_after"] > 0 and report["sparsity"] == pytest.approx(0.5)
    assert set(report["phases"]) >= {"data", "evaluation", "Fisher gradients", "inverses", "selection", "update"}
    state = torch.load(out / "pruned.pt", weights_only=True)
    masks = torch.load(out / "masks.pt", weights_only=True)
    assert set(masks) == {"fc1.weight", "fc2.weight"}
    kept = state["fc1.weight"][masks["fc1.weight"]]
    assert torch.all(state["fc1.weight"][~masks["fc1.weight"]] == 0) and kept.abs().mean() > 0
    assert torch.equal(state["fc1.bias"], trained.fc1.bias)  # the checkpoint was loaded (biases are not pruned)


def test_a_config_file_names_the_factories_and_a_file_path_works(user_pkg, capsys):
    cfg = user_pkg / "cfg.json"
    cfg.write_text(json.dumps({"model": "models.py:build", "data": "mypkg.stuff:calibration_loader",
                               "sparsity": 0.6, "num_grads": 16, "method": "kfac", "progress": False}))
    out = user_pkg / "run2"
    assert main(["prune", "--config", str(cfg), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["method"] == "kfac" and report["sparsity"] == pytest.approx(0.6, abs=0.01)
    assert report["metric"] is None and "time per phase" in capsys.readouterr().out
    assert main(["report", "--model", "models.py:build", "--eval-data", "mypkg.stuff:val_loader"]) == 0
    printed = capsys.readouterr().out
    assert "| fc1.weight |" in printed and "held-out loss" in printed
    # report reads no calibration data: a --data factory is refused (it was silently unused), pointing at --eval-data
    assert main(["report", "--model", "models.py:build", "--data", "mypkg.stuff:val_loader"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("woodfisher: error: --data 'mypkg.stuff:val_loader'") and "--eval-data" in err


@pytest.mark.parametrize("argv,match", [
    (["--model", "nosuchpkg.models:build", "--data", "mypkg.stuff:val_loader"], "cannot import module 'nosuchpkg"),
    (["--model", "mypkg.stuff:nothere", "--data", "mypkg.stuff:val_loader"], "has no attribute 'nothere'"),
    (["--model", "mypkg.stuff:val_loader", "--data", "mypkg.stuff:val_loader"], "not a torch.nn.Module"),
    (["--model", "mypkg.stuff:not_a_module", "--data", "mypkg.stuff:val_loader"], "not a function"),
    (["--model", "mypkg.stuff:build"], "--data is required for your own model"),
    (["--model", "mypkg.stuff:build", "--data", "mypkg.stuff:build"], "batch"),
    (["--model", "missing.py:build", "--data", "mypkg.stuff:val_loader"], "not found"),
])
def test_bad_factories_give_one_line_errors(user_pkg, capsys, argv, match):
    assert main(["prune", *argv, "--sparsity", "0.5", "--no-progress", "--out", str(user_pkg / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("woodfisher: error:") and match in err


def test_help_shows_the_required_flags():
    parser = build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and a.choices and "prune" in a.choices)
    prune = sub.choices["prune"]
    usage = " ".join(prune.format_usage().split())
    assert "--model NAME|MODULE:FACTORY" in usage and "[--model" not in usage
    assert "--model NAME|MODULE:FACTORY --sparsity SPARSITY [" in usage and "[--sparsity" not in usage
    assert "required arguments" in prune.format_help()
    with pytest.raises(SystemExit):
        main(["prune", "--sparsity", "0.5"])


def test_export_loads_the_same_factories_as_prune(user_pkg, capsys):
    """``woodfisher export --model mypkg.stuff:build`` after ``woodfisher prune --model mypkg.stuff:build``:
    run as the console script runs (no current directory on sys.path: ``python -P``), from the folder
    holding the package, and with a ``file.py:factory`` path; a missing attribute is named."""
    import subprocess

    out = user_pkg / "run"
    assert main(["prune", "--model", "mypkg.stuff:build", "--data", "mypkg.stuff:val_loader", "--sparsity", "0.8",
                 "--num-grads", "16", "--no-progress", "--out", str(out)]) == 0
    capsys.readouterr()
    cli = "import sys; from woodfisher.cli import main; sys.exit(main(sys.argv[1:]))"
    for model in ("mypkg.stuff:build", "models.py:build"):
        target = user_pkg / f"{model.split(':')[0]}.csr.pt"
        done = subprocess.run([sys.executable, "-P", "-c", cli, "export", "--model", model, "--checkpoint",
                               str(out / "pruned.pt"), "--format", "csr", "--min-sparsity", "0.5", "--input-shape",
                               "6", "--out", str(target)], cwd=user_pkg, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "converted to csr: fc1" in done.stdout and target.is_file()
    assert main(["export", "--model", "mypkg.stuff:nothere", "--checkpoint", str(out / "pruned.pt"),
                 "--format", "dense", "--out", str(user_pkg / "x.pt")]) == 2
    assert "module 'mypkg.stuff' has no attribute 'nothere'" in capsys.readouterr().err


def test_export_of_a_factory_model_says_whether_it_was_checked(user_pkg, capsys):
    from mypkg.stuff import build

    model = build()
    with torch.no_grad():
        model.fc1.weight[:, :3] = 0  # 50% zeros: csr-worthy
    ckpt = user_pkg / "pruned.pt"
    torch.save(model.state_dict(), ckpt)
    base = ["export", "--model", "mypkg.stuff:build", "--checkpoint", str(ckpt), "--format", "csr",
            "--min-sparsity", "0.3"]
    assert main([*base, "--out", str(user_pkg / "a.pt")]) == 0
    out = capsys.readouterr().out
    assert "outputs not compared with the dense model: no example input" in out and "--input-shape" in out, out
    assert main([*base, "--out", str(user_pkg / "b.pt"), "--input-shape", "6"]) == 0
    out = capsys.readouterr().out
    assert "max |output - dense output| = " in out, out


def test_prune_report_json_names_real_metrics_and_the_magnitude_overlap(user_pkg):
    """Without evaluation data report.json has no ``None_before`` / ``None_after`` keys; it holds the overlap
    with global magnitude (recounted here from the factory's weights and the masks), and ``woodfisher report``
    of the pruned checkpoint gives the same per-layer table."""
    from mypkg.stuff import build

    out = user_pkg / "run3"
    assert main(["prune", "--model", "mypkg.stuff:build", "--data", "mypkg.stuff:calibration_loader",
                 "--sparsity", "0.6", "--num-grads", "32", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["metric"] is None and not any(key.startswith("None") for key in report)
    dense, masks = build(), torch.load(out / "masks.pt", weights_only=True)
    weights = {name: dense.get_parameter(name).detach().abs() for name in masks}
    pruned = sum(int((~keep).sum()) for keep in masks.values())
    threshold = torch.cat([w.flatten() for w in weights.values()]).kthvalue(pruned).values
    both = sum(int(((weights[n] <= threshold) & ~keep).sum()) for n, keep in masks.items())
    assert report["magnitude_overlap"] == pytest.approx(both / pruned)
    assert main(["report", "--model", "mypkg.stuff:build", "--checkpoint", str(out / "pruned.pt"),
                 "--out", str(user_pkg / "rep")]) == 0
    inspected = json.loads((user_pkg / "rep" / "report.json").read_text())
    assert inspected["layers"] == report["layers"] and inspected["totals"] == report["totals"]


VISION = """
import torch
from torch import nn

def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

def dict_batches():
    g = torch.Generator().manual_seed(0)
    return [{"pixel_values": torch.randn(8, 3, 8, 8, generator=g), "labels": torch.randint(0, 3, (8,), generator=g)}
            for _ in range(2)]

def adapter(b):
    import woodfisher
    return woodfisher.Batch(args=(b["pixel_values"],), target=b["labels"])
"""


def test_a_suggested_batch_adapter_says_how_the_command_line_takes_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "vision_user.py").write_text(VISION)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    common = ["prune", "--model", "vision_user:net", "--data", "vision_user:dict_batches", "--sparsity", "0.5",
              "--num-grads", "16", "--no-progress", "--out", str(tmp_path / "out")]
    assert main(common) == 2
    err = capsys.readouterr().err
    assert err.startswith("woodfisher: error: loader:") and "batch_adapter=lambda b:" in err
    assert "(on the command line: write it as a function in a module of yours and pass --batch-adapter " \
           "MODULE:FUNCTION)" in err
    assert main(common + ["--batch-adapter", "vision_user:adapter"]) == 0
