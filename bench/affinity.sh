#!/usr/bin/env bash
# Cache affinity on two replicas behind nginx (deploy/nginx/superpose.conf): the RAG
# workload of superpose-load (a shared document pool, requests drawing from a fixed
# number of document sets) sent three ways, each on fresh replicas (cold caches):
#   affinity     x-superpose-affinity = tenant + document-set hash: consistent hashing
#   least_conn   no header: the config's fallback, fewest active requests
#   round_robin  no header, least_conn removed: nginx's default
# and reported as path-cache hit rate (the replicas' /metrics) and TTFT (superpose-load).
#   bench/affinity.sh [superpose-load flags, e.g. --requests=400]
# MODEL=dir serves a model (default: the built-in one); BUILD=build; OUT=dir for logs/JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD:-build}
out=${OUT:-/tmp/superpose-affinity}
mkdir -p "$out"
server_flags=${MODEL:+--model=$MODEL}
source bench/topology.sh
load_flags=(--workload=rag --rag_pool=96 --rag_doc_sets=24 --rag_docs=4 --rag_doc_tokens=96
  --rag_query_tokens=16 --output_len=8 --concurrency=4 --requests=192 --seed=1 "$@")
echo "| balancing | requests | errors | path-cache hits | misses | hit rate | req/s | TTFT mean ms | p50 | p90 | p99 |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for mode in affinity least_conn round_robin; do
  start_replica 0; start_replica 1; start_nginx "$mode" 2
  header=$([ "$mode" = affinity ] && echo auto || echo none)
  "$build/superpose-load" --server="127.0.0.1:$nginx_port" --affinity="$header" --progress=false \
    --markdown=false --json="$out/$mode.json" "${load_flags[@]}" 2>"$out/$mode.log" || true
  hits=0; misses=0
  for i in 0 1; do
    hits=$((hits + $(metric "${mport[$i]}" superpose_rag_path_cache_hits_total)))
    misses=$((misses + $(metric "${mport[$i]}" superpose_rag_path_cache_misses_total)))
  done
  python3 - "$out/$mode.json" "$mode" "$hits" "$misses" <<'PY'
import json, sys
lv = json.load(open(sys.argv[1]))["levels"][0]
mode, hits, misses = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t = lv["ttft_ms"]
print(f"| {mode} | {lv['requests']} | {lv['errors']} | {hits} | {misses} | "
      f"{100.0 * hits / max(1, hits + misses):.1f}% | {lv['requests_per_s']:.1f} | "
      f"{t['mean']:.1f} | {t['p50']:.1f} | {t['p90']:.1f} | {t['p99']:.1f} |")
PY
  stop_all
done
