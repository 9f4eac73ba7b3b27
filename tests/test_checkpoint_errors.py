"""Bad checkpoint files: corrupt ones reported as corrupt, unsafe ones as unsafe; the CLI prints one line, exit 2."""
from __future__ import annotations

import collections
import os
import pickle

import pytest
import torch

from woodfisher.checkpoint import read_state_dict, save_state_dict
from woodfisher.cli import main
from woodfisher.models import digits_mlp

CORRUPT = "corrupt or truncated"
UNSAFE = "cannot be loaded safely"


class Opaque:
    """A class the safe loader refuses (an arbitrary Python object in a checkpoint)."""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    good = save_state_dict(digits_mlp((8, 4)), d / "good.pt")
    raw = open(good, "rb").read()
    torch.save({k: v for k, v in torch.load(good).items()}, d / "legacy.pt", _use_new_zipfile_serialization=False)
    legacy = open(d / "legacy.pt", "rb").read()
    out = {"good": good, "raw": raw, "legacy": legacy, "dir": d}
    for name, content in [("empty", b""), ("half", raw[: len(raw) // 2]), ("head", raw[:40]),
                          ("legacy_half", legacy[: len(legacy) // 2]), ("random", os.urandom(3000)),
                          ("text", b"not a checkpoint\n" * 20), ("plain_pickle", pickle.dumps({"w": [1.0]}))]:
        (d / f"{name}.pt").write_bytes(content)
        out[name] = str(d / f"{name}.pt")
    torch.save({"model": torch.load(good), "opt": Opaque()}, d / "unsafe.pt")
    torch.save(torch.load(good), d / "protocol4.pt", pickle_protocol=4)
    out["unsafe"], out["protocol4"] = str(d / "unsafe.pt"), str(d / "protocol4.pt")
    return out


@pytest.mark.parametrize("name", ["empty", "half", "head", "legacy_half", "random", "text", "plain_pickle"])
@pytest.mark.parametrize("trust", [False, True])
def test_corrupt_files_are_reported_as_corrupt(files, name, trust):
    with pytest.raises(ValueError) as err:
        read_state_dict(files[name], trust_pickle=trust)
    message = str(err.value)
    assert (CORRUPT in message or "is empty (0 bytes)" in message) and "trust_pickle" not in message


def test_every_truncation_is_corrupt_never_unsafe(files):
    path = files["dir"] / "cut.pt"
    for raw in (files["raw"], files["legacy"]):
        for size in sorted({1, 2, 7, 64, *range(0, len(raw), max(1, len(raw) // 40))} - {0}):
            path.write_bytes(raw[:size])
            with pytest.raises(ValueError, match=CORRUPT):
                read_state_dict(path)


def test_unsafe_files_are_reported_as_unsafe_and_load_when_trusted(files):
    with pytest.raises(ValueError, match=f"{UNSAFE}.*Python objects.*trust_pickle=True.*Opaque"):
        read_state_dict(files["unsafe"])
    assert set(read_state_dict(files["unsafe"], trust_pickle=True)) == set(torch.load(files["good"]))
    with pytest.raises(ValueError, match=f"{UNSAFE}.*pickle instructions"):
        read_state_dict(files["protocol4"])
    state = read_state_dict(files["protocol4"], trust_pickle=True)
    assert all(torch.equal(state[k], v) for k, v in torch.load(files["good"]).items())


@pytest.mark.parametrize("name,match", [("empty", "empty"), ("half", CORRUPT), ("random", CORRUPT),
                                        ("unsafe", "--trust-pickle")])
def test_cli_reports_bad_checkpoints_in_one_line(files, name, match, tmp_path, capsys):
    code = main(["prune", "--model", "digits_mlp", "--checkpoint", files[name], "--sparsity", "0.5",
                 "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("woodfisher: error: ") and err.count("\n") == 1 and match in err
    assert "Traceback" not in err
    if name != "unsafe":
        assert "trust" not in err


def test_cli_unreadable_paths_exit_2(files, tmp_path, capsys):
    assert main(["prune", "--model", "digits_mlp", "--checkpoint", str(files["dir"]), "--sparsity", "0.5",
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("woodfisher: error: checkpoint file not found")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["report", "--model", "digits_mlp", "--checkpoint", files["good"],
                 "--out", str(blocker / "sub")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_state_dict_of_collections_is_not_a_checkpoint(files):
    path = files["dir"] / "counter.pt"
    torch.save({"w": torch.ones(2), "c": collections.Counter()}, path)
    with pytest.raises(ValueError, match="holds no state dict"):
        read_state_dict(path)
