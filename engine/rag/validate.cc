#include "engine/rag/validate.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace superpose::engine::rag {
namespace {

absl::Status Invalid(std::string message) { return absl::InvalidArgumentError(std::move(message)); }

absl::Status CheckOptions(const Options& o, int64_t n, const Limits& limits) {
  if (o.top_k < 1 || o.top_k > n) {
    return Invalid(
        absl::StrCat("rag.top_k must be in [1, ", n, "] (the number of documents), got ", o.top_k));
  }
  if (!(std::isfinite(o.doc_weight) && o.doc_weight >= 0.0f && o.doc_weight <= 10.0f)) {
    return Invalid(absl::StrCat("rag.doc_weight must be in [0, 10], got ", o.doc_weight));
  }
  if (!(std::isfinite(o.canonical_span) && o.canonical_span >= 0.0f &&
        o.canonical_span < static_cast<float>(limits.context_length))) {
    return Invalid(absl::StrCat("rag.canonical_span must be in [0, ", limits.context_length,
                                "), got ", o.canonical_span));
  }
  return absl::OkStatus();
}

absl::Status CheckSegments(const Spec& spec, const Limits& limits) {
  if (spec.query.empty()) return Invalid("query is empty (encodes to no tokens)");
  const int64_t fixed = spec.preamble.size() + spec.query.size() + spec.postamble.size();
  if (fixed >= limits.context_length) {
    return Invalid(absl::StrCat("preamble, query and postamble have ", fixed,
                                " tokens; the context window is ", limits.context_length));
  }
  for (size_t i = 0; i < spec.documents.size(); ++i) {
    const std::string field = absl::StrCat("documents[", i, "]", limits.document_suffix);
    const int64_t len = static_cast<int64_t>(spec.documents[i].size());
    if (len == 0) return Invalid(field + " is empty");
    if (fixed + len >= limits.context_length) {
      return Invalid(
          absl::StrCat(field, " has ", len, " tokens; with the preamble, query and ", "postamble (",
                       fixed, " tokens) it exceeds the context window of ", limits.context_length));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckDocumentCount(int64_t count, const Limits& limits) {
  if (count == 0) return Invalid("documents: at least one document is required");
  if (count > limits.max_documents) {
    return Invalid(
        absl::StrCat("documents has ", count, " entries; the limit is ", limits.max_documents));
  }
  return absl::OkStatus();
}

absl::StatusOr<Checked> Validate(const Spec& spec, const Limits& limits) {
  const int64_t n = static_cast<int64_t>(spec.documents.size());
  if (absl::Status st = CheckDocumentCount(n, limits); !st.ok()) return st;
  if (absl::Status st = CheckSegments(spec, limits); !st.ok()) return st;
  if (absl::Status st = CheckOptions(spec.options, n, limits); !st.ok()) return st;
  Checked c;
  if (spec.options.mode == Mode::kNaive) {
    c.answer_start = FlatSize(spec);
    if (c.answer_start >= limits.context_length) {
      return Invalid(absl::StrCat("documents: the concatenated prompt (rag.mode = NAIVE) has ",
                                  c.answer_start, " tokens; the context window is ",
                                  limits.context_length));
    }
    return c;
  }
  c.layout = ComputeLayout(spec);
  c.answer_start = static_cast<int64_t>(std::ceil(c.layout.answer_start));
  if (c.answer_start >= limits.context_length) {
    return Invalid(absl::StrCat("rag.canonical_span: the answer would start at position ",
                                c.answer_start, "; the context window is ", limits.context_length));
  }
  return c;
}

}  // namespace superpose::engine::rag
