"""step_cpu's Markdown on a synthetic report (the ratio bound, the below-goal explanation, the memory floor's
meaning) and on the committed reports (each JSON renders to its committed Markdown)."""
import json
import os

import pytest
import torch

from benchmarks.step_cpu import markdown, operator_counts

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def entry(yardstick, floor, bs1, bs64):
    return {"numel": 1000, "yardstick_s": yardstick, "floor_s": floor, "grads_bs1_s": bs1, "grads_bs64_s": bs64,
            "ratio_bs1": yardstick / bs1, "ratio_bs64": yardstick / bs64}


def test_bound_and_goal_lines():
    report = {"device": {"device_name": "test cpu"}, "note": "synthetic", "num_grads": 8, "repeats": 1,
              "models": {"small": {"after": entry(0.1, 0.4, 1.0, 0.5)},        # bound 0.25 < 0.5
                         "slow": {"after": entry(1.0, 0.1, 4.0, 2.5)},         # 0.25 / 0.4, bound 10
                         "big": {"after": entry(2.0, 0.1, 3.0, 2.5)}}}         # 0.67 / 0.8: meets
    text = markdown(report)
    assert "| small | after | 1,000 | 0.100 | 1.000 | **0.10** | 0.500 | **0.20** | 0.400 | 0.25 |" in text
    assert "- small: ratio 0.10 / 0.20 (loader batch 1 / 64) is below 0.5, and can't reach it here" in text
    assert "bounded at ratio <= 0.25" in text
    assert "- slow: ratio 0.25 / 0.40 (loader batch 1 / 64) is below 0.5 (the memory floor bounds it at 10.00)." \
        in text
    assert "- meet the 0.5 goal with both loaders: big." in text


def test_operator_counts_split_kernels_from_views():
    x = torch.ones(4, 3)
    counts = operator_counts(lambda: (x + 1).reshape(12).mul(2).view(3, 4).t())  # add, mul; views: view x2, t
    assert counts["kernels"] == 2 and counts["views"] >= 2


def test_operator_table():
    row = dict(entry(0.1, 0.4, 1.0, 0.5), ops_batched_kernels=100, ops_vmap_kernels=250, ops_expanded_kernels=150,
               ops_batched_views=10, ops_vmap_views=900, ops_expanded_views=40, grads_bs64_onechunk_s=0.4)
    report = {"device": {"device_name": "test cpu"}, "note": "synthetic", "num_grads": 8, "repeats": 1,
              "models": {"net": {"after": row}}}
    text = markdown(report)
    assert "| net | 100 | 250 | 150 | 2.50 | 1.50 | 10/900/40 |" in text
    assert "| net | 0.500 | 0.400 | 0.80 |" in text


def test_floor_text_follows_how_the_report_measured_it():
    report = {"device": {"device_name": "test cpu"}, "note": "synthetic", "num_grads": 8, "repeats": 1,
              "models": {"net": {"after": entry(0.1, 0.4, 1.0, 0.5)}}}
    legacy = markdown(report)   # written before the key existed: the floor was the first write into fresh memory
    assert "gradient entries once into fresh memory. Ratio bound" in legacy
    assert "already mapped" not in legacy
    mapped = markdown(dict(report, memory_floor="mapped"))
    assert "gradient entries once into memory already mapped (fresh memory adds" in mapped


@pytest.mark.parametrize("name", ["step_cpu", "step_cpu_b925bb6_vs_7637a2b", "step_cpu_vs_1c3245b",
                                  "step_cpu_mlpnet_main", "step_cuda"])
def test_committed_reports_render_to_their_markdown(name):
    with open(os.path.join(RESULTS, f"{name}.json")) as f:
        report = json.load(f)
    with open(os.path.join(RESULTS, f"{name}.md")) as f:
        assert markdown(report) == f.read()
