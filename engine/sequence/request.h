// Plain C++ request / response types of the engine (the proto types stop at server/).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/time/time.h"
#include "engine/lazy.h"
#include "engine/lora_adapter.h"
#include "engine/rag/rag.h"

namespace superpose::engine {

struct SamplingOptions {
  int32_t max_new_tokens = 256;
  float temperature = 1.0f;  // 0: greedy
  int32_t top_k = 0;         // 0: off
  float top_p = 1.0f;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  uint64_t seed = 0;
};

// A request id goes into every log line of its request, so it must be an id, not text:
// at most 128 letters, digits and - _ . : (INVALID_ARGUMENT naming request_id otherwise).
// The engine checks it on Submit whoever the caller; the server maps it to its response.
inline absl::Status ValidateRequestId(const std::string& id) {
  if (id.size() > 128) return absl::InvalidArgumentError("request_id is longer than 128 bytes");
  for (char c : id) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.' &&
        c != ':') {
      return absl::InvalidArgumentError("request_id may hold only letters, digits and - _ . :");
    }
  }
  return absl::OkStatus();
}

// The only per-request string a log line prints: a request id that passed
// ValidateRequestId, made once when the request arrives. Log lines take this, never a
// Request (which holds the prompt, documents and stop strings), so that what they can
// print is fixed by the type: ids, sizes and timings.
//
// Private mode (HashRequestIdsInLogs) prints a keyed hash of the id instead: the lines
// of one request still share one value, but no id a client chose is written.
class LogId {
 public:
  LogId() = default;
  static absl::StatusOr<LogId> Of(const std::string& request_id);  // log_id.cc
  const std::string& str() const { return id_; }

 private:
  explicit LogId(std::string id) : id_(std::move(id)) {}
  std::string id_;
};

// From now on every LogId made is "h" and 16 hex digits of HMAC-SHA256(key, request
// id) under a random key made here, once per process and never written anywhere. Call
// at startup, before any request. Returns false when no random key could be made.
bool HashRequestIdsInLogs();

struct Request {
  std::string request_id;  // see ValidateRequestId
  std::string tenant = "default";
  std::vector<int32_t> prompt_ids;
  SamplingOptions sampling;
  std::vector<std::string> stop;
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
  bool logprobs = false;
  int32_t top_logprobs = 0;
  bool skip_special_tokens = true;
  int32_t priority = 0;  // higher runs first among waiting requests
  absl::Time deadline = absl::InfiniteFuture();
  // Set for a RAG request (GenerateRag): prompt_ids is then ignored.
  std::shared_ptr<const rag::Spec> rag;
  // LazyLLM token pruning of the prompt (engine/lazy.h); plain requests only.
  LazyOptions lazy;
  // LoRA adapter by name ("" : the base model). Engine::Submit resolves it into
  // `adapter`, which pins the adapter in the backend while the request lives.
  std::string adapter_id;
  std::shared_ptr<const AdapterRef> adapter;
  int64_t adapter_key() const { return adapter != nullptr ? adapter->id : 0; }
};

enum class FinishReason { kNone, kLength, kStop, kEos, kCancelled };
const char* FinishReasonName(FinishReason f);

struct TokenLogprob {
  int32_t token_id = 0;
  float logprob = 0.0f;
};

struct TokenLogprobs {
  TokenLogprob chosen;
  std::vector<TokenLogprob> top;
};

struct Usage {
  int32_t prompt_tokens = 0;
  int32_t generated_tokens = 0;
  int32_t cached_prompt_tokens = 0;
  double queue_time_ms = 0;
  double ttft_ms = 0;
  double total_time_ms = 0;
  // LazyLLM: the boundary layers it ran with and the prompt tokens computed in each
  // stage (stage 0 = every prompt token), empty when it did not run; or why a request
  // that asked for it ran without it.
  std::vector<int32_t> lazy_boundaries;
  std::vector<int32_t> lazy_stage_tokens;
  std::string lazy_skipped;
  bool lazy_revive = false;  // decode-time revival ran (then lazy_revived_tokens counts)
  int64_t lazy_revived_tokens = 0;
};

// What the engine streams back. Events of one request arrive in order, on the engine
// thread: handlers must not block (they queue and return).
struct StreamEvent {
  std::string text;  // newly final text
  std::vector<int32_t> token_ids;
  std::vector<TokenLogprobs> logprobs;
  bool finished = false;
  FinishReason finish_reason = FinishReason::kNone;
  Usage usage;                             // set when finished
  absl::Status status;                     // non-OK: the request failed (finished is true)
  std::shared_ptr<const rag::Result> rag;  // RAG requests, on the final event
};

using StreamCallback = std::function<void(StreamEvent&&)>;

// An adapter name (Request::adapter_id, --adapters, LoadAdapter): 1 to 64 letters,
// digits and - _ . (INVALID_ARGUMENT naming `field`).
absl::Status ValidateAdapterName(const std::string& name, const std::string& field);

}  // namespace superpose::engine
