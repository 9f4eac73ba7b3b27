#!/usr/bin/env bash
# The test command: installs everything, lints (ruff), compile-checks the CUDA sources with nvcc,
# runs the test suite (Triton kernels under TRITON_INTERPRET=1 on CPU) and the
# quick benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check python tests benchmarks scripts woodfisher_kernels examples
bash scripts/check_cuda_compile.sh
.venv/bin/python -m pytest -q -rs tests benchmarks --benchmark-disable "$@"
