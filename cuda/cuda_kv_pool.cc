// The KV pool of a rank: the same number of blocks on every rank, from --kv_blocks,
// --kv_cache_mb or what --gpu_memory_fraction leaves after the weights.
#include <algorithm>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cuda/cuda_backend_impl.h"
#include "engine/util/status.h"

namespace superpose::cuda {

absl::Status CudaBackend::Impl::Finish() {
  const int32_t D = config.head_dim;
  SP_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  const int32_t bs = options.kv_block_size > 0 ? options.kv_block_size : 16;
  const int64_t per_block = static_cast<int64_t>(config.num_layers) * bs * kv_heads * D * 2 *
                            static_cast<int64_t>(sizeof(bf16));
  int64_t blocks = options.kv_num_blocks;
  if (blocks <= 0 && options.device_memory_fraction > 0.0) {
    absl::StatusOr<int64_t> fit = BlocksFromMemoryFraction(per_block);
    if (!fit.ok()) return fit.status();
    blocks = *fit;
  } else if (blocks <= 0) {
    blocks = std::max<int64_t>(1, options.kv_memory_bytes / per_block);
  }
  blocks = std::min<int64_t>(blocks, std::numeric_limits<int32_t>::max() / bs);
  kv_info = KvPoolInfo{static_cast<int32_t>(blocks), bs, per_block, "bfloat16"};
  const size_t elems =
      static_cast<size_t>(config.num_layers) * static_cast<size_t>(blocks) * bs * kv_heads * D;
  SP_RETURN_IF_ERROR(k_cache.Allocate(elems));
  SP_RETURN_IF_ERROR(v_cache.Allocate(elems));
  if (split_decode) SP_RETURN_IF_ERROR(split_ws.Allocate(SplitWorkspaceFloats()));
  // Zeroed so that a bug reading unwritten slots shows as zeros, never as NaN garbage.
  SP_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(k_cache.get(), 0, elems * sizeof(bf16), stream));
  SP_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(v_cache.get(), 0, elems * sizeof(bf16), stream));
  SP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  loaded = true;
  return absl::OkStatus();
}

absl::StatusOr<int64_t> CudaBackend::Impl::BlocksFromMemoryFraction(int64_t per_block) {
  size_t free_b = 0, total_b = 0;
  SP_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_b, &total_b));
  const double budget = options.device_memory_fraction * static_cast<double>(total_b) -
                        static_cast<double>(total_b - free_b) -
                        static_cast<double>(kWorkspaceReserve);
  int64_t blocks = budget > 0 ? static_cast<int64_t>(budget / static_cast<double>(per_block)) : 0;
  if (shard.size > 1) {
    absl::StatusOr<int64_t> agreed = SmallestOverRanks(blocks);
    if (!agreed.ok()) return agreed.status();
    blocks = *agreed;
  }
  if (blocks < 1) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "device_memory_fraction ", options.device_memory_fraction, " leaves no room for the KV ",
        "cache (", free_b >> 20, " MiB free of ", total_b >> 20, " MiB after the weights)"));
  }
  return blocks;
}

// Every rank must agree: take the smallest count (exact in float below 2^24). A rank
// with no room still joins the all-gather (returning before it would leave the other
// ranks waiting in it forever); every rank then fails in the caller.
absl::StatusOr<int64_t> CudaBackend::Impl::SmallestOverRanks(int64_t blocks) {
  blocks = std::min<int64_t>(blocks, int64_t{1} << 24);
  std::vector<float> all(shard.size);
  DeviceArray<float> d;
  SP_RETURN_IF_ERROR(d.Allocate(1 + shard.size));
  const float mine = static_cast<float>(blocks);
  SP_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(d.get(), &mine, sizeof(float), cudaMemcpyHostToDevice, stream));
  SP_RETURN_IF_ERROR(nccl->AllGather(d.get(), 1, d.get() + 1));
  SP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(all.data(), d.get() + 1, sizeof(float) * shard.size,
                                          cudaMemcpyDeviceToHost, stream));
  SP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  for (float f : all) blocks = std::min(blocks, static_cast<int64_t>(f));
  return blocks;
}

absl::Status CudaBackend::Impl::CheckKvBlock(BlockId block) const {
  if (block < 0 || block >= kv_info.num_blocks) {
    return absl::OutOfRangeError(
        absl::StrCat("KV block ", block, " is not in [0, ", kv_info.num_blocks, ")"));
  }
  return absl::OkStatus();
}

size_t CudaBackend::Impl::KvBlockElements() const {
  return static_cast<size_t>(kv_info.block_size) * kv_heads * config.head_dim;
}

size_t CudaBackend::Impl::KvBlockOffset(int32_t layer, BlockId block) const {
  return (static_cast<size_t>(layer) * kv_info.num_blocks + block) * KvBlockElements();
}

absl::Status CudaBackend::Impl::ZeroKvBlocks(absl::Span<const BlockId> blocks) {
  if (!loaded) return absl::FailedPreconditionError("ZeroKvBlocks before Load");
  for (BlockId b : blocks) SP_RETURN_IF_ERROR(CheckKvBlock(b));
  SP_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  const size_t bytes = KvBlockElements() * sizeof(bf16);
  for (BlockId b : blocks) {
    for (int32_t l = 0; l < config.num_layers; ++l) {
      const size_t at = KvBlockOffset(l, b);
      SP_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(k_cache.get() + at, 0, bytes, stream));
      SP_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(v_cache.get() + at, 0, bytes, stream));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<uint8_t>> CudaBackend::Impl::KvBlockBytes(BlockId block) const {
  if (!loaded) return absl::FailedPreconditionError("KvBlockBytes before Load");
  SP_RETURN_IF_ERROR(CheckKvBlock(block));
  SP_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  const size_t bytes = KvBlockElements() * sizeof(bf16);
  std::vector<uint8_t> out(2 * config.num_layers * bytes);
  size_t o = 0;
  for (const bf16* cache : {k_cache.get(), v_cache.get()}) {
    for (int32_t l = 0; l < config.num_layers; ++l, o += bytes) {
      SP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(out.data() + o, cache + KvBlockOffset(l, block),
                                              bytes, cudaMemcpyDeviceToHost, stream));
    }
  }
  SP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  return out;
}

}  // namespace superpose::cuda
