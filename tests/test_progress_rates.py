"""Long phases in a log say how fast they go and when they end; N:M selection and its update are counted apart.

Found on a GPT-2-like model (CPU, output piped to a log): heartbeats read ``39/64 grad [30 s so far]`` with no
rate or time left, and ``pattern="2:4"`` spent minutes in an uncounted "selection" that also held the group OBS
update (``timings["update"]`` was ~0).
"""
from __future__ import annotations

import re

import torch
from torch import nn

import woodfisher as wf
from woodfisher import progress
from woodfisher.progress import display, phase


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_heartbeat_and_end_lines_give_time_left_and_rate(monkeypatch, capsys):
    clock = _Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    monkeypatch.setattr(progress, "HEARTBEAT_SECONDS", 5.0)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    with display(True, "t"), phase("Fisher gradients", total=4, unit="grad") as bar:
        clock.now += 10.0
        bar.update(1)     # 1 of 4 in 10 s: 30 s left at 10 s per gradient
        assert "t: Fisher gradients: 1/4 grad [10 s so far, ~30 s left, 10.00 s/grad]" in capsys.readouterr().err
        clock.now += 10.0
        bar.update(3)     # 4 in 20 s
    assert "t: Fisher gradients: 4/4 grad [20.0 s, 5.00 s/grad]" in capsys.readouterr().err
    with display(True, "t"), phase("inverses", total=50, unit="weight") as bar:
        clock.now += 2.0
        bar.update(50)
    assert "t: inverses: 50/50 weight [2.0 s, 25.00 weight/s]" in capsys.readouterr().err


def test_nm_selection_and_update_are_counted_per_weight_and_timed_apart(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LINE_SECONDS", 0.0)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4))
    data = [(torch.randn(8, 16), torch.randint(0, 4, (8,))) for _ in range(4)]
    res = wf.prune_one_shot(model, data, sparsity=0.5, pattern="2:4", num_grads=32, damp=1e-3, progress=True)
    err = capsys.readouterr().err
    assert re.search(r"selection: 3/3 weight \[", err) and re.search(r"update: 3/3 weight \[", err), err
    assert res.timings["update"] > 0.0 and res.timings["select"] > 0.0
    for weight in (model[0].weight, model[2].weight, model[4].weight):   # 2 of every 4 consecutive entries kept
        assert torch.equal((weight.detach().view(-1, 4) != 0).sum(1), torch.full((weight.numel() // 4,), 2))


def test_a_name_relative_to_each_block_gets_the_full_names_and_a_comprehension_that_works():
    torch.manual_seed(0)
    block = lambda: nn.ModuleDict({"mlp": nn.ModuleDict({"fc": nn.Linear(4, 4), "proj": nn.Linear(4, 4)})})  # noqa: E731
    model = nn.ModuleDict({"h": nn.ModuleList([block() for _ in range(5)])})
    try:
        wf.resolve_targets(model, ["mlp.fc"])
    except ValueError as err:
        text = str(err)
    else:
        raise AssertionError("a relative name was accepted")
    assert text.startswith("modules: no module or parameter is named 'mlp.fc'; 5 end with it ('h.0.mlp.fc', "
                           "'h.1.mlp.fc', 'h.2.mlp.fc' and 2 more)")
    suggested = re.search(r"modules=(\[.*\])$", text).group(1)
    names = eval(suggested, {"model": model})  # noqa: S307 - the message's own example, run as a user would
    assert [t.name for t in wf.resolve_targets(model, names)] == [f"h.{i}.mlp.fc.weight" for i in range(5)]
