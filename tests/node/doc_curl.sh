#!/usr/bin/env bash
# Runs the curl examples of docs/api.md against a running server: every fenced block
# right after a `<!-- curl-test: SUITE [error] -->` line whose SUITE is $3, with
# localhost:8000 pointed at port $2. A block passes when curl succeeds and its output is
# an OpenAI object (or an SSE stream ending in [DONE]); "error" blocks must print an
# OpenAI error object instead. Fails when the doc has no example for the suite.
# Usage: doc_curl.sh DOC PORT SUITE
set -euo pipefail
doc=$1 port=$2 suite=$3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
awk -v suite="$suite" -v dir="$tmp" '
  /^<!-- curl-test: / { split($0, f, " "); want = (f[3] == suite); kind = f[4]; next }
  want && /^```/ && !inblock { inblock = 1; n++; file = sprintf("%s/%02d-%s.sh", dir, n,
                               kind == "error" ? "error" : "ok"); next }
  inblock && /^```/ { inblock = 0; want = 0; close(file); next }
  inblock { print > file }
' "$doc"
count=0
for script in "$tmp"/*.sh; do
  [ -e "$script" ] || break
  count=$((count + 1))
  out=$(sed "s/localhost:8000/127.0.0.1:$port/g" "$script" | bash 2>&1) || {
    echo "FAIL: example $(basename "$script") exited with an error:"; cat "$script"; echo "$out"
    exit 1
  }
  if [[ $script == *-error.sh ]]; then
    grep -q '"error"' <<<"$out" || { echo "FAIL: $(basename "$script") gave no error: $out"; exit 1; }
  elif ! grep -q -e '"object"' -e 'data: \[DONE\]' <<<"$out" || grep -q '"error"' <<<"$out"; then
    echo "FAIL: example $(basename "$script"):"; cat "$script"; echo "$out"
    exit 1
  fi
done
if [ "$count" -eq 0 ]; then echo "FAIL: no curl-test examples for '$suite' in $doc"; exit 1; fi
echo "doc_curl: $count examples of '$suite' in $(basename "$doc") passed"
