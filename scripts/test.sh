#!/usr/bin/env bash
# Builds superpose and runs every test (ctest). GPU tests skip where no GPU exists.
#   scripts/test.sh              Release build in build/
#   scripts/test.sh --sanitize   ASan+UBSan build in build-asan/ (CPU only)
#   scripts/test.sh --tsan       ThreadSanitizer build in build-tsan/ of the engine,
#                                scheduler and server tests (build-tsan/tsan_tests.txt)
# Warnings are errors (SUPERPOSE_WERROR). Test groups: ctest -L unit|server|emulation|gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d ../shared/fixtures ]; then
  echo "test: ../shared/fixtures is missing (the fixtures live beside the checkout)" >&2
  exit 1
fi
jobs=$(nproc)
if [ "${1:-}" = "--tsan" ]; then
  dir=build-tsan
  # ThreadSanitizer sees only instrumented synchronisation: abseil (absl::Mutex, used by
  # our code and by gRPC) is rebuilt with it, and the loader picks it up for everything.
  bash scripts/tsan-abseil.sh "$dir/abseil"
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=None -DCMAKE_CXX_FLAGS="-O1 -g1" \
    -DSUPERPOSE_TSAN=ON -DSUPERPOSE_CUDA=OFF -DSUPERPOSE_WERROR=ON >/dev/null
  ninja -C "$dir" -j"$jobs" tsan_tests
  export LD_LIBRARY_PATH="$PWD/$dir/abseil/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  # libgomp is not instrumented: one OpenMP thread, so kernels run on the calling thread.
  export OMP_NUM_THREADS=1
  export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 ignore_noninstrumented_modules=1 suppressions=$PWD/scripts/tsan.supp"
  # Each test binary whole (its tests one after another), two at a time; a binary's
  # output is shown when it fails.
  mkdir -p "$dir/tsan-logs"
  passed=0 failed=0
  while read -r t; do
    [ -n "$t" ] || continue
    if [ "$(jobs -rp | wc -l)" -ge 2 ]; then wait -n || true; fi
    ( set +e; cd "$dir"; timeout 1200 "./$t" >"tsan-logs/$t.log" 2>&1
      echo $? >"tsan-logs/$t.rc" ) &
  done <"$dir/tsan_tests.txt"
  wait
  while read -r t; do
    [ -n "$t" ] || continue
    if [ "$(cat "$dir/tsan-logs/$t.rc")" = "0" ]; then
      passed=$((passed + 1)); echo "tsan: $t passed"
    else
      failed=$((failed + 1)); echo "tsan: $t FAILED:"; tail -n 80 "$dir/tsan-logs/$t.log"
    fi
  done <"$dir/tsan_tests.txt"
  echo "tsan: $passed passed, $failed failed"
  [ "$failed" = "0" ]
  exit
fi
if [ "${1:-}" = "--sanitize" ]; then
  dir=build-asan
  # -O1, the SIMD kernels -O2 (Highway needs its inlining: with the kernels at -O1 a
  # sampler test took > 300 s), line tables only (-g1): faster to build than -O2 and full
  # debug info, and traces keep their lines.
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=None -DCMAKE_CXX_FLAGS="-O1 -g1 -DNDEBUG" \
    -DSP_KERNEL_OPT=-O2 -DSUPERPOSE_SANITIZE=ON -DSUPERPOSE_CUDA=OFF -DSUPERPOSE_WERROR=ON >/dev/null
  targets=tests  # the benchmarks are built (and warning-free) in the Release build
else
  dir=build
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSUPERPOSE_WERROR=ON >/dev/null
  targets=all
fi
ninja -C "$dir" -j"$jobs" "$targets"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
ctest --test-dir "$dir" --output-on-failure -j2 --timeout 600
