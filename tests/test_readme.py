"""The README's Quick start snippets run as written on a small model (README stays true)."""
from __future__ import annotations

import copy
import pathlib
import re
import warnings

import torch
from torch import nn

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _quick_start_blocks():
    text = README.read_text()
    section = text[text.index("## Quick start"):text.index("## Pruning your own model")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_quick_start_snippets_run():
    blocks = _quick_start_blocks()
    assert len(blocks) >= 4
    torch.manual_seed(0)
    # a head of 16 outputs: one of 4 (128 weights) collapses, rightly warned, at the two-phase sweep's 90%
    dense = nn.Sequential(nn.Flatten(), nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(1024, 20, generator=g), torch.randint(0, 16, (1024,), generator=g)
    loader = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 1024, 64)]  # enough for the snippets' num_grads
    namespace = {"train_loader": loader, "loader": loader}
    with warnings.catch_warnings(record=True) as rec:  # the README's own code runs without a warning
        warnings.simplefilter("always")
        for block in blocks:  # each snippet is an example of its own, on the reader's dense model
            namespace["model"] = model = copy.deepcopy(dense)
            exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    assert not [str(w.message) for w in rec if issubclass(w.category, UserWarning)]
    res = namespace["res"]
    assert 0.79 <= res.sparsity <= 0.81
    assert all(float((p == 0).float().mean()) > 0.5 for n, p in model.named_parameters() if n.endswith("weight")
               and p.dim() == 2)
