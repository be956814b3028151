#!/usr/bin/env bash
# Continuous-batching benchmark: aggregate generated tokens/s and inter-token latency at
# 1, 4, 16 and 64 concurrent streams against a real superpose-server (CPU backend) on a
# generated Llama-shaped model.
#   bench/batching.sh [shape=llama-110m] [concurrency=1,4,16,64] [server flags...]
# e.g. bench/batching.sh llama-110m 1,4,16,64 --cpu_dtype=float32
# LOAD_FLAGS go to the load client, e.g. LOAD_FLAGS="--temperature=0.8 --top_p=0.9";
# SERVER=path runs another server binary (A/B against an older build).
set -euo pipefail
cd "$(dirname "$0")/.."
shape=${1:-llama-110m}
levels=${2:-1,4,16,64}
shift $(($# < 2 ? $# : 2))
ninja -C build superpose-server superpose-load genmodel >/dev/null
dir=/tmp/superpose-bench/$shape
[ -f "$dir/model.safetensors" ] || build/bench/genmodel --out="$dir" --shape="$shape"
port_file=$(mktemp); rm -f "$port_file"
${SERVER:-build/superpose-server} --model="$dir" --listen=127.0.0.1:0 --port_file="$port_file" \
  --metrics_listen= --max_running=64 --max_batch_tokens=1024 --kv_cache_mb=2048 \
  --log_level=warn "$@" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -f "$port_file"' EXIT
for _ in $(seq 1 600); do [ -s "$port_file" ] && break; sleep 0.1; done
build/superpose-load --server=127.0.0.1:$(cat "$port_file") --concurrency="$levels" \
  --requests_per_stream=4 --prompt_tokens=16 --max_new_tokens=64 ${LOAD_FLAGS:-}
