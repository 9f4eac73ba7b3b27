"""The command line (python -m woodfisher ...), config files, the demo and the sweep's quick mode."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from woodfisher.checkpoint import save_state_dict
from woodfisher.cli import main, parse_args
from woodfisher.data import load_digits
from woodfisher.demo import DEMO_METHODS, run_demo, train_digits_mlp

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("WOODFISHER_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    """A briefly trained digits MLP (64-64-32-10) saved as a plain state dict."""
    model = train_digits_mlp(load_digits("train"), epochs=4, seed=0)
    return str(save_state_dict(model, tmp_path_factory.mktemp("ckpt") / "digits.pt"))


def _prune(ckpt, out, *extra):
    return main(["prune", "--model", "digits_mlp", "--checkpoint", ckpt, "--num-grads", "64",
                 "--out", str(out), *extra])


def test_prune_end_to_end_writes_outputs_with_exact_zeros(digits_ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    assert _prune(digits_ckpt, out, "--sparsity", "0.8", "--method", "woodfisher") == 0
    printed = capsys.readouterr().out
    assert "| total |" in printed and "accuracy before" in printed
    for name in ("pruned.pt", "masks.pt", "sparsity.md", "report.json", "layer_sparsity.png"):
        assert (out / name).is_file(), name
    state = torch.load(out / "pruned.pt", weights_only=True)
    masks = torch.load(out / "masks.pt", weights_only=True)
    assert set(masks) == {"layers.0.weight", "layers.1.weight", "layers.2.weight"}
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert abs((1 - kept / total) - 0.8) < 1.0 / total + 1e-9
    for name, keep in masks.items():
        w = state[name]
        assert torch.all(w[~keep] == 0.0)          # exact zeros where pruned
        assert int(torch.count_nonzero(w)) <= int(keep.sum())
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["nnz"] == sum(int(torch.count_nonzero(state[n])) for n in masks)
    assert 0.0 <= report["accuracy_after"] <= 1.0 and report["config"]["method"] == "woodfisher"
    assert report["totals"]["flops_sparse"] < report["totals"]["flops_dense"]


def test_config_file_and_flag_override(digits_ckpt, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"sparsity": 0.5, "method": "global_magnitude", "num-grads": 32,
                               "no_obs_update": True, "block-size": "layer", "damp": "auto"}))
    args = parse_args(["prune", "--config", str(cfg), "--sparsity", "0.7", "--model", "digits_mlp"])
    assert args.sparsity == 0.7 and args.method == "global_magnitude" and args.num_grads == 32
    assert args.obs_update is False and args.block_size is None and args.damp == "auto"
    out = tmp_path / "run"
    assert _prune(digits_ckpt, out, "--config", str(cfg), "--sparsity", "0.7") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["method"] == "global_magnitude"
    assert report["sparsity"] == pytest.approx(0.7, abs=1e-3)


@pytest.mark.parametrize("cfg,match", [({"sparsity": 0.5, "bogus": 1}, "bogus"),
                                       ({"sparsity": 0.5, "num_grad": 8}, "'num_grad' (did you mean 'num_grads'?)"),
                                       ({"method": "random"}, "method"),
                                       ({"num-grads": 2.5}, "num-grads"),
                                       ({"woodtaylor": "yes"}, "true or false")])
def test_bad_config_values(tmp_path, capsys, cfg, match):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    assert main(["prune", "--config", str(path)]) == 2
    assert match in capsys.readouterr().err


def test_bad_inputs_give_clear_errors(digits_ckpt, tmp_path, capsys):
    missing = tmp_path / "no-such-dir"
    mlp_ckpt = save_state_dict(__import__("woodfisher.models", fromlist=["MLPNet"]).MLPNet(), tmp_path / "mlp.pt")
    assert main(["prune", "--model", "mlpnet", "--checkpoint", mlp_ckpt, "--sparsity", "0.5",
                 "--data-dir", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert "no-such-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # no sparsity: argparse's required flag
        _prune(digits_ckpt, tmp_path / "o2")
    assert exc.value.code == 2 and "required: --sparsity" in capsys.readouterr().err
    assert main(["prune", "--model", "digits_mlp", "--sparsity", "0.5"]) == 2
    assert "--checkpoint is required" in capsys.readouterr().err
    assert main(["report", "--model", "mlpnet", "--checkpoint", digits_ckpt]) == 2
    assert "does not match" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--model", "vgg16"])
    assert exc.value.code == 2 and "invalid choice: 'vgg16'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prune", "--model", "digits_mlp", "--sparsity", "1.0"])
    assert "sparsity must lie in [0, 1)" in capsys.readouterr().err


def test_report_on_pruned_checkpoint(digits_ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    assert _prune(digits_ckpt, out, "--sparsity", "0.6", "--method", "magnitude") == 0
    capsys.readouterr()
    assert main(["report", "--model", "digits_mlp", "--checkpoint", str(out / "pruned.pt"),
                 "--out", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    total_line = [line for line in printed.splitlines() if line.startswith("| total")][0]
    sparsity = float(total_line.split("|")[5])
    assert abs(sparsity - 60.0) < 0.1 and "accuracy:" in printed  # layerwise: each layer rounds
    assert (tmp_path / "rep" / "layer_sparsity.png").is_file()


def test_demo_small_run(tmp_path):
    methods = {k: v for k, v in DEMO_METHODS.items() if v.get("num_steps", 1) == 1}
    summary = run_demo(str(tmp_path), sparsities=(0.5, 0.9), seed=1, epochs=3, num_grads=32,
                       hidden=(16, 8), methods=methods)
    assert set(summary["accuracy"]) == set(methods)
    for name in ("accuracy_vs_sparsity.png", "layer_sparsity.png", "results.json"):
        assert (tmp_path / name).is_file()
    assert json.loads((tmp_path / "results.json").read_text())["sparsities"] == [0.5, 0.9]


def test_demo_shows_progress_over_training_and_every_pruning_run(tmp_path, capsys):
    """The README's first command is not silent: the demo's display covers the training and counts the runs
    (here in a log with --progress: a line for every phase); --no-progress shows none."""
    methods = {"Global magnitude": dict(method="global_magnitude")}
    argv = ["demo", "--out", str(tmp_path), "--sparsities", "50", "90"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("woodfisher.demo.DEMO_METHODS", methods)
        mp.setattr("woodfisher.demo.DEMO_HIDDEN", (8,))
        assert main([*argv, "--progress"]) == 0
        err = capsys.readouterr().err
        assert "woodfisher demo: training the digits MLP [" in err
        assert "woodfisher demo: pruning runs: 2/2 run [" in err
        assert main([*argv, "--no-progress"]) == 0
        assert "woodfisher demo" not in capsys.readouterr().err


@pytest.mark.skipif(not (DATA / "checkpoints").is_dir(), reason=f"real data not found at {DATA}")
def test_sweep_quick_mode(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "oneshot_sweep.py"), "--quick",
                           "--data-root", str(DATA), "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    csv = (tmp_path / "oneshot_mlpnet.csv").read_text().splitlines()
    assert csv[0].startswith("model,") and len(csv) > 1


def test_export_subcommand_through_main(digits_ckpt, tmp_path):
    """`woodfisher export` is wired into the CLI: a pruned checkpoint becomes a CSR model file."""
    out = tmp_path / "run"
    assert _prune(digits_ckpt, out, "--sparsity", "0.8", "--method", "global_magnitude") == 0
    target = tmp_path / "csr.pt"
    assert main(["export", "--model", "digits_mlp", "--checkpoint", str(out / "pruned.pt"), "--format", "csr",
                 "--out", str(target), "--min-sparsity", "0.5", "--device", "cpu"]) == 0
    state = torch.load(target, weights_only=True)
    assert any(v.layout == torch.sparse_csr for v in state.values() if isinstance(v, torch.Tensor))


def test_an_nm_pattern_gives_the_sparsity_on_the_command_line_and_in_a_config(tmp_path, capsys):
    base = ["prune", "--model", "mlpnet", "--checkpoint", "w.pt"]
    assert parse_args(base + ["--pattern", "2:4"]).sparsity == 0.5
    assert parse_args(base + ["--pattern", "1:4"]).sparsity == 0.75
    cfg = tmp_path / "nm.json"
    cfg.write_text(json.dumps({"pattern": "2:4"}))
    assert parse_args(base + ["--config", str(cfg)]).sparsity == 0.5
    for rest in ([], ["--pattern", "rows"]):        # nothing fixes it: still required
        with pytest.raises(SystemExit) as exc:
            parse_args(base + rest)
        assert exc.value.code == 2 and "required: --sparsity" in capsys.readouterr().err
