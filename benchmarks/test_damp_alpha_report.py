"""damp_alpha's report on a synthetic CSV: mean ± std, minimum and mean kept fraction per weight, computed here."""
import csv
import json
import statistics

from benchmarks.damp_alpha import FIELDS, report

ROWS = [("defaults, alpha 0.1", "0.1", 0.95, [0.80, 0.86, 0.83], [{"a": 0.1, "b": 0.5}, {"a": 0.2, "b": 0.7},
                                                                 {"a": 0.3, "b": 0.6}], [[], ["b"], []]),
        ("global magnitude", "0.1", 0.95, [0.81], [{"a": 0.05, "b": 0.9}], [[]])]


def test_report_rows(tmp_path):
    with open(tmp_path / "damp_alpha_tiny.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for name, alpha, s, accs, dens, coll in ROWS:
            for seed, (a, d, c) in enumerate(zip(accs, dens, coll)):
                writer.writerow(dict(model="tiny", setting=name, alpha=alpha, sparsity=s, seed=seed, accuracy=a,
                                     densities=json.dumps(d), collapsed=json.dumps(c), device="cpu"))
    text = report(str(tmp_path), "tiny")
    assert (tmp_path / "damp_alpha_tiny.md").read_text() == text
    accs = [100 * a for a in ROWS[0][3]]
    cell = f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f} (n=3)"
    assert f"| defaults, alpha 0.1 | 0.1 | 95 | {cell} | {min(accs):.2f} | 0.200 | 0.600 | b |" in text
    assert "| global magnitude | - | 95 | 81.00 | 81.00 | 0.050 | 0.900 | - |" in text
