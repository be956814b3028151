#include "cuda/cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cuda/attention_body.h"
#include "cuda/attention_tc_body.h"
#include "cuda/cuda_util.h"
#include "cuda/kernels.h"
#include "cuda/nccl_communicator.h"
#include "cuda/step_meta.h"
#include "cuda/top_logits_body.h"
#include "engine/model/weights.h"
#include "engine/tensor_parallel.h"
#include "engine/util/status.h"
#include "spdlog/spdlog.h"

namespace superpose::cuda {

static_assert(kTopMax == engine::kMaxTopLogits, "compact rows: one bound for engine and kernel");

using engine::BatchPlan;
using engine::ForwardOutput;
using engine::KvPoolInfo;
using engine::ModelConfig;
using engine::Shard;
using engine::WeightSource;

int32_t CudaDeviceCount(std::string* error) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    if (error != nullptr) *error = cudaGetErrorString(e);
    return 0;
  }
  if (n == 0 && error != nullptr) *error = "no CUDA device";
  return n;
}

absl::Status GemmBf16(cublasHandle_t handle, const bf16* x, int32_t rows, int32_t in, const bf16* w,
                      int32_t out, float* y) {
  if (rows <= 0 || out <= 0) return absl::OkStatus();
  const float alpha = 1.0f, beta = 0.0f;
  // Column-major view: Y^T [out, rows] = W [in, out]^T * X^T [in, rows].
  SP_CUBLAS_RETURN_IF_ERROR(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in, &alpha, w,
                                         CUDA_R_16BF, in, x, CUDA_R_16BF, in, &beta, y, CUDA_R_32F,
                                         out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return absl::OkStatus();
}

absl::Status UploadBf16(const float* src, size_t n, bf16* dst) {
  if (n == 0) return absl::OkStatus();
  constexpr size_t kChunk = size_t{1} << 24;
  std::vector<uint16_t> tmp(std::min(n, kChunk));
  for (size_t off = 0; off < n; off += kChunk) {
    const size_t m = std::min(kChunk, n - off);
    for (size_t i = 0; i < m; ++i) tmp[i] = engine::F32ToBf16(src[off + i]);
    SP_CUDA_RETURN_IF_ERROR(
        cudaMemcpy(dst + off, tmp.data(), m * sizeof(uint16_t), cudaMemcpyHostToDevice));
  }
  return absl::OkStatus();
}

namespace {

absl::Status UploadF32(const std::vector<float>& src, DeviceArray<float>* dst) {
  SP_RETURN_IF_ERROR(dst->Allocate(src.size()));
  if (src.empty()) return absl::OkStatus();
  SP_CUDA_RETURN_IF_ERROR(
      cudaMemcpy(dst->get(), src.data(), src.size() * sizeof(float), cudaMemcpyHostToDevice));
  return absl::OkStatus();
}

// Workspace kept free of the KV pool when it is sized by a memory fraction.
constexpr int64_t kWorkspaceReserve = int64_t{1} << 30;
// cuBLAS workspace (NVIDIA recommends 32 MiB on Hopper).
constexpr size_t kCublasWorkspace = size_t{32} << 20;

// CUDA graphs of decode steps: one per batch size 1..kGraphMaxBatch, captured lazily.
constexpr int32_t kGraphMaxBatch = 64;
// Keys (cached tokens of all sequences of a step) the graphs' metadata buffer holds at
// first; it grows by 1.5x, and every graph is recaptured when it does.
constexpr size_t kGraphInitialKeys = size_t{1} << 16;
// No new graph is captured once the graph buffers and the instantiated graphs hold this
// much device memory (a part of kWorkspaceReserve).
constexpr int64_t kGraphMemoryBudget = int64_t{512} << 20;
// Rows of one LM-head GEMM in eager steps (128 MB of float32 logits at a 128k vocabulary).
constexpr int32_t kLogitsChunkRows = 256;

}  // namespace

struct CudaBackend::Impl {
  struct Layer {
    DeviceArray<float> attn_norm, mlp_norm, bqkv, q_norm, k_norm;
    DeviceArray<bf16> wqkv, wo, wgate_up, wdown;
  };
  // Activations of a step's T tokens ([T, ...] each).
  struct Activations {
    DeviceArray<float> x, qkv, q, proj, gu;
    DeviceArray<bf16> h, attn, act;
    void Reset() {
      for (auto* a : {&x, &qkv, &q, &proj, &gu}) a->Reset();
      for (auto* a : {&h, &attn, &act}) a->Reset();
    }
    int64_t bytes() const {
      return static_cast<int64_t>(x.size() + qkv.size() + q.size() + proj.size() + gu.size()) * 4 +
             static_cast<int64_t>(h.size() + attn.size() + act.size()) * 2;
    }
  };
  // Device pointers to a step's uploaded metadata.
  struct StepInputs {
    const int32_t* tokens = nullptr;
    const float* pos = nullptr;
    const int32_t* slots = nullptr;
    const int32_t* keys = nullptr;
    const AttnTile* tiles = nullptr;
    int32_t num_tiles = 0;
    int32_t tile_tokens = 1;
  };
  struct DecodeGraph {
    cudaGraphExec_t exec = nullptr;
    int64_t bytes = 0;  // device memory the instantiation took (estimate)
    bool warm = false;  // a decode step of this size ran eagerly (its kernels are loaded)
  };

  engine::BackendOptions options;
  CudaOptions cuda_options;
  NcclCommunicator* comm = nullptr;  // this rank's, with tensor parallelism
  int32_t device = 0;
  ModelConfig config;
  Shard shard;
  int32_t q_heads = 0, kv_heads = 0, kv_head_begin = 0, inter = 0;
  int32_t vocab_begin = 0, vocab_local = 0, vocab_pad = 0;
  int32_t attn_tile = 1;
  int sm_count = 0;
  bool split_decode = false;
  DeviceArray<float> split_ws;  // split-K partials (SplitWorkspaceFloats)
  // Splits of a step's decode attention: 1 (no split) unless every tile is one token
  // and there are fewer (tile, kv head) blocks than SMs; then enough for about two
  // blocks per SM. Depends on the tile count only (graphs = eager).
  int32_t DecodeSplits(int32_t num_tiles, int32_t tile_tokens) const {
    if (!split_decode || tile_tokens != 1 || num_tiles <= 0) return 1;
    const int64_t blocks = static_cast<int64_t>(num_tiles) * kv_heads;
    if (blocks >= sm_count) return 1;
    return static_cast<int32_t>(
        std::min<int64_t>(kMaxSplits, (2 * static_cast<int64_t>(sm_count) + blocks - 1) / blocks));
  }
  // Bounds what DecodeSplits asks for: blocks * splits < 2 * SMs + blocks < 3 * SMs.
  size_t SplitWorkspaceFloats() const {
    return 3 * static_cast<size_t>(sm_count) *
           SplitPartialFloats(q_heads / kv_heads, config.head_dim);
  }
  bool tc_attention = false;  // prefill steps (tiles of > 1 token) on tensor cores
  bool loaded = false;

  DeviceArray<bf16> embed, lm_head;  // [vocab_pad, H]; lm_head empty when tied
  DeviceArray<float> final_norm, inv_freq;
  std::vector<Layer> layers;
  KvPoolInfo kv_info;
  DeviceArray<bf16> k_cache, v_cache;  // [layer][block][slot][kv_head][D]

  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  DeviceArray<char> cublas_workspace;
  NcclCommunicator* nccl = nullptr;

  // Per-step buffers of eager steps (grown on demand).
  Activations eager;
  DeviceArray<float> local, gathered, logits, lp_out;
  DeviceArray<bf16> hn;
  DeviceArray<int32_t> meta;
  PinnedArray<int32_t> meta_host;
  // Compact logits rows: [rows, ns] in, [C][kTopMax] ids and logits and [C] lse out.
  DeviceArray<int32_t> top_meta, top_id, lp_meta;
  PinnedArray<int32_t> lp_meta_host;  // log-prob rows (relative to their chunk), targets
  DeviceArray<float> top_logit, top_lse;
  PinnedArray<int32_t> top_meta_host, top_host;  // top_host: ids, then logits, then lse
  // Sampled rows: [RowSampling (8 words) x S | local rows x S] in, [tokens | logits] out.
  DeviceArray<int32_t> samp_meta, samp_out;
  PinnedArray<int32_t> samp_meta_host, samp_host;

  // CUDA graphs of decode steps. A graph bakes in the pointers of the buffers below,
  // which are allocated once for kGraphMaxBatch tokens (gmeta grows, dropping every
  // graph), and of the weights, the KV pool, inv_freq and the cuBLAS workspace.
  bool graphs_allowed = false;  // options.cuda_graphs and tp = 1 (set by Setup)
  bool graphs_on = true;        // set_cuda_graphs
  bool graphs_failed = false;   // a capture, instantiation or launch failed (warned once)
  bool graphs_budget_warned = false;
  std::array<DecodeGraph, kGraphMaxBatch + 1> graphs;  // by batch size
  Activations gact;
  DeviceArray<float> glocal;   // [kGraphMaxBatch, V] logits
  DeviceArray<int32_t> gmeta;  // the decode layout (cuda/step_meta.h)
  PinnedArray<int32_t> gmeta_host;
  int64_t graph_captures = 0, graph_replays = 0, graph_invalidations = 0;

  ~Impl() {
    int prev = -1;
    cudaGetDevice(&prev);
    cudaSetDevice(device);
    if (stream != nullptr) cudaStreamSynchronize(stream);
    // Graphs first (they reference the buffers), then device memory with this device
    // current, then the handles.
    DestroyGraphs();
    gact.Reset();
    glocal.Reset();
    gmeta.Reset();
    gmeta_host.Reset();
    layers.clear();
    embed.Reset();
    lm_head.Reset();
    final_norm.Reset();
    inv_freq.Reset();
    k_cache.Reset();
    v_cache.Reset();
    split_ws.Reset();
    eager.Reset();
    for (auto* a : {&local, &gathered, &logits, &lp_out}) a->Reset();
    hn.Reset();
    meta.Reset();
    meta_host.Reset();
    top_meta.Reset();
    lp_meta.Reset();
    lp_meta_host.Reset();
    top_id.Reset();
    top_logit.Reset();
    top_lse.Reset();
    top_meta_host.Reset();
    samp_meta.Reset();
    samp_out.Reset();
    samp_meta_host.Reset();
    samp_host.Reset();
    top_host.Reset();
    if (cublas != nullptr) cublasDestroy(cublas);
    cublas_workspace.Reset();
    if (stream != nullptr) cudaStreamDestroy(stream);
    if (prev >= 0) cudaSetDevice(prev);
  }

  absl::Status Setup(const ModelConfig& cfg, const Shard& sh);
  absl::Status AllocateWeights();
  absl::Status ReadWeights(const WeightSource& w);
  absl::Status FillRandom(uint64_t seed, float scale);
  absl::Status Finish();
  absl::Status AllReduce(float* data, int64_t count) {
    if (shard.size == 1) return absl::OkStatus();
    return nccl->AllReduceSum(data, count);
  }
  absl::Status Forward(const BatchPlan& plan, ForwardOutput* out);
  absl::Status ForwardEager(const BatchPlan& plan, const StepMeta& sm, ForwardOutput* out);
  // Reserves `a` for T tokens.
  absl::Status ReserveActivations(Activations& a, size_t T);
  // Enqueues embedding, every layer and the final norm of T tokens (into a.h): no
  // synchronization, no allocation, launch parameters from T and the model alone, so
  // that it can be captured into a graph.
  absl::Status EnqueueLayers(const Activations& a, const StepInputs& in, int32_t T);

  // ---- CUDA graphs of decode steps. ----
  bool GraphEligible(const BatchPlan& plan, const StepMeta& sm) const;
  // Runs a decode step through its graph (capturing it first when needed): true when
  // done; false when the step must run eagerly (first step of its size, memory budget,
  // or a failure, which switches graphs off with one warning). Errors are those of the
  // step itself (copies, synchronization).
  absl::StatusOr<bool> ForwardGraph(const BatchPlan& plan, const StepMeta& sm, ForwardOutput* out);
  // Compact logits rows: buffers for `compact` rows (before any step work is queued).
  absl::Status ReserveTop(size_t compact);
  // The copies of plan.logits_for's rows to the host. BeginLogits sizes out->logits and
  // uploads the compact rows' metadata; row i of logits_for will be row local_row[i] of
  // the device buffer given for it to EnqueueLogitsRange, which queues the copies of
  // whole rows (to out->logits) and the compact-row kernel for entries [i0, i1);
  // EndLogits queues the copy of the compact results to pinned memory, and UnpackTop
  // moves them into out->top / top_lse once the stream is synchronized.
  absl::Status BeginLogits(const BatchPlan& plan, std::vector<int32_t> local_row,
                           ForwardOutput* out);
  absl::Status EnqueueLogitsRange(const BatchPlan& plan, const float* dev, size_t i0, size_t i1,
                                  ForwardOutput* out);
  absl::Status EndLogits();
  void UnpackTop(const BatchPlan& plan, ForwardOutput* out) const;
  struct LogitsCopy {
    std::vector<int32_t> local_row;  // per logits_for entry
    std::vector<int64_t> slot;       // whole: row in out->logits; compact: compact index
    std::vector<int64_t> sampled;    // index among the sampled rows, or -1
    size_t compact = 0, num_sampled = 0;
  } lc;
  bool Sampled(const BatchPlan& plan, size_t i) const {
    return !plan.sampling.empty() && plan.sampling[i].temperature > 0.0f;
  }
  bool Compact(const BatchPlan& plan, size_t i) const {
    return !plan.logits_top.empty() && plan.logits_top[i] > 0;
  }
  absl::Status EnsureGraphBuffers(size_t meta_words);
  absl::Status CaptureGraph(int32_t B);
  // Destroys every graph (the stream must be idle); the buffers stay.
  void DestroyGraphs() {
    for (DecodeGraph& g : graphs) {
      if (g.exec != nullptr) cudaGraphExecDestroy(g.exec);
      g.exec = nullptr;
      g.bytes = 0;
    }
  }
  // Graphs, buffers and counters back to the state of a fresh backend (Setup).
  void ResetGraphs() {
    if (stream != nullptr) cudaStreamSynchronize(stream);
    DestroyGraphs();
    for (DecodeGraph& g : graphs) g.warm = false;
    gact.Reset();
    glocal.Reset();
    gmeta.Reset();
    graphs_failed = false;
    graphs_budget_warned = false;
  }
  void DisableGraphs(const absl::Status& why) {
    if (!graphs_failed) {
      spdlog::warn("CUDA graphs: {}; decode steps launch their kernels one by one from now on",
                   why.ToString());
    }
    graphs_failed = true;
    cudaGetLastError();
    if (stream != nullptr) cudaStreamSynchronize(stream);
    DestroyGraphs();
    gact.Reset();
    glocal.Reset();
    gmeta.Reset();
  }
  int64_t GraphBytes() const {
    int64_t n = gact.bytes() + static_cast<int64_t>(glocal.size()) * 4 +
                static_cast<int64_t>(gmeta.size()) * 4;
    for (const DecodeGraph& g : graphs) n += g.bytes;
    return n;
  }
  int64_t WeightBytes() const {
    int64_t n = static_cast<int64_t>(embed.size() + lm_head.size()) * 2 +
                static_cast<int64_t>(final_norm.size()) * 4;
    for (const Layer& L : layers) {
      n += static_cast<int64_t>(L.wqkv.size() + L.wo.size() + L.wgate_up.size() + L.wdown.size()) *
           2;
      n += static_cast<int64_t>(L.attn_norm.size() + L.mlp_norm.size() + L.bqkv.size() +
                                L.q_norm.size() + L.k_norm.size()) *
           4;
    }
    return n;
  }
};

// Shard sizes (the CPU backend's Megatron split), stream, cuBLAS, communicator.
absl::Status CudaBackend::Impl::Setup(const ModelConfig& cfg, const Shard& sh) {
  config = cfg;
  shard = sh;
  loaded = false;
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
  if (nccl != nullptr) nccl->set_stream(stream);

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
  if (rank == 0) {
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
  if (!config.tie_word_embeddings) {
    SP_RETURN_IF_ERROR(lm_head.Allocate(static_cast<size_t>(vocab_pad) * H));
    SP_CUDA_RETURN_IF_ERROR(cudaMemset(lm_head.get(), 0, lm_head.size() * sizeof(bf16)));
  }
  SP_RETURN_IF_ERROR(final_norm.Allocate(H));
  layers.clear();
  layers.resize(config.num_layers);
  for (Layer& L : layers) {
    SP_RETURN_IF_ERROR(L.attn_norm.Allocate(H));
    SP_RETURN_IF_ERROR(L.mlp_norm.Allocate(H));
    SP_RETURN_IF_ERROR(L.wqkv.Allocate(qkv_rows * H));
    if (config.attention_bias) SP_RETURN_IF_ERROR(L.bqkv.Allocate(qkv_rows));
    if (config.qk_norm) {
      SP_RETURN_IF_ERROR(L.q_norm.Allocate(D));
      SP_RETURN_IF_ERROR(L.k_norm.Allocate(D));
    }
    SP_RETURN_IF_ERROR(L.wo.Allocate(static_cast<size_t>(H) * q_heads * D));
    SP_RETURN_IF_ERROR(L.wgate_up.Allocate(static_cast<size_t>(2) * inter * H));
    SP_RETURN_IF_ERROR(L.wdown.Allocate(static_cast<size_t>(H) * inter));
  }
  SP_RETURN_IF_ERROR(UploadF32(engine::RopeInvFreq(config), &inv_freq));
  // The memsets and copies above ran on the legacy default stream (asynchronously for
  // device memory); later work runs on `stream`, which does not wait for it.
  SP_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  return absl::OkStatus();
}

absl::Status CudaBackend::Impl::ReadWeights(const WeightSource& weights) {
  const int32_t H = config.hidden_size, D = config.head_dim, nq = config.num_heads,
                nkv = config.num_kv_heads, I = config.intermediate_size, V = config.vocab_size;
  const int32_t rank = shard.rank;
  std::vector<float> buf;
  // Reads block [r0, r1) x [c0, c1) of a 2-D tensor and uploads it as bf16 at dst.
  auto block = [&](const std::string& name, std::vector<int64_t> shape, int64_t r0, int64_t r1,
                   int64_t c0, int64_t c1, bf16* dst) -> absl::Status {
    buf.resize(static_cast<size_t>((r1 - r0) * (c1 - c0)));
    SP_RETURN_IF_ERROR(weights.ReadF32Block(name, shape, r0, r1, c0, c1, buf.data()));
    return UploadBf16(buf.data(), buf.size(), dst);
  };
  auto vec = [&](const std::string& name, int64_t n, DeviceArray<float>* dst) -> absl::Status {
    std::vector<float> v(static_cast<size_t>(n));
    SP_RETURN_IF_ERROR(weights.ReadF32(name, {n}, v.data()));
    return UploadF32(v, dst);
  };

  const std::vector<int64_t> emb_shape = {V, H};
  SP_RETURN_IF_ERROR(block("model.embed_tokens.weight", emb_shape, vocab_begin,
                           vocab_begin + vocab_local, 0, H, embed.get()));
  if (!config.tie_word_embeddings) {
    if (!weights.Has("lm_head.weight")) {
      return absl::NotFoundError(
          "tensor 'lm_head.weight' missing and tie_word_embeddings is false");
    }
    SP_RETURN_IF_ERROR(block("lm_head.weight", emb_shape, vocab_begin, vocab_begin + vocab_local, 0,
                             H, lm_head.get()));
  }
  SP_RETURN_IF_ERROR(vec("model.norm.weight", H, &final_norm));
  for (int32_t l = 0; l < config.num_layers; ++l) {
    Layer& L = layers[l];
    const std::string p = absl::StrCat("model.layers.", l, ".");
    SP_RETURN_IF_ERROR(vec(p + "input_layernorm.weight", H, &L.attn_norm));
    SP_RETURN_IF_ERROR(vec(p + "post_attention_layernorm.weight", H, &L.mlp_norm));
    const int64_t q0 = static_cast<int64_t>(rank) * q_heads * D, q1 = q0 + q_heads * D;
    const int64_t k0 = static_cast<int64_t>(kv_head_begin) * D, k1 = k0 + kv_heads * D;
    bf16* dst = L.wqkv.get();
    SP_RETURN_IF_ERROR(block(p + "self_attn.q_proj.weight", {nq * D, H}, q0, q1, 0, H, dst));
    dst += (q1 - q0) * H;
    SP_RETURN_IF_ERROR(block(p + "self_attn.k_proj.weight", {nkv * D, H}, k0, k1, 0, H, dst));
    dst += (k1 - k0) * H;
    SP_RETURN_IF_ERROR(block(p + "self_attn.v_proj.weight", {nkv * D, H}, k0, k1, 0, H, dst));
    if (config.attention_bias) {
      std::vector<float> b(static_cast<size_t>(q1 - q0 + 2 * (k1 - k0)));
      std::vector<float> full(static_cast<size_t>(nq) * D);
      SP_RETURN_IF_ERROR(weights.ReadF32(p + "self_attn.q_proj.bias", {nq * D}, full.data()));
      std::copy(full.begin() + q0, full.begin() + q1, b.begin());
      full.resize(static_cast<size_t>(nkv) * D);
      SP_RETURN_IF_ERROR(weights.ReadF32(p + "self_attn.k_proj.bias", {nkv * D}, full.data()));
      std::copy(full.begin() + k0, full.begin() + k1, b.begin() + (q1 - q0));
      SP_RETURN_IF_ERROR(weights.ReadF32(p + "self_attn.v_proj.bias", {nkv * D}, full.data()));
      std::copy(full.begin() + k0, full.begin() + k1, b.begin() + (q1 - q0) + (k1 - k0));
      SP_RETURN_IF_ERROR(UploadF32(b, &L.bqkv));
    }
    if (config.qk_norm) {
      SP_RETURN_IF_ERROR(vec(p + "self_attn.q_norm.weight", D, &L.q_norm));
      SP_RETURN_IF_ERROR(vec(p + "self_attn.k_norm.weight", D, &L.k_norm));
    }
    SP_RETURN_IF_ERROR(block(p + "self_attn.o_proj.weight", {H, nq * D}, 0, H, q0, q1, L.wo.get()));
    const int64_t i0 = static_cast<int64_t>(rank) * inter, i1 = i0 + inter;
    SP_RETURN_IF_ERROR(block(p + "mlp.gate_proj.weight", {I, H}, i0, i1, 0, H, L.wgate_up.get()));
    SP_RETURN_IF_ERROR(block(p + "mlp.up_proj.weight", {I, H}, i0, i1, 0, H,
                             L.wgate_up.get() + static_cast<size_t>(inter) * H));
    SP_RETURN_IF_ERROR(block(p + "mlp.down_proj.weight", {H, I}, 0, H, i0, i1, L.wdown.get()));
  }
  // Pageable cudaMemcpy may return before its DMA is done: finish before `stream` work.
  SP_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  return absl::OkStatus();
}

absl::Status CudaBackend::Impl::FillRandom(uint64_t seed, float scale) {
  uint64_t n = 0;
  auto rnd = [&](DeviceArray<bf16>& a) -> absl::Status {
    SP_CUDA_RETURN_IF_ERROR(LaunchFillRandom(a.get(), static_cast<int64_t>(a.size()),
                                             seed * 1000003 + ++n, scale, stream));
    return absl::OkStatus();
  };
  auto one = [&](DeviceArray<float>& a) -> absl::Status {
    SP_CUDA_RETURN_IF_ERROR(LaunchFillF32(a.get(), static_cast<int64_t>(a.size()), 1.0f, stream));
    return absl::OkStatus();
  };
  SP_RETURN_IF_ERROR(rnd(embed));
  if (!lm_head.empty()) SP_RETURN_IF_ERROR(rnd(lm_head));
  SP_RETURN_IF_ERROR(one(final_norm));
  for (Layer& L : layers) {
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

// KV pool (the same number of blocks on every rank).
absl::Status CudaBackend::Impl::Finish() {
  const int32_t D = config.head_dim;
  SP_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  const int32_t bs = options.kv_block_size > 0 ? options.kv_block_size : 16;
  const int64_t per_block = static_cast<int64_t>(config.num_layers) * bs * kv_heads * D * 2 *
                            static_cast<int64_t>(sizeof(bf16));
  int64_t blocks = options.kv_num_blocks;
  if (blocks <= 0 && options.device_memory_fraction > 0.0) {
    size_t free_b = 0, total_b = 0;
    SP_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_b, &total_b));
    const double budget = options.device_memory_fraction * static_cast<double>(total_b) -
                          static_cast<double>(total_b - free_b) -
                          static_cast<double>(kWorkspaceReserve);
    blocks = budget > 0 ? static_cast<int64_t>(budget / static_cast<double>(per_block)) : 0;
    if (shard.size > 1) {
      // Every rank must agree: take the smallest count (exact in float below 2^24). A
      // rank with no room still joins the all-gather (returning before it would leave
      // the other ranks waiting in it forever); every rank then fails below.
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
    }
    if (blocks < 1) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "device_memory_fraction ", options.device_memory_fraction, " leaves no room for the KV ",
          "cache (", free_b >> 20, " MiB free of ", total_b >> 20, " MiB after the weights)"));
    }
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

absl::Status CudaBackend::Impl::ReserveActivations(Activations& a, size_t T) {
  const size_t H = config.hidden_size, D = config.head_dim;
  const size_t qd = q_heads * D, qkv_w = qd + 2 * kv_heads * D;
  SP_RETURN_IF_ERROR(a.x.Reserve(T * H));
  SP_RETURN_IF_ERROR(a.h.Reserve(T * H));
  SP_RETURN_IF_ERROR(a.qkv.Reserve(T * qkv_w));
  SP_RETURN_IF_ERROR(a.q.Reserve(T * qd));
  SP_RETURN_IF_ERROR(a.attn.Reserve(T * qd));
  SP_RETURN_IF_ERROR(a.proj.Reserve(T * H));
  SP_RETURN_IF_ERROR(a.gu.Reserve(T * 2 * inter));
  SP_RETURN_IF_ERROR(a.act.Reserve(T * inter));
  return absl::OkStatus();
}

absl::Status CudaBackend::Impl::EnqueueLayers(const Activations& a, const StepInputs& in,
                                              int32_t T) {
  const int32_t H = config.hidden_size, D = config.head_dim, bs = kv_info.block_size;
  const int32_t qd = q_heads * D, kvd = kv_heads * D, qkv_w = qd + 2 * kvd;
  const float eps = config.rms_norm_eps;
  const int64_t rows_h = static_cast<int64_t>(T) * H;
  SP_CUDA_RETURN_IF_ERROR(
      LaunchEmbedding(in.tokens, T, embed.get(), vocab_begin, vocab_local, H, a.x.get(), stream));
  SP_RETURN_IF_ERROR(AllReduce(a.x.get(), rows_h));
  const size_t layer_elems = static_cast<size_t>(kv_info.num_blocks) * bs * kvd;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  for (int32_t l = 0; l < config.num_layers; ++l) {
    const Layer& L = layers[l];
    if (l == 0) {
      SP_CUDA_RETURN_IF_ERROR(
          LaunchAddRmsNorm(a.x.get(), nullptr, L.attn_norm.get(), T, H, eps, a.h.get(), stream));
    }
    SP_RETURN_IF_ERROR(GemmBf16(cublas, a.h.get(), T, H, L.wqkv.get(), qkv_w, a.qkv.get()));
    bf16* kl = k_cache.get() + static_cast<size_t>(l) * layer_elems;
    bf16* vl = v_cache.get() + static_cast<size_t>(l) * layer_elems;
    SP_CUDA_RETURN_IF_ERROR(LaunchQkvPost(
        a.qkv.get(), L.bqkv.empty() ? nullptr : L.bqkv.get(),
        L.q_norm.empty() ? nullptr : L.q_norm.get(), L.k_norm.empty() ? nullptr : L.k_norm.get(),
        in.pos, inv_freq.get(), in.slots, T, q_heads, kv_heads, D, eps, a.q.get(), kl, vl, stream));
    if (tc_attention && in.tile_tokens > 1) {
      SP_CUDA_RETURN_IF_ERROR(LaunchTcAttention(a.q.get(), kl, vl, in.keys, in.tiles, in.num_tiles,
                                                in.tile_tokens, q_heads, kv_heads, D, scale,
                                                a.attn.get(), stream));
    } else if (const int32_t nsplit = DecodeSplits(in.num_tiles, in.tile_tokens); nsplit > 1) {
      SP_CUDA_RETURN_IF_ERROR(LaunchSplitAttention(
          a.q.get(), kl, vl, in.keys, in.tiles, in.num_tiles, in.tile_tokens, q_heads, kv_heads, D,
          scale, nsplit, kSplitMinKeys, split_ws.get(), a.attn.get(), stream));
    } else {
      SP_CUDA_RETURN_IF_ERROR(LaunchAttention(a.q.get(), kl, vl, in.keys, in.tiles, in.num_tiles,
                                              in.tile_tokens, q_heads, kv_heads, D, scale,
                                              a.attn.get(), stream));
    }
    SP_RETURN_IF_ERROR(GemmBf16(cublas, a.attn.get(), T, qd, L.wo.get(), H, a.proj.get()));
    SP_RETURN_IF_ERROR(AllReduce(a.proj.get(), rows_h));
    SP_CUDA_RETURN_IF_ERROR(
        LaunchAddRmsNorm(a.x.get(), a.proj.get(), L.mlp_norm.get(), T, H, eps, a.h.get(), stream));
    SP_RETURN_IF_ERROR(GemmBf16(cublas, a.h.get(), T, H, L.wgate_up.get(), 2 * inter, a.gu.get()));
    SP_CUDA_RETURN_IF_ERROR(LaunchSwiGlu(a.gu.get(), T, inter, a.act.get(), stream));
    SP_RETURN_IF_ERROR(GemmBf16(cublas, a.act.get(), T, inter, L.wdown.get(), H, a.proj.get()));
    SP_RETURN_IF_ERROR(AllReduce(a.proj.get(), rows_h));
    // Residual add fused with the next norm (the final norm after the last layer).
    const float* next_norm =
        l + 1 < config.num_layers ? layers[l + 1].attn_norm.get() : final_norm.get();
    SP_CUDA_RETURN_IF_ERROR(
        LaunchAddRmsNorm(a.x.get(), a.proj.get(), next_norm, T, H, eps, a.h.get(), stream));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Impl::Forward(const BatchPlan& plan, ForwardOutput* out) {
  if (!loaded) return absl::FailedPreconditionError("cuda backend: Forward before Load");
  SP_RETURN_IF_ERROR(engine::ValidatePlan(plan, kv_info, config.vocab_size));
  out->logits.clear();
  out->logprobs.clear();
  out->top.clear();
  out->sampled.clear();
  out->sampled_logit.clear();
  out->top_lse.clear();
  if (plan.num_tokens() == 0) return absl::OkStatus();
  SP_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  if (!plan.sampling.empty() && !cuda_options.row_sampling) {
    for (const engine::RowSampling& r : plan.sampling) {
      if (r.temperature > 0.0f) {
        return absl::FailedPreconditionError("cuda backend: row sampling is off");
      }
    }
  }
  size_t compact = 0, sampled = 0;
  for (int32_t n : plan.logits_top) compact += n > 0;
  for (const engine::RowSampling& r : plan.sampling) sampled += r.temperature > 0.0f;
  SP_RETURN_IF_ERROR(ReserveTop(compact));
  if (sampled > 0) {
    constexpr size_t kWords = sizeof(engine::RowSampling) / sizeof(int32_t);
    SP_RETURN_IF_ERROR(samp_meta.Reserve((kWords + 1) * sampled));
    SP_RETURN_IF_ERROR(samp_meta_host.Reserve((kWords + 1) * sampled));
    SP_RETURN_IF_ERROR(samp_out.Reserve(2 * sampled));
    SP_RETURN_IF_ERROR(samp_host.Reserve(2 * sampled));
  }
  // Step metadata: tokens, positions, slots, keys, tiles, rows.
  absl::StatusOr<StepMeta> sm = BuildStepMeta(plan, kv_info.block_size, attn_tile);
  if (!sm.ok()) return sm.status();
  if (GraphEligible(plan, *sm)) {
    absl::StatusOr<bool> done = ForwardGraph(plan, *sm, out);
    if (!done.ok()) return done.status();
    if (*done) return absl::OkStatus();
    out->logits.clear();
    out->top.clear();
    out->sampled.clear();
    out->sampled_logit.clear();
    out->top_lse.clear();
  }
  return ForwardEager(plan, *sm, out);
}

absl::Status CudaBackend::Impl::ForwardEager(const BatchPlan& plan, const StepMeta& sm,
                                             ForwardOutput* out) {
  const int32_t V = config.vocab_size;
  const int32_t T = plan.num_tokens();
  const int32_t H = config.hidden_size;
  const std::vector<int32_t>& host = sm.words;
  const int32_t R = static_cast<int32_t>(sm.rows.size());
  const int32_t NL = sm.num_logprobs;

  // ---- Step metadata, one upload. ----
  // The pinned buffer is reused by the next step: every path below ends in a sync.
  SP_RETURN_IF_ERROR(meta_host.Reserve(host.size()));
  SP_RETURN_IF_ERROR(meta.Reserve(host.size()));
  std::memcpy(meta_host.get(), host.data(), host.size() * sizeof(int32_t));
  struct SyncOnExit {
    cudaStream_t s;
    ~SyncOnExit() { cudaStreamSynchronize(s); }
  } sync_on_exit{stream};
  SP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
      meta.get(), meta_host.get(), host.size() * sizeof(int32_t), cudaMemcpyHostToDevice, stream));
  StepInputs in;
  in.tokens = meta.get();
  in.pos = reinterpret_cast<const float*>(meta.get() + sm.off_pos);
  in.slots = meta.get() + sm.off_slots;
  in.keys = meta.get() + sm.off_keys;
  in.tiles = reinterpret_cast<const AttnTile*>(meta.get() + sm.off_tiles);
  in.num_tiles = sm.num_tiles;
  in.tile_tokens = sm.tile_tokens;
  const int32_t* d_rows = meta.get() + sm.off_rows;

  // ---- Buffers. ----
  SP_RETURN_IF_ERROR(ReserveActivations(eager, static_cast<size_t>(T)));
  // Logits buffers too: no cudaMalloc/cudaFree once this step's collectives are queued
  // (a device-synchronizing call between NCCL launches of different ranks can hang).
  // The logits rows go through the LM head in chunks of at most kLogitsChunkRows rows,
  // so that a scoring step of thousands of rows needs no more memory than that.
  const int32_t C = std::min(R, kLogitsChunkRows);
  const size_t Cs = static_cast<size_t>(C);
  const int32_t tp = shard.size;
  if (R > 0) {
    SP_RETURN_IF_ERROR(hn.Reserve(Cs * H));
    SP_RETURN_IF_ERROR(local.Reserve(Cs * vocab_pad));
    if (tp > 1) {
      SP_RETURN_IF_ERROR(logits.Reserve(Cs * V));
      SP_RETURN_IF_ERROR(gathered.Reserve(static_cast<size_t>(tp) * Cs * vocab_pad));
    }
    if (NL > 0) {
      SP_RETURN_IF_ERROR(lp_out.Reserve(NL));
      SP_RETURN_IF_ERROR(lp_meta.Reserve(2 * static_cast<size_t>(NL)));
      SP_RETURN_IF_ERROR(lp_meta_host.Reserve(2 * static_cast<size_t>(NL)));
    }
  }

  // ---- Layers. ----
  SP_RETURN_IF_ERROR(EnqueueLayers(eager, in, T));
  if (R == 0) {
    SP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    return absl::OkStatus();
  }

  // ---- Logits: gather rows, lm_head (vocabulary-parallel), all-gather, log-softmax,
  // chunk by chunk. Rows [0, nl) are plan.logits_for's; log-prob requests name rows. ----
  const size_t nl = plan.logits_for.size();
  const int32_t chunks = (R + C - 1) / C;
  std::vector<int32_t> local_row(nl);
  for (size_t i = 0; i < nl; ++i) local_row[i] = static_cast<int32_t>(i % Cs);
  SP_RETURN_IF_ERROR(BeginLogits(plan, std::move(local_row), out));
  // Log-prob requests grouped by chunk (stable), rows relative to their chunk.
  std::vector<int32_t> lp_begin(chunks + 1, 0), lp_order(NL);
  if (NL > 0) {
    const int32_t* lp_row = host.data() + sm.off_lp_row;
    const int32_t* lp_target = host.data() + sm.off_lp_target;
    for (int32_t i = 0; i < NL; ++i) ++lp_begin[lp_row[i] / C + 1];
    for (int32_t k = 0; k < chunks; ++k) lp_begin[k + 1] += lp_begin[k];
    std::vector<int32_t> fill(lp_begin.begin(), lp_begin.end() - 1);
    int32_t* m = lp_meta_host.get();
    for (int32_t i = 0; i < NL; ++i) {
      const int32_t j = fill[lp_row[i] / C]++;
      lp_order[j] = i;
      m[j] = lp_row[i] % C;
      m[NL + j] = lp_target[i];
    }
    SP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(lp_meta.get(), m,
                                            2 * static_cast<size_t>(NL) * sizeof(int32_t),
                                            cudaMemcpyHostToDevice, stream));
  }
  const bf16* head = lm_head.empty() ? embed.get() : lm_head.get();
  for (int32_t k = 0; k < chunks; ++k) {
    const int32_t r0 = k * C, Rc = std::min(C, R - r0);
    const size_t Rcs = static_cast<size_t>(Rc);
    SP_CUDA_RETURN_IF_ERROR(LaunchGatherRows(eager.h.get(), d_rows + r0, Rc, H, hn.get(), stream));
    SP_RETURN_IF_ERROR(GemmBf16(cublas, hn.get(), Rc, H, head, vocab_pad, local.get()));
    // [Rc, V] logits: this rank's own when tp = 1 (vocab_pad == V), else reassembled.
    const float* chunk_logits = tp == 1 ? local.get() : logits.get();
    if (tp > 1) {
      SP_RETURN_IF_ERROR(
          nccl->AllGather(local.get(), static_cast<int64_t>(Rcs) * vocab_pad, gathered.get()));
      for (int32_t rk = 0; rk < tp; ++rk) {
        const int32_t v0 = std::min(V, rk * vocab_pad), v1 = std::min(V, v0 + vocab_pad);
        if (v1 <= v0) continue;
        SP_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(
            logits.get() + v0, sizeof(float) * V,
            gathered.get() + static_cast<size_t>(rk) * Rcs * vocab_pad, sizeof(float) * vocab_pad,
            sizeof(float) * (v1 - v0), Rcs, cudaMemcpyDeviceToDevice, stream));
      }
    }
    const size_t i0 = std::min(nl, static_cast<size_t>(r0)),
                 i1 = std::min(nl, static_cast<size_t>(r0 + Rc));
    SP_RETURN_IF_ERROR(EnqueueLogitsRange(plan, chunk_logits, i0, i1, out));
    const int32_t n = lp_begin[k + 1] - lp_begin[k];
    if (n > 0) {
      SP_CUDA_RETURN_IF_ERROR(LaunchLogprobs(chunk_logits, V, lp_meta.get() + lp_begin[k],
                                             lp_meta.get() + NL + lp_begin[k], n,
                                             lp_out.get() + lp_begin[k], stream));
    }
  }
  SP_RETURN_IF_ERROR(EndLogits());
  std::vector<float> lp_grouped(NL);
  if (NL > 0) {
    SP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(lp_grouped.data(), lp_out.get(), NL * sizeof(float),
                                            cudaMemcpyDeviceToHost, stream));
  }
  SP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  UnpackTop(plan, out);
  out->logprobs.resize(NL);
  for (int32_t j = 0; j < NL; ++j) out->logprobs[lp_order[j]] = lp_grouped[j];
  return absl::OkStatus();
}

absl::Status CudaBackend::Impl::ReserveTop(size_t compact) {
  if (compact == 0) return absl::OkStatus();
  SP_RETURN_IF_ERROR(top_meta.Reserve(2 * compact));
  SP_RETURN_IF_ERROR(top_meta_host.Reserve(2 * compact));
  SP_RETURN_IF_ERROR(top_id.Reserve(compact * kTopMax));
  SP_RETURN_IF_ERROR(top_logit.Reserve(compact * kTopMax));
  SP_RETURN_IF_ERROR(top_lse.Reserve(compact));
  return top_host.Reserve(compact * (2 * kTopMax + 1));
}

absl::Status CudaBackend::Impl::BeginLogits(const BatchPlan& plan, std::vector<int32_t> local_row,
                                            ForwardOutput* out) {
  const int32_t V = config.vocab_size;
  const size_t nl = plan.logits_for.size();
  lc.local_row = std::move(local_row);
  lc.slot.assign(nl, -1);
  lc.sampled.assign(nl, -1);
  lc.compact = 0;
  lc.num_sampled = 0;
  size_t whole = 0;
  for (size_t i = 0; i < nl; ++i) {
    if (Sampled(plan, i)) lc.sampled[i] = static_cast<int64_t>(lc.num_sampled++);
    if (Compact(plan, i)) {
      lc.slot[i] = static_cast<int64_t>(lc.compact++);
    } else if (!Sampled(plan, i)) {
      lc.slot[i] = static_cast<int64_t>(whole++);
    }
  }
  out->logits.resize(whole * V);
  if (lc.num_sampled > 0) {
    // [params | local rows], uploaded once for every range.
    const size_t S = lc.num_sampled;
    constexpr size_t kWords = sizeof(engine::RowSampling) / sizeof(int32_t);
    int32_t* m = samp_meta_host.get();
    for (size_t i = 0; i < nl; ++i) {
      if (lc.sampled[i] < 0) continue;
      std::memcpy(m + static_cast<size_t>(lc.sampled[i]) * kWords, &plan.sampling[i],
                  sizeof(engine::RowSampling));
      m[kWords * S + static_cast<size_t>(lc.sampled[i])] = lc.local_row[i];
    }
    SP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(samp_meta.get(), m, (kWords + 1) * S * sizeof(int32_t),
                                            cudaMemcpyHostToDevice, stream));
  }
  if (lc.compact == 0) return absl::OkStatus();
  // [local rows | ns] of the compact rows, in order; uploaded once for every range.
  int32_t* m = top_meta_host.get();
  for (size_t i = 0; i < nl; ++i) {
    if (plan.logits_top.empty() || plan.logits_top[i] == 0) continue;
    m[lc.slot[i]] = lc.local_row[i];
    m[lc.compact + lc.slot[i]] = plan.logits_top[i];
  }
  SP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(top_meta.get(), m, 2 * lc.compact * sizeof(int32_t),
                                          cudaMemcpyHostToDevice, stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::Impl::EnqueueLogitsRange(const BatchPlan& plan, const float* dev,
                                                   size_t i0, size_t i1, ForwardOutput* out) {
  const int32_t V = config.vocab_size;
  auto whole = [&](size_t i) { return !Compact(plan, i) && !Sampled(plan, i); };
  // Whole rows: runs consecutive both on the device and in out->logits in one copy.
  for (size_t i = i0; i < i1;) {
    if (!whole(i)) {
      ++i;
      continue;
    }
    size_t j = i + 1;
    while (j < i1 && whole(j) && lc.local_row[j] == lc.local_row[j - 1] + 1) ++j;
    SP_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(out->logits.data() + static_cast<size_t>(lc.slot[i]) * V,
                        dev + static_cast<size_t>(lc.local_row[i]) * V, (j - i) * V * sizeof(float),
                        cudaMemcpyDeviceToHost, stream));
    i = j;
  }
  // Sampled rows of the range: consecutive sampled indices [s0, s1).
  int64_t s0 = -1, s1 = -1;
  for (size_t i = i0; i < i1; ++i) {
    if (lc.sampled[i] < 0) continue;
    if (s0 < 0) s0 = lc.sampled[i];
    s1 = lc.sampled[i] + 1;
  }
  if (s0 >= 0) {
    const size_t S = lc.num_sampled, a = static_cast<size_t>(s0);
    constexpr size_t kWords = sizeof(engine::RowSampling) / sizeof(int32_t);
    SP_CUDA_RETURN_IF_ERROR(
        LaunchSampleRows(dev, V, samp_meta.get() + kWords * S + a,
                         reinterpret_cast<const engine::RowSampling*>(samp_meta.get()) + a,
                         static_cast<int32_t>(s1 - s0), samp_out.get() + a,
                         reinterpret_cast<float*>(samp_out.get() + S) + a, stream));
  }
  // Compact rows of the range: consecutive compact indices [c0, c1).
  int64_t c0 = -1, c1 = -1;
  for (size_t i = i0; i < i1; ++i) {
    if (!Compact(plan, i)) continue;
    if (c0 < 0) c0 = lc.slot[i];
    c1 = lc.slot[i] + 1;
  }
  if (c0 < 0) return absl::OkStatus();
  const size_t c = static_cast<size_t>(c0);
  SP_CUDA_RETURN_IF_ERROR(LaunchTopLogits(
      dev, V, top_meta.get() + c, top_meta.get() + lc.compact + c, static_cast<int32_t>(c1 - c0),
      top_id.get() + c * kTopMax, top_logit.get() + c * kTopMax, top_lse.get() + c, stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::Impl::EndLogits() {
  if (lc.num_sampled > 0) {
    SP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(samp_host.get(), samp_out.get(),
                                            2 * lc.num_sampled * sizeof(int32_t),
                                            cudaMemcpyDeviceToHost, stream));
  }
  if (lc.compact == 0) return absl::OkStatus();
  const size_t compact = lc.compact;
  int32_t* h = top_host.get();
  SP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(h, top_id.get(), compact * kTopMax * sizeof(int32_t),
                                          cudaMemcpyDeviceToHost, stream));
  SP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(h + compact * kTopMax, top_logit.get(),
                                          compact * kTopMax * sizeof(float), cudaMemcpyDeviceToHost,
                                          stream));
  SP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(h + 2 * compact * kTopMax, top_lse.get(),
                                          compact * sizeof(float), cudaMemcpyDeviceToHost, stream));
  return absl::OkStatus();
}

void CudaBackend::Impl::UnpackTop(const BatchPlan& plan, ForwardOutput* out) const {
  out->sampled.assign(samp_host.get(), samp_host.get() + lc.num_sampled);
  const float* sampled_logit = reinterpret_cast<const float*>(samp_host.get() + lc.num_sampled);
  out->sampled_logit.assign(sampled_logit, sampled_logit + lc.num_sampled);
  size_t compact = 0;
  for (int32_t n : plan.logits_top) compact += n > 0;
  if (compact == 0) return;
  const int32_t* ids = top_host.get();
  const float* logit = reinterpret_cast<const float*>(ids + compact * kTopMax);
  const float* lse = logit + compact * kTopMax;
  size_t c = 0;
  for (int32_t n : plan.logits_top) {
    if (n == 0) continue;
    for (int32_t j = 0; j < n; ++j) {
      out->top.push_back({ids[c * kTopMax + j], logit[c * kTopMax + j]});
    }
    out->top_lse.push_back(lse[c]);
    ++c;
  }
}

// ---- CUDA graphs of decode steps. ----
//
// A decode step (every sequence one new token, no log-probabilities, tp = 1) of B <=
// kGraphMaxBatch tokens launches the same kernels with the same parameters whatever the
// contexts: grids depend on B and the model only (attention: one block per sequence and
// kv head, each reading its key count from its tile), and every per-step value (tokens,
// positions, write slots, tiles, keys) is read from device memory. So one graph per B,
// captured over fixed buffers, serves every later step of that size: the step uploads
// its metadata into the fixed buffer in the decode layout, launches the graph, and
// copies the logits rows it wants. The graph computes the logits of all B rows (as the
// eager step does when every row wants them, the engine's decode steps).

bool CudaBackend::Impl::GraphEligible(const BatchPlan& plan, const StepMeta& sm) const {
  if (!graphs_allowed || !graphs_on || graphs_failed) return false;
  const int32_t T = plan.num_tokens();
  if (T < 1 || T > kGraphMaxBatch || !plan.logprobs.empty()) return false;
  if (static_cast<int32_t>(plan.seqs.size()) != T) return false;
  for (const engine::SeqPlan& seq : plan.seqs) {
    if (seq.num_tokens != 1) return false;
  }
  return sm.tile_tokens == 1 && sm.num_tiles == T;
}

absl::Status CudaBackend::Impl::EnsureGraphBuffers(size_t meta_words) {
  if (gact.x.empty()) {
    SP_RETURN_IF_ERROR(ReserveActivations(gact, kGraphMaxBatch));
    SP_RETURN_IF_ERROR(glocal.Allocate(static_cast<size_t>(kGraphMaxBatch) * vocab_pad));
  }
  if (meta_words > gmeta.size()) {
    if (!gmeta.empty()) {
      // The graphs point into the old buffer.
      DestroyGraphs();
      ++graph_invalidations;
      spdlog::debug("CUDA graphs: {} metadata words needed, {} held: recapturing", meta_words,
                    gmeta.size());
    }
    const size_t first = DecodeMetaLayout(kGraphMaxBatch).off_keys + kGraphInitialKeys;
    SP_RETURN_IF_ERROR(
        gmeta.Allocate(std::max({meta_words, first, gmeta.size() + gmeta.size() / 2})));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Impl::CaptureGraph(int32_t B) {
  const DecodeLayout l = DecodeMetaLayout(B);
  StepInputs in;
  in.tokens = gmeta.get();
  in.pos = reinterpret_cast<const float*>(gmeta.get() + l.off_pos);
  in.slots = gmeta.get() + l.off_slots;
  in.tiles = reinterpret_cast<const AttnTile*>(gmeta.get() + l.off_tiles);
  in.keys = gmeta.get() + l.off_keys;
  in.num_tiles = B;
  in.tile_tokens = 1;
  const bf16* head = lm_head.empty() ? embed.get() : lm_head.get();
  const int32_t H = config.hidden_size;

  size_t free0 = 0, free1 = 0, total = 0;
  SP_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free0, &total));
  const auto t0 = std::chrono::steady_clock::now();
  // Thread-local mode: only this thread's calls are checked (other backends in the
  // process may allocate meanwhile).
  SP_CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  absl::Status body = EnqueueLayers(gact, in, B);
  if (body.ok()) body = GemmBf16(cublas, gact.h.get(), B, H, head, vocab_pad, glocal.get());
  cudaGraph_t graph = nullptr;
  const cudaError_t end = cudaStreamEndCapture(stream, &graph);  // always ends the capture
  if (!body.ok() || end != cudaSuccess) {
    if (graph != nullptr) cudaGraphDestroy(graph);
    cudaGetLastError();
    if (!body.ok()) return body;
    return CudaStatus(end, "cudaStreamEndCapture", __FILE__, __LINE__);
  }
  size_t nodes = 0;
  cudaGraphGetNodes(graph, nullptr, &nodes);
  cudaGraphExec_t exec = nullptr;
  const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  if (inst != cudaSuccess) {
    cudaGetLastError();
    return CudaStatus(inst, "cudaGraphInstantiate", __FILE__, __LINE__);
  }
  const cudaError_t up = cudaGraphUpload(exec, stream);
  if (up != cudaSuccess) {
    cudaGraphExecDestroy(exec);
    cudaGetLastError();
    return CudaStatus(up, "cudaGraphUpload", __FILE__, __LINE__);
  }
  SP_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free1, &total));
  DecodeGraph& g = graphs[B];
  g.exec = exec;
  g.bytes = free0 > free1 ? static_cast<int64_t>(free0 - free1) : 0;
  if (graph_captures++ == 0) {
    spdlog::info(
        "CUDA graphs: decode steps of batch sizes up to {} replay captured graphs ({:.1f} MiB "
        "of graph buffers)",
        kGraphMaxBatch, static_cast<double>(GraphBytes() - g.bytes) / 1048576.0);
  }
  spdlog::debug(
      "CUDA graphs: batch {} captured: {} nodes, {:.2f} MiB, {:.1f} ms", B, nodes,
      static_cast<double>(g.bytes) / 1048576.0,
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  return absl::OkStatus();
}

absl::StatusOr<bool> CudaBackend::Impl::ForwardGraph(const BatchPlan& plan, const StepMeta& sm,
                                                     ForwardOutput* out) {
  const int32_t B = plan.num_tokens();
  if (graphs[B].exec == nullptr) {
    // The first step of a size runs eagerly: it loads the kernels cuBLAS picks for it
    // outside of any capture.
    if (!graphs[B].warm) {
      graphs[B].warm = true;
      return false;
    }
    if (GraphBytes() >= kGraphMemoryBudget) {
      if (!graphs_budget_warned) {
        spdlog::warn("CUDA graphs: {:.0f} MiB held, no more captured (batch {} runs eagerly)",
                     static_cast<double>(GraphBytes()) / 1048576.0, B);
        graphs_budget_warned = true;
      }
      return false;
    }
  }
  const size_t words = DecodeMetaWords(sm, B);
  absl::Status st = EnsureGraphBuffers(words);  // may drop every graph
  if (st.ok()) st = gmeta_host.Reserve(words);
  if (st.ok()) st = PackDecodeMeta(sm, B, gmeta_host.get());
  if (st.ok() && graphs[B].exec == nullptr) st = CaptureGraph(B);
  if (!st.ok()) {
    DisableGraphs(st);
    return false;
  }

  struct SyncOnExit {
    cudaStream_t s;
    ~SyncOnExit() { cudaStreamSynchronize(s); }
  } sync_on_exit{stream};
  SP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(gmeta.get(), gmeta_host.get(), words * sizeof(int32_t),
                                          cudaMemcpyHostToDevice, stream));
  const cudaError_t e = cudaGraphLaunch(graphs[B].exec, stream);
  if (e != cudaSuccess) {
    DisableGraphs(CudaStatus(e, "cudaGraphLaunch", __FILE__, __LINE__));
    return false;
  }
  ++graph_replays;
  // Rows of plan.logits_for (tp = 1: glocal rows are V floats, one per token).
  SP_RETURN_IF_ERROR(BeginLogits(plan, plan.logits_for, out));
  SP_RETURN_IF_ERROR(EnqueueLogitsRange(plan, glocal.get(), 0, plan.logits_for.size(), out));
  SP_RETURN_IF_ERROR(EndLogits());
  SP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  UnpackTop(plan, out);
  return true;
}

CudaBackend::CudaBackend(const engine::BackendOptions& options, const CudaOptions& cuda,
                         int32_t device, NcclCommunicator* comm)
    : impl_(std::make_unique<Impl>()) {
  impl_->options = options;
  impl_->cuda_options = cuda;
  impl_->device = device;
  impl_->comm = comm;
}

CudaBackend::~CudaBackend() = default;

absl::Status CudaBackend::Load(const ModelConfig& config, const WeightSource& weights,
                               const Shard& shard) {
  SP_RETURN_IF_ERROR(impl_->Setup(config, shard));
  SP_RETURN_IF_ERROR(impl_->AllocateWeights());
  SP_RETURN_IF_ERROR(impl_->ReadWeights(weights));
  return impl_->Finish();
}

absl::Status CudaBackend::LoadRandom(const ModelConfig& config, const Shard& shard, uint64_t seed,
                                     float scale) {
  SP_RETURN_IF_ERROR(impl_->Setup(config, shard));
  SP_RETURN_IF_ERROR(impl_->AllocateWeights());
  SP_RETURN_IF_ERROR(impl_->FillRandom(seed, scale));
  return impl_->Finish();
}

absl::Status CudaBackend::Forward(const BatchPlan& plan, ForwardOutput* out) {
  return impl_->Forward(plan, out);
}

KvPoolInfo CudaBackend::kv() const { return impl_->kv_info; }

bool CudaBackend::SamplesRows() const { return impl_->cuda_options.row_sampling; }
int64_t CudaBackend::weight_bytes() const { return impl_->WeightBytes(); }
int32_t CudaBackend::attention_tile_tokens() const { return impl_->attn_tile; }

void CudaBackend::set_cuda_graphs(bool on) { impl_->graphs_on = on; }

CudaBackend::GraphStats CudaBackend::graph_stats() const {
  const Impl& m = *impl_;
  GraphStats s;
  s.enabled = m.graphs_allowed && m.graphs_on && !m.graphs_failed;
  for (const Impl::DecodeGraph& g : m.graphs) s.graphs += g.exec != nullptr ? 1 : 0;
  s.captures = m.graph_captures;
  s.replays = m.graph_replays;
  s.invalidations = m.graph_invalidations;
  s.device_bytes = m.GraphBytes();
  return s;
}

absl::StatusOr<std::unique_ptr<engine::Backend>> MakeCudaBackend(
    const engine::BackendOptions& options, const CudaOptions& cuda) {
  std::string why;
  const int32_t n = CudaDeviceCount(&why);
  if (n == 0) return absl::FailedPreconditionError("no usable CUDA device: " + why);
  const int32_t tp = options.tensor_parallel;
  if (tp <= 1)
    return std::unique_ptr<engine::Backend>(std::make_unique<CudaBackend>(options, cuda, 0));
  if (tp > n) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tp=", tp, " needs ", tp, " GPUs, this node has ", n));
  }
  std::vector<int> devices(tp);
  for (int32_t r = 0; r < tp; ++r) devices[r] = r;
  auto group = NcclCommunicator::CreateGroup(devices);
  if (!group.ok()) return group.status();
  std::vector<std::unique_ptr<engine::Backend>> ranks;
  std::vector<std::unique_ptr<engine::Communicator>> comms;
  for (int32_t r = 0; r < tp; ++r) {
    ranks.push_back(std::make_unique<CudaBackend>(options, cuda, r, (*group)[r].get()));
    comms.push_back(std::move((*group)[r]));
  }
  return std::unique_ptr<engine::Backend>(
      std::make_unique<engine::TensorParallelBackend>(std::move(ranks), std::move(comms), nullptr));
}

void RegisterBackend(engine::BackendRegistry& registry) {
  registry.Register<CudaOptions>("cuda", ParseCudaOptions, MakeCudaBackend);
}

}  // namespace superpose::cuda
