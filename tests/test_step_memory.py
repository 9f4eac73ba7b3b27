"""A multi-step call (num_steps="auto" is several steps by default) holds one step's gradients and inverses at a
time: its peak tensor memory is that of a single step of the same size, not the sum of two steps'."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import woodfisher as wf
from woodfisher.memory import TensorMemoryMeter


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


@pytest.mark.parametrize("method", ["woodfisher", "diag_fisher"])
def test_steps_do_not_hold_the_previous_steps_curvature(method):
    loader = [(torch.randn(16, 96), torch.randint(0, 10, (16,))) for _ in range(8)]
    peaks = {}
    for steps in (1, 3):
        with TensorMemoryMeter() as meter:
            wf.prune_one_shot(_model(), loader, sparsity=0.6, method=method, num_grads=32 * steps, num_steps=steps,
                              progress=False)
        peaks[steps] = meter.peak
    grads_bytes = 32 * sum(p.numel() for p in _model().parameters() if p.dim() > 1) * 4  # one step's gradients
    assert peaks[3] < peaks[1] + grads_bytes / 2, peaks  # two steps alive at once would add >= grads_bytes
