// The CPU backend's KV pool, block by block: zeroing freed blocks (private mode) and
// reading a block's bytes (tests). Within a layer a block's keys (transposed, see
// attention.h KeyElement) and its values are each one contiguous run.
#include <cstring>

#include "absl/strings/str_cat.h"
#include "engine/cpu/cpu_backend.h"

namespace superpose::engine::cpu {
namespace {

// Calls fn(byte offset, bytes) for block `b`'s run in every layer of one cache.
template <typename Fn>
void ForEachRun(const KvPoolInfo& kv, int32_t layers, int64_t elems_per_block, size_t elem_bytes,
                BlockId b, Fn fn) {
  for (int32_t l = 0; l < layers; ++l) {
    const size_t first = (static_cast<size_t>(l) * kv.num_blocks + b) * elems_per_block;
    fn(first * elem_bytes, elems_per_block * elem_bytes);
  }
}

absl::Status CheckBlock(const KvPoolInfo& kv, BlockId b) {
  if (b < 0 || b >= kv.num_blocks) {
    return absl::OutOfRangeError(
        absl::StrCat("KV block ", b, " is not in [0, ", kv.num_blocks, ")"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CpuBackend::ZeroKvBlocks(absl::Span<const BlockId> blocks) {
  const int64_t per_block =
      static_cast<int64_t>(kv_info_.block_size) * kv_heads_ * config_.head_dim;
  const size_t elem = kv_bf16_ ? sizeof(uint16_t) : sizeof(float);
  auto* k = kv_bf16_ ? reinterpret_cast<uint8_t*>(k_cache16_.data())
                     : reinterpret_cast<uint8_t*>(k_cache_.data());
  auto* v = kv_bf16_ ? reinterpret_cast<uint8_t*>(v_cache16_.data())
                     : reinterpret_cast<uint8_t*>(v_cache_.data());
  for (BlockId b : blocks) {
    if (absl::Status st = CheckBlock(kv_info_, b); !st.ok()) return st;
    ForEachRun(kv_info_, config_.num_layers, per_block, elem, b, [&](size_t at, size_t n) {
      std::memset(k + at, 0, n);
      std::memset(v + at, 0, n);
    });
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<uint8_t>> CpuBackend::KvBlockBytes(BlockId block) const {
  if (absl::Status st = CheckBlock(kv_info_, block); !st.ok()) return st;
  const int64_t per_block =
      static_cast<int64_t>(kv_info_.block_size) * kv_heads_ * config_.head_dim;
  const size_t elem = kv_bf16_ ? sizeof(uint16_t) : sizeof(float);
  const auto* k = kv_bf16_ ? reinterpret_cast<const uint8_t*>(k_cache16_.data())
                           : reinterpret_cast<const uint8_t*>(k_cache_.data());
  const auto* v = kv_bf16_ ? reinterpret_cast<const uint8_t*>(v_cache16_.data())
                           : reinterpret_cast<const uint8_t*>(v_cache_.data());
  std::vector<uint8_t> out;
  for (const uint8_t* cache : {k, v}) {
    ForEachRun(kv_info_, config_.num_layers, per_block, elem, block,
               [&](size_t at, size_t n) { out.insert(out.end(), cache + at, cache + at + n); });
  }
  return out;
}

}  // namespace superpose::engine::cpu
