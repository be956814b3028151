// The state of one CudaBackend rank and the steps of its work, shared by the files that
// implement it, one concern each:
//   cuda_backend.cc    the public class, factories, GEMM and upload helpers
//   cuda_load.cc       Setup (shard, device, attention choice), weights: allocate, read
//                      (engine::ShardedWeightReader), fill at random
//   cuda_kv_pool.cc    the KV pool (sized by blocks, bytes or a memory fraction)
//   cuda_forward.cc    a step: metadata upload, layers, eager logits chunks
//   cuda_logits.cc     logits rows to the host: whole, compact (top-k) and sampled rows,
//                      log-probabilities
//   cuda_graphs.cc     CUDA graphs of decode steps
//   cuda_errors.cc     sticky-error classification and the backend's health
//   cuda_lora.cc       LoRA adapters: upload, the step's segment table, the apply
//   cuda_lazy.cc       LazyLLM steps: stage by stage, scores, pruning (lazy_stage.h)
// Internal to cuda/: no other directory includes it.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "cuda/attention_body.h"
#include "cuda/cuda_backend.h"
#include "cuda/cuda_lora.h"
#include "cuda/cuda_options.h"
#include "cuda/cuda_quant.h"
#include "cuda/cuda_util.h"
#include "cuda/kernels.h"
#include "cuda/nccl_communicator.h"
#include "cuda/step_meta.h"
#include "engine/backend.h"
#include "engine/shard_weights.h"

namespace superpose::cuda {

using engine::BatchPlan;
using engine::BlockId;
using engine::ForwardOutput;
using engine::KvPoolInfo;
using engine::ModelConfig;
using engine::Shard;
using engine::WeightSource;

// Workspace kept free of the KV pool when it is sized by a memory fraction.
inline constexpr int64_t kWorkspaceReserve = int64_t{1} << 30;
// cuBLAS workspace (NVIDIA recommends 32 MiB on Hopper).
inline constexpr size_t kCublasWorkspace = size_t{32} << 20;
// CUDA graphs of decode steps: one per batch size 1..kGraphMaxBatch, captured lazily.
inline constexpr int32_t kGraphMaxBatch = 64;
// Keys (cached tokens of all sequences of a step) the graphs' metadata buffer holds at
// first; it grows by 1.5x, and every graph is recaptured when it does.
inline constexpr size_t kGraphInitialKeys = size_t{1} << 16;
// No new graph is captured once the graph buffers and the instantiated graphs hold this
// much device memory (a part of kWorkspaceReserve).
inline constexpr int64_t kGraphMemoryBudget = int64_t{512} << 20;
// Rows of one LM-head GEMM in eager steps (128 MB of float32 logits at a 128k vocabulary).
inline constexpr int32_t kLogitsChunkRows = 256;

// Copies `src` to a fresh device array of its size.
absl::Status UploadF32(const std::vector<float>& src, DeviceArray<float>* dst);

struct CudaBackend::Impl {
  struct Layer {
    DeviceArray<float> attn_norm, mlp_norm, bqkv, q_norm, k_norm;
    DeviceArray<bf16> wqkv, wo, wgate_up, wdown;
    DeviceQuant wqkv_q, wo_q, wgate_up_q, wdown_q;  // --cuda_dtype=int8|q4 (then no bf16)
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
    const int32_t* lora_segs = nullptr;  // cuda/lora_body.h; none in graphs
    int32_t num_lora_segs = 0;
  };
  struct DecodeGraph {
    cudaGraphExec_t exec = nullptr;
    int64_t bytes = 0;  // device memory the instantiation took (estimate)
    bool warm = false;  // a decode step of this size ran eagerly (its kernels are loaded)
  };
  // Where plan.logits_for's rows go (BeginLogits .. UnpackTop).
  struct LogitsCopy {
    std::vector<int32_t> local_row;  // per logits_for entry
    std::vector<int64_t> slot;       // whole: row in out->logits; compact: compact index
    std::vector<int64_t> sampled;    // index among the sampled rows, or -1
    size_t compact = 0, num_sampled = 0;
  };

  // ---- Options, shard, device. ----
  engine::BackendOptions options;
  CudaOptions cuda_options;
  NcclCommunicator* comm = nullptr;  // this rank's, with tensor parallelism
  int32_t device = 0;
  ModelConfig config;
  Shard shard;
  int32_t q_heads = 0, kv_heads = 0, kv_head_begin = 0, inter = 0;
  int32_t vocab_begin = 0, vocab_local = 0, vocab_pad = 0;
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  DeviceArray<char> cublas_workspace;
  NcclCommunicator* nccl = nullptr;  // comm once Setup checked it
  bool loaded = false;

  // ---- Attention choice (Setup). ----
  int32_t attn_tile = 1;
  int sm_count = 0;
  bool split_decode = false;
  bool tc_attention = false;    // prefill steps (tiles of > 1 token) on tensor cores
  DeviceArray<float> split_ws;  // split-K partials (SplitWorkspaceFloats)

  // ---- Weights. ----
  DeviceArray<bf16> embed, lm_head;  // [vocab_pad, H]; lm_head empty when tied
  DeviceArray<float> final_norm, inv_freq;
  // One per layer; a layer that computes with another's weights (config.json
  // "layer_weight_map", SPIN-style sharing) holds none: WeightsOf gives the owner's.
  std::vector<Layer> layers;
  bool OwnsWeights(int32_t l) const { return config.WeightLayer(l) == l; }
  const Layer& WeightsOf(int32_t l) const { return layers[config.WeightLayer(l)]; }
  // Quantized projections (cuda/cuda_quant.cc): the format, the untied LM head, and the
  // bf16 scratch of prefill steps (the largest layer matrix).
  engine::WeightQuant quant = engine::WeightQuant::kNone;
  DeviceQuant lm_head_q;
  DeviceArray<bf16> quant_scratch;

  // ---- KV pool. ----
  KvPoolInfo kv_info;
  DeviceArray<bf16> k_cache, v_cache;  // [layer][block][slot][kv_head][D]

  // ---- Per-step buffers of eager steps (grown on demand). ----
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
  LogitsCopy lc;

  // ---- CUDA graphs of decode steps. A graph bakes in the pointers of the buffers
  // below, which are allocated once for kGraphMaxBatch tokens (gmeta grows, dropping
  // every graph), and of the weights, the KV pool, inv_freq and the cuBLAS workspace.
  bool graphs_allowed = false;  // CudaOptions::graphs and tp = 1 (set by Setup)
  bool graphs_on = true;        // set_cuda_graphs
  bool graphs_failed = false;   // a capture, instantiation or launch failed (warned once)
  bool graphs_budget_warned = false;
  std::array<DecodeGraph, kGraphMaxBatch + 1> graphs;  // by batch size
  Activations gact;
  DeviceArray<float> glocal;   // [kGraphMaxBatch, V] logits
  DeviceArray<int32_t> gmeta;  // the decode layout (cuda/step_meta.h)
  PinnedArray<int32_t> gmeta_host;
  int64_t graph_captures = 0, graph_replays = 0, graph_invalidations = 0;

  // ---- LoRA adapters (cuda_lora.cc). ----
  CudaLoraState lora;

  // ---- LazyLLM steps (cuda_lazy.cc): score rows, per-head rows, gather scratch. ----
  struct LazyBuffers {
    DeviceArray<float> scores, head_rows, x;
    DeviceArray<bf16> h;
    PinnedArray<float> scores_host;
  } lazy_bufs;

  // ---- Health (cuda_errors.cc): the first sticky CUDA error, after which the context
  // is unusable (every later call fails) and the process must restart.
  mutable absl::Mutex health_mu;
  absl::Status sticky ABSL_GUARDED_BY(health_mu);

  ~Impl();

  // ---- Loading (cuda_load.cc). ----
  // Shard sizes (the CPU backend's Megatron split), stream, cuBLAS, communicator,
  // attention kernels.
  absl::Status Setup(const ModelConfig& cfg, const Shard& sh);
  absl::Status SetupShard(const ModelConfig& cfg, const Shard& sh);
  absl::Status SetupDevice();
  absl::Status SetupAttention();
  absl::Status AllocateWeights();
  absl::Status ReadWeights(const WeightSource& w);
  absl::Status ReadLayer(const engine::ShardedWeightReader& reader, int32_t l,
                         std::vector<float>& buf);
  absl::Status FillRandom(uint64_t seed, float scale);
  int64_t WeightBytes() const;

  // ---- Quantized projections (cuda_quant.cc). ----
  absl::Status ChooseQuant();  // quant from --cuda_dtype and the checkpoint
  bool QuantHead() const;      // the LM head is quantized (untied, quant on)
  absl::Status AllocateQuantScratch();
  absl::Status ReadQuantWeights(const WeightSource& w);
  absl::Status FillQuantRandom(uint64_t seed, float scale);
  int64_t QuantWeightBytes() const;
  // y[T, out] = x[T, in] * W^T: the bf16 GEMM, or the quantized one when wq is set.
  absl::Status Project(const bf16* x, int32_t T, int32_t in, const DeviceArray<bf16>& w,
                       const DeviceQuant& wq, int32_t out, float* y);
  // [rows, vocab_pad] logits of the rank's vocabulary (lm_head, embed when tied, or
  // lm_head_q).
  absl::Status LmHead(const bf16* x, int32_t rows, float* y);

  // ---- KV pool (cuda_kv_pool.cc): sized, allocated and zeroed; then `loaded`. ----
  absl::Status Finish();
  // Blocks that fit in options.device_memory_fraction of the device (the smallest count
  // of every rank with tensor parallelism); RESOURCE_EXHAUSTED when none does.
  absl::StatusOr<int64_t> BlocksFromMemoryFraction(int64_t per_block);
  absl::StatusOr<int64_t> SmallestOverRanks(int64_t blocks);
  // Private mode: zeros the blocks' keys and values on `stream` (cudaMemsetAsync, two
  // per block and layer), ordered before the next step. Tests: a
  // block's bytes (keys of every layer, then values).
  absl::Status ZeroKvBlocks(absl::Span<const BlockId> blocks);
  absl::StatusOr<std::vector<uint8_t>> KvBlockBytes(BlockId block) const;
  // OUT_OF_RANGE unless `block` is in the pool.
  absl::Status CheckKvBlock(BlockId block) const;
  // Elements of one layer's keys (or values) in one block, and where `block` of
  // `layer` starts in k_cache / v_cache.
  size_t KvBlockElements() const;
  size_t KvBlockOffset(int32_t layer, BlockId block) const;

  // ---- A step (cuda_forward.cc). ----
  absl::Status AllReduce(float* data, int64_t count) {
    if (shard.size == 1) return absl::OkStatus();
    return nccl->AllReduceSum(data, count);
  }
  absl::Status Forward(const BatchPlan& plan, ForwardOutput* out);
  absl::Status ReserveRowBuffers(const BatchPlan& plan);
  absl::Status ForwardEager(const BatchPlan& plan, const StepMeta& sm, ForwardOutput* out);
  // Uploads the step's metadata (sm.words) and returns the device pointers into it.
  absl::StatusOr<StepInputs> UploadStepMeta(const StepMeta& sm);
  // Reserves the LM-head buffers of an eager step: chunks of C rows, NL log-probabilities.
  absl::Status ReserveLogitsBuffers(int32_t C, int32_t NL);
  // Enqueues the LM head, the tp all-gather and the row copies / kernels for every
  // chunk of C rows; fills lp_order (log-prob request of each grouped result).
  absl::Status EnqueueLogitsChunks(const BatchPlan& plan, const StepMeta& sm, int32_t C,
                                   std::vector<int32_t>* lp_order, ForwardOutput* out);
  // The [Rc, V] logits of the chunk in `local` (tp = 1) or reassembled in `logits`.
  absl::StatusOr<const float*> ChunkLogits(int32_t Rc);
  // Reserves `a` for T tokens.
  absl::Status ReserveActivations(Activations& a, size_t T);
  // Enqueues embedding, every layer and the final norm of T tokens (into a.h): no
  // synchronization, no allocation, launch parameters from T and the model alone, so
  // that it can be captured into a graph.
  absl::Status EnqueueLayers(const Activations& a, const StepInputs& in, int32_t T);
  // EnqueueLayers' parts: the embedding; layer l's attention block (up to the MLP's
  // norm); its MLP block (up to the next layer's norm). The K cache of layer l.
  absl::Status EnqueueEmbedding(const Activations& a, const StepInputs& in, int32_t T);
  absl::Status EnqueueAttentionHalf(const Activations& a, const StepInputs& in, int32_t T,
                                    int32_t l);
  absl::Status EnqueueMlpHalf(const Activations& a, const StepInputs& in, int32_t T, int32_t l);
  bf16* KeyLayer(int32_t l) const;
  // After the layers of an eager step: the logits rows of sm (rows of eager.h), the
  // log-probabilities, the sync.
  absl::Status FinishEager(const BatchPlan& plan, const StepMeta& sm, int32_t C,
                           ForwardOutput* out);
  // A step with LazyLLM sequences (cuda_lazy.cc): eager, stage by stage.
  absl::Status ForwardLazy(const BatchPlan& plan,
                           const std::vector<std::shared_ptr<const CudaLora>>& adapters,
                           ForwardOutput* out);
  absl::Status EnqueueAttention(const Activations& a, const StepInputs& in, const bf16* kl,
                                const bf16* vl);
  // Splits of a step's decode attention: 1 (no split) unless every tile is one token
  // and there are fewer (tile, kv head) blocks than SMs; then enough for about two
  // blocks per SM. Depends on the tile count only (graphs = eager).
  int32_t DecodeSplits(int32_t num_tiles, int32_t tile_tokens) const;
  // Bounds what DecodeSplits asks for: blocks * splits < 2 * SMs + blocks < 3 * SMs.
  size_t SplitWorkspaceFloats() const;

  // ---- LoRA adapters (cuda_lora.cc). ----
  absl::Status LoadAdapter(int64_t id, const engine::LoraAdapter& adapter);
  // Resolves the plan's adapters (held by the result until the step is done), appends
  // the step's segment table to sm (off_lora, num_lora_segs) and reserves the scratch.
  absl::StatusOr<std::vector<std::shared_ptr<const CudaLora>>> PrepareLora(const BatchPlan& plan,
                                                                           StepMeta* sm);
  // y [T, y_width] += the adapters' terms of `site` at `layer` for x [T, x_width] (the
  // projection's input on this rank); nothing without segments.
  absl::Status ApplyLora(const StepInputs& in, engine::LoraSite site, int32_t layer, const bf16* x,
                         int32_t x_width, float* y, int32_t y_width);

  // ---- Logits rows to the host (cuda_logits.cc). ----
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
  // Groups the log-prob requests by chunk of C rows (stable) and uploads their rows
  // (relative to the chunk) and targets; lp_begin[k] is chunk k's first.
  absl::Status UploadLogprobMeta(const StepMeta& sm, int32_t C, int32_t chunks,
                                 std::vector<int32_t>* lp_begin, std::vector<int32_t>* lp_order);
  // Row kinds: engine::RowLayout's predicates (the one reading of the row contract).
  static bool Sampled(const BatchPlan& plan, size_t i) {
    return engine::RowLayout::Sampled(plan, i);
  }
  static bool Compact(const BatchPlan& plan, size_t i) {
    return engine::RowLayout::TopOf(plan, i) > 0;
  }

  // ---- CUDA graphs of decode steps (cuda_graphs.cc). ----
  bool GraphEligible(const BatchPlan& plan, const StepMeta& sm) const;
  // Runs a decode step through its graph (capturing it first when needed): true when
  // done; false when the step must run eagerly (first step of its size, memory budget,
  // or a failure, which switches graphs off with one warning). Errors are those of the
  // step itself (copies, synchronization).
  absl::StatusOr<bool> ForwardGraph(const BatchPlan& plan, const StepMeta& sm, ForwardOutput* out);
  // Whether a graph of B tokens may run now (false: this step runs eagerly).
  bool GraphReady(int32_t B);
  absl::Status EnsureGraphBuffers(size_t meta_words);
  absl::Status CaptureGraph(int32_t B);
  // Destroys every graph (the stream must be idle); the buffers stay.
  void DestroyGraphs();
  // Graphs, buffers and counters back to the state of a fresh backend (Setup).
  void ResetGraphs();
  void DisableGraphs(const absl::Status& why);
  int64_t GraphBytes() const;

  // ---- Health (cuda_errors.cc). ----
  // After a failed Load or step: records `st` (or what the device reports now) when it
  // is a sticky CUDA error.
  void NoteFailure(const absl::Status& st);
  absl::Status Health() const;
};

}  // namespace superpose::cuda
