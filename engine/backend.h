// The seam between the device-agnostic engine and the compute backends (CPU, CUDA).
// See docs/architecture.md: BatchPlan, KV segments, float positions.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/model/config.h"
#include "engine/model/weights.h"
#include "engine/row_sampling.h"

namespace superpose::engine {

using SeqId = int64_t;
using BlockId = int32_t;

// A run of cached tokens: slots [first_slot, first_slot + length) of one KV block.
struct KvSegment {
  BlockId block = 0;
  int32_t first_slot = 0;
  int32_t length = 0;
};

// Where one new token's key and value are written.
struct KvSlot {
  BlockId block = 0;
  int32_t slot = 0;
};

// One sequence's part of a step. Its new tokens are tokens[token_begin,
// token_begin + num_tokens) of the plan; each attends to every token of `context`
// and to the new tokens of this sequence up to and including itself (causal).
struct SeqPlan {
  SeqId id = 0;
  std::vector<KvSegment> context;
  int32_t token_begin = 0;
  int32_t num_tokens = 0;
};

// Asks for the log-probability of `target` at the distribution predicted after
// plan token `token_index` (i.e. the next-token distribution there).
struct LogprobRequest {
  int32_t token_index = 0;
  int32_t target = 0;
};

// Longest compact logits row (best candidates of a row) a plan may ask for.
inline constexpr int32_t kMaxTopLogits = 64;

struct BatchPlan {
  std::vector<int32_t> tokens;      // flattened new tokens of all sequences
  std::vector<float> positions;     // RoPE position of each token (may be fractional)
  std::vector<KvSlot> kv_slots;     // where each token's K/V goes
  std::vector<SeqPlan> seqs;        // contiguous, in token order
  std::vector<int32_t> logits_for;  // token indices whose logits are returned
  // Empty, or one per logits_for entry: 0 returns that row whole, n in
  // [1, kMaxTopLogits] returns only its n best tokens and its log-sum-exp (a compact
  // row: what greedy and top-k sampling need, without moving the vocabulary).
  std::vector<int32_t> logits_top;
  // Empty, or one per logits_for entry: with a temperature > 0 the backend draws that
  // row's token itself (engine/row_sampling.h; backends with SamplesRows() only) and
  // returns no whole row for it (its compact row still, when logits_top asks).
  std::vector<RowSampling> sampling;
  std::vector<LogprobRequest> logprobs;

  int32_t num_tokens() const { return static_cast<int32_t>(tokens.size()); }
};

// One token of a compact logits row.
struct TopLogit {
  int32_t id = 0;
  float logit = 0;
  bool operator==(const TopLogit& o) const { return id == o.id && logit == o.logit; }
};

struct ForwardOutput {
  // The whole rows: vocab_size floats for each plan.logits_for entry whose logits_top
  // is 0 and that the backend did not sample (every entry when logits_top and sampling
  // are empty), in the order of plan.logits_for.
  std::vector<float> logits;
  // The compact rows, in the order of plan.logits_for: for an entry with logits_top
  // n > 0, its n best tokens (logit descending, lower id first on ties) in `top` and
  // the log-sum-exp of its whole row in `top_lse`.
  std::vector<TopLogit> top;
  std::vector<float> top_lse;
  // The rows the backend sampled (plan.sampling), in the order of plan.logits_for: the
  // token drawn and its logit.
  std::vector<int32_t> sampled;
  std::vector<float> sampled_logit;
  // One per plan.logprobs entry (natural log).
  std::vector<float> logprobs;
};

// The one reading of the row contract above: where each plan.logits_for row lies in a
// ForwardOutput, and what it holds. Backends fill outputs by it (CompactLogits, the
// CUDA LM head), the engine reads them by it.
struct RowView {
  const float* whole = nullptr;    // the whole row (vocab_size floats), or null
  absl::Span<const TopLogit> top;  // a compact row's best tokens (empty if none)
  float top_lse = 0.0f;            // with `top`: log-sum-exp of the whole row
  int32_t sampled = -1;            // the token the backend drew, or -1
  float sampled_logit = 0.0f;
};

class RowLayout {
 public:
  explicit RowLayout(const BatchPlan& plan);
  // Row r's compact length (0: not compact) and whether the backend samples it.
  static int32_t TopOf(const BatchPlan& plan, size_t r) {
    return plan.logits_top.empty() ? 0 : plan.logits_top[r];
  }
  static bool Sampled(const BatchPlan& plan, size_t r) {
    return !plan.sampling.empty() && plan.sampling[r].temperature > 0.0f;
  }
  // Returned whole: neither compact nor sampled.
  static bool Whole(const BatchPlan& plan, size_t r) {
    return TopOf(plan, r) == 0 && !Sampled(plan, r);
  }

  size_t rows() const { return at_.size(); }
  int64_t whole_rows() const { return whole_; }
  int64_t top_tokens() const { return top_; }
  int64_t compact_rows() const { return compact_; }
  int64_t sampled_rows() const { return sampled_; }
  // INTERNAL when `out` does not have this shape.
  absl::Status Check(const ForwardOutput& out, int32_t vocab) const;
  RowView Row(const ForwardOutput& out, size_t r, int32_t vocab) const;

 private:
  struct At {
    int64_t whole = -1, top = 0, lse = -1, sampled = -1;
    int32_t n = 0;
  };
  std::vector<At> at_;
  int64_t whole_ = 0, top_ = 0, compact_ = 0, sampled_ = 0;
};

// Device memory for keys and values: num_blocks blocks of block_size tokens each, for
// every layer. Block ids are handed out by the engine's KvBlockManager.
struct KvPoolInfo {
  int32_t num_blocks = 0;
  int32_t block_size = 0;
  int64_t bytes_per_block = 0;  // all layers, K and V
  std::string dtype;            // element type of K and V: "float32" or "bfloat16"
};

// Tensor-parallel rank of a backend.
struct Shard {
  int32_t rank = 0;
  int32_t size = 1;
};

// Collectives among the ranks of one node (NCCL on GPUs, threads on the CPU).
class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int32_t rank() const = 0;
  virtual int32_t size() const = 0;
  virtual absl::Status AllReduceSum(float* data, int64_t count) = 0;
  // Each rank contributes `count` floats; `out` receives size()*count in rank order.
  virtual absl::Status AllGather(const float* in, int64_t count, float* out) = 0;
  virtual absl::Status Broadcast(float* data, int64_t count, int32_t root) = 0;
  virtual absl::Status Barrier() = 0;
  // Makes every pending and later collective of this rank fail with ABORTED instead of
  // waiting for ranks that will not come (a rank whose step failed). Thread-safe and
  // idempotent; the group is not usable afterwards.
  virtual void Abort() = 0;
};

struct BackendOptions {
  int32_t num_threads = 0;  // 0: all cores
  int32_t kv_block_size = 16;
  int32_t kv_num_blocks = 0;  // 0: derive from kv_memory_bytes
  int64_t kv_memory_bytes = 256ll << 20;
  // GPU backends: when > 0 and kv_num_blocks is 0, the KV pool takes what is left of
  // this fraction of device memory after the weights and a workspace reserve.
  double device_memory_fraction = 0.0;
  // CUDA backend: replay decode steps (every sequence one new token) from captured CUDA
  // graphs, one per batch size up to 64; tp = 1 only. Results equal graphs off bitwise.
  bool cuda_graphs = true;
  // CUDA backend: decode steps with fewer (sequence, kv head) pairs than the GPU has SMs
  // split each context over up to 16 blocks of at least 256 keys (split-K attention)
  // and merge them; the split count depends on the batch size only, so graphs and
  // eager steps stay bitwise equal.
  bool cuda_split_decode = true;
  // Rows of temperature requests without top-k or penalties are sampled by the backend
  // (engine/row_sampling.h) instead of copying the whole row to the host: the CUDA
  // backend on the GPU (cuda_row_sampling); the CPU backend only when cpu_row_sampling
  // is set (its host sampler is as fast; tests use it).
  bool cuda_row_sampling = true;
  bool cpu_row_sampling = false;
  // CUDA backend attention of prefill steps: "auto" (tensor cores when head_dim is a
  // multiple of 16 up to 128, else the float32 SIMT kernel), "simt" or "tensor_core".
  std::string cuda_attention = "auto";
  // CPU backend weight type: "auto" (bfloat16 for bf16 checkpoints on CPUs with AMX,
  // float32 otherwise), "float32" or "bfloat16".
  std::string cpu_dtype = "auto";
  // CPU backend KV cache element type: "auto" (bfloat16 when the weights run in
  // bfloat16, float32 otherwise), "float32" or "bfloat16". The CUDA backend always
  // stores bfloat16.
  std::string kv_cache_dtype = "auto";
  int32_t tensor_parallel = 1;   // ranks (a registry factory builds the group)
  Communicator* comm = nullptr;  // set per rank by the group; null: tp = 1
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;           // "cpu", "cuda"
  virtual std::string compute_dtype() const = 0;  // "float32", "bfloat16"
  virtual absl::Status Load(const ModelConfig& config, const WeightSource& weights,
                            const Shard& shard) = 0;
  // Runs one step. Every rank of a tensor-parallel group gets the same plan.
  virtual absl::Status Forward(const BatchPlan& plan, ForwardOutput* out) = 0;
  virtual KvPoolInfo kv() const = 0;
  // Whether Forward draws the tokens of rows with plan.sampling (else the plan must not
  // ask).
  virtual bool SamplesRows() const { return false; }
  // OK while the backend can run steps; else why it cannot any more (a tensor-parallel
  // group aborted after a rank failed). Thread-safe.
  virtual absl::Status Health() const { return absl::OkStatus(); }
};

// Explicit registration of backends (no static initializers).
class BackendRegistry {
 public:
  using Factory = std::function<absl::StatusOr<std::unique_ptr<Backend>>(const BackendOptions&)>;
  void Register(const std::string& name, Factory factory);
  bool Has(const std::string& name) const;
  std::vector<std::string> Names() const;
  absl::StatusOr<std::unique_ptr<Backend>> Create(const std::string& name,
                                                  const BackendOptions& options) const;

 private:
  std::map<std::string, Factory> factories_;
};

// Megatron-style split of one model over `shard.size` ranks: query heads, MLP columns
// and the vocabulary are divided; kv heads are divided, or replicated (one per rank)
// when there are fewer kv heads than ranks. Shared by every backend.
struct ShardLayout {
  int32_t q_heads = 0;        // query heads of this rank
  int32_t kv_heads = 0;       // kv heads stored by this rank
  int32_t kv_head_begin = 0;  // first global kv head of this rank
  int32_t inter = 0;          // MLP columns of this rank
  int32_t vocab_pad = 0;      // vocabulary rows per rank (the last rank may use fewer)
  int32_t vocab_begin = 0;
  int32_t vocab_local = 0;
};
// INVALID_ARGUMENT naming the size that tp does not divide.
absl::StatusOr<ShardLayout> ComputeShardLayout(const ModelConfig& config, const Shard& shard);

// The `n` best tokens of `row` (logit descending, lower id first on ties), appended to
// `out`. `n` is at most row.size().
void SelectTopLogits(absl::Span<const float> row, int32_t n, std::vector<TopLogit>* out);
// log(sum(exp(row))), computed stably (float exponentials, double sum).
float LogSumExp(absl::Span<const float> row);
// Fills out->logits, out->top, out->top_lse and out->sampled* from whole rows: `rows`
// holds plan.logits_for.size() rows of `vocab` floats. For backends that have every row
// on the host (sampled rows drawn with SampleRowReference).
void CompactLogits(const BatchPlan& plan, int32_t vocab, const float* rows, ForwardOutput* out);

// Checks a plan against the pool and itself (ranges, slots, segment bounds) so that a
// backend never reads or writes outside its memory. Backends run it on every step
// (tensor-parallel groups once for the group and once per rank); tests use it too.
absl::Status ValidatePlan(const BatchPlan& plan, const KvPoolInfo& kv, int32_t vocab_size);

}  // namespace superpose::engine
