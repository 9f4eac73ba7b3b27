"""Saving what a pruning call returns with torch.save and loading it back with torch.load's default
``weights_only=True`` (torch >= 2.6), in a fresh process as a user would."""
import subprocess
import sys

import torch
from torch import nn

import woodfisher as wf
from woodfisher.pai import prune_at_init


def _data():
    gen = torch.Generator().manual_seed(0)
    inputs, labels = torch.randn(32, 8, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    return [(inputs[:16], labels[:16]), (inputs[16:], labels[16:])]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _load_in_fresh_process(path):
    """torch.load(path) (weights_only=True) in a new interpreter that imports woodfisher; the repr it prints."""
    code = ("import sys, torch, woodfisher, woodfisher.pai; "
            "res = torch.load(sys.argv[1], weights_only=True); "
            "print(type(res).__name__, res.sparsity, sorted(res.masks), int(sum(m.sum() for m in res.masks.values())))")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_prune_result_loads_with_weights_only(tmp_path):
    res = wf.prune_one_shot(_model(), _data(), sparsity=0.5, num_grads=16, progress=False)
    torch.save(res, tmp_path / "res.pt")
    again = torch.load(tmp_path / "res.pt", weights_only=True)
    assert type(again) is wf.PruneResult and again.config == res.config and again.layers == res.layers
    assert again.masks.keys() == res.masks.keys()
    assert all(torch.equal(again.masks[name], keep) for name, keep in res.masks.items())
    kept = sum(int(keep.sum()) for keep in res.masks.values())
    assert _load_in_fresh_process(tmp_path / "res.pt") == [
        "PruneResult", str(res.sparsity), "['0.weight',", "'2.weight']", str(kept)]


def test_pai_result_loads_with_weights_only(tmp_path):
    res = prune_at_init(_model(), _data(), sparsity=0.5, criterion="snip", progress=False)
    torch.save(res, tmp_path / "pai.pt")
    again = torch.load(tmp_path / "pai.pt", weights_only=True)
    assert type(again) is type(res) and again.collapsed == res.collapsed and again.layers == res.layers
    assert _load_in_fresh_process(tmp_path / "pai.pt")[0] == "PaIResult"
