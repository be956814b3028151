#!/usr/bin/env bash
# Cross-compiles the CPU kernels and their unit tests for aarch64 (Debian's
# g++-aarch64-linux-gnu, arm64 multiarch -dev packages) and runs the tests under
# qemu-user, so the NEON code paths are built and tested on x86 CI machines.
#   scripts/arm-check.sh [--install]   (--install: apt-get the cross toolchain first)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--install" ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO dpkg --add-architecture arm64
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends g++-aarch64-linux-gnu qemu-user \
    libhwy-dev:arm64 libgtest-dev:arm64 libabsl-dev:arm64 >/dev/null
fi
BUILD=${BUILD_ARM:-build-arm}
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSUPERPOSE_KERNELS_ONLY=ON \
  -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake ${ARM_CMAKE_ARGS:-} >/dev/null
cmake --build "$BUILD" -j"$(nproc)"
readelf -h "$BUILD/simd_test" | grep -q AArch64  # really an Arm binary
# One OpenMP thread: under Debian 12's qemu-user (7.2) libgomp hangs as soon as a second
# thread joins a parallel region (seen with a five-line program), so the thread-count
# tests run on x86 only.
OMP_NUM_THREADS=1 ctest --test-dir "$BUILD" --output-on-failure -j"$(nproc)" -E ThreadCount
echo "arm-check: aarch64 kernels built and tested under qemu-user"
