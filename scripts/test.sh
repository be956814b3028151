#!/usr/bin/env bash
# Builds superpose and runs every test (ctest). GPU tests skip where no GPU exists.
#   scripts/test.sh              Release build in build/
#   scripts/test.sh --sanitize   ASan+UBSan build in build-asan/ (CPU only)
# Warnings are errors (SUPERPOSE_WERROR). Test groups: ctest -L unit|server|emulation|gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d ../shared/fixtures ]; then
  echo "test: ../shared/fixtures is missing (the fixtures live beside the checkout)" >&2
  exit 1
fi
jobs=$(nproc)
if [ "${1:-}" = "--sanitize" ]; then
  dir=build-asan
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSUPERPOSE_SANITIZE=ON \
    -DSUPERPOSE_CUDA=OFF -DSUPERPOSE_WERROR=ON >/dev/null
else
  dir=build
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSUPERPOSE_WERROR=ON >/dev/null
fi
ninja -C "$dir" -j"$jobs"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
ctest --test-dir "$dir" --output-on-failure -j2 --timeout 600
