"""benchmarks/nm_conv.py: its channel-run count and its Markdown table (no data needed)."""
from __future__ import annotations

import argparse
import csv

import torch
from torch import nn

from benchmarks import nm_conv


def test_channel_violations_counts_runs_of_input_channels():
    conv = nn.Conv2d(8, 2, 3, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0:3, 1, 2] = 1.0      # 3 non-zeros in channels 0..3 at (out 0, kh 1, kw 2): one violation
        conv.weight[1, 4:6, :, :] = 1.0      # 2 non-zeros in every run of channels 4..7 of out 1: none
    model = nn.Sequential(conv)
    assert nm_conv.channel_violations(model, ["0.weight"]) == (1, 2 * 2 * 9)


def test_report_lists_every_row(tmp_path):
    row = dict.fromkeys(nm_conv.FIELDS, "")
    row.update(grouping="channels", method="magnitude", seed=0, accuracy=0.5, dense_accuracy=0.9,
               channel_violations=0, channel_runs=12)
    with open(tmp_path / "nm_conv.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=nm_conv.FIELDS)
        writer.writeheader()
        writer.writerows([row, dict(row, grouping="row-major", channel_violations=3)])
    text = nm_conv.report(argparse.Namespace(out=str(tmp_path)))
    assert "| channels | magnitude | 0 | 50.00 | 90.00 | 0 of 12 | - |" in text
    assert "| row-major | magnitude | 0 | 50.00 | 90.00 | 3 of 12 | - |" in text
