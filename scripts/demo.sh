#!/usr/bin/env bash
# The main job: train a small MLP on scikit-learn's digits, prune it one-shot with
# WoodFisher vs global magnitude vs diagonal Fisher, print the table, save the plot.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "demo: setting up .venv (first run: torch, triton and the package, a few minutes; later: ~20 s)" >&2
bash scripts/setup_env.sh >/dev/null
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} .venv/bin/python -m woodfisher demo --out out/demo "$@"
