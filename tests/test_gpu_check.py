"""scripts/gpu_check.sh, the one GPU command, cannot run here; its dry run (GPU_CHECK_DRY_RUN=1)
exercises the same stages, timeouts, result files and summary on the CPU with stand-ins.
Also: on a GPU machine ``pytest -m gpu`` selects the Triton tests and the backend matrix."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("env", "t_triton", "drvbuild", "build", "sanitize", "t_gpu_ops", "t_gpu", "sbs", "r50", "step")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="the dry run builds the emulated driver with g++")
def test_dry_run_runs_every_stage_and_writes_the_summary(tmp_path):
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", OUT=str(tmp_path / "out"), PYTHON=sys.executable,
               GFR_BUDGET="900")
    res = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1000)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "DRY RUN" in summary and "device :" in summary
    for stage in STAGES:
        assert re.search(rf"^  {stage}\s+ok\s", summary, re.M), f"stage {stage} not ok:\n{summary}"
    assert "stages that failed or timed out: none" in summary
    assert "driver: woodfisher_driver: passed" in summary
    assert "side-by-side benchmark" in summary and "measured peaks" in summary
    assert re.search(r"ResNet-50 one-shot step\n  .*: total [0-9.]+ s", summary), summary
    assert "per_sample_grads='expanded'" in summary and "kernels dispatched: batched fwd+bwd" in summary, summary
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"summary.txt", "all.tar.gz", "junit_triton.xml", "junit_gpu.xml", "kernels_cuda.json"} <= files


def test_gpu_mark_selects_triton_tests_and_backend_matrix_on_a_gpu_machine():
    """Collection as a GPU machine sees it (torch.cuda.is_available patched to True)."""
    code = ("import sys, torch, pytest; torch.cuda.is_available = lambda: True; "
            "sys.exit(pytest.main(['--collect-only', '-q', '-m', 'gpu', '-p', 'no:cacheprovider', "
            "'tests/test_triton_kernels.py', 'tests/test_ops.py']))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ids = [line for line in res.stdout.splitlines() if "::" in line]
    assert any(i.startswith("tests/test_triton_kernels.py::") for i in ids)
    assert any("test_ops.py::" in i and "triton-cuda" in i for i in ids)
    assert any("test_ops.py::" in i and "torch-cuda" in i for i in ids)
    assert not any("-cpu-" in i for i in ids), "CPU rows must not carry the gpu mark"
