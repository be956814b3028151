#!/usr/bin/env bash
# Installs the build and test dependencies of superpose from Debian 12 packages.
set -euo pipefail
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
  cmake ninja-build pkg-config g++ git ca-certificates \
  libgtest-dev libgmock-dev \
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler grpc-proto \
  libspdlog-dev libfmt-dev libabsl-dev libopenblas-openmp-dev libhwy-dev \
  nlohmann-json3-dev libpcre2-dev libutf8proc-dev libcpp-httplib-dev libssl-dev \
  clang-14 libclang-rt-14-dev python3 >/dev/null  # scripts/fuzz.sh (libFuzzer, seeds)
# examples/python and its test (/usr/bin/python3); deploy/ checks (docker-compose config).
$SUDO apt-get install -y -qq --no-install-recommends \
  python3-grpcio python3-grpc-tools python3-yaml docker-compose >/dev/null
# The HTTP API's tests with the official openai npm package (tests/node; Node >= 20).
if command -v npm >/dev/null; then
  npm ci --prefix "$(dirname "$0")/../tests/node" --no-audit --no-fund >/dev/null
else
  echo "setup: npm not found: the Node.OpenAiSdk tests will fail until Node >= 20 is installed"
fi
echo "setup: dependencies installed"
