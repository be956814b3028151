// Validation of API requests and conversion between proto and engine types.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "engine/model/tokenizer.h"
#include "engine/sequence/request.h"
#include "superpose/v1/superpose.pb.h"

namespace superpose::server {

struct Limits {
  int32_t context_length = 0;  // the engine's context window
  int32_t vocab_size = 0;      // model vocabulary (valid token ids)
  int32_t default_max_new_tokens = 256;
  int32_t max_stop_strings = 16;
  int32_t max_stop_string_bytes = 256;
  int32_t max_top_logprobs = 20;
  int32_t max_rag_documents = 64;
  // Bytes of one text field, checked before tokenizing (server/request_bounds.h);
  // 0: unbounded.
  int64_t max_text_bytes = 0;
};

// Checks every field of `req` and builds the engine request. INVALID_ARGUMENT with a
// message naming the field; messages may carry numbers, never user text.
absl::StatusOr<engine::Request> ToEngineRequest(const v1::GenerateRequest& req,
                                                const engine::Tokenizer& tokenizer,
                                                const Limits& limits);

// GenerateRag: every segment tokenized on its own (BOS only on the preamble; each
// document ends with a newline), options checked, naive or superposition layout
// checked against the context window.
absl::StatusOr<engine::Request> ToEngineRagRequest(const v1::GenerateRagRequest& req,
                                                   const engine::Tokenizer& tokenizer,
                                                   const Limits& limits);
// `ids`: the callers' document ids (may be empty).
void ToProto(const engine::rag::Result& result, const std::vector<std::string>& ids,
             const engine::rag::Spec& spec, v1::RagReport* out);

// Token ids given by a client: each must be in [0, vocab_size).
absl::Status ValidateTokenIds(const google::protobuf::RepeatedField<uint32_t>& ids,
                              int32_t vocab_size, const char* field);
// Text must be valid UTF-8.
absl::Status ValidateUtf8(const std::string& text, const std::string& field);

v1::FinishReason ToProto(engine::FinishReason reason);
void ToProto(const engine::Usage& usage, v1::Usage* out);
void ToProto(const engine::TokenLogprobs& lp, const engine::Tokenizer& tokenizer,
             v1::TokenLogprobs* out);

}  // namespace superpose::server
