#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: install dependencies, build, start
# superpose-server (the built-in demo model unless MODEL is set), send a real
# streaming request with superpose-cli, then stop the server.
#   scripts/demo.sh                      # built-in model (meaningless text)
#   MODEL=/path/to/hf-model scripts/demo.sh "Once upon a time"
set -euo pipefail
cd "$(dirname "$0")/.."
prompt=${1:-"Once upon a time"}
bash scripts/setup.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
ninja -C build superpose-server superpose-cli
port_file=$(mktemp)
rm -f "$port_file"
args=(--listen=127.0.0.1:0 --port_file="$port_file" --metrics_listen=127.0.0.1:0)
if [ -n "${MODEL:-}" ]; then args+=(--model="$MODEL"); fi
build/superpose-server "${args[@]}" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -f "$port_file"' EXIT
for _ in $(seq 1 600); do [ -s "$port_file" ] && break; sleep 0.1; done
[ -s "$port_file" ] || { echo "demo: the server did not start" >&2; exit 1; }
addr=127.0.0.1:$(cat "$port_file")
build/superpose-cli info --server="$addr" | grep -E "model_name|architecture|num_parameters|context_length|backend"
build/superpose-cli generate --server="$addr" --prompt="$prompt" --max_new_tokens=64 \
  --temperature=0.8 --top_p=0.95 --seed=1
# A superposition RAG request: three documents, the best path kept.
docs=$(mktemp)
printf '%s\n' "Lily went to the park with her mom. She saw a big red ball." \
  "Tom had a little dog named Max. Max liked to run in the garden." \
  "The sun was shining and the birds were singing." > "$docs"
build/superpose-cli rag --server="$addr" --preamble="Read the stories." --docs_file="$docs" \
  --query="What did Lily see at the park?" --postamble=" Answer:" --top_k_paths=1 \
  --max_new_tokens=24
rm -f "$docs"
