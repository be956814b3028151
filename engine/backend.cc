#include "engine/backend.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "engine/row_math.h"

namespace superpose::engine {

absl::Status ValidateBackendOptions(const BackendOptions& o) {
  if (o.num_threads < 0) return absl::InvalidArgumentError("--threads: must be >= 0");
  if (o.kv_block_size < 1) return absl::InvalidArgumentError("--kv_block_size: must be >= 1");
  if (o.kv_num_blocks < 0) return absl::InvalidArgumentError("--kv_blocks: must be >= 0");
  if (o.kv_num_blocks == 0 && o.kv_memory_bytes <= 0) {
    return absl::InvalidArgumentError("--kv_cache_mb: must be > 0 (or give --kv_blocks)");
  }
  if (!(o.device_memory_fraction >= 0.0 && o.device_memory_fraction <= 1.0)) {
    return absl::InvalidArgumentError("--gpu_memory_fraction: must be in [0, 1]");
  }
  if (o.tensor_parallel < 1) return absl::InvalidArgumentError("--tp: must be >= 1");
  return absl::OkStatus();
}

absl::Status CheckFlagNames(const BackendFlags& flags, absl::string_view backend,
                            std::initializer_list<absl::string_view> known) {
  for (const auto& [name, value] : flags) {
    if (std::find(known.begin(), known.end(), name) == known.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", name, ": not an option of the ", backend, " backend"));
    }
  }
  return absl::OkStatus();
}

absl::Status ParseFlagBool(const BackendFlags& flags, const std::string& name, bool* out) {
  auto it = flags.find(name);
  if (it == flags.end()) return absl::OkStatus();
  if (!absl::SimpleAtob(it->second, out)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, ": unknown value '", it->second, "' (true, false)"));
  }
  return absl::OkStatus();
}

bool BackendRegistry::Has(const std::string& name) const { return entries_.count(name) > 0; }

std::vector<std::string> BackendRegistry::Names() const {
  std::vector<std::string> names;
  for (const auto& [name, e] : entries_) names.push_back(name);
  return names;
}

absl::StatusOr<BackendRegistry::Config> BackendRegistry::Configure(
    const std::string& name, const BackendOptions& options, const BackendFlags& flags) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) {
    return absl::InvalidArgumentError(absl::StrCat("--backend: unknown backend '", name, "'"));
  }
  if (absl::Status st = ValidateBackendOptions(options); !st.ok()) return st;
  absl::StatusOr<std::shared_ptr<const void>> typed = it->second.parse(flags);
  if (!typed.ok()) return typed.status();
  Config config;
  config.name_ = name;
  config.options_ = options;
  config.typed_ = *std::move(typed);
  return config;
}

absl::StatusOr<std::unique_ptr<Backend>> BackendRegistry::Create(const Config& config) const {
  auto it = entries_.find(config.name_);
  if (it == entries_.end() || config.typed_ == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("backend '", config.name_, "' was not configured by this registry"));
  }
  return it->second.create(config.options_, config.typed_.get());
}

absl::Status ValidatePlan(const BatchPlan& plan, const KvPoolInfo& kv, int32_t vocab_size) {
  const int32_t n = plan.num_tokens();
  if (static_cast<int32_t>(plan.positions.size()) != n ||
      static_cast<int32_t>(plan.kv_slots.size()) != n) {
    return absl::InvalidArgumentError("plan: tokens, positions and kv_slots differ in length");
  }
  for (int32_t i = 0; i < n; ++i) {
    if (plan.tokens[i] < 0 || plan.tokens[i] >= vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("plan: token ", i, " out of vocabulary"));
    }
    const KvSlot& s = plan.kv_slots[i];
    if (s.block < 0 || s.block >= kv.num_blocks || s.slot < 0 || s.slot >= kv.block_size) {
      return absl::InvalidArgumentError(absl::StrCat("plan: kv slot of token ", i, " out of pool"));
    }
  }
  int32_t next = 0;
  for (const SeqPlan& seq : plan.seqs) {
    if (seq.token_begin != next || seq.num_tokens < 0 || seq.token_begin + seq.num_tokens > n) {
      return absl::InvalidArgumentError(absl::StrCat("plan: seq ", seq.id, " token range"));
    }
    next += seq.num_tokens;
    for (const KvSegment& g : seq.context) {
      if (g.block < 0 || g.block >= kv.num_blocks || g.first_slot < 0 || g.length < 0 ||
          g.first_slot + g.length > kv.block_size) {
        return absl::InvalidArgumentError(absl::StrCat("plan: seq ", seq.id, " segment"));
      }
    }
  }
  if (next != n) return absl::InvalidArgumentError("plan: seqs do not cover all tokens");
  for (int32_t t : plan.logits_for) {
    if (t < 0 || t >= n) return absl::InvalidArgumentError("plan: logits_for out of range");
  }
  if (!plan.logits_top.empty() && plan.logits_top.size() != plan.logits_for.size()) {
    return absl::InvalidArgumentError("plan: logits_top and logits_for differ in length");
  }
  for (int32_t n : plan.logits_top) {
    if (n < 0 || n > kMaxTopLogits || n > vocab_size) {
      return absl::InvalidArgumentError("plan: logits_top out of range");
    }
  }
  if (!plan.sampling.empty() && plan.sampling.size() != plan.logits_for.size()) {
    return absl::InvalidArgumentError("plan: sampling and logits_for differ in length");
  }
  for (const RowSampling& r : plan.sampling) {
    if (!(r.temperature >= 0.0f) || !std::isfinite(r.temperature)) {
      return absl::InvalidArgumentError("plan: sampling temperature out of range");
    }
    if (r.temperature > 0.0f &&
        (!(r.top_p > 0.0f && r.top_p <= 1.0f) || !(r.min_p >= 0.0f && r.min_p <= 1.0f))) {
      return absl::InvalidArgumentError("plan: sampling top_p or min_p out of range");
    }
  }
  for (const LogprobRequest& r : plan.logprobs) {
    if (r.token_index < 0 || r.token_index >= n || r.target < 0 || r.target >= vocab_size) {
      return absl::InvalidArgumentError("plan: logprob request out of range");
    }
  }
  return absl::OkStatus();
}

namespace {
// a comes before b in a compact row.
bool Better(const TopLogit& a, const TopLogit& b) {
  return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
}
}  // namespace

void SelectTopLogits(absl::Span<const float> row, int32_t n, std::vector<TopLogit>* out) {
  const int32_t V = static_cast<int32_t>(row.size());
  n = std::min(n, V);
  if (n <= 0) return;
  // A heap of the n best so far, its worst on top; ids arrive in increasing order, so a
  // later token only enters with a strictly larger logit than the worst kept.
  const size_t base = out->size();
  for (int32_t i = 0; i < n; ++i) out->push_back({i, row[i]});
  auto first = out->begin() + static_cast<std::ptrdiff_t>(base);
  std::make_heap(first, out->end(), Better);
  float worst = first->logit;
  for (int32_t i = n; i < V; ++i) {
    if (!(row[i] > worst)) continue;
    std::pop_heap(first, out->end(), Better);
    out->back() = {i, row[i]};
    std::push_heap(first, out->end(), Better);
    worst = first->logit;
  }
  std::sort(first, out->end(), Better);
}

float LogSumExp(absl::Span<const float> row) {
  if (row.empty()) return -std::numeric_limits<float>::infinity();
  const float mx = MaxOf(row.data(), static_cast<int32_t>(row.size()));
  if (!std::isfinite(mx)) return mx;
  const double sum = ScaledExp(row.data(), static_cast<int32_t>(row.size()), 1.0f, mx, nullptr);
  return mx + static_cast<float>(std::log(sum));
}

RowLayout::RowLayout(const BatchPlan& plan) : at_(plan.logits_for.size()) {
  for (size_t r = 0; r < at_.size(); ++r) {
    At& a = at_[r];
    a.n = TopOf(plan, r);
    if (Sampled(plan, r)) a.sampled = sampled_++;
    if (a.n > 0) {
      a.top = top_;
      a.lse = compact_++;
      top_ += a.n;
    } else if (a.sampled < 0) {
      a.whole = whole_++;
    }
  }
}

absl::Status RowLayout::Check(const ForwardOutput& out, int32_t vocab) const {
  if (static_cast<size_t>(whole_) * vocab != out.logits.size() ||
      static_cast<size_t>(top_) != out.top.size() ||
      static_cast<size_t>(compact_) != out.top_lse.size() ||
      static_cast<size_t>(sampled_) != out.sampled.size() ||
      static_cast<size_t>(sampled_) != out.sampled_logit.size()) {
    return absl::InternalError("backend failure: logits of the wrong shape");
  }
  return absl::OkStatus();
}

RowView RowLayout::Row(const ForwardOutput& out, size_t r, int32_t vocab) const {
  const At& a = at_[r];
  RowView v;
  if (a.whole >= 0) v.whole = out.logits.data() + static_cast<size_t>(a.whole) * vocab;
  if (a.n > 0) {
    v.top = absl::MakeConstSpan(out.top).subspan(a.top, a.n);
    v.top_lse = out.top_lse[a.lse];
  }
  if (a.sampled >= 0) {
    v.sampled = out.sampled[a.sampled];
    v.sampled_logit = out.sampled_logit[a.sampled];
  }
  return v;
}

void CompactLogits(const BatchPlan& plan, int32_t vocab, const float* rows, ForwardOutput* out) {
  const size_t nl = plan.logits_for.size();
  out->top.clear();
  out->top_lse.clear();
  out->sampled.clear();
  out->sampled_logit.clear();
  out->logits.clear();
  for (size_t r = 0; r < nl; ++r) {
    const absl::Span<const float> row(rows + r * vocab, vocab);
    if (RowLayout::Sampled(plan, r)) {
      const int32_t t = SampleRowReference(row.data(), vocab, plan.sampling[r]);
      out->sampled.push_back(t);
      out->sampled_logit.push_back(row[t]);
    }
    if (const int32_t n = RowLayout::TopOf(plan, r); n > 0) {
      SelectTopLogits(row, n, &out->top);
      out->top_lse.push_back(LogSumExp(row));
    } else if (RowLayout::Whole(plan, r)) {
      out->logits.insert(out->logits.end(), row.begin(), row.end());
    }
  }
}

absl::StatusOr<ShardLayout> ComputeShardLayout(const ModelConfig& config, const Shard& shard) {
  const int32_t tp = shard.size, rank = shard.rank;
  if (tp < 1 || rank < 0 || rank >= tp) return absl::InvalidArgumentError("bad shard");
  const int32_t nq = config.num_heads, nkv = config.num_kv_heads, I = config.intermediate_size,
                V = config.vocab_size;
  if (nq <= 0 || nkv <= 0 || I <= 0 || V <= 0) {
    return absl::InvalidArgumentError("model config has non-positive sizes");
  }
  if (nq % tp != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("tp=", tp, " does not divide num_attention_heads=", nq));
  }
  if (I % tp != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("tp=", tp, " does not divide intermediate_size=", I));
  }
  ShardLayout l;
  l.q_heads = nq / tp;
  if (nkv >= tp) {
    if (nkv % tp != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("tp=", tp, " does not divide num_key_value_heads=", nkv));
    }
    l.kv_heads = nkv / tp;
    l.kv_head_begin = rank * l.kv_heads;
  } else {
    if (tp % nkv != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("num_key_value_heads=", nkv, " does not divide tp=", tp));
    }
    l.kv_heads = 1;  // replicated: each rank keeps the one kv head its query heads use
    l.kv_head_begin = rank * nkv / tp;
  }
  l.inter = I / tp;
  l.vocab_pad = (V + tp - 1) / tp;
  l.vocab_begin = std::min(V, rank * l.vocab_pad);
  l.vocab_local = std::min(V, l.vocab_begin + l.vocab_pad) - l.vocab_begin;
  return l;
}

}  // namespace superpose::engine
