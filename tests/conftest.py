"""Test configuration: Triton runs in its interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is imported, so it is set here, at the
top of the first module pytest loads.

Never call torch.set_num_threads in tests or library code: with the MKL of torch 2.13's
CPU wheel, changing the thread count mid-process makes later batched LU factorisations
(torch.linalg.inv of blocks of 200+) fail ("Pivots given to lu_solve ..."). Set
OMP_NUM_THREADS before the process starts instead.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# the gloo runs of the distributed tests: one spawn per world size and session (tests/_dist_harness.py)
@pytest.fixture(scope="session")
def suite2(tmp_path_factory):
    import _dist_harness

    return _dist_harness._run_suite(2, tmp_path_factory)


@pytest.fixture(scope="session")
def suite3(tmp_path_factory):
    import _dist_harness

    return _dist_harness._run_suite(3, tmp_path_factory)
