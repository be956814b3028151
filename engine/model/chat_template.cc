#include "engine/model/chat_template.h"

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "engine/model/jinja.h"

namespace superpose::model {

struct ChatTemplate::Impl {
  std::string source;
  std::string bos_token, eos_token;
  jinja::Template tmpl;
};

ChatTemplate::ChatTemplate(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}

absl::StatusOr<ChatTemplate> ChatTemplate::Parse(const std::string& source, std::string bos_token,
                                                 std::string eos_token) {
  absl::StatusOr<jinja::Template> tmpl = jinja::Template::Parse(source);
  if (!tmpl.ok()) return tmpl.status();
  return ChatTemplate(std::make_shared<const Impl>(
      Impl{source, std::move(bos_token), std::move(eos_token), *std::move(tmpl)}));
}

namespace {

// A special token in tokenizer_config.json: a string, or an AddedToken object
// {"content": ...}; absent or null reads as "".
absl::StatusOr<std::string> TokenString(const nlohmann::json& config, const char* key,
                                        const std::string& path) {
  if (!config.contains(key) || config[key].is_null()) return std::string();
  const nlohmann::json& v = config[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) {
    return v["content"].get<std::string>();
  }
  return absl::InvalidArgumentError(
      absl::StrCat(path, ": '", key, "' must be a string or an object with 'content'"));
}

// `chat_template`: a string, or a list of {name, template} where "default" is taken.
absl::StatusOr<std::string> TemplateSource(const nlohmann::json& config, const std::string& path) {
  if (!config.contains("chat_template") || config["chat_template"].is_null()) {
    return absl::NotFoundError(absl::StrCat(path, ": no 'chat_template'"));
  }
  const nlohmann::json& t = config["chat_template"];
  if (t.is_string()) return t.get<std::string>();
  if (t.is_array()) {
    for (const nlohmann::json& entry : t) {
      if (entry.is_object() && entry.value("name", "") == "default" && entry.contains("template") &&
          entry["template"].is_string()) {
        return entry["template"].get<std::string>();
      }
    }
    return absl::NotFoundError(absl::StrCat(path, ": 'chat_template' has no \"default\" entry"));
  }
  return absl::InvalidArgumentError(
      absl::StrCat(path, ": 'chat_template' must be a string or a list of {name, template}"));
}

}  // namespace

absl::StatusOr<ChatTemplate> ChatTemplate::FromTokenizerConfig(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream text;
  text << in.rdbuf();
  const nlohmann::json config =
      nlohmann::json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (!config.is_object())
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  absl::StatusOr<std::string> source = TemplateSource(config, path);
  if (!source.ok()) return source.status();
  absl::StatusOr<std::string> bos = TokenString(config, "bos_token", path);
  if (!bos.ok()) return bos.status();
  absl::StatusOr<std::string> eos = TokenString(config, "eos_token", path);
  if (!eos.ok()) return eos.status();
  absl::StatusOr<ChatTemplate> t = Parse(*source, *std::move(bos), *std::move(eos));
  if (!t.ok()) return absl::InvalidArgumentError(absl::StrCat(path, ": ", t.status().message()));
  return t;
}

absl::StatusOr<std::string> ChatTemplate::Render(const nlohmann::json& messages,
                                                 const ChatRenderOptions& options) const {
  return Render(nlohmann::ordered_json(messages), nlohmann::ordered_json(options.extra_context),
                options);
}

absl::StatusOr<std::string> ChatTemplate::Render(const nlohmann::ordered_json& messages,
                                                 const nlohmann::ordered_json& extra_context,
                                                 const ChatRenderOptions& options) const {
  if (!messages.is_array()) return absl::InvalidArgumentError("messages must be a JSON array");
  if (!extra_context.is_null() && !extra_context.is_object()) {
    return absl::InvalidArgumentError("extra_context must be a JSON object or null");
  }
  // As transformers: the extra variables, then the messages, the generation flag and
  // the special tokens (those win over an extra variable of the same name).
  nlohmann::ordered_json context =
      extra_context.is_object() ? extra_context : nlohmann::ordered_json::object();
  context["messages"] = messages;
  context["add_generation_prompt"] = options.add_generation_prompt;
  context["bos_token"] = impl_->bos_token;
  context["eos_token"] = impl_->eos_token;
  const absl::Time now = options.clock ? options.clock() : absl::Now();
  jinja::RenderLimits limits;
  if (options.max_steps > 0) limits.max_steps = options.max_steps;
  if (options.max_output_bytes > 0) limits.max_output_bytes = options.max_output_bytes;
  return impl_->tmpl.Render(context, now, limits);
}

const std::string& ChatTemplate::source() const { return impl_->source; }

}  // namespace superpose::model
