#!/usr/bin/env bash
# Compile check of the CUDA sources without a GPU (CI):
#  1. every csrc/*.cu with nvcc for sm_90 (compile only; the ptxas register / smem report is
#     kept for step 4 and printed with VERBOSE=1);
#  2. csrc/bindings.cpp syntax-checked with g++ against the torch headers of .venv (the CPU
#     wheel ships them, except the generated c10/cuda/impl/cuda_cmake_macros.h, which is
#     bypassed with -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE) and the CUDA include dir;
#  3. the launchers + driver built as plain C++ against the CPU emulator (csrc/emu), with
#     AddressSanitizer/UBSan where available, and run on small cases: executes the kernels'
#     index logic and barriers against double-precision references (skip: WF_SKIP_EMU=1);
#  4. the static goals of the Woodbury kernels (python -m benchmarks.static_model --check: FFMA per
#     shared/global load >= 4 in the SASS of the shared-memory build kernel, no spills,
#     >= 2 CTAs per SM at c = 128, the cost model's geometry equal to the launchers');
#  5. every Triton kernel variant compiled for sm_90 with a real launch's argument
#     specialization (scripts/triton_spec_compile.py --quick: no spills, no non-IEEE division /
#     square root) with the installed triton, and with triton 3.6 (the GPU image's version) in
#     the side venv .venv-triton36 (created on first use; WF_TRITON36=0 skips it, and a
#     failed install only warns); WF_SKIP_TRITON=1 skips step 5;
#  6. optionally (WF_CHECK_CMAKE=1) configure + build the standalone CMake project.
# Fails on any error. About 3-4 minutes on 2 cores (steps 5: ~2 minutes with a cold cache).
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
# 1. nvcc, two files at a time; object + ptxas report per file in $tmp.
compile_one() {
  if ! "$NVCC" -std=c++17 -O3 -arch=sm_90 -Icsrc -Xcompiler -Wall -Xptxas -v -c "$1" \
      -o "$tmp/$(basename "$1").o" 2> "$tmp/$(basename "$1").ptxas.log"; then
    cat "$tmp/$(basename "$1").ptxas.log" >&2
    return 1
  fi
  [ "${VERBOSE:-0}" = "1" ] && cat "$tmp/$(basename "$1").ptxas.log"
  return 0
}
pids=()
n=0
for f in csrc/*.cu; do
  [ -e "$f" ] || continue
  compile_one "$f" &
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
  # shellcheck disable=SC2054  # the commas belong to the -fsanitize value
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

# 4. Static goals of the Woodbury kernels (SASS, ptxas, occupancy, cost-model geometry).
if [ -x "$PY" ] && "$PY" -c "import torch" 2>/dev/null; then
  driver=()
  [ -x "$tmp/driver_emu" ] && driver=(--driver "$tmp/driver_emu")
  if ! "$PY" -m benchmarks.static_model --check --no-triton --build-dir "$tmp" "${driver[@]}" > "$tmp/static.log" 2>&1; then
    cat "$tmp/static.log"
    echo "check_cuda_compile: static kernel goals FAILED" >&2
    exit 1
  fi
  echo "check_cuda_compile: static goals met ($(grep -c '\[met\]' "$tmp/static.log") checks: FFMA/load, spills, CTAs/SM, cost-model geometry)"
fi

# 5. Triton variants with the real launch specialization, installed triton and triton 3.6.
triton_spec() {  # triton_spec PYTHON LABEL
  if ! "$1" -c "import triton.backends.nvidia" 2>/dev/null; then
    echo "check_cuda_compile: $2 has no triton NVIDIA backend; Triton variants NOT compiled"
    return 0
  fi
  if ! TRITON_INTERPRET=0 TRITON_DEFAULT_FP_FUSION=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
      "$1" scripts/triton_spec_compile.py --quick \
      > "$tmp/triton_$2.log" 2>&1; then
    grep -E '"error"|"stl": [1-9]|"non_ieee": \["|SUMMARY|Error' "$tmp/triton_$2.log" | tail -20
    echo "check_cuda_compile: Triton variants FAILED ($2)" >&2
    return 1
  fi
  echo "check_cuda_compile: $(grep SUMMARY "$tmp/triton_$2.log" | sed 's/^SUMMARY //')"
}
if [ "${WF_SKIP_TRITON:-0}" != "1" ] && [ -x "$PY" ]; then
  triton_spec "$PY" installed
  if [ "${WF_TRITON36:-1}" != "0" ]; then
    side=.venv-triton36
    if [ ! -x "$side/bin/python" ] || ! "$side/bin/python" -c "import triton, torch" 2>/dev/null; then
      # only triton in the side venv; torch and the package come from .venv through a .pth file
      { python3 -m venv "$side" && "$side/bin/python" -m pip install -q --disable-pip-version-check "triton==3.6.0" \
          && "$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
             > "$("$side/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_woodfisher_venv.pth"; } \
        > "$tmp/triton36_install.log" 2>&1 || true
    fi
    if "$side/bin/python" -c "import triton, torch; assert triton.__version__.startswith('3.6')" 2>/dev/null; then
      triton_spec "$side/bin/python" triton36
    else
      echo "check_cuda_compile: WARNING: triton 3.6 side venv unavailable (see pip); 3.6 variants NOT compiled" >&2
    fi
  fi
fi

# 6. Standalone CMake project.
if [ "${WF_CHECK_CMAKE:-0}" = "1" ]; then
  if ! { cmake -S . -B "$tmp/cmake" -DCMAKE_CUDA_COMPILER="$NVCC" > "$tmp/cmake.log" 2>&1 \
          && cmake --build "$tmp/cmake" -j 2 >> "$tmp/cmake.log" 2>&1; }; then
    cat "$tmp/cmake.log"
    echo "check_cuda_compile: CMake build FAILED" >&2
    exit 1
  fi
  echo "check_cuda_compile: CMake project configured and built"
fi
