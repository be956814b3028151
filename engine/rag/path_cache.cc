#include "engine/rag/path_cache.h"

#include <cstring>

#include "absl/hash/hash.h"
#include "absl/types/span.h"

namespace superpose::engine::rag {
namespace {
uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
}  // namespace

uint64_t PathCache::Key(const std::string& tenant, int64_t adapter,
                        const std::vector<int32_t>& preamble, const std::vector<int32_t>& doc,
                        float start, float step) {
  return absl::HashOf(std::string_view("superpose-path-v1"), tenant, adapter,
                      absl::MakeConstSpan(preamble), absl::MakeConstSpan(doc), Bits(start),
                      Bits(step));
}

uint64_t PathCache::BlockKey(uint64_t key, int32_t i) {
  return absl::HashOf(key, i, std::string_view("path-block"));
}

std::optional<PathCache::Entry> PathCache::Lookup(uint64_t key, int32_t num_blocks) {
  auto it = entries_.find(key);
  if (it == entries_.end() || it->second.num_blocks != num_blocks) {
    return std::nullopt;
  }
  Entry e;
  for (int32_t i = 0; i < num_blocks; ++i) {
    std::optional<BlockId> b = blocks_->Lookup(BlockKey(key, i));
    if (!b) {
      // Part of the entry was evicted: the rest is useless.
      for (BlockId r : e.blocks) blocks_->Release(r);
      entries_.erase(it);
      return std::nullopt;
    }
    e.blocks.push_back(*b);
  }
  e.doc_sum = it->second.doc_sum;
  e.doc_count = it->second.doc_count;
  return e;
}

void PathCache::Insert(uint64_t key, const std::vector<BlockId>& blocks, double doc_sum,
                       int32_t doc_count) {
  if (entries_.contains(key)) return;  // computed concurrently by another request
  for (size_t i = 0; i < blocks.size(); ++i) {
    if (blocks_->Contains(BlockKey(key, static_cast<int32_t>(i)))) return;
  }
  for (size_t i = 0; i < blocks.size(); ++i) {
    blocks_->Publish(blocks[i], BlockKey(key, static_cast<int32_t>(i)));
  }
  entries_[key] = {doc_sum, doc_count, static_cast<int32_t>(blocks.size())};
  if (entries_.size() > 2 * static_cast<size_t>(blocks_->num_blocks())) DropStale();
}

// Forgets entries whose first block was evicted (their likelihoods are all that is
// left of them), so the table stays bounded by the pool size.
void PathCache::DropStale() {
  for (auto it = entries_.begin(); it != entries_.end();) {
    if (!blocks_->Contains(BlockKey(it->first, 0))) {
      entries_.erase(it++);
    } else {
      ++it;
    }
  }
}

}  // namespace superpose::engine::rag
