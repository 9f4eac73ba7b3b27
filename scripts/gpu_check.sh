#!/usr/bin/env bash
# gpu_check.sh: build, test, sanitize and benchmark woodfisher_kernels on a GPU machine in one
# command (written for an H200 machine: torch 2.11+cu130, triton 3.6, nvcc 13.0, no network).
#
#   cd <repo root> && OUT=<folder> bash scripts/gpu_check.sh          # ~8 min, hard cap GFR_BUDGET
#
# Seen on an H200 lease (2026-11-30): 15 min of device time per session, ~30 s to start a machine,
# 2 CPU threads visible there; one call `bash scripts/gpu_check.sh` with timeout_s 540 leaves time
# for one short follow-up. That run: build 27 s, Triton tests 34 s, ops matrix 25 s, the other GPU
# tests > 170 s (their float64 references have since moved their condition numbers to the CPU),
# side by side 101 s, ResNet-50 step 24 s, step 41 s.
#   GPU_CHECK_DRY_RUN=1 OUT=<folder> bash scripts/gpu_check.sh        # CPU: control flow only (~2 min)
#
# Every stage runs under its own `timeout`; a stage that fails or hangs never stops the later
# ones, and the whole run ends within GFR_BUDGET seconds (default 480). Stages (logs in brackets):
#   env       GPU, driver, toolchain and package versions                  [env.json, nvidia_smi.txt]
#   t_triton  pytest -m gpu on the Triton tests and the Triton rows of the backend matrix
#             (tests/test_triton_kernels.py, tests/test_ops.py -k triton), in the background
#             while the extension builds                                  [pytest_triton.log]
#   drvbuild  the standalone csrc/ driver, nvcc -arch sm_90 (background)   [driver_build.log]
#   build     CUDA extension: pip install --no-build-isolation --no-deps -e . with -Xptxas -v
#             (ptxas report in the log); fallback build_fb = setup.py build_ext --inplace;
#             cuobjdump of _C                                             [build.log, sass_arch.txt]
#   sanitize  (background) the driver on the GPU (every launcher vs float64 CPU references),
#             compute-sanitizer memcheck / racecheck / synccheck / initcheck on small driver
#             cases, memcheck of the torch ops (CUDA + Triton)     [driver.log, sanitizer_*.log]
#   t_gpu     pytest -m gpu, everything but Triton: the CUDA backend, the cuda / torch-on-GPU rows
#             of the backend matrix (tests/test_ops.py, in parallel: t_gpu_ops), the pruner
#   sbs       side-by-side benchmark (benchmarks/ pipeline, first-run profile: build c,m in
#             (64,64) (128,128) (256,256) (64,16) (128,16) (256,64); streaming k in 1,16,128 for
#             c in 64,128,256; OBS ops; CUDA shared vs tiled kernel)       [sbs.log]
#   r50       ResNet-50 one-shot step, paper setting 1000x80 (benchmarks/resnet50_step.py)
#   step      (before sbs and r50 on a GPU) the whole step by phase and per-sample gradients against
#             the batched fwd+bwd, MLPNet / ResNet-20 / MobileNet-like (benchmarks/step_cpu.py
#             --device cuda: step_cuda.json / .md, in all.tar.gz)
#   prof      Nsight Compute (ncu --clock-control none) on the CUDA build kernels at c = 64 / 128 / 512,
#             shared and tiled (scripts/gpu_check/prof_case.py), if any time is left  [prof.csv]
#   summary   summary.txt (names the device), printed last
# Test results also stream to junit_*.jsonl as they arrive, so a run cut short still counts.
# Output under $OUT (default ./gpu_check_out), 7 files at most: summary.txt, all.tar.gz (every log
# and result), junit_triton.xml, junit_gpu.xml, kernels_cuda.json, kernels_cuda.md (side by side,
# the device named inside), resnet50_step_cuda.json.
# Knobs: GFR_BUDGET (s, default 480; 900 in a dry run, whose stages only need ~2 min), PYTHON (default python3; .venv/bin/python in
# a dry run), GFR_SKIP (comma list of stage names), GFR_XDIST (pytest-xdist workers, default 4,
# 0 = off), GFR_D (side-by-side model size, default 4194304 parameters).
# GPU_CHECK_DRY_RUN=1 runs every stage's control flow on the CPU with stand-ins: Triton tests in the
# interpreter, the driver built against the CPU emulator (csrc/emu) and run on small cases (no
# compute-sanitizer), no extension build, the side-by-side profile on the CPU with a tiny model,
# the ResNet-50 step on its smoke model. Exit status 1 when a stage failed or timed out.
set -u -o pipefail

DRY=${GPU_CHECK_DRY_RUN:-0}
START=$(date +%s)
if [ "$DRY" = "1" ]; then BUDGET=${GFR_BUDGET:-900}; else BUDGET=${GFR_BUDGET:-480}; fi
DEADLINE=$((START + BUDGET))
REPO=$(pwd)
if [ "$DRY" = "1" ] && [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
OUT=${OUT:-$REPO/gpu_check_out}
W=$(mktemp -d)
HELP=$REPO/scripts/gpu_check
mkdir -p "$OUT"
STAGES=$W/stages.tsv
: > "$STAGES"

export PYTHONPATH="$REPO:$REPO/python:$HELP${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 MPLBACKEND=Agg GPU_CHECK_DRY_RUN=$DRY
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}   # 3 pytest runs x 4 workers share 16 cores
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
if [ "$DRY" = "1" ]; then export TRITON_INTERPRET=1; fi
# CUDA_HOME from nvcc itself when unset (a wrapper script on PATH would give a wrong toolkit root)
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc > /dev/null 2>&1; then
  CUDA_TOP=$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
  if [ -n "$CUDA_TOP" ] && [ -e "$CUDA_TOP/include/cuda_runtime.h" ]; then
    CUDA_HOME=$(cd "$CUDA_TOP" && pwd)
    export CUDA_HOME
  fi
fi
# python's own bin folder first (ninja, pytest, pip of the same environment)
PYBIN=$(dirname "$("$PY" -c 'import sys; print(sys.executable)' 2>/dev/null || command -v "$PY")")
export PATH="$PYBIN:$PATH:/usr/local/cuda/bin"

log() { printf '[gpu_check %4ds] %s\n' "$(( $(date +%s) - START ))" "$*"; }
left() { echo $(( DEADLINE - $(date +%s) )); }
skipped() { [[ ",${GFR_SKIP:-}," == *",$1,"* ]]; }
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$STAGES"; }

# Seconds a stage may take: at most WANT, leaving RESERVE seconds for the stages after it.
stage_timeout() {
  local t=$(( $(left) - $2 ))
  (( t > $1 )) && t=$1
  (( t < 0 )) && t=0
  echo "$t"
}

# run NAME WANT RESERVE LOGFILE CMD...: CMD under `timeout` (TERM, KILL 10 s later), output to
# LOGFILE, status recorded in stages.tsv (ok / FAIL / TIMEOUT / SKIP). Returns CMD's status.
run() {
  local name=$1 want=$2 reserve=$3 logf=$4
  shift 4
  if skipped "$name"; then record "$name" SKIP - 0 "GFR_SKIP"; log "stage $name: skipped (GFR_SKIP)"; return 3; fi
  local t
  t=$(stage_timeout "$want" "$reserve")
  if (( t < 10 )); then record "$name" SKIP - 0 "no time left"; log "stage $name: skipped (no time left)"; return 3; fi
  log "stage $name: start (timeout ${t}s) -> $(basename "$logf")"
  local t0 rc status=ok
  t0=$(date +%s)
  timeout -k 10 "$t" "$@" > "$logf" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if (( rc == 124 || rc == 137 )); then status=TIMEOUT; elif (( rc != 0 )); then status=FAIL; fi
  record "$name" "$status" "$rc" "$dt" "limit ${t}s"
  log "stage $name: $status (rc=$rc, ${dt}s)"
  return "$rc"
}

# Copy the results to $OUT (at most 7 files).
publish() {
  local f
  for f in junit_triton.xml junit_gpu.xml kernels_cuda.json kernels_cuda.md resnet50_step_cuda.json; do
    if [ -s "$W/$f" ]; then cp -f "$W/$f" "$OUT/$f"; fi
  done
  if [ -s "$W/summary.txt" ]; then cp -f "$W/summary.txt" "$OUT/summary.txt"; fi
  tar czf "$W/all.tar.gz.part" --exclude='all.tar.gz*' --exclude='wf_driver' --exclude='triton_cache' \
    -C "$W" . 2>/dev/null && mv -f "$W/all.tar.gz.part" "$OUT/all.tar.gz"
}

have_py_mod() { "$PY" -c "import $1" > /dev/null 2>&1; }

# ---------------------------------------------------------------- stage: env
log "work folder $W, output $OUT, budget ${BUDGET}s, python $PY$([ "$DRY" = "1" ] && echo ', DRY RUN (CPU)')"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu,utilization.gpu --format=csv,noheader 2>&1
  nvidia-smi 2>&1 | head -20
} > "$W/nvidia_smi.txt"
run env 40 0 "$W/env_probe.log" bash -c "'$PY' '$HELP/env_probe.py' > '$W/env.json'"
{ nvcc --version 2>&1 | tail -2; gcc --version 2>&1 | head -1; ninja --version 2>&1;
  command -v compute-sanitizer 2>&1; uname -a; nproc; free -g 2>&1 | head -2; df -h /tmp 2>&1 | tail -1; } > "$W/env_tools.txt"
publish

XDIST=()
TOUT=()
SESSION_T=0
if [ "$DRY" != "1" ] && [ "${GFR_XDIST:-4}" != "0" ] && have_py_mod xdist; then XDIST=(-n "${GFR_XDIST:-4}"); fi
if have_py_mod pytest_timeout; then
  TOUT=(--timeout=150)
  "$PY" -m pytest --help 2>/dev/null | grep -q -- "--session-timeout" && SESSION_T=1
fi
# pytest_args JUNIT SESSION_SECONDS: common options (junit, per-test timeout, graceful session end)
pytest_args() {
  local a=(-p no:cacheprovider -p results_plugin -rfE --tb=short -v --junitxml="$W/$1")
  a+=(${XDIST[@]+"${XDIST[@]}"} ${TOUT[@]+"${TOUT[@]}"})
  local s=$2
  (( s < 10 )) && s=10
  (( SESSION_T )) && a+=(--session-timeout="$s")
  printf '%s\n' "${a[@]}"
}

# ---------------------------------------------------------------- stage: build (+ background jobs)
# Reserve 200 s after the test phase for the benchmarks (sbs <= 110 s, r50 <= 60 s) and the summary,
# but never squeeze the tests under ~90 s (correctness first; the benchmarks adapt or skip).
tests_reserve() {
  local l r=200
  l=$(left)
  (( l - r < 90 )) && r=$(( l - 90 ))
  (( r < 100 )) && r=100
  [ "$DRY" = "1" ] && r=60
  echo "$r"
}
TESTS_END_RESERVE=$(tests_reserve)
# t_triton: Triton tests on the GPU while the extension compiles (they do not need it; they import
# woodfisher_kernels before the build writes _C, so they see the Triton/torch backends).
if [ "$DRY" = "1" ]; then
  TRITON_TESTS=(tests/test_triton_kernels.py -k "padded_coordinates")
else
  TRITON_TESTS=(-m gpu tests/test_triton_kernels.py tests/test_ops.py -k triton)
fi
T_TRITON=$(stage_timeout 220 "$TESTS_END_RESERVE")
mapfile -t PA < <(pytest_args junit_triton.xml $(( T_TRITON - 40 )))
run t_triton 220 "$TESTS_END_RESERVE" "$W/pytest_triton.log" "$PY" -m pytest "${TRITON_TESTS[@]}" "${PA[@]}" &
PID_TRITON=$!
sleep 8   # let collection import the package before the extension appears

CU_SOURCES=(csrc/*.cu)
if [ "$DRY" = "1" ]; then  # the same launchers and driver against the CPU emulator
  run drvbuild 240 60 "$W/driver_build.log" g++ -std=c++17 -O0 -DWF_EMULATE -Icsrc -x c++ "${CU_SOURCES[@]}" \
    -x none csrc/driver/woodfisher_driver.cpp -o "$W/wf_driver" &
else
  run drvbuild 120 250 "$W/driver_build.log" nvcc -std=c++17 -O3 -lineinfo \
    -gencode=arch=compute_90,code=sm_90 -Xptxas -v -Icsrc "${CU_SOURCES[@]}" csrc/driver/woodfisher_driver.cpp \
    -o "$W/wf_driver" &
fi
PID_DRV=$!

export MAX_JOBS=${MAX_JOBS:-16}
if [ "$DRY" = "1" ]; then
  run build 30 60 "$W/build.log" "$PY" -c "print('dry run: extension build skipped (no CUDA torch here)')"
  BUILD_RC=3
else
  export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} -Xptxas -v"
  run build 170 240 "$W/build.log" "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .
  BUILD_RC=$?
fi
ext_check() {
  "$PY" - > "$W/ext_check.txt" 2>&1 <<'PYEOF'
import sys
import woodfisher_kernels as wk
from woodfisher_kernels import _cuda
if _cuda.AVAILABLE:
    from woodfisher_kernels import _C
    print("yes; limits [shared max c, Woodbury max c, OBS max c] =", _cuda.limits(),
          "; backends", wk.available_backends("fisher_inverse"), "; from", _C.__file__)
else:
    print("NO: the 'cuda' backend is unavailable; backends", wk.available_backends("fisher_inverse"))
sys.exit(0 if _cuda.AVAILABLE else 1)
PYEOF
}
ext_check
EXT_RC=$?
if [ "$DRY" != "1" ] && [ "$BUILD_RC" != 3 ] && [ "$EXT_RC" != 0 ]; then
  log "editable install gave no loadable extension; trying setup.py build_ext --inplace"
  run build_fb 120 240 "$W/build_fallback.log" "$PY" setup.py build_ext --inplace && ext_check
fi
unset NVCC_APPEND_FLAGS
SO=$(find woodfisher_kernels -maxdepth 1 -name '_C*.so' 2>/dev/null | head -1)
if [ -n "$SO" ] && command -v cuobjdump > /dev/null; then
  { cuobjdump --list-elf "$SO"; cuobjdump --dump-resource-usage "$SO"; } > "$W/sass_arch.txt" 2>&1
fi
publish

# ---------------------------------------------------------------- stage: driver + sanitizers (bg)
wait "$PID_DRV"
TESTS_END_RESERVE=$(tests_reserve)
# shellcheck disable=SC2317  # runs in a child bash (declare -f), not called here
sanitize_all() {
  local cs
  [ -x "$W/wf_driver" ] || { echo "no driver binary"; return 2; }
  if [ "$DRY" = "1" ]; then  # emulated driver on small cases; no compute-sanitizer on the CPU
    timeout -k 5 60 "$W/wf_driver" --quick 1x7x5 2x33x17 1x130x33 > "$W/driver.log" 2>&1; echo "driver (emulated) rc=$?"
    return 0
  fi
  cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  timeout -k 5 45 "$W/wf_driver" > "$W/driver.log" 2>&1; echo "driver (full grid) rc=$?"
  [ -x "$cs" ] || { echo "compute-sanitizer not found"; return 2; }
  timeout -k 5 30 "$cs" --tool memcheck --leak-check full "$W/wf_driver" 3x64x20 2x128x17 1x204x4 2x300x40 \
    > "$W/sanitizer_memcheck.log" 2>&1; echo "memcheck rc=$?"
  timeout -k 5 35 "$cs" --tool racecheck --racecheck-report all "$W/wf_driver" 2x64x5 1x128x33 1x200x2 1x300x17 \
    > "$W/sanitizer_racecheck.log" 2>&1; echo "racecheck rc=$?"
  timeout -k 5 50 "$cs" --tool memcheck "$PY" "$HELP/ops_smoke.py" > "$W/sanitizer_memcheck_ops.log" 2>&1
  echo "memcheck (torch ops, CUDA + Triton) rc=$?"
  timeout -k 5 20 "$cs" --tool synccheck "$W/wf_driver" 2x64x40 1x300x17 > "$W/sanitizer_synccheck.log" 2>&1
  echo "synccheck rc=$?"
  timeout -k 5 20 "$cs" --tool initcheck "$W/wf_driver" 2x64x5 1x300x17 > "$W/sanitizer_initcheck.log" 2>&1
  echo "initcheck rc=$?"
}
run sanitize 220 "$TESTS_END_RESERVE" "$W/sanitize.log" \
  bash -c "$(declare -f sanitize_all); W='$W' PY='$PY' HELP='$HELP' DRY='$DRY' sanitize_all" &
PID_SAN=$!

# ---------------------------------------------------------------- stage: GPU tests
# Everything marked gpu except the Triton tests (stage t_triton): the backend matrix of
# tests/test_ops.py in parallel (t_gpu_ops), the rest (CUDA backend, pruner on the GPU) in t_gpu.
if [ "$DRY" = "1" ]; then  # on the CPU: gpu-marked tests collect and skip; a few matrix rows run
  GPU_TESTS=(tests/test_cuda_backend.py -k "limits or unloadable")
  OPS_TESTS=(tests/test_ops.py -k "fisher_inverse_matches_dense_float64 and torch-cpu-c7-m16")
else
  # the pruner's GPU tests first, the large CUDA kernel matrix last: a stage cut short by its
  # limit then loses kernel cases that the driver and the ops matrix also cover
  mapfile -t GPU_TESTS < <(ls tests/test_*.py | grep -v -e 'tests/test_ops.py' -e 'tests/test_cuda_backend.py')
  GPU_TESTS+=(tests/test_cuda_backend.py -k "not triton")
  OPS_TESTS=(-m gpu tests/test_ops.py -k "not triton")
fi
T_GPU=$(stage_timeout 170 "$TESTS_END_RESERVE")
mapfile -t PA2 < <(pytest_args junit_gpu_ops.xml $(( T_GPU - 40 )))
run t_gpu_ops 170 "$TESTS_END_RESERVE" "$W/pytest_gpu_ops.log" "$PY" -m pytest "${OPS_TESTS[@]}" "${PA2[@]}" &
PID_OPS=$!
mapfile -t PA < <(pytest_args junit_gpu.xml $(( T_GPU - 40 )))
run t_gpu 170 "$TESTS_END_RESERVE" "$W/pytest_gpu.log" "$PY" -m pytest -m gpu "${GPU_TESTS[@]}" "${PA[@]}"
wait "$PID_OPS" "$PID_TRITON" "$PID_SAN"
# one junit_gpu.xml with both GPU runs
"$PY" - "$W" <<'PYEOF' 2>/dev/null
import os, sys
import xml.etree.ElementTree as ET
W = sys.argv[1]
root = ET.Element("testsuites")
for name in ("junit_gpu.xml", "junit_gpu_ops.xml"):
    p = os.path.join(W, name)
    if os.path.exists(p):
        r = ET.parse(p).getroot()
        root.extend([r] if r.tag == "testsuite" else list(r))
if len(root):
    ET.ElementTree(root).write(os.path.join(W, "junit_gpu.xml"))
PYEOF
publish

# ---------------------------------------------------------------- stage: benchmarks (GPU alone)
T_SBS=$(stage_timeout 120 90)
if [ "$DRY" = "1" ]; then
  T_SBS=$(stage_timeout 240 120)
  run sbs 240 120 "$W/sbs.log" env GFR_SBS_DEVICE=cpu GFR_D="${GFR_D:-1024}" "$PY" "$HELP/sbs_profile.py" "$W" \
    $(( T_SBS / 2 ))
  publish
  run r50 240 10 "$W/r50.log" "$PY" -m benchmarks.resnet50_step --model smoke --device cpu --out "$W"
  publish
  run step 240 10 "$W/step.log" "$PY" -m benchmarks.step_cpu --quick --device cpu --out "$W"
else
  # the step first: issue 10's open figure (per-sample gradients against the batched pass on a GPU)
  run step 75 15 "$W/step.log" "$PY" -m benchmarks.step_cpu --device cuda --repeats 1 --out "$W"
  publish
  T_SBS=$(stage_timeout 120 90)
  run sbs 120 90 "$W/sbs.log" "$PY" "$HELP/sbs_profile.py" "$W" $(( T_SBS - 15 ))
  publish
  run r50 110 30 "$W/r50.log" "$PY" -m benchmarks.resnet50_step --setting 1000x80 --out "$W"
  publish
  # Nsight Compute counters of the CUDA build kernels (scripts/gpu_check/prof_case.py: 4 shapes, a
  # warm-up and a measured launch each); the summary prints the measured launches' key metrics.
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2> /dev/null | head -1)
  if [ -n "$NCU" ] && [ "$BUILD_RC" != 3 ]; then
    run prof 70 5 "$W/prof.log" bash -c "'$NCU' --clock-control none -k regex:woodbury \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      --csv --page details '$PY' '$HELP/prof_case.py' > '$W/prof.csv'"
  else
    record prof SKIP - 0 "no ncu or no extension"
  fi
fi
publish

# ---------------------------------------------------------------- summary
nvidia-smi --query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv,noheader > "$W/nvidia_smi_end.txt" 2>&1
timeout -k 3 15 "$PY" "$HELP/summary.py" "$W" "$(( $(date +%s) - START ))" > /dev/null 2>&1 \
  || { echo "summary.py failed; stage table:"; cat "$STAGES"; } > "$W/summary.txt"
publish
cat "$W/summary.txt"
log "done in $(( $(date +%s) - START ))s; results in $OUT ($(find "$OUT" -maxdepth 1 -type f | wc -l) files); work folder $W"
if grep -qE $'\t(FAIL|TIMEOUT)\t' "$STAGES"; then exit 1; fi
exit 0
