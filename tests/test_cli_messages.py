"""What the command line prints: one-line argparse errors, --help with defaults, the progress line
(off when stderr is no terminal, labels that name what is counted), export's converted layers and
library warnings as ``note:`` lines."""
import argparse
import io
import os
import re
import sys
import warnings

import pytest
import torch

import woodfisher as wf
from woodfisher import diagnostics, progress
from woodfisher.checkpoint import save_state_dict
from woodfisher.cli import build_parser, main, parse_args
from woodfisher.config import AUTO_BLOCK_PER_GRAD
from woodfisher.data import load_digits
from woodfisher.demo import train_digits_mlp
from woodfisher.models import MODEL_SPECS
from woodfisher.progress import Progress, display, output_mode, phase, write_line


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    model = train_digits_mlp(load_digits("train"), epochs=2, seed=0)
    return str(save_state_dict(model, tmp_path_factory.mktemp("ckpt") / "digits.pt"))


def _subparsers():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


# ---- 1. argparse errors --------------------------------------------------------------

@pytest.mark.parametrize("argv,command,match", [
    (["prune", "--model", "digits_mlp", "--checkpoint", "x.pt", "--sparsity", "1.5"], "prune", "[0, 1)"),
    (["prune", "--model", "resnet21"], "prune", "invalid choice: 'resnet21'"),
    (["prune", "--model", "digits_mlp", "--sparsity", "0.5", "--damp", "-3"], "prune", "damp must be > 0"),
    (["pai", "--sparsity", "1.5"], "pai", "[0, 1)"),
    (["export", "--model", "digits_mlp", "--format", "zip"], "export", "invalid choice: 'zip'"),
    (["prunee"], "", "invalid choice: 'prunee'"),
    ([], "", "required"),
])
def test_argparse_errors_are_one_line_with_a_help_hint(argv, command, match, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.count("\n") == 1 and err.startswith("woodfisher: error: ") and "usage:" not in err
    assert match in err and err.rstrip().endswith(f"(see {' '.join(['woodfisher', command]).strip()} --help)")


# ---- 2. --help -------------------------------------------------------------------------

def test_every_option_has_help_and_the_defaults_are_shown():
    _, commands = _subparsers()
    for name, sub in commands.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = formatter._expand_help(action)
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            if action.default not in (None, False):
                assert "(default" in text, f"{name} {action.option_strings[0]}: {text!r}"
            if action.default not in (None, False) and "(default:" not in action.help:
                assert f"(default: {action.default})" in text  # the parser's own default, not retyped
    prune = commands["prune"]
    help_of = {a.dest: prune._get_formatter()._expand_help(a) for a in prune._actions}
    assert f"{AUTO_BLOCK_PER_GRAD} x the gradients of a step" in help_of["block_size"]
    assert "(default: 512)" in help_of["num_grads"]
    export_model = next(a for a in commands["export"]._actions if a.dest == "model")
    assert all(model in export_model.help for model in MODEL_SPECS)
    pai_help = {a.dest: a.help for a in commands["pai"]._actions}
    assert all(pai_help[dest] for dest in ("criterion", "mode", "score_batch_size", "synflow_iterations",
                                           "weight_decay"))


# ---- 3. progress -------------------------------------------------------------------------

class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_live_on_a_terminal_and_plain_lines_in_a_log(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LINE_SECONDS", 0.0)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    with display(True, "test") as shown, phase("work", total=2, unit="step") as bar:
        bar.update(2)
    err = capsys.readouterr().err
    assert shown.mode == "lines" and shown.bar is None          # stderr captured (a log): plain lines
    assert "test: work: 2/2 step [" in err and "\r" not in err and err.endswith("\n")
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with display(True, "test") as shown, phase("work", total=2, unit="step") as bar:
        bar.update(2)
        assert shown.mode == "live" and shown.bar is not None
    assert re.search(r"test: work: \d/2 step", terminal.getvalue())


def test_log_lines_skip_short_phases_unless_forced_and_beat_during_long_ones(monkeypatch, capsys):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    with display(True, "test"), phase("quick", total=1) as bar:  # well under LINE_SECONDS
        bar.update(1)
    assert capsys.readouterr().err == ""
    with display(True, "test", force=True), phase("quick", total=1) as bar:
        bar.update(1)
    assert "test: quick: 1/1 it [" in capsys.readouterr().err
    monkeypatch.setattr(progress, "HEARTBEAT_SECONDS", 0.0)
    with display(True, "test"), phase("long", total=3, unit="grad") as bar:
        bar.update(1)
        assert re.search(r"test: long: 1/3 grad \[0 s so far, ~0 s left, [\d.]+ (grad/s|s/grad)\]",
                         capsys.readouterr().err)


def test_tqdm_disable_and_progress_false_show_nothing_unless_forced(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LINE_SECONDS", 0.0)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert output_mode(True) is None and output_mode(True, force=True) == "lines"
    monkeypatch.setenv("TQDM_DISABLE", "0")
    assert output_mode(True) == "lines" and output_mode(False) is None


def test_notebook_gets_the_widget_though_its_stderr_is_no_terminal(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(progress, "_in_notebook", lambda: True)
    assert output_mode(True) == "live"


def _logged_run(monkeypatch):
    """A log (stderr captured) that shows every phase, and a small model with its data."""
    monkeypatch.setattr(progress, "LINE_SECONDS", 0.0)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    return model, [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(4)]


def test_library_call_in_a_log_prints_lines_like_the_cli(monkeypatch, capsys):
    """prune_one_shot's default (progress=True) and the CLI without a flag follow the same rule."""
    model, data = _logged_run(monkeypatch)
    wf.prune_one_shot(model, data, sparsity=0.5, num_grads=32, num_steps=1)
    err = capsys.readouterr().err
    assert "woodfisher: Fisher gradients: 32/32 grad [" in err and "\r" not in err
    wf.prune_one_shot(model, data, sparsity=0.6, num_grads=32, num_steps=1, progress=False)
    assert capsys.readouterr().err == ""


def test_search_damp_shows_progress_by_default_labelled_with_each_candidate(monkeypatch, capsys):
    """The slowest entry point (one pruning per candidate) has the same default as prune_one_shot."""
    model, data = _logged_run(monkeypatch)
    wf.search_damp(model, data, data[:1], sparsity=0.5, grid=[1e-3, 1e-1], num_grads=16, num_steps=1)
    err = capsys.readouterr().err
    for label in ("damp 0.001 (1/2)", "damp 0.1 (2/2)"):
        assert f"woodfisher search_damp: held-out loss, {label} [" in err, err
    wf.search_damp(model, data, data[:1], sparsity=0.5, grid=[1e-3], num_grads=16, num_steps=1, progress=False)
    assert capsys.readouterr().err == ""


def test_write_line_is_a_line_of_its_own_while_a_display_runs(capsys):
    with display(True, "test", force=True):
        with phase("work"):
            write_line("note: hello")
    assert "note: hello" in capsys.readouterr().err.split("\n")


def _counted(err):
    """{(label, total, unit)} of every drawn 'label: n/total unit' fragment of a progress line."""
    return {(m.group(1), int(m.group(3)), m.group(4))
            for m in re.finditer(r"(?:^|: )([A-Za-z][\w ]*): (\d+)/(\d+) (\w+) \[", err.replace("\r", "\n"),
                                 flags=re.M)}


def test_phase_labels_name_what_they_count(capsys):
    prog = Progress(desc="run", force=True)
    first = prog.start("Fisher gradients", 5, "grad")
    first.update(5)
    first.close()
    second = prog.start("inverses", 2, "weight")
    second.update(1)
    second.close()
    prog.close()
    assert _counted(capsys.readouterr().err) == {("Fisher gradients", 5, "grad"), ("inverses", 2, "weight")}


def test_cli_progress_in_a_log_labels_right_and_errors_on_a_fresh_line(digits_ckpt, tmp_path, capsys):
    base = ["prune", "--model", "digits_mlp", "--checkpoint", digits_ckpt, "--sparsity", "0.8",
            "--num-grads", "32", "--num-steps", "1"]
    assert parse_args(base).progress is None
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert "\r" not in capsys.readouterr().err                     # stderr captured, a log: plain lines only
    assert main([*base, "--out", str(tmp_path / "b"), "--progress"]) == 0
    err = capsys.readouterr().err
    weights = len(torch.load(tmp_path / "b" / "masks.pt", weights_only=True))
    assert _counted(err) == {("Fisher gradients", 32, "grad"), ("inverses", weights, "weight"),
                             ("update", weights, "weight")}
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main([*base, "--out", str(blocker / "sub"), "--progress"]) == 2  # fails after the line was drawn
    err = capsys.readouterr().err
    assert err.split("\n")[-2].startswith("woodfisher: error: ")


# ---- 4. export ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def conv_pruned(tmp_path_factory):
    """ResNet-20 with every convolution 80% zeros and its only Linear (fc) dense."""
    torch.manual_seed(0)
    model = MODEL_SPECS["resnet20"].factory()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                weight = module.weight
                weight[weight.abs() <= weight.abs().flatten().kthvalue(int(0.8 * weight.numel())).values] = 0
    convs = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)]
    return str(save_state_dict(model, tmp_path_factory.mktemp("r20") / "pruned.pt")), convs


def test_export_refuses_a_conversion_that_converts_nothing(conv_pruned, tmp_path, capsys):
    path, convs = conv_pruned
    out = tmp_path / "x.pt"
    argv = ["export", "--model", "resnet20", "--checkpoint", path, "--format", "csr", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("woodfisher: error: --format csr converted no layer")
    assert "'fc'" not in err and "fc, 0.0%" in err and "--conv" in err and f"{len(convs)} Conv2d" in err
    assert not out.exists()
    assert main([*argv, "--min-sparsity", "0.5", "--conv"]) == 0
    printed = capsys.readouterr().out
    listed = re.findall(r"(\S+) \((\d+\.\d)% zeros\)", printed.split("converted to csr: ")[1].splitlines()[0])
    assert [name for name, _ in listed] == convs and all(float(pct) >= 79.0 for _, pct in listed)
    assert out.is_file()


def test_export_names_the_converted_layers(digits_ckpt, tmp_path, capsys):
    assert main(["export", "--model", "digits_mlp", "--checkpoint", digits_ckpt, "--format", "csr",
                 "--min-sparsity", "0", "--out", str(tmp_path / "x.pt")]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("converted to csr: ")][0]
    state = torch.load(digits_ckpt, weights_only=True)
    expected = [key[: -len(".weight")] for key in state if key.endswith(".weight")]
    assert [name for name, _ in re.findall(r"(\S+) \((\d+\.\d)% zeros\)", line)] == expected


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_export_refuses_an_out_folder_that_does_not_exist(digits_ckpt, tmp_path, capsys, fmt):
    out = tmp_path / "missing" / "x.pt"
    assert main(["export", "--model", "digits_mlp", "--checkpoint", digits_ckpt, "--format", fmt,
                 "--min-sparsity", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and str(tmp_path / "missing") in err
    assert not (tmp_path / "missing").exists()


# ---- 5. the degenerate-mask warning ----------------------------------------------------------

def _warning(config):
    with pytest.warns(UserWarning) as record:
        diagnostics.warn_if_degenerate(1.0, diagnostics.MIN_WARN_COUNT, config)
    return str(record[0].message)


def test_degenerate_warning_names_only_the_causes_that_apply():
    defaults = _warning(wf.PruneConfig(sparsity=0.9))
    assert "ties c to m" not in defaults and "relative to it" not in defaults and "Usual causes" not in defaults
    assert "(the defaults)" in defaults and "num_grads" in defaults and "num_steps" in defaults
    by_hand = _warning(wf.PruneConfig(sparsity=0.9, block_size=None, damp=1e-5))
    assert "Usual causes" in by_hand and "ties c to m" in by_hand and "relative to it" in by_hand
    block_only = _warning(wf.PruneConfig(sparsity=0.9, block_size=None))
    assert "ties c to m" in block_only and "relative to it" not in block_only


def test_cli_prints_library_warnings_as_note_lines(digits_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(diagnostics, "DEGENERATE_OVERLAP", 0.0)   # every mask counts as degenerate
    monkeypatch.setattr(diagnostics, "MIN_WARN_COUNT", 0)
    assert main(["prune", "--model", "digits_mlp", "--checkpoint", digits_ckpt, "--sparsity", "0.8",
                 "--num-grads", "32", "--num-steps", "1", "--out", str(tmp_path / "o")]) == 0
    lines = capsys.readouterr().err.splitlines()
    notes = [line for line in lines if line.startswith("note: --method woodfisher pruned")]
    assert len(notes) == 1 and "(the defaults)" in notes[0]
    assert not any("UserWarning" in line or "warnings.warn" in line for line in lines)
    with warnings.catch_warnings(record=True) as record:             # the library still warns
        warnings.simplefilter("always")
        model = train_digits_mlp(load_digits("train"), epochs=1, seed=0)
        wf.prune_one_shot(model, [(torch.randn(8, 64), torch.randint(0, 10, (8,)))] * 4, sparsity=0.8,
                          num_grads=32, num_steps=1, progress=False)
    assert any(issubclass(w.category, UserWarning) and "same weights as magnitude" in str(w.message)
               for w in record)


def test_a_multi_step_run_shows_which_step_each_phase_belongs_to(capsys):
    """num_steps > 1 restarts the gradient count at every step: the line says which step it is at
    ("Fisher gradients, step 2/3: ..."), and a one-step run keeps the plain phase names."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    loader = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(4)]
    with display(True, "run", force=True):
        wf.prune_one_shot(model, loader, sparsity=0.7, num_grads=24, num_steps=3)
    err = capsys.readouterr().err.replace("\r", "\n")
    for step in (1, 2, 3):
        assert re.search(rf"run: Fisher gradients, step {step}/3: \d+/8 grad", err), step
        assert f"run: inverses, step {step}/3: " in err and f"run: update, step {step}/3 " in err
    assert "step 4/3" not in err
    with display(True, "run", force=True):
        wf.prune_one_shot(model, loader, sparsity=0.8, num_grads=24, num_steps=1)
    err = capsys.readouterr().err
    assert "run: Fisher gradients: " in err and ", step" not in err


def test_the_command_line_programs_turn_on_torchs_huge_page_allocation(monkeypatch):
    """``woodfisher`` / ``python -m woodfisher`` (console_main) set THP_MEM_ALLOC_ENABLE=1 unless the environment
    already says otherwise; a library call (main) leaves the caller's environment alone. (The speed-up it buys:
    benchmarks/results/thp_step.md.)"""
    from woodfisher.cli import HUGE_PAGES_VARIABLE, console_main
    monkeypatch.delenv(HUGE_PAGES_VARIABLE, raising=False)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert HUGE_PAGES_VARIABLE not in os.environ
    with pytest.raises(SystemExit):
        console_main(["--help"])
    assert os.environ[HUGE_PAGES_VARIABLE] == "1"
    monkeypatch.setenv(HUGE_PAGES_VARIABLE, "0")   # the user's choice wins
    with pytest.raises(SystemExit):
        console_main(["--help"])
    assert os.environ[HUGE_PAGES_VARIABLE] == "0"
