#!/usr/bin/env bash
# HTTP (OpenAI API) vs gRPC throughput at the same load: one superpose-server with both
# front ends on a generated Llama-shaped model; superpose-load drives gRPC, then
# bench/http_load.mjs drives /v1/completions (streamed), both at STREAMS concurrent
# streams of 4 requests (16 random prompt tokens, 64 new tokens, EOS ignored, greedy).
# The HTTP path should cost no measurable throughput (docs/benchmarks.md).
#   bench/http_vs_grpc.sh [shape=llama-110m] [streams=16] [server flags...]
# Needs node (>= 20). Run on an otherwise idle machine; runs gRPC, HTTP, gRPC, HTTP.
set -euo pipefail
cd "$(dirname "$0")/.."
shape=${1:-llama-110m}
streams=${2:-16}
shift $(($# < 2 ? $# : 2))
ninja -C build superpose-server superpose-load genmodel >/dev/null
dir=/tmp/superpose-bench/$shape
[ -f "$dir/model.safetensors" ] || build/bench/genmodel --out="$dir" --shape="$shape"
tmp=$(mktemp -d)
build/superpose-server --model="$dir" --listen=127.0.0.1:0 --port_file="$tmp/grpc" \
  --http_listen=127.0.0.1:0 --http_port_file="$tmp/http" --metrics_listen= \
  --max_running=64 --max_batch_tokens=1024 --kv_cache_mb=2048 --log_level=warn "$@" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 1 600); do [ -s "$tmp/http" ] && break; sleep 0.1; done
model=$(basename "$dir")
echo "gRPC (superpose-load):"
build/superpose-load --server=127.0.0.1:$(cat "$tmp/grpc") --concurrency="$streams" \
  --requests_per_stream=4 --prompt_tokens=16 --max_new_tokens=64
echo
echo "| api | streams | generated tokens | tokens/s | mean TTFT ms | mean TPOT ms |"
echo "|---|---|---|---|---|---|"
node bench/http_load.mjs "$(cat "$tmp/http")" "$model" "$streams" 4 16 64
echo
echo "again, gRPC then HTTP:"
build/superpose-load --server=127.0.0.1:$(cat "$tmp/grpc") --concurrency="$streams" \
  --requests_per_stream=4 --prompt_tokens=16 --max_new_tokens=64
node bench/http_load.mjs "$(cat "$tmp/http")" "$model" "$streams" 4 16 64
