#!/usr/bin/env bash
# The engine's layers include downwards only (docs/architecture.md): nothing in the
# backend interface, the KV manager, sequences or RAG includes engine/runtime/, and
# nothing in engine/ includes server/. Prints the offending lines; exits 1 if any.
set -euo pipefail
cd "$(dirname "$0")/.."
bad=$(grep -nH '#include "engine/runtime/' engine/backend* engine/row_sampling* engine/kv/* \
        engine/sequence/* engine/rag/* || true)
bad+=$(grep -rnH '#include "server/' engine || true)
if [ -n "$bad" ]; then
  echo "layering: includes against the layers:"
  echo "$bad"
  exit 1
fi
echo "layering: ok"
