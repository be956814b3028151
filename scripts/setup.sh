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
# nginx: the gRPC balancer of tests/server_topology_test.cc and bench/affinity.sh.
$SUDO apt-get install -y -qq --no-install-recommends nginx-light >/dev/null
# Node.js and tests/node's packages: @huggingface/jinja renders the reference that
# tests/chat_template_test.cc compares our chat templates with; the official openai SDK
# drives the HTTP API (tests/node/run.sh).
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
npm ci --prefix "$(dirname "$0")/../tests/node" --no-audit --no-fund >/dev/null
echo "setup: dependencies installed"
