#include "server/convert.h"

#include <cmath>
#include <random>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "engine/model/tokenizer_unicode.h"
#include "engine/rag/validate.h"
#include "engine/runtime/adapters.h"
#include "engine/util/status.h"
#include "server/lazy_options.h"

namespace superpose::server {
namespace {

absl::Status Invalid(const std::string& msg) { return absl::InvalidArgumentError(msg); }

template <typename Req>
absl::Status FillCommon(const Req& req, int32_t prompt_len, const Limits& limits,
                        engine::Request* out);

}  // namespace

absl::Status ValidateUtf8(const std::string& text, const std::string& field) {
  if (!engine::tok::IsValidUtf8(text)) return Invalid(absl::StrCat(field, " is not valid UTF-8"));
  return absl::OkStatus();
}

absl::Status ValidateTokenIds(const google::protobuf::RepeatedField<uint32_t>& ids,
                              int32_t vocab_size, const char* field) {
  for (int i = 0; i < ids.size(); ++i) {
    if (ids[i] >= static_cast<uint32_t>(vocab_size)) {
      return Invalid(absl::StrCat(field, "[", i, "] = ", ids[i],
                                  " is not a token id (vocabulary size ", vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<engine::Request> ToEngineRequest(const v1::GenerateRequest& req,
                                                const engine::Tokenizer& tokenizer,
                                                const Limits& limits) {
  engine::Request out;
  // Prompt.
  const bool add_special = !req.has_add_special_tokens() || req.add_special_tokens();
  switch (req.prompt_case()) {
    case v1::GenerateRequest::kText:
      SP_RETURN_IF_ERROR(ValidateUtf8(req.text(), "text"));
      out.prompt_ids = tokenizer.Encode(req.text(), add_special);
      if (out.prompt_ids.empty()) return Invalid("text encodes to no tokens");
      break;
    case v1::GenerateRequest::kTokenIds:
      if (req.token_ids().ids().empty()) return Invalid("token_ids.ids is empty");
      SP_RETURN_IF_ERROR(
          ValidateTokenIds(req.token_ids().ids(), limits.vocab_size, "token_ids.ids"));
      out.prompt_ids.assign(req.token_ids().ids().begin(), req.token_ids().ids().end());
      break;
    default:
      return Invalid("prompt: one of text or token_ids is required");
  }
  const int32_t prompt_len = static_cast<int32_t>(out.prompt_ids.size());
  if (prompt_len >= limits.context_length) {
    return Invalid(absl::StrCat("prompt has ", prompt_len, " tokens; the context window is ",
                                limits.context_length, " (at least one token must fit after it)"));
  }
  SP_RETURN_IF_ERROR(FillCommon(req, prompt_len, limits, &out));
  out.logprobs = req.logprobs();
  if (req.top_logprobs() > static_cast<uint32_t>(limits.max_top_logprobs)) {
    return Invalid(absl::StrCat("top_logprobs must be in [0, ", limits.max_top_logprobs, "], got ",
                                req.top_logprobs()));
  }
  if (req.top_logprobs() > 0 && !req.logprobs()) {
    return Invalid("top_logprobs needs logprobs = true");
  }
  out.top_logprobs = static_cast<int32_t>(req.top_logprobs());
  out.lazy = LazyFromProto(req);  // checked by the engine against the model
  return out;
}

namespace {

// Sampling, stopping and bookkeeping fields, shared by Generate and GenerateRag.
// `prompt_len`: the position the output starts at.
template <typename Req>
absl::Status FillCommon(const Req& req, int32_t prompt_len, const Limits& limits,
                        engine::Request* out_ptr) {
  engine::Request& out = *out_ptr;
  // Sampling.
  const v1::SamplingParams& sp = req.sampling();
  engine::SamplingOptions& s = out.sampling;
  // 0 means the server default, like an absent field (the proto's comment).
  if (sp.max_new_tokens() != 0) {
    if (sp.max_new_tokens() > static_cast<uint32_t>(limits.context_length - prompt_len)) {
      return Invalid(absl::StrCat(
          "sampling.max_new_tokens = ", sp.max_new_tokens(), " does not fit the context window: ",
          prompt_len, " prompt tokens + max_new_tokens must be <= ", limits.context_length));
    }
    s.max_new_tokens = static_cast<int32_t>(sp.max_new_tokens());
  } else {
    s.max_new_tokens = std::min(limits.default_max_new_tokens, limits.context_length - prompt_len);
  }
  if (sp.has_temperature()) {
    if (!std::isfinite(sp.temperature()) || sp.temperature() < 0.0f) {
      return Invalid(
          absl::StrCat("sampling.temperature must be finite and >= 0, got ", sp.temperature()));
    }
    s.temperature = sp.temperature();
  }
  s.top_k = static_cast<int32_t>(std::min<uint32_t>(sp.top_k(), 1u << 30));
  if (sp.has_top_p()) {
    if (!(sp.top_p() > 0.0f && sp.top_p() <= 1.0f)) {
      return Invalid(absl::StrCat("sampling.top_p must be in (0, 1], got ", sp.top_p()));
    }
    s.top_p = sp.top_p();
  }
  if (!(sp.min_p() >= 0.0f && sp.min_p() <= 1.0f)) {
    return Invalid(absl::StrCat("sampling.min_p must be in [0, 1], got ", sp.min_p()));
  }
  s.min_p = sp.min_p();
  if (sp.has_repetition_penalty()) {
    if (!(std::isfinite(sp.repetition_penalty()) && sp.repetition_penalty() > 0.0f)) {
      return Invalid(
          absl::StrCat("sampling.repetition_penalty must be > 0, got ", sp.repetition_penalty()));
    }
    s.repetition_penalty = sp.repetition_penalty();
  }
  if (!(sp.presence_penalty() >= -2.0f && sp.presence_penalty() <= 2.0f)) {
    return Invalid(
        absl::StrCat("sampling.presence_penalty must be in [-2, 2], got ", sp.presence_penalty()));
  }
  if (!(sp.frequency_penalty() >= -2.0f && sp.frequency_penalty() <= 2.0f)) {
    return Invalid(absl::StrCat("sampling.frequency_penalty must be in [-2, 2], got ",
                                sp.frequency_penalty()));
  }
  s.presence_penalty = sp.presence_penalty();
  s.frequency_penalty = sp.frequency_penalty();
  if (sp.has_seed()) {
    s.seed = sp.seed();
  } else {
    std::random_device rd;
    s.seed = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  }

  // Stopping.
  if (req.stop_size() > limits.max_stop_strings) {
    return Invalid(
        absl::StrCat("stop has ", req.stop_size(), " strings; at most ", limits.max_stop_strings));
  }
  for (int i = 0; i < req.stop_size(); ++i) {
    const std::string field = absl::StrCat("stop[", i, "]");
    if (req.stop(i).empty()) return Invalid(field + " is empty");
    if (static_cast<int32_t>(req.stop(i).size()) > limits.max_stop_string_bytes) {
      return Invalid(
          absl::StrCat(field, " is longer than ", limits.max_stop_string_bytes, " bytes"));
    }
    SP_RETURN_IF_ERROR(ValidateUtf8(req.stop(i), field));
    out.stop.push_back(req.stop(i));
  }
  SP_RETURN_IF_ERROR(ValidateTokenIds(req.stop_token_ids(), limits.vocab_size, "stop_token_ids"));
  out.stop_token_ids.assign(req.stop_token_ids().begin(), req.stop_token_ids().end());
  out.ignore_eos = req.ignore_eos();
  out.skip_special_tokens = !req.has_skip_special_tokens() || req.skip_special_tokens();
  SP_RETURN_IF_ERROR(engine::ValidateRequestId(req.request_id()));
  out.request_id = req.request_id();
  if (req.priority() < -100 || req.priority() > 100) {
    return Invalid(absl::StrCat("priority must be in [-100, 100], got ", req.priority()));
  }
  out.priority = req.priority();
  if (!req.adapter_id().empty()) {
    SP_RETURN_IF_ERROR(engine::ValidateAdapterName(req.adapter_id(), "adapter_id"));
  }
  out.adapter_id = req.adapter_id();  // resolved (and pinned) by Engine::Submit
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<engine::Request> ToEngineRagRequest(const v1::GenerateRagRequest& req,
                                                   const engine::Tokenizer& tokenizer,
                                                   const Limits& limits) {
  engine::rag::Limits rag_limits;
  rag_limits.context_length = limits.context_length;
  rag_limits.max_documents = limits.max_rag_documents;
  rag_limits.document_suffix = ".text";
  auto spec = std::make_shared<engine::rag::Spec>();
  SP_RETURN_IF_ERROR(ValidateUtf8(req.preamble(), "preamble"));
  SP_RETURN_IF_ERROR(ValidateUtf8(req.query(), "query"));
  SP_RETURN_IF_ERROR(ValidateUtf8(req.postamble(), "postamble"));
  // Before any tokenizing: the count alone.
  SP_RETURN_IF_ERROR(engine::rag::CheckDocumentCount(req.documents_size(), rag_limits));
  spec->preamble = tokenizer.Encode(req.preamble(), true);
  spec->query = tokenizer.Encode(req.query(), false);
  spec->postamble = tokenizer.Encode(req.postamble(), false);
  for (int i = 0; i < req.documents_size(); ++i) {
    const v1::RagDocument& d = req.documents(i);
    const std::string field = absl::StrCat("documents[", i, "].text");
    SP_RETURN_IF_ERROR(ValidateUtf8(d.text(), field));
    SP_RETURN_IF_ERROR(ValidateUtf8(d.id(), absl::StrCat("documents[", i, "].id")));
    if (d.id().size() > 256) return Invalid(absl::StrCat("documents[", i, "].id is too long"));
    if (d.text().empty()) return Invalid(field + " is empty");
    std::string text = d.text();
    if (text.back() != '\n') text.push_back('\n');
    spec->documents.push_back(tokenizer.Encode(text, false));
  }
  // Options: the proto's enums here, every other rule in engine::rag::Validate.
  const v1::RagOptions& o = req.rag();
  engine::rag::Options& opt = spec->options;
  switch (o.mode()) {
    case v1::RAG_MODE_UNSPECIFIED:
    case v1::RAG_MODE_SUPERPOSITION:
      opt.mode = engine::rag::Mode::kSuperposition;
      break;
    case v1::RAG_MODE_NAIVE:
      opt.mode = engine::rag::Mode::kNaive;
      break;
    default:
      return Invalid(absl::StrCat("rag.mode: unknown value ", o.mode()));
  }
  switch (o.positions()) {
    case v1::RAG_POSITIONS_UNSPECIFIED:
    case v1::RAG_POSITIONS_EQUILIBRIUM:
      opt.positions = engine::rag::PositionMode::kEquilibrium;
      break;
    case v1::RAG_POSITIONS_LEFT_ALIGNED:
      opt.positions = engine::rag::PositionMode::kLeftAligned;
      break;
    default:
      return Invalid(absl::StrCat("rag.positions: unknown value ", o.positions()));
  }
  opt.top_k = o.has_top_k() ? static_cast<int32_t>(std::min<uint32_t>(o.top_k(), 1u << 30)) : 1;
  if (o.has_doc_weight()) opt.doc_weight = o.doc_weight();
  opt.path_cache = !o.has_path_cache() || o.path_cache();
  if (o.has_canonical_span()) opt.canonical_span = o.canonical_span();
  absl::StatusOr<engine::rag::Checked> checked = engine::rag::Validate(*spec, rag_limits);
  if (!checked.ok()) return checked.status();
  engine::Request out;
  SP_RETURN_IF_ERROR(FillCommon(req, static_cast<int32_t>(checked->answer_start), limits, &out));
  out.lazy = LazyFromProto(req);  // checked by the engine (naive mode only)
  out.rag = std::move(spec);
  return out;
}

void ToProto(const engine::rag::Result& r, const std::vector<std::string>& ids,
             const engine::rag::Spec& spec, v1::RagReport* out) {
  out->set_mode(r.mode == engine::rag::Mode::kNaive ? v1::RAG_MODE_NAIVE
                                                    : v1::RAG_MODE_SUPERPOSITION);
  for (size_t i = 0; i < r.docs.size(); ++i) {
    const engine::rag::DocResult& d = r.docs[i];
    v1::RagDocumentReport* o = out->add_documents();
    o->set_index(static_cast<uint32_t>(i));
    if (i < ids.size() && !ids[i].empty()) o->set_id(ids[i]);
    if (r.mode == engine::rag::Mode::kSuperposition) {
      o->set_score(d.score);
      o->set_query_logprob(d.query_ll);
      o->set_document_logprob(d.doc_ll);
    }
    o->set_kept(d.kept);
    o->set_cached(d.cached);
    if (i < spec.documents.size()) o->set_tokens(static_cast<uint32_t>(spec.documents[i].size()));
  }
  out->set_computed_tokens(r.computed_tokens);
  out->set_path_cache_tokens(r.path_cache_tokens);
  out->set_prefix_cache_tokens(r.prefix_cache_tokens);
  out->set_pruned_tokens(r.pruned_tokens);
  out->set_flops(r.flops.total);
  out->set_critical_path_flops(r.flops.critical_path);
  out->set_naive_flops(r.naive_flops.total);
  if (r.mode == engine::rag::Mode::kSuperposition) out->set_span(r.span);
}

v1::FinishReason ToProto(engine::FinishReason reason) {
  switch (reason) {
    case engine::FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    case engine::FinishReason::kStop:
      return v1::FINISH_REASON_STOP;
    case engine::FinishReason::kEos:
      return v1::FINISH_REASON_EOS;
    case engine::FinishReason::kCancelled:
      return v1::FINISH_REASON_CANCELLED;
    default:
      return v1::FINISH_REASON_UNSPECIFIED;
  }
}

void ToProto(const engine::Usage& u, v1::Usage* out) {
  out->set_prompt_tokens(u.prompt_tokens);
  out->set_generated_tokens(u.generated_tokens);
  out->set_cached_prompt_tokens(u.cached_prompt_tokens);
  out->set_queue_time_ms(u.queue_time_ms);
  out->set_time_to_first_token_ms(u.ttft_ms);
  out->set_total_time_ms(u.total_time_ms);
  LazyUsageToProto(u, out);
}

void ToProto(const engine::TokenLogprobs& lp, const engine::Tokenizer& tokenizer,
             v1::TokenLogprobs* out) {
  auto fill = [&](const engine::TokenLogprob& t, v1::TokenLogprob* o) {
    o->set_token_id(t.token_id);
    o->set_logprob(t.logprob);
    o->set_token(tokenizer.IdToToken(t.token_id));
  };
  fill(lp.chosen, out->mutable_chosen());
  for (const auto& t : lp.top) fill(t, out->add_top());
}

}  // namespace superpose::server
