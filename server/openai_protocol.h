// The OpenAI-compatible HTTP API's JSON (docs/api.md "HTTP API"): request bodies of
// /v1/completions and /v1/chat/completions parsed into the gRPC request messages (so
// that one set of bounds and field checks applies to both), and the responses, stream
// chunks and errors in OpenAI's shapes.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/model/tokenizer.h"
#include "engine/sequence/request.h"
#include "nlohmann/json.hpp"
#include "server/chat_prompt.h"
#include "server/convert.h"
#include "superpose/v1/superpose.pb.h"

namespace superpose::server::openai {

enum class Endpoint { kCompletions, kChat };

// Most choices one request may ask for (prompts x n).
inline constexpr int kMaxChoices = 16;

// A parsed generation request: one gRPC request per prompt (completions may carry a
// list of prompts), each run `n` times; or one GenerateRag request (chat with documents).
struct CallPlan {
  Endpoint endpoint = Endpoint::kCompletions;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  bool logprobs = false;
  int32_t top_logprobs = 0;
  int32_t n = 1;
  bool rag = false;
  std::vector<v1::GenerateRequest> prompts;
  v1::GenerateRagRequest rag_request;
  std::string adapter;  // `model` named this LoRA adapter ("": the base model)
  int num_choices() const { return n * (rag ? 1 : static_cast<int>(prompts.size())); }
};

struct ParseContext {
  std::string model_name;  // the id /v1/models lists
  const ChatPrompter* chat = nullptr;
  const Limits* limits = nullptr;
  // Whether `model` names a LoRA adapter, which it may instead of the base model (as
  // vLLM); empty: no adapters. (A callback: the parser needs no adapter manager.)
  std::function<bool(const std::string&)> is_adapter;
};

// Checks every field's type and range (INVALID_ARGUMENT with the OpenAI parameter name
// as ParamOf), the model (NOT_FOUND), and renders chat messages.
absl::StatusOr<CallPlan> ParseCall(const nlohmann::json& body, Endpoint endpoint,
                                   const ParseContext& ctx);

// An error for `param` (the OpenAI request parameter it is about).
absl::Status Bad(const std::string& param, const std::string& message);
// The parameter an error names: the one Bad() set, else derived from the message of a
// gRPC-side check ("sampling.max_new_tokens ..." is max_tokens); "" for none.
std::string ParamOf(const absl::Status& status);

struct ApiError {
  int http_status = 500;
  nlohmann::json body;  // {"error": {"message", "type", "param", "code"}}
};
// `endpoint` picks the names the messages use (max_tokens, prompt or messages).
ApiError ToApiError(const absl::Status& status, Endpoint endpoint = Endpoint::kCompletions);
ApiError MakeApiError(int http_status, const std::string& message, const std::string& type,
                      const std::string& param, const std::string& code);

// What one choice produced (merged from its engine events).
struct ChoiceOutput {
  std::string text;
  std::vector<int32_t> token_ids;
  std::vector<engine::TokenLogprobs> logprobs;
  bool finished = false;
  engine::FinishReason finish_reason = engine::FinishReason::kNone;
  engine::Usage usage;
  std::shared_ptr<const engine::rag::Result> rag;
};

const char* FinishReasonString(engine::FinishReason reason);

// Response pieces. `id`: "cmpl-..." / "chatcmpl-...", `created`: unix seconds.
struct ResponseMeta {
  Endpoint endpoint = Endpoint::kCompletions;
  std::string id;
  int64_t created = 0;
  std::string model;
  bool logprobs = false;
  const engine::Tokenizer* tokenizer = nullptr;
};

// One choice's logprobs object for `lps` (completions form: tokens / token_logprobs /
// top_logprobs / text_offset from `*text_offset`, advanced; chat form: content).
nlohmann::json LogprobsJson(const ResponseMeta& meta, const std::vector<engine::TokenLogprobs>& lps,
                            int64_t* text_offset);
// OpenAI usage: prompt tokens counted once per prompt, completion tokens of every choice.
nlohmann::json UsageJson(int64_t prompt_tokens, int64_t completion_tokens, int64_t cached_tokens);
// The whole non-streamed response. `prompt_of_choice`: which prompt each choice answers.
nlohmann::json FullResponse(const ResponseMeta& meta, const std::vector<ChoiceOutput>& choices,
                            int n);
// A stream chunk of choice `index` with `text` (and logprobs, finish reason when
// finished). `first`: the chat form's first chunk of a choice (role "assistant").
nlohmann::json StreamChunk(const ResponseMeta& meta, int index, const std::string& text,
                           const std::vector<engine::TokenLogprobs>& lps, int64_t* text_offset,
                           engine::FinishReason finish, bool first);
// The last chunk with include_usage: no choices, the usage of all.
nlohmann::json UsageChunk(const ResponseMeta& meta, const std::vector<ChoiceOutput>& choices,
                          int n);
// The per-document report of a RAG choice (the `rag` extension field).
nlohmann::json RagJson(const engine::rag::Result& result, const std::vector<std::string>& ids,
                       const engine::rag::Spec& spec);

}  // namespace superpose::server::openai
