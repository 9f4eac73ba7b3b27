"""damp_live's report on a synthetic CSV: mean ± std per rule, the paired new - old difference and the lambda
ratio, computed here from the rows."""
import csv
import statistics

from benchmarks.damp_live import FIELDS, NEW, OLD, report

OLD_ACC, NEW_ACC = [0.80, 0.86, 0.83], [0.82, 0.85, 0.87]
OLD_DAMP, NEW_DAMP = [1e-4, 2e-4, 4e-4], [1e-3, 1e-3, 2e-3]


def test_report_pairs_seeds(tmp_path):
    with open(tmp_path / "damp_live.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for rule, accs, damps in ((OLD, OLD_ACC, OLD_DAMP), (NEW, NEW_ACC, NEW_DAMP)):
            for seed, (a, d) in enumerate(zip(accs, damps)):
                writer.writerow(dict(model="tiny", rule=rule, alpha="0.1", sparsity=0.9, seed=seed, accuracy=a,
                                     damp_last_step=d, steps=8, device="cpu"))
    text = report(str(tmp_path))
    assert (tmp_path / "damp_live.md").read_text() == text
    cell = lambda a: f"{statistics.mean(a):.2f} ± {statistics.stdev(a):.2f} (n=3)"  # noqa: E731
    diff = [100 * (b - a) for a, b in zip(OLD_ACC, NEW_ACC)]
    ratio = statistics.mean(b / a for a, b in zip(OLD_DAMP, NEW_DAMP))
    assert f"| tiny | 90 | {OLD} | 0.1 | 8 | {cell([100 * a for a in OLD_ACC])} | - | - |" in text
    assert (f"| tiny | 90 | {NEW} | 0.1 | 8 | {cell([100 * a for a in NEW_ACC])} | "
            f"{statistics.mean(diff):+.2f} ± {statistics.stdev(diff):.2f} (n=3) | {ratio:.2f} |") in text
