#include "server/chat_prompt.h"

#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/model/tokenizer_unicode.h"
#include "spdlog/spdlog.h"

namespace superpose::server {
namespace {

// Private-use characters around a marker name: text a client sends cannot hold them by
// accident, and a template that copies the content copies them too.
constexpr char kBegin[] = "\xEE\x80\x80superpose-documents\xEE\x80\x80";
constexpr char kEnd[] = "\xEE\x80\x81superpose-query-end\xEE\x80\x81";

absl::Status Invalid(const std::string& msg) { return absl::InvalidArgumentError(msg); }

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string TokenText(const engine::Tokenizer& tokenizer, std::optional<int32_t> id) {
  return id.has_value() ? tokenizer.IdToToken(*id) : std::string();
}

// One message's content as a string: a string, or text parts joined.
absl::StatusOr<std::string> ContentText(const nlohmann::json& content, const std::string& field) {
  if (content.is_string()) return content.get<std::string>();
  if (content.is_null()) return std::string();
  if (!content.is_array()) return Invalid(field + " must be a string or an array of parts");
  std::string text;
  for (size_t i = 0; i < content.size(); ++i) {
    const nlohmann::json& part = content[i];
    const std::string pf = absl::StrCat(field, "[", i, "]");
    if (!part.is_object() || !part.contains("type") || part["type"] != "text" ||
        !part.contains("text") || !part["text"].is_string()) {
      return Invalid(pf + " must be {\"type\": \"text\", \"text\": string} (only text parts)");
    }
    text += part["text"].get<std::string>();
  }
  return text;
}

}  // namespace

absl::StatusOr<nlohmann::json> NormalizeMessages(const nlohmann::json& messages) {
  if (!messages.is_array()) return Invalid("messages must be an array");
  if (messages.empty()) return Invalid("messages is empty");
  nlohmann::json out = nlohmann::json::array();
  for (size_t i = 0; i < messages.size(); ++i) {
    const nlohmann::json& m = messages[i];
    const std::string field = absl::StrCat("messages[", i, "]");
    if (!m.is_object()) return Invalid(field + " must be an object");
    if (!m.contains("role") || !m["role"].is_string()) {
      return Invalid(field + ".role must be a string");
    }
    nlohmann::json msg = {{"role", m["role"]}};
    absl::StatusOr<std::string> content =
        ContentText(m.contains("content") ? m["content"] : nlohmann::json(), field + ".content");
    if (!content.ok()) return content.status();
    msg["content"] = *std::move(content);
    if (m.contains("name")) {
      if (!m["name"].is_string()) return Invalid(field + ".name must be a string");
      msg["name"] = m["name"];
    }
    out.push_back(std::move(msg));
  }
  return out;
}

absl::StatusOr<ChatRagParts> CutAtMarkers(const std::string& rendered, const std::string& begin,
                                          const std::string& end) {
  const size_t b = rendered.find(begin);
  const size_t e = b == std::string::npos ? b : rendered.find(end, b + begin.size());
  if (b == std::string::npos || e == std::string::npos ||
      rendered.find(begin, b + 1) != std::string::npos ||
      rendered.find(end, e + 1) != std::string::npos) {
    return Invalid(
        "messages: the chat template does not copy the last user message's content verbatim, "
        "so the documents cannot be placed (docs/rag.md, \"Chat layout\")");
  }
  ChatRagParts parts;
  parts.preamble = rendered.substr(0, b);
  parts.query = rendered.substr(b + begin.size(), e - b - begin.size());
  parts.postamble = rendered.substr(e + end.size());
  return parts;
}

ChatPrompter ChatPrompter::Without(std::string why) {
  ChatPrompter p;
  p.why_ = std::move(why);
  return p;
}

absl::StatusOr<ChatPrompter> ChatPrompter::Load(const std::string& template_file,
                                                const std::string& model_dir,
                                                const engine::Tokenizer& tokenizer) {
  ChatPrompter p;
  p.bos_text_ = TokenText(tokenizer, tokenizer.bos_id());
  if (!template_file.empty()) {
    absl::StatusOr<std::string> source = ReadFile(template_file);
    if (!source.ok()) return source.status();
    absl::StatusOr<model::ChatTemplate> t =
        model::ChatTemplate::Parse(*source, p.bos_text_, TokenText(tokenizer, tokenizer.eos_id()));
    if (!t.ok()) return t.status();
    p.template_ = std::make_shared<const model::ChatTemplate>(*std::move(t));
    return p;
  }
  constexpr char kNone[] =
      "the model has no chat template (tokenizer_config.json chat_template); start the server "
      "with --chat_template=FILE";
  if (model_dir.empty()) return Without(kNone);
  const std::string config = model_dir + "/tokenizer_config.json";
  if (!std::ifstream(config)) return Without(kNone);
  absl::StatusOr<model::ChatTemplate> t = model::ChatTemplate::FromTokenizerConfig(config);
  if (absl::IsNotFound(t.status())) return Without(kNone);
  if (!t.ok()) {
    // Completions still work; chat requests say why they cannot.
    spdlog::warn("chat template of the model not usable: {}", t.status().ToString());
    return Without(absl::StrCat("the model's chat template cannot be used (", t.status().message(),
                                "); start the server with --chat_template"));
  }
  p.template_ = std::make_shared<const model::ChatTemplate>(*std::move(t));
  return p;
}

absl::StatusOr<std::string> ChatPrompter::Render(const nlohmann::json& messages) const {
  if (template_ == nullptr) return absl::FailedPreconditionError(why_);
  model::ChatRenderOptions options;
  options.add_generation_prompt = true;
  absl::StatusOr<std::string> text = template_->Render(messages, options);
  if (!text.ok()) {
    return absl::Status(text.status().code(), absl::StrCat("messages: the chat template failed: ",
                                                           text.status().message()));
  }
  return text;
}

absl::StatusOr<ChatRagParts> ChatPrompter::RenderForRag(const nlohmann::json& messages) const {
  int last_user = -1;
  for (size_t i = 0; i < messages.size(); ++i) {
    if (messages[i]["role"] == "user") last_user = static_cast<int>(i);
  }
  if (last_user < 0) return Invalid("messages: documents need a user message (the query)");
  nlohmann::json marked = messages;
  std::string& content = marked[last_user]["content"].get_ref<std::string&>();
  content = absl::StrCat(kBegin, content, kEnd);
  absl::StatusOr<std::string> rendered = Render(marked);
  if (!rendered.ok()) return rendered.status();
  absl::StatusOr<ChatRagParts> parts = CutAtMarkers(*rendered, kBegin, kEnd);
  if (!parts.ok()) return parts.status();
  if (!bos_text_.empty() && absl::StartsWith(parts->preamble, bos_text_)) {
    parts->preamble.erase(0, bos_text_.size());
  }
  return parts;
}

absl::Status RenderMessagesInto(const ChatPrompter* chat, v1::GenerateRequest* req) {
  nlohmann::json messages = nlohmann::json::array();
  for (int i = 0; i < req->messages().messages_size(); ++i) {
    const v1::ChatMessage& m = req->messages().messages(i);
    for (const std::string* s : {&m.role(), &m.content()}) {
      if (!engine::tok::IsValidUtf8(*s)) {
        return Invalid(absl::StrCat("messages.messages[", i, "] is not valid UTF-8"));
      }
    }
    if (m.role().empty()) return Invalid(absl::StrCat("messages.messages[", i, "].role is empty"));
    messages.push_back({{"role", m.role()}, {"content", m.content()}});
  }
  if (chat == nullptr || !chat->available()) {
    return Invalid(absl::StrCat("messages: ", chat == nullptr ? "the server has no chat template"
                                                              : chat->unavailable_reason()));
  }
  absl::StatusOr<std::string> text = chat->Render(messages);
  if (!text.ok()) return Invalid(std::string(text.status().message()));
  req->set_text(*std::move(text));  // clears messages (one prompt)
  req->set_add_special_tokens(false);
  return absl::OkStatus();
}

}  // namespace superpose::server
