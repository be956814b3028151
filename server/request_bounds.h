// Request bounds checked before any tokenizing: the bytes of every text field, the
// count of repeated fields, and the size of a whole request message. Tokenizing costs
// about a microsecond per byte and the ids take four bytes per token (more in a
// Tokenize response), so text that cannot fit the context window must be refused by
// its size alone. See docs/operations.md ("Request bounds").
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "server/convert.h"
#include "superpose/v1/superpose.pb.h"

namespace superpose::server {

// Most messages of one chat (GenerateRequest.messages).
inline constexpr int kMaxChatMessages = 1024;

// What the flags ask for; 0 means "derive it".
struct BoundsConfig {
  // Most input bytes one token can stand for, on average over a prompt that fills the
  // context window. 32: in the fixture tokenizers (stories260k, llama-spm, phi-3,
  // gpt-2, gpt-neox, falcon) text takes 1.8-3.0 bytes per token on average (13 at most
  // for one test case), the longest piece of the SentencePiece vocabularies is 27
  // bytes, and only runs of spaces or punctuation in the byte-level ones (up to 80, 128
  // and 512 bytes) are longer. docs/operations.md ("Request bounds") has the numbers.
  int32_t max_bytes_per_token = 32;
  int64_t max_text_bytes = 0;     // per text field; 0: context_length * max_bytes_per_token
  int64_t max_request_bytes = 0;  // per message; 0: 4 * max_text_bytes + 64 KiB
};

struct RequestBounds {
  int64_t max_text_bytes = 0;
  int64_t max_request_bytes = 0;
};

// The bounds for a server whose context window is `context_length` tokens;
// INVALID_ARGUMENT naming the flag when a given value is out of range.
absl::StatusOr<RequestBounds> DeriveRequestBounds(int32_t context_length,
                                                  const BoundsConfig& config);

// Sizes and counts only: INVALID_ARGUMENT naming the field and the limit. Run before
// any tokenizing; ToEngineRequest / ToEngineRagRequest still check everything else.
absl::Status CheckBounds(const v1::GenerateRequest& req, const Limits& limits);
absl::Status CheckBounds(const v1::GenerateRagRequest& req, const Limits& limits);
absl::Status CheckBounds(const v1::TokenizeRequest& req, const Limits& limits);
absl::Status CheckBounds(const v1::DetokenizeRequest& req, const Limits& limits);

// The text bytes a request will tokenize: small requests tokenize inline.
int64_t TextBytes(const v1::GenerateRequest& req);
int64_t TextBytes(const v1::GenerateRagRequest& req);

}  // namespace superpose::server
