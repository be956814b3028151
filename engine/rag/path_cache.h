// The path cache (papers.md 1.2 "Path caching", section 5): a document's KV, computed
// over a preamble at given positions, plus its document log-likelihood, reused across
// requests. The KV lives in the engine's ordinary ref-counted blocks, published in the
// block manager's content index under keys derived from the entry key, so cached
// documents are evicted least recently used together with prefix-cache blocks.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "engine/kv/kv_block_manager.h"
#include "engine/rag/rag.h"

namespace superpose::engine::rag {

class PathCache {
 public:
  explicit PathCache(KvBlockManager* blocks) : blocks_(blocks) {}

  // Identifies a document's KV: tenant (never shared across tenants), LoRA adapter (its
  // k/v projections change the KV; 0: the base model), the preamble it attended to, its
  // tokens, start position and position step. The model is fixed per engine (one cache
  // per loaded model).
  static uint64_t Key(const std::string& tenant, int64_t adapter,
                      const std::vector<int32_t>& preamble, const std::vector<int32_t>& doc,
                      float start, float step);

  struct Entry {
    std::vector<BlockId> blocks;  // retained for the caller
    double doc_sum = 0;           // sum and count of the document log-likelihood terms
    int32_t doc_count = 0;
  };
  // A hit retains every block of the entry (the caller releases them).
  std::optional<Entry> Lookup(uint64_t key, int32_t num_blocks);
  // Publishes the blocks of a computed document (the caller keeps its references).
  void Insert(uint64_t key, const std::vector<BlockId>& blocks, double doc_sum, int32_t doc_count);

 private:
  static uint64_t BlockKey(uint64_t key, int32_t i);
  void DropStale();

  KvBlockManager* blocks_;
  struct Stats {
    double doc_sum = 0;
    int32_t doc_count = 0;
    int32_t num_blocks = 0;
  };
  absl::flat_hash_map<uint64_t, Stats> entries_;
};

}  // namespace superpose::engine::rag
