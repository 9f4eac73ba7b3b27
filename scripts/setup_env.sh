#!/usr/bin/env bash
# Create .venv (if needed) with everything the package, demo and tests use, and
# install this package into it (editable, no build isolation so no second torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# transformers (extra "hf") and onnx/onnxruntime (extra "onnx"): test-only; neither pulls another torch
.venv/bin/python -m pip install -q --disable-pip-version-check \
  torch==2.13.0 triton numpy tqdm matplotlib scikit-learn transformers==5.18.0 \
  pytest pytest-benchmark hypothesis ruff==0.17.6 pybind11 ninja setuptools wheel onnx onnxscript onnxruntime 2>&1 \
  | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . 2>&1 \
  | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, woodfisher_kernels, woodfisher; print('torch', torch.__version__)"
