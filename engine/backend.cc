#include "engine/backend.h"

#include "absl/strings/str_cat.h"

namespace superpose::engine {

void BackendRegistry::Register(const std::string& name, Factory factory) {
  factories_[name] = std::move(factory);
}

bool BackendRegistry::Has(const std::string& name) const { return factories_.count(name) > 0; }

std::vector<std::string> BackendRegistry::Names() const {
  std::vector<std::string> names;
  for (const auto& [name, f] : factories_) names.push_back(name);
  return names;
}

absl::StatusOr<std::unique_ptr<Backend>> BackendRegistry::Create(
    const std::string& name, const BackendOptions& options) const {
  auto it = factories_.find(name);
  if (it == factories_.end()) {
    return absl::InvalidArgumentError(absl::StrCat("unknown backend '", name, "'"));
  }
  return it->second(options);
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
  for (const LogprobRequest& r : plan.logprobs) {
    if (r.token_index < 0 || r.token_index >= n || r.target < 0 || r.target >= vocab_size) {
      return absl::InvalidArgumentError("plan: logprob request out of range");
    }
  }
  return absl::OkStatus();
}

}  // namespace superpose::engine
