// Loading a rank: setup (shard, device, attention kernels), weights allocated, read
// through engine::ShardedWeightReader and uploaded as bf16, or filled at random.
#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cuda/attention_tc_body.h"
#include "cuda/cuda_backend_impl.h"
#include "cuda/lazy_kernels.h"
#include "engine/model/weights.h"
#include "engine/util/status.h"
#include "spdlog/spdlog.h"

namespace superpose::cuda {

absl::Status CudaBackend::Impl::Setup(const ModelConfig& cfg, const Shard& sh) {
  config = cfg;
  shard = sh;
  loaded = false;
  SP_RETURN_IF_ERROR(SetupShard(cfg, sh));
  SP_RETURN_IF_ERROR(SetupDevice());
  SP_RETURN_IF_ERROR(ChooseQuant());
  return SetupAttention();
}

// Shard sizes (the CPU backend's Megatron split) and the communicator.
absl::Status CudaBackend::Impl::SetupShard(const ModelConfig& cfg, const Shard& sh) {
  const int32_t tp = sh.size, rank = sh.rank;
  if (tp < 1 || rank < 0 || rank >= tp) return absl::InvalidArgumentError("bad shard");
  const int32_t D = cfg.head_dim, nq = cfg.num_heads, nkv = cfg.num_kv_heads,
                I = cfg.intermediate_size, V = cfg.vocab_size;
  if (cfg.hidden_size <= 0 || D <= 0 || nq <= 0 || nkv <= 0 || I <= 0 || V <= 0 ||
      cfg.num_layers <= 0) {
    return absl::InvalidArgumentError("model config has non-positive sizes");
  }
  if (D % 2 != 0) return absl::InvalidArgumentError("head_dim must be even (RoPE)");
  if (nq % nkv != 0) {
    return absl::InvalidArgumentError("num_key_value_heads does not divide num_attention_heads");
  }
  absl::StatusOr<engine::ShardLayout> layout = engine::ComputeShardLayout(cfg, sh);
  if (!layout.ok()) return layout.status();
  q_heads = layout->q_heads;
  kv_heads = layout->kv_heads;
  kv_head_begin = layout->kv_head_begin;
  inter = layout->inter;
  vocab_pad = layout->vocab_pad;
  vocab_begin = layout->vocab_begin;
  vocab_local = layout->vocab_local;

  if (comm == nullptr && !sh.whole()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cuda backend without a communicator loads the whole model (Shard{}), not rank ", rank,
        " of ", tp));
  }
  if (comm != nullptr) {
    if (comm->size() != tp || comm->rank() != rank) {
      return absl::InvalidArgumentError(absl::StrCat(
          "shard rank ", rank, " of ", tp, " does not match the NCCL communicator's rank ",
          comm->rank(), " of ", comm->size()));
    }
    if (comm->device() != device) {
      return absl::InvalidArgumentError("NCCL communicator is on another device");
    }
    nccl = comm;
  }
  return absl::OkStatus();
}

// Device, stream, cuBLAS; graphs reset (a new load replaces what they point at).
absl::Status CudaBackend::Impl::SetupDevice() {
  const int32_t tp = shard.size, rank = shard.rank;
  SP_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  if (stream == nullptr) {
    SP_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  }
  // A new load replaces the weights and buffers that graphs point at. With tensor
  // parallelism every step has NCCL collectives, which are not captured: no graphs.
  ResetGraphs();
  graphs_allowed = cuda_options.graphs && tp == 1;
  if (cuda_options.graphs && tp > 1 && rank == 0) {
    spdlog::info("CUDA graphs: off with tensor parallelism (tp={})", tp);
  }
  if (cublas == nullptr) {
    SP_CUBLAS_RETURN_IF_ERROR(cublasCreate(&cublas));
    SP_CUBLAS_RETURN_IF_ERROR(cublasSetStream(cublas, stream));
    // A workspace of our own, so that cuBLAS never allocates in the middle of a step.
    SP_RETURN_IF_ERROR(cublas_workspace.Allocate(kCublasWorkspace));
    SP_CUBLAS_RETURN_IF_ERROR(
        cublasSetWorkspace(cublas, cublas_workspace.get(), cublas_workspace.size()));
  }
  SP_CUDA_RETURN_IF_ERROR(LoadKernels());
  SP_CUDA_RETURN_IF_ERROR(LoadLazyKernels());
  if (nccl != nullptr) nccl->set_stream(stream);

  return absl::OkStatus();
}

// Prefill and decode attention kernels for this model's head_dim and group.
absl::Status CudaBackend::Impl::SetupAttention() {
  const int32_t D = config.head_dim;
  // Attention tile: as many query tokens per block as keep tokens x group <= 64 rows
  // and fit the device's shared memory.
  int smem_optin = 0;
  SP_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int32_t G = q_heads / kv_heads;
  const CudaAttention mode = cuda_options.attention;
  const bool tc_ok =
      TcAttentionSupported(D, G) && TcAttentionSharedBytesFor(D) <= static_cast<size_t>(smem_optin);
  if (mode == CudaAttention::kTensorCore && !tc_ok) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--cuda_attention=tensor_core needs head_dim a multiple of 16 up to ", kTcMaxHeadDim,
        " and at most ", kTcRows, " query heads per kv head (head_dim ", D, ", group ", G, ")"));
  }
  tc_attention = mode != CudaAttention::kSimt && tc_ok;
  if (tc_attention) SP_CUDA_RETURN_IF_ERROR(PrepareTcAttention(D));
  attn_tile = std::max(1, std::min(16, 64 / G));
  while (attn_tile > 1 &&
         AttentionSharedBytes(attn_tile * G, D) > static_cast<size_t>(smem_optin)) {
    attn_tile /= 2;
  }
  const size_t smem = AttentionSharedBytes(attn_tile * G, D);
  if (smem > static_cast<size_t>(smem_optin)) {
    return absl::InvalidArgumentError(absl::StrCat("attention needs ", smem,
                                                   " bytes of shared memory for head_dim ", D,
                                                   ", the device has ", smem_optin));
  }
  SP_CUDA_RETURN_IF_ERROR(PrepareAttention(smem));
  // Split-K decode (tiles of one token: G query rows).
  SP_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  split_decode = cuda_options.split_decode && sm_count > 1;
  if (split_decode) SP_CUDA_RETURN_IF_ERROR(PrepareSplitAttention(AttentionSharedBytes(G, D)));
  // Tensor cores: prefill tiles of 64 / G tokens (64 query rows, 16 per warp); decode
  // steps (tiles of one token) keep the SIMT kernel.
  if (tc_attention) attn_tile = kTcRows / G;
  if (shard.rank == 0) {
    spdlog::info("CUDA attention: prefill on {} ({} tokens per tile), decode on simt",
                 tc_attention ? "tensor cores" : "simt", attn_tile);
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Impl::AllocateWeights() {
  const int32_t H = config.hidden_size, D = config.head_dim;
  const size_t qkv_rows = static_cast<size_t>(q_heads + 2 * kv_heads) * D;
  SP_RETURN_IF_ERROR(embed.Allocate(static_cast<size_t>(vocab_pad) * H));
  SP_CUDA_RETURN_IF_ERROR(cudaMemset(embed.get(), 0, embed.size() * sizeof(bf16)));
  lm_head.Reset();
  if (!config.tie_word_embeddings && !QuantHead()) {
    SP_RETURN_IF_ERROR(lm_head.Allocate(static_cast<size_t>(vocab_pad) * H));
    SP_CUDA_RETURN_IF_ERROR(cudaMemset(lm_head.get(), 0, lm_head.size() * sizeof(bf16)));
  }
  SP_RETURN_IF_ERROR(final_norm.Allocate(H));
  layers.clear();
  layers.resize(config.num_layers);
  for (int32_t l = 0; l < config.num_layers; ++l) {
    if (!OwnsWeights(l)) continue;  // computes with another layer's (layer_weight_map)
    Layer& L = layers[l];
    SP_RETURN_IF_ERROR(L.attn_norm.Allocate(H));
    SP_RETURN_IF_ERROR(L.mlp_norm.Allocate(H));
    if (config.attention_bias) SP_RETURN_IF_ERROR(L.bqkv.Allocate(qkv_rows));
    if (config.qk_norm) {
      SP_RETURN_IF_ERROR(L.q_norm.Allocate(D));
      SP_RETURN_IF_ERROR(L.k_norm.Allocate(D));
    }
    if (quant != engine::WeightQuant::kNone) continue;  // cuda_quant.cc's DeviceQuant
    SP_RETURN_IF_ERROR(L.wqkv.Allocate(qkv_rows * H));
    SP_RETURN_IF_ERROR(L.wo.Allocate(static_cast<size_t>(H) * q_heads * D));
    SP_RETURN_IF_ERROR(L.wgate_up.Allocate(static_cast<size_t>(2) * inter * H));
    SP_RETURN_IF_ERROR(L.wdown.Allocate(static_cast<size_t>(H) * inter));
  }
  SP_RETURN_IF_ERROR(AllocateQuantScratch());
  SP_RETURN_IF_ERROR(UploadF32(engine::RopeInvFreq(config), &inv_freq));
  // The memsets and copies above ran on the legacy default stream (asynchronously for
  // device memory); later work runs on `stream`, which does not wait for it.
  SP_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  return absl::OkStatus();
}

// Every tensor through the shared sharded reader (engine/shard_weights.h), uploaded as
// bf16 (norms and biases as float32).
absl::Status CudaBackend::Impl::ReadWeights(const WeightSource& weights) {
  absl::StatusOr<engine::ShardedWeightReader> reader =
      engine::ShardedWeightReader::Create(config, weights, shard);
  if (!reader.ok()) return reader.status();
  const size_t H = config.hidden_size;
  std::vector<float> buf(static_cast<size_t>(vocab_local) * H);
  SP_RETURN_IF_ERROR(reader->Embedding(buf.data()));
  SP_RETURN_IF_ERROR(UploadBf16(buf.data(), buf.size(), embed.get()));
  if (!lm_head.empty()) {
    SP_RETURN_IF_ERROR(reader->LmHead(buf.data()));
    SP_RETURN_IF_ERROR(UploadBf16(buf.data(), buf.size(), lm_head.get()));
  }
  std::vector<float> norm(H);
  SP_RETURN_IF_ERROR(reader->FinalNorm(norm.data()));
  SP_RETURN_IF_ERROR(UploadF32(norm, &final_norm));
  for (int32_t l = 0; l < config.num_layers; ++l) {
    if (OwnsWeights(l)) SP_RETURN_IF_ERROR(ReadLayer(*reader, l, buf));
  }
  if (quant != engine::WeightQuant::kNone) SP_RETURN_IF_ERROR(ReadQuantWeights(weights));
  // Pageable cudaMemcpy may return before its DMA is done: finish before `stream` work.
  SP_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  return absl::OkStatus();
}

absl::Status CudaBackend::Impl::ReadLayer(const engine::ShardedWeightReader& reader, int32_t l,
                                          std::vector<float>& buf) {
  Layer& L = layers[l];
  const size_t H = config.hidden_size, D = config.head_dim;
  // A float32 tensor of n values, uploaded to dst.
  auto vec = [&](absl::Status (engine::ShardedWeightReader::*read)(int32_t, float*) const, size_t n,
                 DeviceArray<float>* dst) -> absl::Status {
    std::vector<float> v(n);
    SP_RETURN_IF_ERROR((reader.*read)(l, v.data()));
    return UploadF32(v, dst);
  };
  // A matrix of n values, uploaded as bf16 to dst.
  auto mat = [&](absl::Status (engine::ShardedWeightReader::*read)(int32_t, float*) const,
                 const DeviceArray<bf16>& dst) -> absl::Status {
    if (dst.empty()) return absl::OkStatus();  // quantized (ReadQuantWeights)
    buf.resize(dst.size());
    SP_RETURN_IF_ERROR((reader.*read)(l, buf.data()));
    return UploadBf16(buf.data(), buf.size(), dst.get());
  };
  using R = engine::ShardedWeightReader;
  SP_RETURN_IF_ERROR(vec(&R::AttnNorm, H, &L.attn_norm));
  SP_RETURN_IF_ERROR(vec(&R::MlpNorm, H, &L.mlp_norm));
  SP_RETURN_IF_ERROR(mat(&R::Qkv, L.wqkv));
  if (config.attention_bias) {
    SP_RETURN_IF_ERROR(vec(&R::QkvBias, static_cast<size_t>(reader.qkv_rows()), &L.bqkv));
  }
  if (config.qk_norm) {
    SP_RETURN_IF_ERROR(vec(&R::QNorm, D, &L.q_norm));
    SP_RETURN_IF_ERROR(vec(&R::KNorm, D, &L.k_norm));
  }
  SP_RETURN_IF_ERROR(mat(&R::O, L.wo));
  SP_RETURN_IF_ERROR(mat(&R::GateUp, L.wgate_up));
  return mat(&R::Down, L.wdown);
}

absl::Status CudaBackend::Impl::FillRandom(uint64_t seed, float scale) {
  uint64_t n = 0;
  auto rnd = [&](DeviceArray<bf16>& a) -> absl::Status {
    if (a.empty()) return absl::OkStatus();  // quantized (FillQuantRandom)
    SP_CUDA_RETURN_IF_ERROR(LaunchFillRandom(a.get(), static_cast<int64_t>(a.size()),
                                             seed * 1000003 + ++n, scale, stream));
    return absl::OkStatus();
  };
  auto one = [&](DeviceArray<float>& a) -> absl::Status {
    SP_CUDA_RETURN_IF_ERROR(LaunchFillF32(a.get(), static_cast<int64_t>(a.size()), 1.0f, stream));
    return absl::OkStatus();
  };
  SP_RETURN_IF_ERROR(rnd(embed));
  SP_RETURN_IF_ERROR(rnd(lm_head));
  SP_RETURN_IF_ERROR(FillQuantRandom(seed, scale));
  SP_RETURN_IF_ERROR(one(final_norm));
  for (int32_t l = 0; l < config.num_layers; ++l) {
    if (!OwnsWeights(l)) continue;
    Layer& L = layers[l];
    SP_RETURN_IF_ERROR(one(L.attn_norm));
    SP_RETURN_IF_ERROR(one(L.mlp_norm));
    SP_RETURN_IF_ERROR(rnd(L.wqkv));
    if (!L.bqkv.empty()) {
      SP_CUDA_RETURN_IF_ERROR(
          LaunchFillF32(L.bqkv.get(), static_cast<int64_t>(L.bqkv.size()), 0.0f, stream));
    }
    if (!L.q_norm.empty()) SP_RETURN_IF_ERROR(one(L.q_norm));
    if (!L.k_norm.empty()) SP_RETURN_IF_ERROR(one(L.k_norm));
    SP_RETURN_IF_ERROR(rnd(L.wo));
    SP_RETURN_IF_ERROR(rnd(L.wgate_up));
    SP_RETURN_IF_ERROR(rnd(L.wdown));
  }
  SP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  return absl::OkStatus();
}

int64_t CudaBackend::Impl::WeightBytes() const {
  int64_t n = QuantWeightBytes() + static_cast<int64_t>(embed.size() + lm_head.size()) * 2 +
              static_cast<int64_t>(final_norm.size()) * 4;
  for (const Layer& L : layers) {
    n += static_cast<int64_t>(L.wqkv.size() + L.wo.size() + L.wgate_up.size() + L.wdown.size()) * 2;
    n += static_cast<int64_t>(L.attn_norm.size() + L.mlp_norm.size() + L.bqkv.size() +
                              L.q_norm.size() + L.k_norm.size()) *
         4;
  }
  return n;
}

}  // namespace superpose::cuda
