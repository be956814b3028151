// Chat templates: the model's `chat_template` (a Jinja template in
// tokenizer_config.json, or a file given to the server) rendered into a prompt, as
// Hugging Face transformers' apply_chat_template and the @huggingface/jinja renderer do,
// byte for byte. The interpreter (engine/model/jinja*.{h,cc}) covers the subset chat
// templates use.
#ifndef SUPERPOSE_ENGINE_MODEL_CHAT_TEMPLATE_H_
#define SUPERPOSE_ENGINE_MODEL_CHAT_TEMPLATE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "nlohmann/json.hpp"

namespace superpose::model {

struct ChatRenderOptions {
  // Appends the assistant turn's opening (the template's `add_generation_prompt`).
  bool add_generation_prompt = true;
  // Further variables the template may read (e.g. `tools`, `documents`,
  // `enable_thinking`); a JSON object, or null.
  nlohmann::json extra_context;
  // What strftime_now() formats (in UTC); unset: absl::Now(). Tests fix it.
  std::function<absl::Time()> clock;
  // Bounds on one render (0: the defaults of jinja::RenderLimits, 20M steps and 64 MiB):
  // a template that loops forever or builds a huge string fails with
  // ResourceExhausted instead of holding the server.
  int64_t max_steps = 0;
  int64_t max_output_bytes = 0;
};

class ChatTemplate {
 public:
  // Parses `source`; a syntax error is InvalidArgument naming the line and column.
  // `bos_token` / `eos_token` are the strings the template sees under those names.
  static absl::StatusOr<ChatTemplate> Parse(const std::string& source, std::string bos_token,
                                            std::string eos_token);
  // Reads `chat_template` (a string, or a list of {name, template} where "default" is
  // taken) and the bos/eos token strings from a tokenizer_config.json. NotFound when the
  // file has no template.
  static absl::StatusOr<ChatTemplate> FromTokenizerConfig(const std::string& path);

  // `messages`: a JSON array of objects with at least `role` and `content`.
  // InvalidArgument for a template error at run time, including the template's own
  // raise_exception("...") message.
  absl::StatusOr<std::string> Render(const nlohmann::json& messages,
                                     const ChatRenderOptions& options) const;
  // As above with JSON that keeps its key order (nlohmann::json sorts object keys):
  // tool schemas and message fields then print in the order the client sent them, as
  // in transformers. `extra_context` stands for options.extra_context (ignored here).
  absl::StatusOr<std::string> Render(const nlohmann::ordered_json& messages,
                                     const nlohmann::ordered_json& extra_context,
                                     const ChatRenderOptions& options) const;

  const std::string& source() const;

 private:
  struct Impl;
  explicit ChatTemplate(std::shared_ptr<const Impl> impl);
  std::shared_ptr<const Impl> impl_;
};

}  // namespace superpose::model

#endif  // SUPERPOSE_ENGINE_MODEL_CHAT_TEMPLATE_H_
