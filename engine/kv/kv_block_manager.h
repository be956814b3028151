// The KV block manager: a fixed pool of reference-counted blocks, with a content-hash
// index of full blocks for prefix caching. Unreferenced cached blocks stay findable
// until evicted, least recently used first. Owned by the engine thread; the counters
// may be read from any thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <list>
#include <optional>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "engine/backend.h"

namespace superpose::engine {

class KvBlockManager {
 public:
  explicit KvBlockManager(int32_t num_blocks);

  // A block with refcount 1, or nullopt when every block is referenced. May evict the
  // least recently used cached block.
  std::optional<BlockId> Allocate();
  void Retain(BlockId block);
  // Drops one reference; at zero the block becomes free (and, if it holds published
  // content, stays in the cache until evicted).
  void Release(BlockId block);

  // Prefix cache. Lookup retains the block on a hit.
  std::optional<BlockId> Lookup(uint64_t hash);
  bool Contains(uint64_t hash) const { return index_.contains(hash); }
  // The block holding `hash`, without retaining it (for decisions made before acting).
  std::optional<BlockId> Peek(uint64_t hash) const {
    auto it = index_.find(hash);
    if (it == index_.end()) return std::nullopt;
    return it->second;
  }
  // Marks a full block as holding the content identified by `hash`.
  void Publish(BlockId block, uint64_t hash);

  int32_t num_blocks() const { return static_cast<int32_t>(refs_.size()); }
  // Blocks with no references (free or evictable cached ones).
  int32_t free_blocks() const { return free_count_.load(std::memory_order_relaxed); }
  int32_t cached_blocks() const { return cached_count_.load(std::memory_order_relaxed); }
  int32_t refcount(BlockId block) const { return refs_[block]; }
  int64_t evictions() const { return evictions_; }

  // Private mode: `hook` is called with every block whose last reference is dropped
  // (Release), before the block can be handed out again. Such a block is unpublished
  // first: its content is about to go. Set before the first Allocate.
  void set_release_hook(std::function<void(BlockId)> hook) { release_hook_ = std::move(hook); }

 private:
  void Unpublish(BlockId block);

  std::vector<int32_t> refs_;
  std::vector<uint64_t> hash_of_;  // 0: not published
  std::vector<bool> has_hash_;
  // Unreferenced blocks: never-used / unpublished ones first (front), then cached
  // ones in LRU order; allocation takes from the front.
  std::list<BlockId> free_list_;
  std::vector<std::list<BlockId>::iterator> free_pos_;
  std::vector<bool> in_free_;
  absl::flat_hash_map<uint64_t, BlockId> index_;
  std::atomic<int32_t> free_count_{0};
  std::atomic<int32_t> cached_count_{0};
  int64_t evictions_ = 0;
  std::function<void(BlockId)> release_hook_;
};

// Hash of a full block's content chained to everything before it.
uint64_t HashBlock(uint64_t parent, const int32_t* tokens, int32_t count);
uint64_t HashString(uint64_t seed, const std::string& s);

}  // namespace superpose::engine
