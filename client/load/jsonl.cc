// --workload=jsonl: the requests of a file, one JSON object a line, sent in order and
// cycled (request i is line i mod lines). Schema: docs/operations.md.
#include <fstream>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "client/load/workload_internal.h"

namespace superpose::load::internal {
namespace v1 = superpose::v1;
namespace {

using nlohmann::json;

absl::Status LineError(const Settings& s, int line, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat("--jsonl: ", s.jsonl, ":", line, ": ", why));
}

// Reads the "rag" object into `r`; an error names the field.
std::string ParseRag(const json& j, v1::GenerateRagRequest* r) {
  if (!j.is_object()) return "'rag' is not an object";
  r->set_preamble(j.value("preamble", ""));
  r->set_query(j.value("query", ""));
  r->set_postamble(j.value("postamble", ""));
  if (!j.contains("documents") || !j["documents"].is_array())
    return "'rag.documents' is not a list";
  for (const json& d : j["documents"]) {
    v1::RagDocument* doc = r->add_documents();
    if (d.is_string()) {
      doc->set_text(d.get<std::string>());
    } else if (d.is_object() && d.contains("text")) {
      doc->set_text(d["text"].get<std::string>());
      doc->set_id(d.value("id", ""));
    } else {
      return "'rag.documents' entries are strings or {\"text\", \"id\"}";
    }
  }
  const std::string mode = j.value("mode", "superposition");
  if (mode != "superposition" && mode != "naive") return "'rag.mode' is superposition or naive";
  r->mutable_rag()->set_mode(mode == "naive" ? v1::RAG_MODE_NAIVE : v1::RAG_MODE_SUPERPOSITION);
  r->mutable_rag()->set_top_k(j.value("top_k", 1u));
  r->mutable_rag()->set_path_cache(j.value("path_cache", true));
  return "";
}

// One line's request; `why` gets the reason when it is not one.
std::string ParsePrompt(const json& j, CallSpec* c, std::string* affinity_bytes) {
  if (j.contains("prompt")) {
    if (!j["prompt"].is_string()) return "'prompt' is not a string";
    c->generate.set_text(j["prompt"].get<std::string>());
    *affinity_bytes = c->generate.text().substr(0, 256);
    return "";
  }
  if (!j.contains("token_ids") || !j["token_ids"].is_array() || j["token_ids"].empty()) {
    return "needs 'prompt', 'token_ids' (a non-empty list) or 'rag'";
  }
  std::vector<uint32_t> ids;
  for (const json& id : j["token_ids"]) {
    if (!id.is_number_unsigned()) return "'token_ids' holds a value that is not a token id";
    ids.push_back(id.get<uint32_t>());
    c->generate.mutable_token_ids()->add_ids(ids.back());
  }
  c->prompt_ids = static_cast<int64_t>(ids.size());
  *affinity_bytes = "ids";
  affinity_bytes->append(reinterpret_cast<const char*>(ids.data()), ids.size() * 4);
  return "";
}

std::string ParseLine(const Settings& s, int line, const json& j, CallSpec* c) {
  if (!j.is_object()) return "not a JSON object";
  std::string affinity_bytes, why;
  if (j.contains("rag")) {
    c->rag = true;
    why = ParseRag(j["rag"], &c->rag_request);
    affinity_bytes = "docs:";
    for (const auto& d : c->rag_request.documents())
      absl::StrAppend(&affinity_bytes, d.text(), "\x1f");
  } else {
    why = ParsePrompt(j, c, &affinity_bytes);
  }
  if (!why.empty()) return why;
  std::mt19937_64 rng = RequestRng(s.seed, line);
  const json out = j.value("max_new_tokens", json(s.output_len.Sample(rng)));
  if (!out.is_number_integer() || out.get<int64_t>() <= 0) return "'max_new_tokens' is not > 0";
  const bool ignore_eos = j.value("ignore_eos", s.ignore_eos);
  auto* sampling = c->rag ? c->rag_request.mutable_sampling() : c->generate.mutable_sampling();
  SetSampling(s, 0, out.get<int>(), sampling);
  c->rag ? c->rag_request.set_ignore_eos(ignore_eos) : c->generate.set_ignore_eos(ignore_eos);
  if (j.contains("affinity") && !j["affinity"].is_string()) return "'affinity' is not a string";
  c->affinity = j.contains("affinity") ? j["affinity"].get<std::string>()
                                       : ChooseAffinity(s, AffinityKey(s, affinity_bytes));
  return "";
}

class JsonlWorkload : public Workload {
 public:
  explicit JsonlWorkload(std::vector<CallSpec> calls, uint64_t seed)
      : calls_(std::move(calls)), seed_(seed) {}
  CallSpec Make(uint64_t index, uint64_t) const override {
    CallSpec c = calls_[index % calls_.size()];
    const uint64_t seed = RequestRng(seed_, index)();
    (c.rag ? c.rag_request.mutable_sampling() : c.generate.mutable_sampling())->set_seed(seed);
    return c;
  }

 private:
  std::vector<CallSpec> calls_;
  uint64_t seed_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Workload>> MakeJsonlWorkload(const Settings& s) {
  std::ifstream in(s.jsonl);
  if (!in) return absl::InvalidArgumentError("--jsonl: cannot read " + s.jsonl);
  std::vector<CallSpec> calls;
  int n = 0;
  for (std::string line; std::getline(in, line);) {
    ++n;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) return LineError(s, n, "not valid JSON");
    CallSpec c;
    std::string why;
    try {
      why = ParseLine(s, n, j, &c);
    } catch (const json::exception& e) {  // a field of the wrong type
      why = e.what();
    }
    if (!why.empty()) return LineError(s, n, why);
    calls.push_back(std::move(c));
  }
  if (calls.empty()) return absl::InvalidArgumentError("--jsonl: " + s.jsonl + " has no requests");
  return std::make_unique<JsonlWorkload>(std::move(calls), s.seed);
}

}  // namespace superpose::load::internal
