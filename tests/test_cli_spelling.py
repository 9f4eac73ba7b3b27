"""Errors and notes of the command line name options as the user wrote them: ``--num-grads 16`` for a flag, the
key of a ``--config`` file for an option given there, ``--no-obs-update`` for an on/off option, never the API's
``num_grads=16`` (woodfisher.cli._spelling, one place for every message)."""
import json

import pytest

from woodfisher.cli import build_parser, main
from woodfisher.cli._spelling import cli_text, user_spellings


@pytest.fixture()
def factory(tmp_path):
    path = tmp_path / "factory.py"
    path.write_text("import torch\nfrom torch import nn\n"
                    "def build():\n    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))\n"
                    "def data():\n    g = torch.Generator().manual_seed(0)\n"
                    "    return [(torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g))"
                    " for _ in range(4)]\n")
    return ["prune", "--model", f"{path}:build", "--data", f"{path}:data", "--out", str(tmp_path / "out"),
            "--no-progress"]


def _error(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("woodfisher: error: ") and err.count("\n") == 1, err
    return err


def test_flags_are_named_as_typed(factory, capsys):
    err = _error(factory + ["--sparsity", "0.5", "--num-grads", "16", "--num-steps", "20"], capsys)
    assert "--num-steps 20 needs --num-grads >= --num-steps (--num-grads 16 is the total" in err, err
    assert "num_grads" not in err and "num_steps" not in err
    err = _error(factory + ["--pattern", "2:4", "--block-size", "6"], capsys)
    assert err.startswith("woodfisher: error: --block-size 6 must be a multiple of M=4 for pattern"), err
    err = _error(factory + ["--sparsity", "0.5", "--joint-update", "--no-obs-update"], capsys)
    assert "--joint-update needs --obs-update (it is a form" in err, err


def test_config_keys_are_named_as_written(factory, tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"num-grads": 16, "num_steps": 20, "sparsity": 0.5}))
    err = _error(factory + ["--config", str(cfg)], capsys)
    assert '"num_steps": 20 needs "num-grads" >= "num_steps" ("num-grads": 16 is the total' in err, err
    err = _error(factory + ["--config", str(cfg), "--num-grads", "12"], capsys)   # the flag wins, and is named
    assert '"num_steps": 20 needs --num-grads >= "num_steps" (--num-grads 12 is the total' in err, err


def test_calls_and_function_options_keep_the_apis_words():
    sub = build_parser()._subparsers._group_actions[0].choices["prune"]
    spellings = user_spellings(sub, ["prune", "--num-grads", "8", "--woodtaylor"], {"block_size": 4})
    text = cli_text("num_grads=8 is too few; estimate_curvature(model, loader, num_grads=8) or pass "
                    "batch_adapter=lambda b: b; woodtaylor=False, block_size=4, sampled_fisher=True", spellings)
    assert text.startswith("--num-grads 8 is too few; estimate_curvature(model, loader, num_grads=8) or pass "
                           "batch_adapter=lambda b: b; no --woodtaylor, \"block_size\": 4, --sampled-fisher"), text
    assert "--batch-adapter MODULE:FUNCTION" in text   # what the command line takes instead of a lambda
    assert cli_text("num_grads=8", None) == "num_grads=8"


def test_an_api_name_that_differs_from_the_flag_is_named_as_the_flag():
    sub = build_parser()._subparsers._group_actions[0].choices["pai"]   # prune_at_init(params=) is --modules
    spellings = user_spellings(sub, ["pai", "--modules", "fc"], None)
    assert cli_text("params=['fc']: no module named 'fc'; num_probes=0 must be >= 1", spellings) == \
        "--modules ['fc']: no module named 'fc'; --num-probes 0 must be >= 1"
