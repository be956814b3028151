// TEMPORARY (branch openai): the Jinja interpreter behind chat_template.h comes from the
// jinja branch; the integrator drops this file when merging it. Every entry point
// answers UNIMPLEMENTED, so chat requests fail with a clear error until then.
#include "engine/model/chat_template.h"

namespace superpose::model {

struct ChatTemplate::Impl {
  std::string source;
};

ChatTemplate::ChatTemplate(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}

absl::StatusOr<ChatTemplate> ChatTemplate::Parse(const std::string& source, std::string bos_token,
                                                 std::string eos_token) {
  return absl::UnimplementedError("chat templates are not implemented in this build");
}

absl::StatusOr<ChatTemplate> ChatTemplate::FromTokenizerConfig(const std::string& path) {
  return absl::UnimplementedError("chat templates are not implemented in this build");
}

absl::StatusOr<std::string> ChatTemplate::Render(const nlohmann::json& messages,
                                                 const ChatRenderOptions& options) const {
  return absl::UnimplementedError("chat templates are not implemented in this build");
}

const std::string& ChatTemplate::source() const { return impl_->source; }

}  // namespace superpose::model
