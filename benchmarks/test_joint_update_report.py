"""joint_update.report on a synthetic CSV: paired means and differences computed here."""
import csv
import statistics

from benchmarks.joint_update import FIELDS, report

ACC = {("mlpnet", "paper (1 step)", 0.9): {False: [0.80, 0.82], True: [0.85, 0.83]},
       ("resnet20", "defaults", 0.8): {False: [0.70], True: [0.75]}}


def test_report_pairs_seeds_and_writes_the_table(tmp_path):
    with open(tmp_path / "joint_update.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for (model, setting, s), by_joint in ACC.items():
            for joint in (True, False):   # joint rows first: the report must pair by seed, not by order
                for seed, acc in enumerate(by_joint[joint]):
                    writer.writerow(dict(model=model, setting=setting, joint_update=joint, sparsity=s, seed=seed,
                                         accuracy=acc, dense_accuracy=0.9, eval_samples=10, sparsity_actual=s,
                                         update_seconds=1.0 + joint, call_seconds=3.0, steps=1, device="cpu"))
    text = report(str(tmp_path))
    assert (tmp_path / "joint_update.md").read_text() == text
    summed, joint = ACC[("mlpnet", "paper (1 step)", 0.9)][False], ACC[("mlpnet", "paper (1 step)", 0.9)][True]
    diffs = [100 * (y - x) for x, y in zip(summed, joint)]
    row = (f"| mlpnet | paper (1 step) | 90 | {100 * statistics.mean(summed):.2f} | "
           f"{100 * statistics.mean(joint):.2f} | {statistics.mean(diffs):+.2f} | {min(diffs):+.2f} to "
           f"{max(diffs):+.2f} | 2 | 1.00 | 2.00 | 3.00 | 3.00 |")
    assert row in text
    assert "| resnet20 | defaults | 80 | 70.00 | 75.00 | +5.00 | +5.00 to +5.00 | 1 |" in text
