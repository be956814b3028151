// The CPU backend: float32 activations and attention arithmetic; weights in float32
// (GEMMs through our own kernel, engine/cpu/small_gemm.h, whose result for a row does not
// depend on the other rows or the threads; the numerical reference for every other
// backend) or in bfloat16 (AMX tile kernel, half the weight bytes: the fast choice for
// bf16 checkpoints on CPUs that have AMX); the KV cache in float32 or bfloat16
// (CpuOptions::kv_cache_dtype). Element-wise work on OpenMP threads.
#pragma once

#include <memory>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "engine/backend.h"
#include "engine/cpu/aligned.h"
#include "engine/cpu/attention.h"
#include "engine/cpu/bf16_gemm.h"
#include "engine/cpu/cpu_options.h"
#include "engine/cpu/lora.h"
#include "engine/cpu/quant_gemm.h"
#include "engine/cpu/quant_weights.h"
#include "engine/cpu/small_gemm.h"
#include "engine/shard_weights.h"

namespace superpose::engine::cpu {

class CpuBackend : public Backend {
 public:
  // A whole-model backend (Load with Shard{}), or, with `comm`, one rank of a
  // tensor-parallel group (Load with the Shard of comm's rank and size).
  // options.tensor_parallel is not read here (MakeCpuBackend builds groups).
  explicit CpuBackend(const BackendOptions& options, const CpuOptions& cpu = {},
                      Communicator* comm = nullptr);
  std::string name() const override { return "cpu"; }
  // "float32", "bfloat16", or "int8" / "q4" (quantized, engine/cpu/quant_gemm.h): the
  // weights' type (activations are float32; the KV cache's type is kv().dtype).
  std::string compute_dtype() const override {
    if (quant_ != WeightQuant::kNone) return WeightQuantName(quant_);
    return bf16_ ? "bfloat16" : "float32";
  }
  absl::Status Load(const ModelConfig& config, const WeightSource& weights,
                    const Shard& shard) override;
  absl::Status Forward(const BatchPlan& plan, ForwardOutput* out) override;
  KvPoolInfo kv() const override { return kv_info_; }
  bool SamplesRows() const override { return cpu_.row_sampling; }
  bool SupportsLazy() const override { return true; }
  bool SupportsLazyRevival() const override { return true; }
  // LoRA adapters (engine/cpu/lora.h): this rank's part, in float32.
  bool SupportsAdapters() const override { return true; }
  absl::Status LoadAdapter(int64_t id, const LoraAdapter& adapter) override;
  absl::Status UnloadAdapter(int64_t id) override { return lora_table_.Unload(id); }
  // engine/cpu/kv_pool_access.cc: zeroing (private mode) and the tests' reader.
  absl::Status ZeroKvBlocks(absl::Span<const BlockId> blocks) override;
  absl::StatusOr<std::vector<uint8_t>> KvBlockBytes(BlockId block) const override;
  // LazyLLM's Aux Cache of sequence `id` (engine/cpu/lazy_forward.cc), zeroed and freed.
  void ReleaseSequence(SeqId id) override;
  // Tests: bytes the Aux Caches hold now (not while a Forward runs).
  int64_t LazyAuxBytes() const;

 private:
  // A weight W[out, in]: float32 row-major, or packed bf16, or quantized (then f32 is
  // empty).
  struct Matrix {
    AlignedFloats f32;  // cache-line aligned rows (engine/cpu/aligned.h)
    PackedBf16 bf16;
    QuantMatrix quant;  // int8 / q4 (engine/cpu/quant_gemm.h)
    int32_t out = 0, in = 0;
  };
  struct Layer {
    std::vector<float> attn_norm;  // [hidden]
    Matrix wqkv;                   // [(q_local + 2 * kv_local) * head_dim, hidden]
    std::vector<float> bqkv;       // same rows, empty without attention bias
    std::vector<float> q_norm;     // [head_dim], empty without qk norm
    std::vector<float> k_norm;
    Matrix wo;                    // [hidden, q_local * head_dim]
    std::vector<float> mlp_norm;  // [hidden]
    Matrix wgate_up;              // [2 * inter_local, hidden]: gate rows then up rows
    Matrix wdown;                 // [hidden, inter_local]
  };

  // Sizes m for W[out, in] and returns the float buffer to read it into.
  static float* Shape(Matrix& m, int32_t out, int32_t in);
  // After reading: packs to bf16 (and frees the floats) when the backend runs bf16.
  void Finish(Matrix& m) const;
  // y[T, out] = x[T, in] * W[out, in]^T
  void Linear(const float* x, int32_t rows, const Matrix& w, float* y) const;
  void LinearF32(const float* x, int32_t rows, int32_t in, const float* w, int32_t out,
                 float* y) const;
  // Keys of every sequence of a step (context first, then its new tokens) and the
  // step's attention work items: (sequence, kv head, tile of new-token rows). Built once
  // per step for all layers.
  struct AttnItem {
    int32_t seq, kvh;
    int32_t first, count;  // its queries: [first, first + count) of query_row / query_nk
  };
  struct KeyIndex {
    std::vector<AttnKeys> keys;  // per sequence
    std::vector<AttnItem> items;
    std::vector<int64_t> query_row;  // token * q_heads + head: the query's row in q and out
    std::vector<int32_t> query_nk;   // keys the query sees
  };
  struct StepBuffers;
  // The rows a step computes at the current layer: every new token, less those LazyLLM
  // pruned at an earlier boundary of their sequence (engine/cpu/lazy_forward.cc). The
  // rows of a sequence stay contiguous and in token order.
  struct ActiveRows {
    // row -> plan token; a token revived from the Aux Cache has a step-local id past the
    // plan's tokens (StepBuffers::AddRow: its own position).
    std::vector<int32_t> token;
    std::vector<KvSlot> slot;                  // row -> where its K/V go in this stage
    std::vector<int32_t> begin, count, stage;  // per plan sequence
    // LazyLLM revival mode past stage 0 (LazyPlan::by_entries): row -> its entry in the
    // stage (compact index k, prefix: it attends to entries [0, prefix) and itself); -1
    // elsewhere.
    std::vector<int32_t> compact, prefix;
    std::vector<int32_t> own;  // row -> own index (revival mode), else -1
  };
  // LazyLLM bookkeeping of one Forward.
  struct LazyStep {
    std::vector<int32_t> result_of;          // per plan sequence: its out->lazy entry, or -1
    std::vector<std::vector<float>> scores;  // per plan sequence deciding at this layer
  };
  // A sequence's Aux Cache: the hidden state each pruned token left at its boundary.
  struct LazyAux {
    std::vector<float> h;     // [own, hidden]
    std::vector<int32_t> at;  // [own]: the boundary its state is from, -1: none
  };
  static ActiveRows AllRows(const BatchPlan& plan);
  KeyIndex BuildKeyIndex(const BatchPlan& plan, const ActiveRows& rows) const;
  // lazy_forward.cc: results, the boundary scores, the pruning and the counts.
  static void StartLazy(const BatchPlan& plan, LazyStep* z, ForwardOutput* out);
  static bool AnyBoundary(const BatchPlan& plan, const ActiveRows& rows, int32_t l);
  absl::Status LazyScores(const BatchPlan& plan, const KeyIndex& ix, const ActiveRows& rows,
                          int32_t l, const float* q, LazyStep* z);
  // Head-summed attention probabilities of query row `row` over `keys` at layer l.
  std::vector<float> LastTokenAttention(const AttnKeys& keys, int32_t l, const float* q,
                                        int32_t row) const;
  void LazyPrune(const BatchPlan& plan, int32_t l, LazyStep* z, ActiveRows* rows,
                 std::vector<float>* x, ForwardOutput* out, StepBuffers* b);
  // The rows plan sequence si takes into the next stage (appended to *next and *nx).
  void NextStageRows(const BatchPlan& plan, size_t si, int32_t l, LazyStep* z,
                     const ActiveRows& rows, const std::vector<float>& x, ActiveRows* next,
                     std::vector<float>* nx, ForwardOutput* out, StepBuffers* b);
  // Revival mode (LazyPlan::by_entries): a replay's rows in the stage's entry order, a
  // decode step's selection and revivals from the Aux Cache.
  void ReplayStageRows(const SeqPlan& seq, int32_t stage, const ActiveRows& rows, int32_t si,
                       const std::vector<float>& x, ActiveRows* next, std::vector<float>* nx);
  void DecodeStageRows(const SeqPlan& seq, int32_t stage, const ActiveRows& rows, int32_t si,
                       const std::vector<float>& scores, const std::vector<float>& x,
                       ActiveRows* next, std::vector<float>* nx, std::vector<LazyEntry>* revived,
                       StepBuffers* b);
  // Stores the hidden state of row r (own index `own`) as left at boundary `stage`.
  void StoreAux(SeqId id, int32_t own, int32_t stage, const float* h);
  // KeyIndex's part for a revival-mode sequence past stage 0: the stage's entries as
  // one key list, and a list of its own for each revived row.
  void RevivalKeys(const SeqPlan& seq, const ActiveRows& rows, int32_t si, KeyIndex* ix) const;
  static void LazyCount(const ActiveRows& rows, int32_t l, const LazyStep& z, ForwardOutput* out);
  void Attention(const KeyIndex& ix, int32_t layer, const float* q, float* out) const;
  // Scratch of one step's T tokens and its RoPE tables.
  struct StepBuffers {
    StepBuffers(const BatchPlan& plan, const ModelConfig& config, int32_t q_heads, int32_t kv_heads,
                int32_t inter, const std::vector<float>& inv_freq);
    // A token revived from the Aux Cache (not a plan token) at `position`: its id.
    int32_t AddRow(float position);
    // Room for `rows` rows (revived tokens may outnumber the plan's).
    void Fit(size_t rows);
    std::vector<float> h, qkv, q, attn, proj, gu, act;
    int32_t half = 0;                 // head_dim / 2
    std::vector<float> cos_t, sin_t;  // [tokens, half]
    const std::vector<float>* inv_freq = nullptr;
    size_t per_row[7] = {};  // floats per row of h, qkv, q, attn, proj, gu, act
  };
  // Forward's steps: x[T, hidden] through the embedding, each layer's attention and MLP
  // blocks (residuals added), then the logits rows.
  absl::Status Embed(const BatchPlan& plan, std::vector<float>* x);
  absl::Status AttentionBlock(const BatchPlan& plan, const ActiveRows& rows,
                              const KeyIndex& key_index, int32_t l, StepBuffers* b,
                              std::vector<float>* x);
  absl::Status MlpBlock(int32_t l, StepBuffers* b, std::vector<float>* x);
  absl::Status Logits(const BatchPlan& plan, const ActiveRows& active, const std::vector<float>& x,
                      ForwardOutput* out);
  absl::StatusOr<const float*> LmHead(const std::vector<float>& hn, int32_t R);
  void Logprobs(const BatchPlan& plan, const float* logits, int32_t R,
                const std::vector<int32_t>& lp_row, ForwardOutput* out) const;
  absl::Status AllReduce(float* data, int64_t count);
  // Load's steps.
  absl::Status CheckShard(const Shard& shard) const;
  absl::Status ChooseWeightType(const WeightSource& weights);
  // `quant`: the quantized projections' reader (null when they are float or bf16).
  absl::Status ReadEmbeddingAndHead(const ShardedWeightReader& reader,
                                    const QuantWeightReader* quant);
  absl::Status ReadLayer(const ShardedWeightReader& reader, const QuantWeightReader* quant,
                         int32_t l);
  void AllocateKvPool();

  BackendOptions options_;
  CpuOptions cpu_;
  Communicator* comm_ = nullptr;  // null: the whole model
  ModelConfig config_;
  Shard shard_;
  // Per-rank sizes (tensor parallelism splits heads, MLP columns and the vocabulary).
  int32_t q_heads_ = 0;   // query heads of this rank
  int32_t kv_heads_ = 0;  // kv heads stored by this rank
  int32_t kv_head_begin_ = 0;
  int32_t inter_ = 0;  // intermediate columns of this rank
  int32_t vocab_begin_ = 0;
  int32_t vocab_local_ = 0;
  std::vector<std::vector<int32_t>> heads_of_;  // local query heads of each local kv head

  bool bf16_ = false;                       // weights in bf16 (Matrix::bf16)
  WeightQuant quant_ = WeightQuant::kNone;  // projections quantized (Matrix::quant)
  std::vector<float> embed_;  // [vocab_local, hidden] (float32 always: a lookup table)
  Matrix lm_head_;            // [vocab_pad, hidden]; f32 empty when tied to embed_ in f32
  std::vector<float> final_norm_;
  std::vector<Layer> layers_;
  std::vector<float> inv_freq_;

  KvPoolInfo kv_info_;
  // K: [layer][block][kv_head][head_dim][slot] (transposed within a block: see attention.h)
  // V: [layer][block][slot][kv_head][head_dim]
  // float32, or bfloat16 bit patterns when kv_bf16_ (one pair is used, the other empty).
  bool kv_bf16_ = false;
  std::vector<float> k_cache_;
  std::vector<float> v_cache_;
  std::vector<uint16_t> k_cache16_;
  std::vector<uint16_t> v_cache16_;
  std::vector<float> lm_local_;  // LM-head output scratch [rows, vocab_local]
  std::vector<float> lm_full_;   // gathered logits scratch (tensor parallel)
  LoraTable lora_table_;         // adapters loaded (thread-safe)
  LoraStep lora_step_;           // the adapters of the running Forward, over its rows
  // LazyLLM Aux Caches by sequence (revival mode), from a deciding prefill to
  // ReleaseSequence; only the thread running Forward touches them.
  absl::flat_hash_map<SeqId, LazyAux> lazy_aux_;
};

// Registers "cpu" (ParseCpuOptions, MakeCpuBackend).
void RegisterBackend(BackendRegistry& registry);

// A CPU backend split options.tensor_parallel ways over threads (1: a plain CpuBackend).
// Load it with Shard{}.
std::unique_ptr<Backend> MakeCpuBackend(const BackendOptions& options, const CpuOptions& cpu = {});

}  // namespace superpose::engine::cpu
