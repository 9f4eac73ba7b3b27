"""The benchmark baselines compute the same matrix as the package, and the scripts run.

Baselines (a) (paper loop) and (b) (einsum + baddbmm per gradient) must equal
``fisher_inverse`` and a dense float64 ``inv(damp I + G^T G / N)`` (same maths);
``side_by_side.py --quick`` and the ResNet-50 step script (tiny stand-in model) run.
"""
import json

import pytest
import torch

import woodfisher_kernels as wk
from benchmarks import _common as cm
from benchmarks import baselines, cpu_fallback, precision_table, previous, resnet50_step, side_by_side


def _dense_reference(grads, damp, n):
    fisher = torch.einsum("bmi,bmj->bij", grads, grads) / n
    fisher.diagonal(dim1=1, dim2=2).add_(damp)
    return torch.linalg.inv(fisher)


@pytest.mark.parametrize("b,m,c", [(3, 7, 5), (2, 3, 9), (1, 12, 4)])
@pytest.mark.parametrize("num_samples", [None, 20.0])
def test_baselines_match_fisher_inverse_float64(b, m, c, num_samples):
    gen = torch.Generator().manual_seed(b * 100 + m * 10 + c)
    grads = torch.randn(b, m, c, dtype=torch.float64, generator=gen)
    damp = 0.1
    n = float(m) if num_samples is None else num_samples
    ref = _dense_reference(grads, damp, n)
    ours = wk.fisher_inverse(grads, damp, num_samples, backend="torch")
    loop = baselines.reference_loop_inverse(grads, damp, num_samples)
    einsum = baselines.batched_einsum_inverse(grads, damp, num_samples)
    for out in (ours, loop, einsum):
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_baseline_updates_continue_an_inverse():
    """Streaming: k more gradients on an existing inverse = inverse of the bigger Fisher."""
    grads = torch.randn(2, 10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref = _dense_reference(grads, 0.5, 10.0)
    for update in (baselines.reference_loop_update_, baselines.batched_einsum_update_):
        inv = wk.fisher_inverse(grads[:, :4], 0.5, 10.0, backend="torch")
        torch.testing.assert_close(update(inv, grads[:, 4:], 10.0), ref, rtol=1e-10, atol=1e-10)


def test_baselines_refuse_bad_input():
    with pytest.raises(ValueError, match="damp"):
        baselines.reference_loop_inverse(torch.randn(1, 2, 3), 0.0)
    with pytest.raises(ValueError, match="grads"):
        baselines.batched_einsum_inverse(torch.randn(2, 3), 1.0)


def test_float64_apply_reference_both_paths():
    g = torch.randn(2, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    v = torch.randn(2, 7, 3, dtype=torch.float64)
    want = _dense_reference(g, 0.2, 5.0) @ v
    torch.testing.assert_close(cm.float64_apply_reference(g, 0.2, 5.0, v), want)
    big = torch.randn(1, 3, 4100, dtype=torch.float64)        # c > 4096: Woodbury path
    vb = torch.randn(1, 4100, 2, dtype=torch.float64)
    y = cm.float64_apply_reference(big, 0.3, 3.0, vb)
    fy = 0.3 * y + big.transpose(1, 2) @ (big @ y) / 3.0     # F y must give back v
    torch.testing.assert_close(fy, vb)


def test_side_by_side_quick_runs(tmp_path):
    res = side_by_side.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    recs = [r for r in res["records"] if "error" not in r]
    methods = {r["method"] for r in recs if r["section"] == "build"}
    assert {"ref_loop", "einsum_baddbmm", "torch", "lowrank"} <= methods
    assert {r["section"] for r in recs} == {"build", "stream", "stats"}
    for r in recs:
        assert r["time_full_s"] > 0 and r["time_full_s"] >= r["time_measured_s"] * (1 - 1e-9)
        if r.get("rel_err_vs_float64") is not None:
            assert r["rel_err_vs_float64"] < 1e-2
    saved = json.loads((tmp_path / "kernels_cpu_quick.json").read_text())
    assert saved["peaks"]["fp32_peak_tflops"] > 0 and saved["peaks"]["mem_bandwidth_gbs"] > 0
    assert (tmp_path / "kernels_cpu_quick.md").read_text().startswith("# Kernel benchmarks")
    assert (tmp_path / "roofline_cpu_quick.png").stat().st_size > 1000


def test_resnet50_step_smoke_runs():
    res = resnet50_step.main(["--model", "smoke", "--device", "cpu", "--api", "ops", "--no-warmup",
                              "--sparsity", "0.5"])
    run = res["runs"][0]
    assert set(run["phases_s"]) == {"gradients", "inverse", "select", "update"}
    assert abs(run["sparsity"] - 0.5) < 0.01


def test_previous_fallback_computes_the_same_inverse():
    g = torch.randn(3, 20, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    want = _dense_reference(g, 0.3, 20.0)
    torch.testing.assert_close(previous.fisher_inverse(g, 0.3, 20.0), want)
    a, diag = previous.lowrank_factor(g[:, :5], 0.3, 5.0)
    torch.testing.assert_close(diag, torch.diagonal(_dense_reference(g[:, :5], 0.3, 5.0), dim1=1, dim2=2))


def test_cpu_fallback_quick_runs(tmp_path):
    res = cpu_fallback.main(["--quick", "--out", str(tmp_path)])
    for row in res["build"]:
        for r in row["methods"].values():
            assert r["gflops"] > 0 and 0 < r["pct_of_peak"] and r["rel_err_vs_float64"] <= r["bound"]
    assert res["lowrank"]["diag_max_rel_err_vs_float64"] < 1e-5
    assert (tmp_path / "cpu_fallback_quick.md").read_text().startswith("# CPU fallback")
    png = tmp_path / "cpu_fallback_quick.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png.unlink()
    assert cpu_fallback.main(["--plot", str(tmp_path / "cpu_fallback_quick.json")])["plot"] == str(png)
    assert png.exists()


def test_precision_table_quick_runs(tmp_path):
    rows = precision_table.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    for row in rows:
        for res in row["results"].values():
            assert res["outcome"] == "ValueError" or res["error"] <= row["bound"]
    assert "| c | m | damp |" in (tmp_path / "PRECISION_quick.md").read_text()


def test_cpu_kernel_ab_runs_and_both_kernels_agree(tmp_path):
    """The paired-run harness compiles the kernel of a git revision next to this checkout's and runs both."""
    import shutil
    import subprocess

    from benchmarks import cpu_kernel_ab
    if shutil.which("git") is None or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("needs a git checkout (the harness reads csrc/cpu of a revision with git show)")
    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler (cc)")
    report = cpu_kernel_ab.main(["--before", "HEAD", "--quick", "--out", str(tmp_path)])
    assert len(report["rows"]) == 8
    for row in report["rows"]:
        assert row["before_s"] > 0 and row["after_s"] > 0
        assert row["max_rel_difference"] < 1e-5   # the same maths (bitwise equal unless csrc/cpu was edited)
    saved = json.loads((tmp_path / "cpu_kernel_ab_quick.json").read_text())
    assert saved["before"] == "HEAD" and (tmp_path / "cpu_kernel_ab_quick.md").exists()


def test_thp_step_runs_both_settings(tmp_path):
    """The huge-page benchmark runs a default step in a worker process per allocation setting."""
    from benchmarks import thp_step
    report = thp_step.main(["--models", "mlpnet", "--num-samples", "64", "--calls", "1", "--repeats", "1",
                            "--out", str(tmp_path)])
    rows = report["models"]["mlpnet"]
    assert list(rows) == list(thp_step.SETTINGS)
    for r in rows.values():
        assert r["wall"] > 0 and r["minor_faults"] >= 0
        assert all(0 <= r[k] <= r["total"] for k in ("gradients", "inverse", "select", "update"))
    assert "THP_MEM_ALLOC_ENABLE=1" in (tmp_path / "thp_step.md").read_text()
