#!/usr/bin/env bash
# Starts superpose-server (stories260k) with the HTTP API and drives it with the official
# `openai` npm package: `node --test tests/node/<suite>.test.mjs`, then runs the curl
# examples of docs/api.md (tests/node/doc_curl.sh). ctest runs it (Node.OpenAiSdk,
# Node.OpenAiSdkChat); it FAILS, never skips, when node or the package is missing
# (scripts/setup.sh installs both: npm ci --prefix tests/node).
#
# Usage: run.sh BUILD_DIR SHARED_DIR core|chat
#   core: models, completions (streamed or not), stop, seeds, logprobs, errors, disconnect.
#   chat: chat completions and RAG chat with documents, on a server started with
#         --chat_template=tests/chat_templates/chatml-bos.jinja (rendered by the chat
#         template interpreter, engine/model/jinja*).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=$1 shared=$2 suite=$3
if ! command -v node >/dev/null; then
  echo "FAIL: node not found (Node >= 20; scripts/setup.sh installs it)" >&2
  exit 1
fi
if [ ! -f "$here/node_modules/openai/package.json" ]; then
  echo "FAIL: the openai package is not installed: npm ci --prefix tests/node" >&2
  exit 1
fi
tmp=$(mktemp -d)
args=(--model="$shared/fixtures/stories260k" --backend=cpu --log_level=warn
  --listen=127.0.0.1:0 --port_file="$tmp/grpc"
  --metrics_listen=127.0.0.1:0 --metrics_port_file="$tmp/metrics"
  --http_listen=127.0.0.1:0 --http_port_file="$tmp/http")
if [ "$suite" = chat ]; then args+=(--chat_template="$here/../chat_templates/chatml-bos.jinja"); fi
"$build/superpose-server" "${args[@]}" >"$tmp/log" 2>&1 &
pid=$!
cleanup() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
for _ in $(seq 600); do
  [ -s "$tmp/http" ] && break
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "FAIL: superpose-server did not start:" >&2
    cat "$tmp/log" >&2
    exit 1
  fi
  sleep 0.1
done
[ -s "$tmp/http" ] || { echo "FAIL: no HTTP port after 60 s" >&2; exit 1; }
export SUPERPOSE_HTTP_PORT=$(cat "$tmp/http") SUPERPOSE_METRICS_PORT=$(cat "$tmp/metrics")
node --test "$here/$suite.test.mjs"
bash "$here/doc_curl.sh" "$here/../../docs/api.md" "$SUPERPOSE_HTTP_PORT" "$suite"
