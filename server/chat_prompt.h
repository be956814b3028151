// Chat prompts: a conversation (a JSON array of {role, content}) rendered into prompt
// text by the model's chat template (engine/model/chat_template.h), for the HTTP API
// (server/openai_server.h) and gRPC Generate's `messages`. Also the RAG layout rule of
// docs/rag.md ("Chat layout"): the documents go before the last user message's
// content, so a chat with documents is cut into preamble / query / postamble.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "engine/model/chat_template.h"
#include "engine/model/tokenizer.h"
#include "nlohmann/json.hpp"
#include "superpose/v1/superpose.pb.h"

namespace superpose::server {

// The parts of a rendered chat around the documents (GenerateRag's fields).
struct ChatRagParts {
  std::string preamble;   // everything before the last user message's content
  std::string query;      // the last user message's content
  std::string postamble;  // everything after it (end of turn, assistant header)
};

class ChatPrompter {
 public:
  // No template: every Render is FAILED_PRECONDITION with `why` (e.g. "the model has no
  // chat_template; start the server with --chat_template").
  static ChatPrompter Without(std::string why);
  // `template_file` (--chat_template) when not empty, else `model_dir`/tokenizer_config.json
  // (no file or no template there: Without(...)). An error reading or parsing the file
  // given is returned (a startup error); the model's own template failing to parse is
  // logged and the server runs without chat.
  static absl::StatusOr<ChatPrompter> Load(const std::string& template_file,
                                           const std::string& model_dir,
                                           const engine::Tokenizer& tokenizer);

  bool available() const { return template_ != nullptr; }
  const std::string& unavailable_reason() const { return why_; }

  // The prompt text of `messages` (checked by CheckMessages), with the assistant turn's
  // opening appended. Special tokens appear as text (e.g. "<s>"): encode it with
  // add_special_tokens = false (the template adds BOS itself, as in HF's
  // apply_chat_template).
  absl::StatusOr<std::string> Render(const nlohmann::json& messages) const;
  // Renders `messages` with markers around the last user message's content and cuts the
  // text there. A leading BOS token text is dropped from the preamble (GenerateRag adds
  // BOS when tokenizing it). INVALID_ARGUMENT when there is no user message or the
  // template does not copy its content verbatim.
  absl::StatusOr<ChatRagParts> RenderForRag(const nlohmann::json& messages) const;

 private:
  std::shared_ptr<const model::ChatTemplate> template_;
  std::string why_;
  std::string bos_text_;
};

// Checks a JSON `messages` array: objects with a string `role` and a `content` that is a
// string or an array of {"type": "text", "text": ...} parts (joined); returns the array
// with every content a string. INVALID_ARGUMENT naming the field ("messages[2].content").
absl::StatusOr<nlohmann::json> NormalizeMessages(const nlohmann::json& messages);

// gRPC Generate's `messages` (checked: valid UTF-8) rendered by `chat` (null: none)
// into `text`, to be tokenized without adding BOS. INVALID_ARGUMENT naming `messages`.
absl::Status RenderMessagesInto(const ChatPrompter* chat, v1::GenerateRequest* req);

// Splits `rendered` at the two markers (each must occur exactly once, in order).
absl::StatusOr<ChatRagParts> CutAtMarkers(const std::string& rendered, const std::string& begin,
                                          const std::string& end);

}  // namespace superpose::server
