#!/usr/bin/env bash
# Compile check of the CUDA sources without a GPU (CI):
#  1. every csrc/*.cu with nvcc for sm_90 (compile only; ptxas register / smem report with
#     VERBOSE=1);
#  2. csrc/bindings.cpp syntax-checked with g++ against the torch headers of .venv (the CPU
#     wheel ships them, except the generated c10/cuda/impl/cuda_cmake_macros.h, which is
#     bypassed with -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE) and the CUDA include dir;
#  3. the launchers + driver built as plain C++ against the CPU emulator (csrc/emu), with
#     AddressSanitizer/UBSan where available, and run on small cases: executes the kernels'
#     index logic and barriers against double-precision references (skip: WF_SKIP_EMU=1);
#  4. optionally (WF_CHECK_CMAKE=1) configure + build the standalone CMake project.
# Fails on any error. About a minute on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ]; then
  echo "check_cuda_compile: nvcc not found; CUDA sources NOT compile-checked" >&2
  [ "${CI:-}" = "true" ] && exit 1
  exit 0
fi
CXX=${CXX:-g++}
PY=${PYTHON:-.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ptxas_flags=()
[ "${VERBOSE:-0}" = "1" ] && ptxas_flags=(-Xptxas -v)

# 1. nvcc, two files at a time.
pids=()
n=0
for f in csrc/*.cu; do
  [ -e "$f" ] || continue
  "$NVCC" -std=c++17 -O3 -arch=sm_90 -Icsrc -Xcompiler -Wall "${ptxas_flags[@]}" \
    -c "$f" -o "$tmp/$(basename "$f").o" &
  pids+=($!)
  n=$((n + 1))
  if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p"; done
echo "check_cuda_compile: $n CUDA source file(s) compiled for sm_90 with $($NVCC --version | tail -1)"

# 2. bindings.cpp against the torch headers, in the background while 3. builds.
# nvcc may be a wrapper script: ask it where its toolkit lives.
cuda_top=$("$NVCC" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
cuda_inc="${CUDA_HOME:-${cuda_top:-/usr/local/cuda}}/include"
bind_pid=""
if [ -x "$PY" ] && "$PY" -c "import torch" 2>/dev/null; then
  torch_inc=$("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join('-isystem ' + p for p in c.include_paths()))")
  py_inc=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  # The standard torch's own extension builder uses for this torch version.
  std=$("$PY" -c "import inspect, torch.utils.cpp_extension as c; print('c++20' if '-std=c++20' in inspect.getsource(c) else 'c++17')")
  if [ -e "$("$PY" -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'include', 'c10', 'cuda', 'CUDAStream.h'))")" ]; then
    # shellcheck disable=SC2086
    "$CXX" -std="$std" -fsyntax-only -Wall -Wextra -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -Icsrc \
      $torch_inc -isystem "$py_inc" -isystem "$cuda_inc" csrc/bindings.cpp &
    bind_pid=$!
  else
    echo "check_cuda_compile: torch in $PY has no c10/cuda headers; bindings.cpp NOT checked"
  fi
else
  echo "check_cuda_compile: no torch in $PY; bindings.cpp NOT checked"
fi

# 3. CPU emulator build + run.
if [ "${WF_SKIP_EMU:-0}" != "1" ]; then
  # AddressSanitizer (exact-size emulated allocations) catches out-of-bounds indexing.
  san=(-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer)
  echo 'int main() { return 0; }' > "$tmp/san.cpp"
  "$CXX" "${san[@]}" "$tmp/san.cpp" -o "$tmp/san" 2>/dev/null || san=()
  "$CXX" -std=c++17 -O1 -g "${san[@]}" -DWF_EMULATE -Icsrc -x c++ csrc/*.cu -x none \
    csrc/driver/woodfisher_driver.cpp -o "$tmp/driver_emu"
  for seed in 1 2; do  # second run: gridDim capped so that grid-stride loops iterate
    if ! WF_EMU_SEED=$seed WF_EMU_MAX_GRID=$((seed == 2 ? 2 : 0)) "$tmp/driver_emu" --quick \
        > "$tmp/emu.log" 2>&1; then
      cat "$tmp/emu.log"
      echo "check_cuda_compile: emulated kernels FAILED" >&2
      exit 1
    fi
  done
  echo "check_cuda_compile: emulated kernels passed ($(grep -c ' ok$' "$tmp/emu.log") checks per run, 2 runs${san:+, with ASan/UBSan})"
fi

if [ -n "$bind_pid" ]; then
  wait "$bind_pid"
  echo "check_cuda_compile: bindings.cpp syntax-checked against torch $("$PY" -c 'import torch; print(torch.__version__)') headers (-std=$std)"
fi

# 4. Standalone CMake project.
if [ "${WF_CHECK_CMAKE:-0}" = "1" ]; then
  cmake -S . -B "$tmp/cmake" -DCMAKE_CUDA_COMPILER="$NVCC" > "$tmp/cmake.log" 2>&1 \
    && cmake --build "$tmp/cmake" -j 2 >> "$tmp/cmake.log" 2>&1 \
    || { cat "$tmp/cmake.log"; echo "check_cuda_compile: CMake build FAILED" >&2; exit 1; }
  echo "check_cuda_compile: CMake project configured and built"
fi
