// The BPE model of a Hugging Face tokenizer.json, with HF `tokenizers` semantics: each
// word starts as characters (or byte-fallback `<0xXX>` pieces, or unk), then the
// adjacent pair with the lowest merge rank is merged (leftmost on ties) until no merge
// applies. A heap over a linked list of symbols makes it O(n log n) per word; a
// bounded, mutex-protected word cache makes repeated words cheap.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "engine/model/tokenizer_components.h"

namespace superpose::engine::tok {

class BpeModel {
 public:
  // `j` is tokenizer.json's "model" object.
  static absl::StatusOr<std::unique_ptr<BpeModel>> Parse(const nlohmann::json& j,
                                                         const ParseContext& ctx);

  // Appends the ids of one pre-tokenized word. Thread-safe.
  void Tokenize(std::string_view word, std::vector<int32_t>* out) const;

  std::optional<int32_t> TokenToId(std::string_view token) const;
  const std::string* IdToToken(int32_t id) const;  // nullptr when unknown
  int32_t max_id() const { return static_cast<int32_t>(vocab_r_.size()) - 1; }
  bool byte_fallback() const { return byte_fallback_; }

  // Ids must be below this (tables are indexed by id; real vocabularies are < 1M).
  static constexpr int64_t kMaxTokenId = int64_t{1} << 24;
  static constexpr size_t kMaxCachedWordBytes = 256;
  static constexpr size_t kCacheCapacity = 20000;

 private:
  BpeModel() = default;
  void MergeWord(std::string_view word, std::vector<int32_t>* out) const;
  std::optional<int32_t> Lookup(std::string_view s) const;

  absl::flat_hash_map<std::string, int32_t> vocab_;
  std::vector<std::string> vocab_r_;
  std::vector<char> has_id_;
  // (left id << 32 | right id) -> (rank, merged id)
  absl::flat_hash_map<uint64_t, std::pair<int32_t, int32_t>> merges_;
  bool byte_fallback_ = false;
  bool fuse_unk_ = false;
  bool ignore_merges_ = false;
  int32_t unk_id_ = -1;
  std::string continuing_subword_prefix_;
  std::string end_of_word_suffix_;
  int32_t byte_ids_[256];  // "<0xXX>" ids for byte fallback, -1 when absent

  mutable absl::Mutex mu_;
  mutable absl::flat_hash_map<std::string, std::vector<int32_t>> cache_ ABSL_GUARDED_BY(mu_);
};

}  // namespace superpose::engine::tok
