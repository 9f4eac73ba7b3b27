"""pytest-benchmark configuration for benchmarks/.

Quick mode (default, CI): tiny shapes, torch backend on CPU; add ``--benchmark-disable``
to run each benchmark once as a smoke test. Full mode: ``--bench-full`` (or
``WF_BENCH_FULL=1``) uses ResNet-scale block counts and is meant for the GPU machine,
where the cuda / triton backends are benchmarked too.
"""
import os


def pytest_addoption(parser):
    parser.addoption("--bench-full", action="store_true", default=False,
                     help="benchmarks/: large shapes (for a GPU machine)")


def pytest_configure(config):
    full = config.getoption("--bench-full", default=False) or os.environ.get("WF_BENCH_FULL", "0") == "1"
    os.environ["WF_BENCH_FULL"] = "1" if full else "0"
