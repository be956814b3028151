// libFuzzer target: request conversion and validation (server/convert.h) with the real
// stories260k tokenizer. Byte 0 picks the message (GenerateRequest, GenerateRagRequest,
// TokenizeRequest, DetokenizeRequest); the rest is parsed as that proto (wire format)
// and run through what the server does with it before the engine sees it (proto2: strings
// are not UTF-8-checked by the parser, so invalid UTF-8 reaches the validation).
// Invariants: an accepted request satisfies every documented limit (ids in the
// vocabulary, prompt + max_new_tokens within the context window, sampling values in
// range, stop strings counted and sized); a rejected one is INVALID_ARGUMENT and its
// message carries no user text (privacy: messages may carry numbers, never text).
// Kept thin on purpose: only the public conversion API, so API changes are small edits.
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>

#include "engine/model/tokenizer.h"
#include "engine/rag/validate.h"
#include "fuzz/fuzz_util.h"
#include "server/convert.h"

namespace superpose::fuzz {
namespace {

namespace v1 = superpose::v1;
using server::Limits;

std::unique_ptr<engine::Tokenizer> g_tokenizer;
Limits g_limits;

void CheckIdsInVocab(const std::vector<int32_t>& ids) {
  for (int32_t id : ids) FUZZ_CHECK(id >= 0 && id < g_limits.vocab_size);
}

// Messages are built from field names and numbers: printable ASCII. User text with any
// other byte must therefore never appear in one (a plain-ASCII text could coincide with
// a message's own words, so only the message's alphabet is checked for those).
void CheckNoText(const absl::Status& st, const std::string& text) {
  for (char c : text) {
    if (c < 0x20 || c > 0x7E) {
      FUZZ_CHECK(std::string(st.message()).find(text) == std::string::npos);
      return;
    }
  }
}

void CheckRejected(const absl::Status& st) {
  FUZZ_CHECK(st.code() == absl::StatusCode::kInvalidArgument);
  FUZZ_CHECK(!st.message().empty());
  for (char c : st.message()) FUZZ_CHECK(c >= 0x20 && c <= 0x7E);
}

template <typename Req>
void CheckCommon(const Req& req, const engine::Request& r, int64_t prompt_len) {
  const engine::SamplingOptions& s = r.sampling;
  FUZZ_CHECK(s.max_new_tokens >= 1 && prompt_len + s.max_new_tokens <= g_limits.context_length);
  FUZZ_CHECK(std::isfinite(s.temperature) && s.temperature >= 0);
  FUZZ_CHECK(s.top_k >= 0);
  FUZZ_CHECK(s.top_p > 0 && s.top_p <= 1);
  FUZZ_CHECK(s.min_p >= 0 && s.min_p <= 1);
  FUZZ_CHECK(std::isfinite(s.repetition_penalty) && s.repetition_penalty > 0);
  FUZZ_CHECK(s.presence_penalty >= -2 && s.presence_penalty <= 2);
  FUZZ_CHECK(s.frequency_penalty >= -2 && s.frequency_penalty <= 2);
  FUZZ_CHECK(static_cast<int>(r.stop.size()) == req.stop_size());
  FUZZ_CHECK(static_cast<int32_t>(r.stop.size()) <= g_limits.max_stop_strings);
  for (const std::string& stop : r.stop) {
    FUZZ_CHECK(!stop.empty() &&
               static_cast<int32_t>(stop.size()) <= g_limits.max_stop_string_bytes);
    FUZZ_CHECK(StrictUtf8(stop));
  }
  CheckIdsInVocab(r.stop_token_ids);
  FUZZ_CHECK(engine::ValidateRequestId(r.request_id).ok());
  FUZZ_CHECK(r.priority >= -100 && r.priority <= 100);
}

template <typename Req>
void CheckStopsNotLeaked(const Req& req, const absl::Status& st) {
  for (const std::string& stop : req.stop()) CheckNoText(st, stop);
}

void FuzzGenerate(const v1::GenerateRequest& req) {
  absl::StatusOr<engine::Request> r = server::ToEngineRequest(req, *g_tokenizer, g_limits);
  if (!r.ok()) {
    CheckRejected(r.status());
    CheckNoText(r.status(), req.text());
    CheckStopsNotLeaked(req, r.status());
    return;
  }
  FUZZ_CHECK(!r->prompt_ids.empty());
  CheckIdsInVocab(r->prompt_ids);
  FUZZ_CHECK(static_cast<int32_t>(r->prompt_ids.size()) < g_limits.context_length);
  if (req.has_text()) {
    FUZZ_CHECK(StrictUtf8(req.text()));
    const bool special = !req.has_add_special_tokens() || req.add_special_tokens();
    FUZZ_CHECK(r->prompt_ids == g_tokenizer->Encode(req.text(), special));
  }
  CheckCommon(req, *r, static_cast<int64_t>(r->prompt_ids.size()));
  FUZZ_CHECK(r->top_logprobs >= 0 && r->top_logprobs <= g_limits.max_top_logprobs);
  FUZZ_CHECK(r->top_logprobs == 0 || r->logprobs);
  FUZZ_CHECK(r->rag == nullptr);
}

void FuzzRag(const v1::GenerateRagRequest& req) {
  absl::StatusOr<engine::Request> r = server::ToEngineRagRequest(req, *g_tokenizer, g_limits);
  if (!r.ok()) {
    CheckRejected(r.status());
    for (const std::string* t : {&req.preamble(), &req.query(), &req.postamble()}) {
      CheckNoText(r.status(), *t);
    }
    for (const auto& d : req.documents()) CheckNoText(r.status(), d.text());
    CheckStopsNotLeaked(req, r.status());
    return;
  }
  FUZZ_CHECK(r->rag != nullptr);
  const engine::rag::Spec& spec = *r->rag;
  FUZZ_CHECK(static_cast<int>(spec.documents.size()) == req.documents_size());
  FUZZ_CHECK(req.documents_size() >= 1 && req.documents_size() <= g_limits.max_rag_documents);
  FUZZ_CHECK(!spec.query.empty());
  int64_t fixed = spec.preamble.size() + spec.query.size() + spec.postamble.size();
  for (const auto& d : spec.documents) {
    FUZZ_CHECK(!d.empty());
    CheckIdsInVocab(d);
    FUZZ_CHECK(fixed + static_cast<int64_t>(d.size()) < g_limits.context_length);
  }
  CheckIdsInVocab(spec.preamble);
  CheckIdsInVocab(spec.query);
  CheckIdsInVocab(spec.postamble);
  const engine::rag::Options& o = spec.options;
  FUZZ_CHECK(o.top_k >= 1 && o.top_k <= req.documents_size());
  FUZZ_CHECK(std::isfinite(o.doc_weight) && o.doc_weight >= 0 && o.doc_weight <= 10);
  FUZZ_CHECK(std::isfinite(o.canonical_span) && o.canonical_span >= 0);
  // The request's own layout: the answer position max_new_tokens was checked against.
  engine::rag::Limits rag_limits;
  rag_limits.context_length = g_limits.context_length;
  rag_limits.max_documents = g_limits.max_rag_documents;
  absl::StatusOr<engine::rag::Checked> checked = engine::rag::Validate(spec, rag_limits);
  FUZZ_CHECK(checked.ok());
  FUZZ_CHECK(checked->answer_start >= fixed);
  CheckCommon(req, *r, checked->answer_start);
}

// What SuperposeService::Tokenize / Detokenize do between validation and the response.
void FuzzTokenize(const v1::TokenizeRequest& req) {
  absl::Status st = server::ValidateUtf8(req.text(), "text");
  if (!st.ok()) {
    CheckRejected(st);
    CheckNoText(st, req.text());
    return;
  }
  const bool special = !req.has_add_special_tokens() || req.add_special_tokens();
  const std::vector<int32_t> ids = g_tokenizer->Encode(req.text(), special);
  CheckIdsInVocab(ids);
  for (int32_t id : ids) FUZZ_CHECK(!g_tokenizer->IdToToken(id).empty());
}

void FuzzDetokenize(const v1::DetokenizeRequest& req) {
  absl::Status st = server::ValidateTokenIds(req.token_ids(), g_limits.vocab_size, "token_ids");
  if (!st.ok()) {
    CheckRejected(st);
    return;
  }
  std::vector<int32_t> ids(req.token_ids().begin(), req.token_ids().end());
  CheckIdsInVocab(ids);
  const bool skip = !req.has_skip_special_tokens() || req.skip_special_tokens();
  FUZZ_CHECK(StrictUtf8(g_tokenizer->Decode(ids, skip)));
}

template <typename Msg>
bool Parse(const uint8_t* data, size_t size, Msg* msg) {
  return msg->ParseFromArray(data, static_cast<int>(size));
}

}  // namespace
}  // namespace superpose::fuzz

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  using namespace superpose::fuzz;
  auto t = superpose::engine::Tokenizer::FromDir(SharedDir() + "/fixtures/stories260k");
  if (!t.ok()) {
    std::fprintf(stderr, "fuzz: %s\n", t.status().ToString().c_str());
    std::exit(2);
  }
  g_tokenizer = std::move(*t);
  g_limits.context_length = 512;  // stories260k's max_position_embeddings
  g_limits.vocab_size = g_tokenizer->vocab_size();
  return 0;
}

// Byte 0 % 4: 0 GenerateRequest, 1 GenerateRagRequest, 2 TokenizeRequest,
// 3 DetokenizeRequest. See fuzz/make_seeds.py.
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace superpose::fuzz;
  if (size < 1 || size > 16 * 1024) return 0;
  const uint8_t* body = data + 1;
  const size_t n = size - 1;
  switch (data[0] % 4) {
    case 0: {
      superpose::v1::GenerateRequest req;
      if (Parse(body, n, &req)) FuzzGenerate(req);
      break;
    }
    case 1: {
      superpose::v1::GenerateRagRequest req;
      if (Parse(body, n, &req)) FuzzRag(req);
      break;
    }
    case 2: {
      superpose::v1::TokenizeRequest req;
      if (Parse(body, n, &req)) FuzzTokenize(req);
      break;
    }
    default: {
      superpose::v1::DetokenizeRequest req;
      if (Parse(body, n, &req)) FuzzDetokenize(req);
      break;
    }
  }
  return 0;
}
