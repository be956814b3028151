#include "server/openai_protocol.h"

#include <google/protobuf/util/json_util.h>

#include <cmath>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "engine/util/status.h"
#include "server/lazy_options.h"

namespace superpose::server::openai {
namespace {

using nlohmann::json;

constexpr char kParamPayload[] = "superpose.dev/openai-param";

// A present, non-null member of `body` (null counts as absent, as OpenAI treats it).
const json* Member(const json& body, const char* name) {
  auto it = body.find(name);
  if (it == body.end() || it->is_null()) return nullptr;
  return &*it;
}

absl::Status GetNumber(const json& body, const char* name, float* out, bool* present) {
  const json* v = Member(body, name);
  *present = v != nullptr;
  if (v == nullptr) return absl::OkStatus();
  if (!v->is_number()) return Bad(name, absl::StrCat(name, " must be a number"));
  const double d = v->get<double>();
  if (!std::isfinite(d)) return Bad(name, absl::StrCat(name, " must be finite"));
  *out = static_cast<float>(d);
  return absl::OkStatus();
}

absl::Status GetInt(const json& body, const char* name, int64_t lo, int64_t hi, int64_t* out,
                    bool* present) {
  const json* v = Member(body, name);
  *present = v != nullptr;
  if (v == nullptr) return absl::OkStatus();
  if (!v->is_number_integer()) return Bad(name, absl::StrCat(name, " must be an integer"));
  const int64_t i =
      v->is_number_unsigned() && v->get<uint64_t>() > INT64_MAX ? INT64_MAX : v->get<int64_t>();
  if (i < lo || i > hi) {
    return Bad(name, absl::StrCat(name, " must be in [", lo, ", ", hi, "], got ", i));
  }
  *out = i;
  return absl::OkStatus();
}

absl::Status GetBool(const json& body, const char* name, bool* out) {
  const json* v = Member(body, name);
  if (v == nullptr) return absl::OkStatus();
  if (!v->is_boolean()) return Bad(name, absl::StrCat(name, " must be a boolean"));
  *out = v->get<bool>();
  return absl::OkStatus();
}

// Parameters this server does not implement: refused (naming them) rather than ignored
// when they would change the output.
absl::Status CheckUnsupported(const json& body) {
  for (const char* name : {"tools", "tool_choice", "functions", "function_call", "suffix",
                           "logit_bias", "prediction", "audio", "modalities"}) {
    const json* v = Member(body, name);
    if (v != nullptr && !(v->is_object() && v->empty()) && !(v->is_array() && v->empty())) {
      return Bad(name, absl::StrCat(name, " is not supported by this server"));
    }
  }
  bool echo = false;
  SP_RETURN_IF_ERROR(GetBool(body, "echo", &echo));
  if (echo) return Bad("echo", "echo is not supported by this server");
  int64_t best_of = 1;
  bool present;
  SP_RETURN_IF_ERROR(GetInt(body, "best_of", 1, 1, &best_of, &present));
  if (const json* rf = Member(body, "response_format");
      rf != nullptr && !(rf->is_object() && rf->value("type", "text") == "text")) {
    return Bad("response_format", "only response_format {\"type\": \"text\"} is supported");
  }
  if (const json* user = Member(body, "user"); user != nullptr && !user->is_string()) {
    return Bad("user", "user must be a string");
  }
  return absl::OkStatus();
}

template <typename Req>
absl::Status FillStop(const json& body, Req* req) {
  const json* stop = Member(body, "stop");
  if (stop == nullptr) return absl::OkStatus();
  if (stop->is_string()) {
    req->add_stop(stop->get<std::string>());
    return absl::OkStatus();
  }
  if (!stop->is_array()) return Bad("stop", "stop must be a string or an array of strings");
  for (const json& s : *stop) {
    if (!s.is_string()) return Bad("stop", "stop must be a string or an array of strings");
    req->add_stop(s.get<std::string>());
  }
  return absl::OkStatus();
}

absl::Status FillSampling(const json& body, v1::SamplingParams* sp) {
  bool present = false;
  int64_t i = 0;
  for (const char* name : {"max_tokens", "max_completion_tokens"}) {  // the latter wins
    SP_RETURN_IF_ERROR(GetInt(body, name, 1, INT32_MAX, &i, &present));
    if (present) sp->set_max_new_tokens(static_cast<uint32_t>(i));
  }
  float f = 0;
  SP_RETURN_IF_ERROR(GetNumber(body, "temperature", &f, &present));
  if (present) sp->set_temperature(f);
  SP_RETURN_IF_ERROR(GetNumber(body, "top_p", &f, &present));
  if (present) sp->set_top_p(f);
  SP_RETURN_IF_ERROR(GetNumber(body, "min_p", &f, &present));
  if (present) sp->set_min_p(f);
  SP_RETURN_IF_ERROR(GetNumber(body, "repetition_penalty", &f, &present));
  if (present) sp->set_repetition_penalty(f);
  SP_RETURN_IF_ERROR(GetNumber(body, "presence_penalty", &f, &present));
  if (present) sp->set_presence_penalty(f);
  SP_RETURN_IF_ERROR(GetNumber(body, "frequency_penalty", &f, &present));
  if (present) sp->set_frequency_penalty(f);
  // -1 is vLLM's "off", as 0 is ours.
  SP_RETURN_IF_ERROR(GetInt(body, "top_k", -1, INT32_MAX, &i, &present));
  if (present && i > 0) sp->set_top_k(static_cast<uint32_t>(i));
  SP_RETURN_IF_ERROR(GetInt(body, "seed", INT64_MIN, INT64_MAX, &i, &present));
  if (present) sp->set_seed(static_cast<uint64_t>(i));
  return absl::OkStatus();
}

// An extension object given as the proto message's JSON form (the same fields as over
// gRPC: `rag` = RagOptions, `lazy` = LazyOptions).
absl::Status ParseProtoMember(const json& body, const char* name, google::protobuf::Message* out) {
  const json* m = Member(body, name);
  if (m == nullptr) return absl::OkStatus();
  if (!m->is_object()) return Bad(name, absl::StrCat(name, " must be an object"));
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = false;
  const auto st = google::protobuf::util::JsonStringToMessage(m->dump(), out, options);
  if (st.ok()) return absl::OkStatus();
  // Protobuf's message quotes what it could not read (a value, an unknown key): caller text,
  // which an error body must not echo. The message is rebuilt from the descriptor's names.
  const std::string pb = st.message().as_string();
  const google::protobuf::Descriptor* d = out->GetDescriptor();
  if (absl::StrContains(pb, "Cannot find field")) {
    std::string known;
    for (int i = 0; i < d->field_count(); ++i)
      absl::StrAppend(&known, i == 0 ? "" : ", ", d->field(i)->name());
    return Bad(name, absl::StrCat(name, " has an unknown field (known: ", known, ")"));
  }
  for (int i = 0; i < d->field_count(); ++i) {
    const google::protobuf::FieldDescriptor* f = d->field(i);
    if (absl::StrContains(pb, absl::StrCat("(", f->json_name(), ")")) ||
        absl::StrContains(pb, absl::StrCat("(", f->name(), ")"))) {
      return Bad(name, absl::StrCat(name, ".", f->name(),
                                    " has a value of the wrong type or out of range"));
    }
  }
  return Bad(name, absl::StrCat(name, " is not a valid ", d->name(), " object"));
}

// The fields GenerateRequest and GenerateRagRequest share.
template <typename Req>
absl::Status FillCommon(const json& body, Req* req) {
  SP_RETURN_IF_ERROR(FillSampling(body, req->mutable_sampling()));
  SP_RETURN_IF_ERROR(FillStop(body, req));
  bool b = false;
  if (Member(body, "ignore_eos") != nullptr) {
    SP_RETURN_IF_ERROR(GetBool(body, "ignore_eos", &b));
    req->set_ignore_eos(b);
  }
  if (Member(body, "skip_special_tokens") != nullptr) {
    SP_RETURN_IF_ERROR(GetBool(body, "skip_special_tokens", &b));
    req->set_skip_special_tokens(b);
  }
  int64_t priority = 0;
  bool present = false;
  SP_RETURN_IF_ERROR(GetInt(body, "priority", -100, 100, &priority, &present));
  if (present) req->set_priority(static_cast<int32_t>(priority));
  if (Member(body, "lazy") == nullptr) return absl::OkStatus();  // unset: the server default
  return ParseProtoMember(body, "lazy", req->mutable_lazy());
}

absl::Status ParseStreamOptions(const json& body, CallPlan* plan) {
  SP_RETURN_IF_ERROR(GetBool(body, "stream", &plan->stream));
  const json* so = Member(body, "stream_options");
  if (so == nullptr) return absl::OkStatus();
  if (!plan->stream) return Bad("stream_options", "stream_options needs stream = true");
  if (!so->is_object()) return Bad("stream_options", "stream_options must be an object");
  if (const json* u = Member(*so, "include_usage"); u != nullptr) {
    if (!u->is_boolean())
      return Bad("stream_options", "stream_options.include_usage must be a boolean");
    plan->include_usage = u->get<bool>();
  }
  return absl::OkStatus();
}

// Completions: `logprobs` is the number of alternatives (0: the chosen token only).
// Chat: `logprobs` a boolean, `top_logprobs` the number of alternatives.
absl::Status ParseLogprobs(const json& body, const Limits& limits, CallPlan* plan) {
  int64_t top = 0;
  bool present = false;
  if (plan->endpoint == Endpoint::kCompletions) {
    SP_RETURN_IF_ERROR(GetInt(body, "logprobs", 0, limits.max_top_logprobs, &top, &present));
    plan->logprobs = present;
  } else {
    SP_RETURN_IF_ERROR(GetBool(body, "logprobs", &plan->logprobs));
    SP_RETURN_IF_ERROR(GetInt(body, "top_logprobs", 0, limits.max_top_logprobs, &top, &present));
    if (present && top > 0 && !plan->logprobs) {
      return Bad("top_logprobs", "top_logprobs needs logprobs = true");
    }
  }
  plan->top_logprobs = static_cast<int32_t>(top);
  return absl::OkStatus();
}

// One completions prompt: a string or a list of token ids.
absl::Status AddPrompt(const json& p, CallPlan* plan) {
  v1::GenerateRequest req;
  if (p.is_string()) {
    req.set_text(p.get<std::string>());
  } else if (p.is_array() && !p.empty() && p[0].is_number()) {
    auto* ids = req.mutable_token_ids();
    for (const json& id : p) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > UINT32_MAX) {
        return Bad("prompt", "prompt token ids must be non-negative integers");
      }
      ids->add_ids(static_cast<uint32_t>(id.get<int64_t>()));
    }
  } else {
    return Bad("prompt",
               "prompt must be a string, an array of strings, an array of token ids, or an "
               "array of arrays of token ids");
  }
  plan->prompts.push_back(std::move(req));
  return absl::OkStatus();
}

absl::Status ParsePrompts(const json& body, CallPlan* plan) {
  const json* p = Member(body, "prompt");
  if (p == nullptr) return Bad("prompt", "prompt is required");
  if (p->is_array() && !p->empty() && (p->at(0).is_string() || p->at(0).is_array())) {
    if (static_cast<int64_t>(p->size()) > kMaxChoices) {
      return Bad("prompt",
                 absl::StrCat("prompt has ", p->size(), " prompts; at most ", kMaxChoices));
    }
    for (const json& one : *p) SP_RETURN_IF_ERROR(AddPrompt(one, plan));
    return absl::OkStatus();
  }
  if (p->is_array() && p->empty()) return Bad("prompt", "prompt is empty");
  return AddPrompt(*p, plan);
}

absl::Status ParseRagOptions(const json& body, v1::GenerateRagRequest* req) {
  if (Member(body, "rag") == nullptr) return absl::OkStatus();
  return ParseProtoMember(body, "rag", req->mutable_rag());
}

absl::Status ParseDocuments(const json& docs, v1::GenerateRagRequest* req) {
  if (!docs.is_array() || docs.empty()) {
    return Bad("documents", "documents must be a non-empty array of {id, text}");
  }
  for (size_t i = 0; i < docs.size(); ++i) {
    const json& d = docs[i];
    const std::string field = absl::StrCat("documents[", i, "]");
    if (!d.is_object() || !d.contains("text") || !d["text"].is_string()) {
      return Bad("documents", field + ".text must be a string");
    }
    v1::RagDocument* out = req->add_documents();
    out->set_text(d["text"].get<std::string>());
    if (const json* id = Member(d, "id"); id != nullptr) {
      if (!id->is_string()) return Bad("documents", field + ".id must be a string");
      out->set_id(id->get<std::string>());
    }
  }
  return absl::OkStatus();
}

absl::Status ParseChat(const json& body, const ParseContext& ctx, CallPlan* plan) {
  const json* m = Member(body, "messages");
  if (m == nullptr) return Bad("messages", "messages is required");
  absl::StatusOr<json> messages = NormalizeMessages(*m);
  if (!messages.ok()) return Bad("messages", std::string(messages.status().message()));
  if (!ctx.chat->available()) return Bad("messages", ctx.chat->unavailable_reason());
  const json* docs = Member(body, "documents");
  if (docs == nullptr) {
    if (Member(body, "rag") != nullptr) return Bad("rag", "rag needs documents");
    absl::StatusOr<std::string> text = ctx.chat->Render(*messages);
    if (!text.ok()) return Bad("messages", std::string(text.status().message()));
    v1::GenerateRequest req;
    req.set_text(*std::move(text));
    req.set_add_special_tokens(false);  // the template wrote BOS (if the model has one)
    SP_RETURN_IF_ERROR(FillCommon(body, &req));
    plan->prompts.push_back(std::move(req));
    return absl::OkStatus();
  }
  plan->rag = true;
  v1::GenerateRagRequest& req = plan->rag_request;
  SP_RETURN_IF_ERROR(ParseDocuments(*docs, &req));
  SP_RETURN_IF_ERROR(ParseRagOptions(body, &req));
  absl::StatusOr<ChatRagParts> parts = ctx.chat->RenderForRag(*messages);
  if (!parts.ok()) return Bad("messages", std::string(parts.status().message()));
  req.set_preamble(std::move(parts->preamble));
  req.set_query(std::move(parts->query));
  req.set_postamble(std::move(parts->postamble));
  return FillCommon(body, &req);
}

}  // namespace

absl::Status Bad(const std::string& param, const std::string& message) {
  absl::Status st = absl::InvalidArgumentError(message);
  st.SetPayload(kParamPayload, absl::Cord(param));
  return st;
}

std::string ParamOf(const absl::Status& status) {
  if (auto p = status.GetPayload(kParamPayload)) return std::string(*p);
  if (status.code() != absl::StatusCode::kInvalidArgument) return "";
  const absl::string_view m = status.message();
  // Messages of the gRPC-side checks (server/convert.cc, request_bounds.cc).
  static const std::pair<const char*, const char*> kPrefixes[] = {
      {"sampling.max_new_tokens", "max_tokens"},
      {"sampling.", ""},
      {"stop", "stop"},
      {"text", "prompt"},
      {"token_ids", "prompt"},
      {"prompt", "prompt"},
      {"top_logprobs", "top_logprobs"},
      {"priority", "priority"},
      {"documents", "documents"},
      {"preamble", "messages"},
      {"query", "messages"},
      {"postamble", "messages"},
      {"rag", "rag"},
      {"lazy", "lazy"},
      {"request", ""}};
  for (const auto& [prefix, param] : kPrefixes) {
    if (!absl::StartsWith(m, prefix)) continue;
    if (*param != '\0') return param;
    const absl::string_view rest = m.substr(std::string_view(prefix).size());
    return std::string(rest.substr(0, rest.find_first_of(" [.")));
  }
  return "";
}

ApiError MakeApiError(int http_status, const std::string& message, const std::string& type,
                      const std::string& param, const std::string& code) {
  ApiError e;
  e.http_status = http_status;
  e.body = {{"error",
             {{"message", message},
              {"type", type},
              {"param", param.empty() ? json() : json(param)},
              {"code", code.empty() ? json() : json(code)}}}};
  return e;
}

ApiError ToApiError(const absl::Status& status, Endpoint endpoint) {
  // gRPC-side messages name proto fields: say the OpenAI names instead.
  std::string message = absl::StrReplaceAll(
      status.message(), {{"sampling.max_new_tokens", "max_tokens"}, {"sampling.", ""}});
  if (absl::StartsWith(message, "text ") && endpoint == Endpoint::kChat) {
    message = "messages (rendered)" + message.substr(4);
  }
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kFailedPrecondition:
      return MakeApiError(400, message, "invalid_request_error", ParamOf(status), "");
    case absl::StatusCode::kUnauthenticated:
      return MakeApiError(401, message, "authentication_error", "", "invalid_api_key");
    case absl::StatusCode::kPermissionDenied:
      return MakeApiError(403, message, "permission_error", "", "");
    case absl::StatusCode::kNotFound:
      return MakeApiError(404, message, "invalid_request_error", "model", "model_not_found");
    case absl::StatusCode::kResourceExhausted:
      return MakeApiError(429, message, "rate_limit_error", "", "rate_limit_exceeded");
    case absl::StatusCode::kUnavailable:
      return MakeApiError(503, message, "server_error", "", "unavailable");
    case absl::StatusCode::kDeadlineExceeded:
      return MakeApiError(504, message, "server_error", "", "timeout");
    case absl::StatusCode::kCancelled:
      return MakeApiError(499, message, "server_error", "", "cancelled");
    case absl::StatusCode::kUnimplemented:
      return MakeApiError(501, message, "server_error", "", "unimplemented");
    default:
      return MakeApiError(500, message, "server_error", "", "");
  }
}

absl::StatusOr<CallPlan> ParseCall(const json& body, Endpoint endpoint, const ParseContext& ctx) {
  if (!body.is_object()) return Bad("", "the request body must be a JSON object");
  const json* model = Member(body, "model");
  if (model == nullptr) return Bad("model", "model is required");
  if (!model->is_string()) return Bad("model", "model must be a string");
  CallPlan plan;
  if (model->get<std::string>() != ctx.model_name) {
    if (!ctx.is_adapter || !ctx.is_adapter(model->get<std::string>())) {
      return absl::NotFoundError(absl::StrCat("The model does not exist; this server serves '",
                                              ctx.model_name,
                                              "' and its adapters (GET /v1/models)"));
    }
    plan.adapter = model->get<std::string>();  // a LoRA adapter of the base model
  }
  plan.endpoint = endpoint;
  SP_RETURN_IF_ERROR(CheckUnsupported(body));
  SP_RETURN_IF_ERROR(ParseStreamOptions(body, &plan));
  SP_RETURN_IF_ERROR(ParseLogprobs(body, *ctx.limits, &plan));
  int64_t n = 1;
  bool present = false;
  SP_RETURN_IF_ERROR(GetInt(body, "n", 1, kMaxChoices, &n, &present));
  plan.n = static_cast<int32_t>(n);
  if (endpoint == Endpoint::kCompletions) {
    if (Member(body, "documents") != nullptr) {
      return Bad("documents", "documents are accepted by /v1/chat/completions only");
    }
    SP_RETURN_IF_ERROR(ParsePrompts(body, &plan));
    for (v1::GenerateRequest& req : plan.prompts) SP_RETURN_IF_ERROR(FillCommon(body, &req));
  } else {
    SP_RETURN_IF_ERROR(ParseChat(body, ctx, &plan));
  }
  if (plan.num_choices() > kMaxChoices) {
    return Bad("n", absl::StrCat("prompts x n = ", plan.num_choices(), "; at most ", kMaxChoices));
  }
  if (!plan.adapter.empty()) plan.rag_request.set_adapter_id(plan.adapter);
  for (v1::GenerateRequest& req : plan.prompts) {
    if (!plan.adapter.empty()) req.set_adapter_id(plan.adapter);
    req.set_logprobs(plan.logprobs);
    req.set_top_logprobs(static_cast<uint32_t>(plan.top_logprobs));
  }
  return plan;
}

const char* FinishReasonString(engine::FinishReason reason) {
  switch (reason) {
    case engine::FinishReason::kLength:
      return "length";
    case engine::FinishReason::kStop:
    case engine::FinishReason::kEos:
      return "stop";
    case engine::FinishReason::kCancelled:
      return "cancelled";
    default:
      return nullptr;
  }
}

namespace {

json Reason(engine::FinishReason reason) {
  const char* r = FinishReasonString(reason);
  return r == nullptr ? json() : json(r);
}

// A token's text as it reads in the output: SentencePiece pieces with their leading
// space ("\u2581" as " "; decoding a lone piece would drop it), byte-level and byte
// fallback tokens decoded.
std::string TokenText(const engine::Tokenizer& tokenizer, int32_t id) {
  const std::string piece = tokenizer.IdToToken(id);
  const bool byte_fallback = piece.size() == 6 && absl::StartsWith(piece, "<0x");
  if (tokenizer.kind() == "sentencepiece-bpe" && !byte_fallback && !tokenizer.IsSpecial(id)) {
    return absl::StrReplaceAll(piece, {{"\xE2\x96\x81", " "}});
  }
  const int32_t ids[] = {id};
  return tokenizer.Decode(ids, /*skip_special_tokens=*/false);
}

json Bytes(const std::string& s) {
  json out = json::array();
  for (unsigned char c : s) out.push_back(static_cast<int>(c));
  return out;
}

json ChatTokenJson(const engine::Tokenizer& tokenizer, const engine::TokenLogprob& lp) {
  const std::string text = TokenText(tokenizer, lp.token_id);
  return {{"token", text}, {"logprob", lp.logprob}, {"bytes", Bytes(text)}};
}

}  // namespace

json LogprobsJson(const ResponseMeta& meta, const std::vector<engine::TokenLogprobs>& lps,
                  int64_t* text_offset) {
  const engine::Tokenizer& tok = *meta.tokenizer;
  if (meta.endpoint == Endpoint::kChat) {
    json content = json::array();
    for (const engine::TokenLogprobs& lp : lps) {
      json entry = ChatTokenJson(tok, lp.chosen);
      json top = json::array();
      for (const engine::TokenLogprob& t : lp.top) top.push_back(ChatTokenJson(tok, t));
      entry["top_logprobs"] = std::move(top);
      content.push_back(std::move(entry));
    }
    return {{"content", std::move(content)}};
  }
  json tokens = json::array(), token_logprobs = json::array(), top = json::array(),
       offsets = json::array();
  for (const engine::TokenLogprobs& lp : lps) {
    const std::string text = TokenText(tok, lp.chosen.token_id);
    tokens.push_back(text);
    token_logprobs.push_back(lp.chosen.logprob);
    json alternatives = json::object();
    for (const engine::TokenLogprob& t : lp.top) {
      alternatives[TokenText(tok, t.token_id)] = t.logprob;
    }
    top.push_back(std::move(alternatives));
    offsets.push_back(*text_offset);
    *text_offset += static_cast<int64_t>(text.size());
  }
  return {{"tokens", std::move(tokens)},
          {"token_logprobs", std::move(token_logprobs)},
          {"top_logprobs", std::move(top)},
          {"text_offset", std::move(offsets)}};
}

json UsageJson(int64_t prompt_tokens, int64_t completion_tokens, int64_t cached_tokens) {
  return {{"prompt_tokens", prompt_tokens},
          {"completion_tokens", completion_tokens},
          {"total_tokens", prompt_tokens + completion_tokens},
          {"prompt_tokens_details", {{"cached_tokens", cached_tokens}}}};
}

namespace {

// usage.lazy (an extension): per prompt where LazyLLM ran or was skipped, gRPC's
// LazyUsage in its JSON form plus `prompt_index`.
json LazyUsageJson(const std::vector<ChoiceOutput>& choices, int n) {
  json out = json::array();
  for (size_t i = 0; i < choices.size(); i += n) {
    v1::Usage u;
    LazyUsageToProto(choices[i].usage, &u);
    if (!u.has_lazy()) continue;
    google::protobuf::util::JsonPrintOptions options;
    options.preserve_proto_field_names = true;
    std::string text;
    if (!google::protobuf::util::MessageToJsonString(u.lazy(), &text, options).ok()) continue;
    json z = json::parse(text, nullptr, false);
    z["prompt_index"] = i / n;
    out.push_back(std::move(z));
  }
  return out;
}

// Choice i answers prompt i / n: its prompt tokens are counted once per prompt.
json TotalUsage(const std::vector<ChoiceOutput>& choices, int n) {
  int64_t prompt = 0, completion = 0, cached = 0;
  for (size_t i = 0; i < choices.size(); ++i) {
    completion += choices[i].usage.generated_tokens;
    if (i % n == 0) {
      prompt += choices[i].usage.prompt_tokens;
      cached += choices[i].usage.cached_prompt_tokens;
    }
  }
  json usage = UsageJson(prompt, completion, cached);
  if (json lazy = LazyUsageJson(choices, n); !lazy.empty()) usage["lazy"] = std::move(lazy);
  return usage;
}

json Envelope(const ResponseMeta& meta, bool chunk) {
  const bool chat = meta.endpoint == Endpoint::kChat;
  return {
      {"id", meta.id},
      {"object", chat ? (chunk ? "chat.completion.chunk" : "chat.completion") : "text_completion"},
      {"created", meta.created},
      {"model", meta.model}};
}

}  // namespace

json FullResponse(const ResponseMeta& meta, const std::vector<ChoiceOutput>& choices, int n) {
  json out = Envelope(meta, false);
  json list = json::array();
  for (size_t i = 0; i < choices.size(); ++i) {
    const ChoiceOutput& c = choices[i];
    json choice = {{"index", i}, {"finish_reason", Reason(c.finish_reason)}};
    int64_t offset = 0;
    choice["logprobs"] = meta.logprobs ? LogprobsJson(meta, c.logprobs, &offset) : json();
    if (meta.endpoint == Endpoint::kChat) {
      choice["message"] = {{"role", "assistant"}, {"content", c.text}};
    } else {
      choice["text"] = c.text;
    }
    list.push_back(std::move(choice));
  }
  out["choices"] = std::move(list);
  out["usage"] = TotalUsage(choices, n);
  return out;
}

json StreamChunk(const ResponseMeta& meta, int index, const std::string& text,
                 const std::vector<engine::TokenLogprobs>& lps, int64_t* text_offset,
                 engine::FinishReason finish, bool first) {
  json out = Envelope(meta, true);
  json choice = {{"index", index}, {"finish_reason", Reason(finish)}};
  choice["logprobs"] =
      meta.logprobs && !lps.empty() ? LogprobsJson(meta, lps, text_offset) : json();
  if (meta.endpoint == Endpoint::kChat) {
    json delta = json::object();
    if (first) delta["role"] = "assistant";
    if (!text.empty() || first) delta["content"] = text;
    choice["delta"] = std::move(delta);
  } else {
    choice["text"] = text;
  }
  out["choices"] = json::array({std::move(choice)});
  return out;
}

json UsageChunk(const ResponseMeta& meta, const std::vector<ChoiceOutput>& choices, int n) {
  json out = Envelope(meta, true);
  out["choices"] = json::array();
  out["usage"] = TotalUsage(choices, n);
  return out;
}

json RagJson(const engine::rag::Result& result, const std::vector<std::string>& ids,
             const engine::rag::Spec& spec) {
  v1::RagReport report;
  ToProto(result, ids, spec, &report);
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  std::string text;
  if (!google::protobuf::util::MessageToJsonString(report, &text, options).ok()) return json();
  return json::parse(text, nullptr, false);
}

}  // namespace superpose::server::openai
