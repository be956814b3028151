#include "client/load/workload.h"

#include <algorithm>
#include <fstream>
#include <iterator>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/load/connection.h"
#include "client/load/workload_internal.h"

namespace superpose::load {
namespace v1 = superpose::v1;
namespace {

// Used when --text_file is not given: plain prose, so prompts and documents are
// ordinary text in any tokenizer.
constexpr char kBuiltinText[] =
    "The harbour town woke before the sun. Fishing boats slid out past the breakwater while "
    "the bakers on Quay Street pulled the first loaves from their ovens, and the smell of bread "
    "drifted over the water. Mara had lived above the chandlery for eleven years, long enough "
    "to know every bell in the town by its voice. The church bell was low and patient; the "
    "bell on the harbour master's door was thin and impatient, and it rang whenever a ship "
    "came in without warning. This morning it rang three times before seven. She went down to "
    "the quay with her coat half buttoned and found a small grey boat tied where no boat "
    "should be, its sail folded with care and its deck swept clean. There was no one aboard. "
    "On the bench beside the tiller lay a notebook wrapped in oilcloth, and in the notebook, "
    "in a careful hand, were tide tables for a coast she did not recognise, lists of stores "
    "bought and used, and on the last page a single line: if you find this, the lighthouse "
    "keeper will know what to do. The lighthouse had been empty for twenty years. Mara closed "
    "the notebook, looked out at the grey line of the sea, and began to walk along the cliff "
    "path toward the point. The wind was rising from the west, carrying rain, and the gulls "
    "had gone quiet on the rocks below. Halfway there she met old Tomas with his dog, and "
    "he told her that a light had burned in the tower last night, for the first time since "
    "the storm that took his brother's boat. Together they climbed the last hill, and the "
    "door at the foot of the tower stood open, and on the stairs inside were wet footprints, "
    "small and bare, leading up toward the lamp room where something was singing softly.";

constexpr char kPreamble[] =
    "You are a careful assistant. Answer the question using only the documents below, and "
    "say so when they do not contain the answer.";

uint64_t Fnv(const std::string& bytes) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : bytes) h = (h ^ c) * 1099511628211ull;
  return h;
}

absl::Status RpcError(const char* rpc, const grpc::Status& st) {
  return absl::UnavailableError(absl::StrCat(rpc, " failed: ", st.error_message(), " (code ",
                                             static_cast<int>(st.error_code()), ")"));
}

// Token ids of the text, cut into windows of any length (wrapping around).
class TextSource {
 public:
  absl::Status Load(const Settings& s, v1::Superpose::Stub& stub) {
    std::string text = kBuiltinText;
    if (!s.text_file.empty()) {
      std::ifstream in(s.text_file, std::ios::binary);
      if (!in) return absl::InvalidArgumentError("--text_file: cannot read " + s.text_file);
      text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    }
    v1::TokenizeRequest req;
    req.set_text(text);
    req.set_add_special_tokens(false);
    v1::TokenizeResponse resp;
    grpc::ClientContext ctx;
    PrepareContext(s, "", &ctx);
    grpc::Status st = stub.Tokenize(&ctx, req, &resp);
    if (!st.ok()) return RpcError("Tokenize", st);
    ids_.assign(resp.token_ids().begin(), resp.token_ids().end());
    if (ids_.size() < 8) return absl::InvalidArgumentError("--text_file: fewer than 8 tokens");
    return absl::OkStatus();
  }
  std::vector<uint32_t> Window(uint64_t offset, int n) const {
    std::vector<uint32_t> out(n);
    for (int i = 0; i < n; ++i) out[i] = ids_[(offset + i) % ids_.size()];
    return out;
  }
  size_t size() const { return ids_.size(); }

 private:
  std::vector<uint32_t> ids_;
};

absl::StatusOr<std::string> Detokenize(const Settings& s, v1::Superpose::Stub& stub,
                                       const std::vector<uint32_t>& ids) {
  v1::DetokenizeRequest req;
  for (uint32_t id : ids) req.add_token_ids(id);
  v1::DetokenizeResponse resp;
  grpc::ClientContext ctx;
  PrepareContext(s, "", &ctx);
  grpc::Status st = stub.Detokenize(&ctx, req, &resp);
  if (!st.ok()) return RpcError("Detokenize", st);
  return resp.text();
}

class SyntheticWorkload : public Workload {
 public:
  SyntheticWorkload(const Settings& s, TextSource text, uint32_t n_vocab)
      : s_(s), text_(std::move(text)), n_vocab_(n_vocab) {}

  CallSpec Make(uint64_t index, uint64_t level_index) const override {
    std::mt19937_64 rng = internal::RequestRng(s_.seed, index);
    const int n_in = s_.input_len.Sample(rng);
    const int n_out = s_.output_len.Sample(rng);
    std::vector<uint32_t> ids = Prompt(rng, n_in, level_index);
    CallSpec c;
    for (uint32_t id : ids) c.generate.mutable_token_ids()->add_ids(id);
    c.prompt_ids = static_cast<int64_t>(ids.size());
    internal::SetSampling(s_, rng(), n_out, c.generate.mutable_sampling());
    c.generate.set_ignore_eos(s_.ignore_eos);
    c.affinity = internal::ChooseAffinity(s_, internal::PrefixAffinity(s_, ids));
    return c;
  }

 private:
  std::vector<uint32_t> Prompt(std::mt19937_64& rng, int n, uint64_t level_index) const {
    if (s_.prompt_ids == "lcg") return Lcg(n, level_index);
    if (s_.prompt_ids == "hash") return Hash(n, level_index);
    std::vector<uint32_t> ids;
    if (s_.shared_prefix_tokens > 0) {
      const uint64_t p = rng() % s_.prefixes;
      ids = text_.Window(p * 7919, s_.shared_prefix_tokens);
    }
    const int rest = std::max(1, n - static_cast<int>(ids.size()));
    const std::vector<uint32_t> tail = text_.Window(rng() % text_.size(), rest);
    ids.insert(ids.end(), tail.begin(), tail.end());
    return ids;
  }
  // The peer benchmark's makeTokens (shared/tools/peers/bench_llamacpp.mjs), request i
  // of a level seeded with --prompt_seed + 131 i.
  std::vector<uint32_t> Lcg(int n, uint64_t i) const {
    std::vector<uint32_t> ids;
    uint32_t x = s_.prompt_seed + 131u * static_cast<uint32_t>(i);
    for (int k = 0; k < n; ++k) {
      x = x * 1664525u + 1013904223u;
      ids.push_back(259 + x % (n_vocab_ > 260 ? n_vocab_ - 259 : 1));
    }
    return ids;
  }
  std::vector<uint32_t> Hash(int n, uint64_t i) const {
    std::vector<uint32_t> ids;
    uint32_t x = 2654435761u * static_cast<uint32_t>(i * 977 + 1);
    for (int k = 0; k < n; ++k) {
      x = x * 1664525u + 1013904223u;
      ids.push_back((x >> 8) % s_.vocab);
    }
    return ids;
  }

  Settings s_;
  TextSource text_;
  uint32_t n_vocab_;
};

class RagWorkload : public Workload {
 public:
  explicit RagWorkload(const Settings& s) : s_(s) {}

  absl::Status Build(const TextSource& text, v1::Superpose::Stub& stub) {
    const int d = s_.rag.doc_tokens;
    for (int j = 0; j < s_.rag.pool; ++j) {
      auto doc = Detokenize(s_, stub, text.Window(static_cast<uint64_t>(j) * (d + 13), d));
      if (!doc.ok()) return doc.status();
      pool_.push_back(*doc);
    }
    for (int q = 0; q < 16; ++q) {
      auto query = Detokenize(s_, stub, text.Window(q * 101 + 57, s_.rag.query_tokens));
      if (!query.ok()) return query.status();
      queries_.push_back(*query);
    }
    for (int k = 0; k < s_.rag.doc_sets; ++k) sets_.push_back(DrawSet(k));
    return absl::OkStatus();
  }

  CallSpec Make(uint64_t index, uint64_t) const override {
    std::mt19937_64 rng = internal::RequestRng(s_.seed, index);
    const std::vector<int>& set = sets_[rng() % sets_.size()];
    CallSpec c;
    v1::GenerateRagRequest& r = c.rag_request;
    c.rag = true;
    r.set_preamble(kPreamble);
    std::string set_bytes;
    for (int j : set) {
      v1::RagDocument* doc = r.add_documents();
      doc->set_text(pool_[j]);
      doc->set_id(absl::StrCat("doc-", j));
      absl::StrAppend(&set_bytes, j, ",");
    }
    r.set_query(queries_[rng() % queries_.size()]);
    r.mutable_rag()->set_mode(s_.rag.mode == "naive" ? v1::RAG_MODE_NAIVE
                                                     : v1::RAG_MODE_SUPERPOSITION);
    r.mutable_rag()->set_top_k(s_.rag.top_k);
    r.mutable_rag()->set_path_cache(s_.rag.path_cache);
    internal::SetSampling(s_, rng(), s_.output_len.Sample(rng), r.mutable_sampling());
    r.set_ignore_eos(s_.ignore_eos);
    c.affinity = internal::ChooseAffinity(s_, AffinityKey(s_, "docs:" + set_bytes));
    return c;
  }

 private:
  // Document set k: --rag_docs distinct pool documents, in a fixed order.
  std::vector<int> DrawSet(int k) const {
    std::vector<int> all(s_.rag.pool);
    std::iota(all.begin(), all.end(), 0);
    std::mt19937_64 rng = internal::RequestRng(s_.seed ^ 0x5eed5e75ull, k);
    std::shuffle(all.begin(), all.end(), rng);
    all.resize(s_.rag.docs);
    std::sort(all.begin(), all.end());
    return all;
  }

  Settings s_;
  std::vector<std::string> pool_, queries_;
  std::vector<std::vector<int>> sets_;
};

absl::StatusOr<uint32_t> ModelVocab(const Settings& s, v1::Superpose::Stub& stub) {
  grpc::ClientContext ctx;
  PrepareContext(s, "", &ctx);
  v1::ModelInfo info;
  grpc::Status st = stub.GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info);
  if (!st.ok()) return RpcError("GetModelInfo", st);
  return info.vocab_size();
}

}  // namespace

namespace internal {

std::mt19937_64 RequestRng(uint64_t seed, uint64_t index) {
  std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                    static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32)};
  return std::mt19937_64(seq);
}

void SetSampling(const Settings& s, uint64_t seed, int max_new_tokens, v1::SamplingParams* p) {
  p->set_max_new_tokens(max_new_tokens);
  p->set_temperature(s.temperature);
  p->set_top_k(s.top_k);
  p->set_top_p(s.top_p);
  p->set_seed(seed);
}

std::string PrefixAffinity(const Settings& s, const std::vector<uint32_t>& ids) {
  const size_t n = std::min(ids.size(), static_cast<size_t>(s.affinity_prefix_tokens));
  return AffinityKey(s, std::string(reinterpret_cast<const char*>(ids.data()), n * 4));
}

std::string ChooseAffinity(const Settings& s, const std::string& automatic) {
  if (s.affinity == "none") return "";
  if (s.affinity.rfind("key:", 0) == 0) return s.affinity.substr(4);
  return automatic;
}

}  // namespace internal

std::string AffinityKey(const Settings& s, const std::string& bytes) {
  return absl::StrFormat("%s/%016x", s.tenant, Fnv(bytes));
}

absl::StatusOr<std::unique_ptr<Workload>> MakeWorkload(
    const Settings& s, const std::shared_ptr<grpc::Channel>& channel) {
  if (s.workload == "jsonl") return internal::MakeJsonlWorkload(s);
  auto stub = v1::Superpose::NewStub(channel);
  TextSource text;
  if (s.prompt_ids == "text") {
    if (absl::Status st = text.Load(s, *stub); !st.ok()) return st;
  }
  if (s.workload == "rag") {
    auto rag = std::make_unique<RagWorkload>(s);
    if (absl::Status st = rag->Build(text, *stub); !st.ok()) return st;
    return rag;
  }
  uint32_t n_vocab = 0;
  if (s.prompt_ids == "lcg") {
    auto v = ModelVocab(s, *stub);
    if (!v.ok()) return v.status();
    n_vocab = *v;
  }
  return std::make_unique<SyntheticWorkload>(s, std::move(text), n_vocab);
}

}  // namespace superpose::load
