// The one validation of a RAG request (used by the server before it answers and by the
// engine on Submit): INVALID_ARGUMENT naming the field, with numbers but never text.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/rag/rag.h"

namespace superpose::engine::rag {

struct Limits {
  int32_t context_length = 0;
  int32_t max_documents = 64;
  // Appended to "documents[i]" in messages (".text" where the API names a text field).
  std::string document_suffix;
};

struct Checked {
  Layout layout;             // superposition mode
  int64_t answer_start = 0;  // first position of the answer (rounded up)
};

// The number of documents alone (cheap; before anything is tokenized).
absl::Status CheckDocumentCount(int64_t count, const Limits& limits);
// Every rule: counts, empty segments, lengths against the context window, options
// (top_k, doc_weight, canonical_span) and where the answer would start.
absl::StatusOr<Checked> Validate(const Spec& spec, const Limits& limits);

}  // namespace superpose::engine::rag
