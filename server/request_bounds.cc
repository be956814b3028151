#include "server/request_bounds.h"

#include <algorithm>
#include <climits>
#include <string>

#include "absl/strings/str_cat.h"
#include "engine/util/status.h"

namespace superpose::server {
namespace {

absl::Status Invalid(const std::string& msg) { return absl::InvalidArgumentError(msg); }

absl::Status CheckText(int64_t bytes, const std::string& field, const Limits& limits) {
  if (limits.max_text_bytes <= 0 || bytes <= limits.max_text_bytes) return absl::OkStatus();
  return Invalid(absl::StrCat(field, " has ", bytes, " bytes; at most ", limits.max_text_bytes,
                              " (--max_text_bytes: what the context window of ",
                              limits.context_length, " tokens can hold)"));
}

template <typename Req>
absl::Status CheckCommon(const Req& req, const Limits& limits) {
  if (req.stop_size() > limits.max_stop_strings) {
    return Invalid(
        absl::StrCat("stop has ", req.stop_size(), " strings; at most ", limits.max_stop_strings));
  }
  for (int i = 0; i < req.stop_size(); ++i) {
    if (static_cast<int64_t>(req.stop(i).size()) > limits.max_stop_string_bytes) {
      return Invalid(absl::StrCat("stop[", i, "] has ", req.stop(i).size(), " bytes; at most ",
                                  limits.max_stop_string_bytes));
    }
  }
  if (req.stop_token_ids_size() > limits.vocab_size) {
    return Invalid(absl::StrCat("stop_token_ids has ", req.stop_token_ids_size(), " ids; at most ",
                                limits.vocab_size, " (the vocabulary size)"));
  }
  return engine::ValidateRequestId(req.request_id());
}

absl::Status CheckRagText(const v1::GenerateRagRequest& req, const Limits& limits) {
  SP_RETURN_IF_ERROR(CheckText(static_cast<int64_t>(req.preamble().size()), "preamble", limits));
  SP_RETURN_IF_ERROR(CheckText(static_cast<int64_t>(req.query().size()), "query", limits));
  SP_RETURN_IF_ERROR(CheckText(static_cast<int64_t>(req.postamble().size()), "postamble", limits));
  const int64_t shared =
      static_cast<int64_t>(req.preamble().size() + req.query().size() + req.postamble().size());
  SP_RETURN_IF_ERROR(CheckText(shared, "preamble + query + postamble", limits));
  // Naive mode concatenates every document; superposition puts each on its own path.
  const bool naive = req.rag().mode() == v1::RAG_MODE_NAIVE;
  int64_t all = shared;
  for (int i = 0; i < req.documents_size(); ++i) {
    const v1::RagDocument& d = req.documents(i);
    const std::string field = absl::StrCat("documents[", i, "].text");
    const int64_t bytes = static_cast<int64_t>(d.text().size());
    SP_RETURN_IF_ERROR(CheckText(bytes, field, limits));
    if (!naive)
      SP_RETURN_IF_ERROR(
          CheckText(shared + bytes, field + " with the preamble, query and postamble", limits));
    if (d.id().size() > 256) {
      return Invalid(
          absl::StrCat("documents[", i, "].id has ", d.id().size(), " bytes; at most 256"));
    }
    all += bytes;
  }
  if (naive)
    SP_RETURN_IF_ERROR(CheckText(
        all, "documents (rag.mode = NAIVE: all of them with the preamble, query and postamble)",
        limits));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<RequestBounds> DeriveRequestBounds(int32_t context_length,
                                                  const BoundsConfig& config) {
  if (config.max_bytes_per_token < 1) {
    return Invalid(
        absl::StrCat("--max_bytes_per_token must be >= 1, got ", config.max_bytes_per_token));
  }
  if (config.max_text_bytes < 0 || config.max_request_bytes < 0) {
    return Invalid("--max_text_bytes and --max_request_bytes must be >= 0 (0: derived)");
  }
  RequestBounds b;
  b.max_text_bytes = config.max_text_bytes > 0
                         ? config.max_text_bytes
                         : int64_t{context_length} * config.max_bytes_per_token;
  // A full-size text field with every other field near its own limit, or GenerateRag
  // documents of up to four full-size fields in all.
  b.max_request_bytes =
      config.max_request_bytes > 0 ? config.max_request_bytes : 4 * b.max_text_bytes + (64 << 10);
  if (b.max_request_bytes > INT_MAX) {
    if (config.max_request_bytes > 0) {
      return Invalid(absl::StrCat("--max_request_bytes must be <= ", INT_MAX, " (gRPC's limit)"));
    }
    b.max_request_bytes = INT_MAX;
  }
  return b;
}

absl::Status CheckBounds(const v1::GenerateRequest& req, const Limits& limits) {
  if (req.has_text()) {
    SP_RETURN_IF_ERROR(CheckText(static_cast<int64_t>(req.text().size()), "text", limits));
  }
  if (req.has_messages()) {
    const int n = req.messages().messages_size();
    if (n == 0 || n > kMaxChatMessages) {
      return Invalid(absl::StrCat("messages has ", n, " messages; 1 to ", kMaxChatMessages));
    }
    SP_RETURN_IF_ERROR(CheckText(TextBytes(req), "messages", limits));
  }
  if (req.has_token_ids() && req.token_ids().ids_size() >= limits.context_length) {
    return Invalid(absl::StrCat("prompt has ", req.token_ids().ids_size(),
                                " tokens (token_ids.ids); the context window is ",
                                limits.context_length, " (at least one token must fit after it)"));
  }
  return CheckCommon(req, limits);
}

absl::Status CheckBounds(const v1::GenerateRagRequest& req, const Limits& limits) {
  if (req.documents_size() > limits.max_rag_documents) {
    return Invalid(absl::StrCat("documents has ", req.documents_size(), " documents; at most ",
                                limits.max_rag_documents));
  }
  SP_RETURN_IF_ERROR(CheckRagText(req, limits));
  return CheckCommon(req, limits);
}

absl::Status CheckBounds(const v1::TokenizeRequest& req, const Limits& limits) {
  return CheckText(static_cast<int64_t>(req.text().size()), "text", limits);
}

absl::Status CheckBounds(const v1::DetokenizeRequest& req, const Limits& limits) {
  // Tokenize returns at most about one id per byte of its text.
  const int64_t most = std::max<int64_t>(limits.max_text_bytes, limits.context_length);
  if (limits.max_text_bytes > 0 && req.token_ids_size() > most) {
    return Invalid(absl::StrCat("token_ids has ", req.token_ids_size(), " ids; at most ", most,
                                " (--max_text_bytes)"));
  }
  return absl::OkStatus();
}

int64_t TextBytes(const v1::GenerateRequest& req) {
  int64_t n = req.has_text() ? static_cast<int64_t>(req.text().size()) : 0;
  for (const v1::ChatMessage& m : req.messages().messages()) {
    n += static_cast<int64_t>(m.role().size() + m.content().size());
  }
  return n;
}

int64_t TextBytes(const v1::GenerateRagRequest& req) {
  int64_t n =
      static_cast<int64_t>(req.preamble().size() + req.query().size() + req.postamble().size());
  for (const v1::RagDocument& d : req.documents()) n += static_cast<int64_t>(d.text().size());
  return n;
}

}  // namespace superpose::server
