#include "engine/kv/kv_block_manager.h"

#include <cassert>

#include "absl/hash/hash.h"

namespace superpose::engine {

KvBlockManager::KvBlockManager(int32_t num_blocks)
    : refs_(num_blocks, 0),
      hash_of_(num_blocks, 0),
      has_hash_(num_blocks, false),
      free_pos_(num_blocks),
      in_free_(num_blocks, true) {
  for (BlockId b = 0; b < num_blocks; ++b) free_pos_[b] = free_list_.insert(free_list_.end(), b);
  free_count_ = num_blocks;
}

std::optional<BlockId> KvBlockManager::Allocate() {
  if (free_list_.empty()) return std::nullopt;
  const BlockId b = free_list_.front();
  free_list_.pop_front();
  in_free_[b] = false;
  if (has_hash_[b]) {
    Unpublish(b);
    ++evictions_;
  }
  refs_[b] = 1;
  free_count_.fetch_sub(1, std::memory_order_relaxed);
  return b;
}

void KvBlockManager::Retain(BlockId b) {
  if (refs_[b]++ == 0) {
    assert(in_free_[b]);
    free_list_.erase(free_pos_[b]);
    in_free_[b] = false;
    free_count_.fetch_sub(1, std::memory_order_relaxed);
  }
}

void KvBlockManager::Release(BlockId b) {
  assert(refs_[b] > 0);
  if (--refs_[b] == 0) {
    if (release_hook_) {
      if (has_hash_[b]) Unpublish(b);
      release_hook_(b);
    }
    // Cached content goes to the back (most recently used); plain blocks to the front.
    free_pos_[b] = has_hash_[b] ? free_list_.insert(free_list_.end(), b)
                                : free_list_.insert(free_list_.begin(), b);
    in_free_[b] = true;
    free_count_.fetch_add(1, std::memory_order_relaxed);
  }
}

std::optional<BlockId> KvBlockManager::Lookup(uint64_t hash) {
  auto it = index_.find(hash);
  if (it == index_.end()) return std::nullopt;
  Retain(it->second);
  return it->second;
}

void KvBlockManager::Publish(BlockId b, uint64_t hash) {
  if (has_hash_[b]) return;
  if (index_.contains(hash)) return;  // an identical block is already cached
  index_[hash] = b;
  hash_of_[b] = hash;
  has_hash_[b] = true;
  cached_count_.fetch_add(1, std::memory_order_relaxed);
}

void KvBlockManager::Unpublish(BlockId b) {
  index_.erase(hash_of_[b]);
  has_hash_[b] = false;
  hash_of_[b] = 0;
  cached_count_.fetch_sub(1, std::memory_order_relaxed);
}

uint64_t HashBlock(uint64_t parent, const int32_t* tokens, int32_t count) {
  return absl::HashOf(parent, absl::MakeConstSpan(tokens, count));
}

uint64_t HashString(uint64_t seed, const std::string& s) { return absl::HashOf(seed, s); }

}  // namespace superpose::engine
