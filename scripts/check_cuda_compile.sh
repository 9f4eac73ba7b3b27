#!/usr/bin/env bash
# Compile every csrc/*.cu for sm_90 (compile only, no GPU needed) so a broken kernel fails CI.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ]; then
  echo "check_cuda_compile: nvcc not found; CUDA sources NOT compile-checked" >&2
  [ "${CI:-}" = "true" ] && exit 1
  exit 0
fi
tmp=$(mktemp -d)
n=0
for f in csrc/*.cu; do
  [ -e "$f" ] || continue
  "$NVCC" -std=c++17 -O3 -arch=sm_90 -Icsrc -c "$f" -o "$tmp/$(basename "$f").o"
  n=$((n + 1))
done
rm -rf "$tmp"
echo "check_cuda_compile: $n CUDA source file(s) compiled for sm_90 with $($NVCC --version | tail -1)"
