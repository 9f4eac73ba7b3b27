"""benchmarks/step_ops.py: the counts it records are those of the code (a small run), and its table renders."""
from __future__ import annotations

from benchmarks import step_ops


def test_counts_and_markdown():
    counts = step_ops.worker("mlpnet", 8)
    assert set(counts) == set(step_ops.PATHS)
    for path in step_ops.PATHS:
        assert counts[path]["kernels"] > 0
    # per-sample gradients dispatch more than the model's own batched pass; 8 samples are one vmap call either way
    assert counts["vmap"]["kernels"] > counts["batched"]["kernels"]
    assert counts["vmap"] == counts["vmap_one_call"]
    report = {"num_grads": 8, "commit": "abc", "torch": "x", "models": {"mlpnet": {"after": counts}}}
    text = step_ops.markdown(report)
    row = next(line for line in text.splitlines() if line.startswith("| mlpnet | after |"))
    assert f"| {counts['vmap_one_call']['kernels']} |" in row
