#!/usr/bin/env bash
# GPU check: builds the CUDA backend for Hopper only (sm_90a, fast), runs the GPU tests
# and the GPU benchmark, and writes full logs plus a short summary (printed last) to
# $OUT, or to build-gpu/gpu-check/ when OUT is unset. Needs an NVIDIA GPU with its
# driver and the CUDA 13 toolkit (nvcc, cuBLAS, NCCL); budget: under 8 minutes on one
# H200 with 16 cores.
#   scripts/gpu-check.sh                 build + tests + benchmark
#   GPU_CHECK_SANITIZE=1 scripts/...     also compute-sanitizer memcheck on the kernel tests
#   GPU_CHECK_BUILD=1 scripts/...        build here even when .gpu-prebuilt/ exists
#   GPU_CHECK_PREBUILT=1 scripts/...     use .gpu-prebuilt/ even when this machine could build
# Without the Debian build dependencies and no network to install them (e.g. the
# project's device machines), run scripts/gpu-prebuild.sh first on a Debian 12 machine
# and carry .gpu-prebuilt/ along.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$PWD/build-gpu/gpu-check}
mkdir -p "$out"
summary="$out/summary.md"
: >"$summary"
start=$(date +%s)
note() { echo "- [$(($(date +%s) - start))s] $*" | tee -a "$summary"; }
finish() {
  echo
  echo "==================== gpu-check summary ===================="
  cat "$summary"
  exit "$1"
}
echo "# gpu-check $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null)" >"$summary"

# At most 8 files come back from a device machine: summary.md, build.log (nvidia-smi,
# setup, build), cuda_backend_test.log, other_tests.log, cuda_bench.log,
# cuda_bench_simt.log, cuda_bench_long.log, sanitizer.log.
nvidia-smi >"$out/build.log" 2>&1 && note "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)" \
  || note "nvidia-smi failed (see build.log)"
export PATH=/usr/local/cuda/bin:$PATH

# Build here when the dependencies are present (or can be installed with
# scripts/setup.sh); else use .gpu-prebuilt/ from scripts/gpu-prebuild.sh (built on a
# Debian 12 machine and carried along), with this machine's CUDA libraries.
missing=""
for pc in grpc++ protobuf libpcre2-8 libutf8proc cpp-httplib; do
  pkg-config --exists "$pc" 2>/dev/null || missing="$missing $pc"
done
[ -f /usr/include/nlohmann/json.hpp ] || missing="$missing nlohmann-json"
[ -f /usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so ] || missing="$missing openblas-openmp"
command -v ninja >/dev/null || missing="$missing ninja"
bin=build-gpu
bench=build-gpu/bench/cuda_bench
if [ -x .gpu-prebuilt/bin/cuda_backend_test ] && [ "${GPU_CHECK_BUILD:-0}" != 1 ] &&
  { [ -n "$missing" ] || [ "${GPU_CHECK_PREBUILT:-0}" = 1 ]; }; then
  note "missing build dependencies:${missing:- none}; using .gpu-prebuilt (commit $(cat .gpu-prebuilt/COMMIT 2>/dev/null))"
  bin=.gpu-prebuilt/bin
  bench=.gpu-prebuilt/bin/cuda_bench
  libs=$PWD/.gpu-prebuilt/lib
  for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libnccl.so.2; do
    ldconfig -p 2>/dev/null | grep -q "$lib" && continue
    found=$(find /usr/local /opt /usr/lib -name "$lib" -print -quit 2>/dev/null)
    if [ -n "$found" ]; then libs="$libs:$(dirname "$found")"; else note "WARNING: $lib not found"; fi
  done
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export SUPERPOSE_SHARED_DIR=$PWD/.gpu-prebuilt/shared
  if [ "$(cat .gpu-prebuilt/COMMIT 2>/dev/null)" != "$(git rev-parse HEAD 2>/dev/null)" ]; then
    note "WARNING: .gpu-prebuilt was built from another commit than this checkout's HEAD"
  fi
  deps=$(ldd "$bin/cuda_backend_test" "$bin/cuda_bench" 2>&1)
  echo "$deps" >>"$out/build.log"
  if echo "$deps" | grep -q "not found"; then
    note "FAIL: prebuilt binaries miss libraries: $(echo "$deps" | grep 'not found' | sort -u | tr -s ' \t\n' ' ')"
    finish 1
  fi
else
  command -v nvcc >/dev/null || { note "FAIL: nvcc not found (and no .gpu-prebuilt)"; finish 1; }
  if [ -n "$missing" ]; then
    note "missing build dependencies:$missing; running scripts/setup.sh"
    if ! bash scripts/setup.sh >>"$out/build.log" 2>&1; then
      note "FAIL: scripts/setup.sh failed (no network or not Debian?); see build.log." \
        "Run scripts/gpu-prebuild.sh on a Debian 12 machine and carry .gpu-prebuilt along."
      finish 1
    fi
  fi
  jobs=$(nproc)
  if [ ! -d ../shared/fixtures ] && [ -d .gpu-prebuilt/shared ]; then
    export SUPERPOSE_SHARED_DIR=$PWD/.gpu-prebuilt/shared
  fi
  {
    cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DSUPERPOSE_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES=90a &&
      ninja -C build-gpu -j"$jobs" cuda_backend_test cuda_step_meta_test tensor_parallel_test \
        golden_test cuda_lora_test cuda_quant_test cuda_layer_sharing_test cuda_lazy_test \
        cuda_bench superpose-server
  } >>"$out/build.log" 2>&1
  if [ $? -ne 0 ]; then
    note "FAIL: build (see build.log)"
    tail -30 "$out/build.log"
    finish 1
  fi
  note "built (sm_90a) in $(($(date +%s) - start))s"
fi

status=0
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
run_test() {  # name, timeout, log file
  echo "==== $1" >>"$out/$3"
  timeout "$2" "$bin/$1" --gtest_color=no >"$out/$1.tmp" 2>&1
  local rc=$?
  local line
  line=$(grep -E '^\[  (PASSED|FAILED|SKIPPED) +\] [0-9]+ tests?' "$out/$1.tmp" | tr '\n' ' ')
  cat "$out/$1.tmp" >>"$out/$3"
  rm -f "$out/$1.tmp"
  if [ $rc -eq 0 ]; then note "$1: ok: $line"; else note "$1: FAIL (rc $rc): $line"; status=1; fi
}
run_test cuda_step_meta_test 30 other_tests.log
run_test cuda_backend_test 240 cuda_backend_test.log
grep -E 'teacher-forced|^cuda graphs:|greedy == golden' "$out/cuda_backend_test.log" | sed 's/^/    /' | tee -a "$summary"
# The backend's own CUDA graph log lines (a capture failure is a warning, not an error).
grep -E 'CUDA graphs:' "$out/cuda_backend_test.log" | sed -E 's/^\[[^]]*\] //' | sort | uniq -c |
  head -5 | sed 's/^/    /' | tee -a "$summary"
grep -E '^\[  FAILED  \]|Failure|Expected|Which is|error' "$out/cuda_backend_test.log" | head -20 |
  sed 's/^/    /' | tee -a "$summary"
run_test tensor_parallel_test 120 other_tests.log
# Tests newer than a .gpu-prebuilt may be missing from it: run those that exist, and show
# their summary lines (pattern, optional) under the result.
optional_test() {  # name, timeout, summary-line pattern
  if [ ! -x "$bin/$1" ]; then
    note "$1: not in $bin (a .gpu-prebuilt from before it)"
    return
  fi
  run_test "$1" "$2" other_tests.log
  if [ -n "${3:-}" ]; then
    grep -E "$3" "$out/other_tests.log" | sed 's/^/    /' | tee -a "$summary"
  fi
}
optional_test cuda_lora_test 120
optional_test cuda_quant_test 180 '^\[ cuda quant \]' # --cuda_dtype=int8|q4
optional_test cuda_layer_sharing_test 60 # layer_weight_map on the device
optional_test cuda_lazy_test 180 '^decisions: ' # LazyLLM against the CPU backend
run_test golden_test 120 other_tests.log

timeout 200 "$bench" >"$out/cuda_bench.log" 2>&1
rc=$?
if [ $rc -eq 0 ]; then
  note "cuda_bench: ok"
  sed -n '/^## cuda_bench summary/,$p' "$out/cuda_bench.log" >>"$summary"
else
  note "cuda_bench: FAIL (rc $rc), last lines:"
  tail -5 "$out/cuda_bench.log" | sed 's/^/    /' | tee -a "$summary"
  status=1
fi

# The prefill attention kernels side by side (the run above used auto: tensor cores).
left=$((420 - ($(date +%s) - start)))
if [ $left -gt 60 ]; then
  timeout $((left < 120 ? left : 120)) "$bench" --attention=simt --batches=1 --steps=3 \
    >"$out/cuda_bench_simt.log" 2>&1 &&
    { note "cuda_bench --attention=simt (prefill row to compare):"; grep -E '^\| prefill|^\|---|^\| [0-9]+x[0-9]+' "$out/cuda_bench_simt.log" | sed 's/^/    /' | tee -a "$summary"; } ||
    note "cuda_bench --attention=simt: rc $? (see cuda_bench_simt.log)"
fi

# Long-context decode at small batches, split-K attention on and off.
left=$((430 - ($(date +%s) - start)))
if [ $left -gt 60 ]; then
  for split in true false; do
    timeout $((left / 2 < 90 ? left / 2 : 90)) "$bench" --batches=1,8 --context=8192 --steps=10 \
      --prefill=1x256 --split_decode=$split >>"$out/cuda_bench_long.log" 2>&1 &&
      { note "cuda_bench --context=8192 --split_decode=$split (decode rows):"; grep -E '^\| [0-9]+ \| 8192' "$out/cuda_bench_long.log" | tail -2 | sed 's/^/    /' | tee -a "$summary"; } ||
      note "cuda_bench --context=8192 --split_decode=$split: rc $? (see cuda_bench_long.log)"
  done
fi

if [ "${GPU_CHECK_SANITIZE:-0}" = 1 ] && command -v compute-sanitizer >/dev/null; then
  left=$((440 - ($(date +%s) - start)))
  if [ $left -gt 30 ]; then
    timeout "$left" compute-sanitizer --tool memcheck --error-exitcode 9 \
      "$bin/cuda_backend_test" --gtest_filter='*Attention*:*QkvPost*:*ForwardMatches*:*DecodeGraphs*:*TopLogits*:*CompactRows*:*Split*' \
      >"$out/sanitizer.log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then note "compute-sanitizer memcheck: clean"; else note "compute-sanitizer: rc $rc (see sanitizer.log)"; status=1; fi
  fi
fi
note "done in $(($(date +%s) - start))s, status $status"
finish $status
