"""demo_seeds' summary on synthetic runs (means, the cells where the defaults win, a mismatch refused) and the
committed report (its JSON renders to its committed Markdown)."""
import json
import os

import pytest

from benchmarks.demo_seeds import DEFAULTS, DIAGONAL, markdown, summarise

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run(seed, defaults, diagonal, sparsities=(0.8, 0.9)):
    return {"seed": seed, "sparsities": list(sparsities), "dense_accuracy": 0.97,
            "accuracy": {DEFAULTS: list(defaults), DIAGONAL: list(diagonal)}}


def test_summary_means_and_winning_cells():
    runs = [run(0, (0.9, 0.8), (0.7, 0.85)), run(1, (0.7, 0.6), (0.5, 0.4))]
    s = summarise(runs, compare_from=0.8)
    assert s["mean_accuracy"][DEFAULTS] == pytest.approx([0.8, 0.7])
    assert s["mean_accuracy"][DIAGONAL] == pytest.approx([0.6, 0.625])
    assert (s["cells"], s["defaults_beat_diagonal"]) == (4, 3)  # seed 0 at 90% loses by 0.05
    assert s["margin_min"] == pytest.approx(-0.05) and s["margin_max"] == pytest.approx(0.2)
    assert summarise(runs, compare_from=0.9)["cells"] == 2


def test_runs_of_other_sparsities_are_refused():
    with pytest.raises(ValueError, match="^runs:"):
        summarise([run(0, (0.9, 0.8), (0.7, 0.85)), run(1, (0.9,), (0.7,), sparsities=(0.8,))])


def test_committed_report_renders_from_its_json():
    with open(os.path.join(RESULTS, "demo_seeds.json")) as f:
        report = json.load(f)
    assert summarise(report["runs"]) == report["summary"]  # JSON keeps floats exactly
    with open(os.path.join(RESULTS, "demo_seeds.md")) as f:
        assert f.read() == markdown(report["summary"], report["runs"], report["device"], report["commit"])
