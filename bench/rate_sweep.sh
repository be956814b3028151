#!/usr/bin/env bash
# Open-loop rate sweep on one CPU replica: Poisson arrivals at each rate for a fixed
# time, goodput (requests meeting the TTFT and ITL objectives) vs offered rate.
#   bench/rate_sweep.sh [superpose-load flags, e.g. --rates=5,10,20 --slo_ttft_ms=200]
# MODEL=dir serves a model (default: the built-in one); SERVER_FLAGS adds server flags;
# BUILD=build; OUT=dir for logs and the JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD:-build}
out=${OUT:-/tmp/superpose-sweep}
mkdir -p "$out"
server_flags="${MODEL:+--model=$MODEL} ${SERVER_FLAGS:-}"
source bench/topology.sh
start_replica 0
"$build/superpose-load" --server="127.0.0.1:${port[0]}" --progress=false --json="$out/sweep.json" \
  --rates=10,20,40,80,160 --duration_s=15 --warmup_requests=8 --input_len=uniform:32:128 \
  --output_len=uniform:16:64 --slo_ttft_ms=250 --slo_itl_ms=50 --seed=1 "$@"
