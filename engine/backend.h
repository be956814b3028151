// The seam between the device-agnostic engine and the compute backends (CPU, CUDA).
// See docs/architecture.md: BatchPlan, KV segments, float positions.
#pragma once

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "engine/lora_adapter.h"
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

// One entry of a stage's compact list (LazyPlan revival mode): the own index of the token
// whose K/V is at the stage's k-th own slot, and how many of the stage's first entries it
// attends to before itself (its key set: entries [0, prefix) and itself). prefix == k for
// every entry but a revived one, which attends to the entries the deciding prefill put in
// the stage before it (so its K/V is what a prefill that had kept it would hold, however
// late it is revived).
struct LazyEntry {
  int32_t own = 0;
  int32_t prefix = 0;
  bool operator==(const LazyEntry& o) const { return own == o.own && prefix == o.prefix; }
};

// LazyLLM token pruning of one sequence (docs/architecture.md "LazyLLM"; engine/lazy.h).
// The layers are cut into stages after each boundary layer: stage 0 is layers
// [0, boundaries[0]], stage s is (boundaries[s-1], boundaries[s]], the last stage runs to
// the last layer. A token computed in stage s has K/V in the layers of stages 0..s only.
// Stage 0 keeps the usual layout (kv_slots, SeqPlan::context); a stage s >= 1 keeps its
// tokens compact: the k-th token a sequence computes in stage s has its K/V, in that
// stage's layers, at the slot of the sequence's k-th own token, so that a stage's
// context is a few long runs however the pruning fell (attention reads keys in runs of
// consecutive slots). At a layer of stage s a query attends to stage_context[s-1]
// (stage 0: SeqPlan::context) and to the new tokens present in stage s.
struct LazyPlan {
  std::vector<int32_t> boundaries;  // empty: not lazy; else increasing, < num_layers
  // One per boundary: the context segments that have K/V in stage s + 1.
  std::vector<std::vector<KvSegment>> stage_context;
  // One per boundary: where the new tokens computed in stage s + 1 write their K/V in
  // its layers, in token order. With `keep` (which tokens go on is not known yet) one
  // per new token, and the stage's tokens take the first ones.
  std::vector<std::vector<KvSlot>> stage_slots;
  // Prefill that decides: at boundary s the last new token's head-averaged attention
  // (over the context too) scores the other new tokens of the stage and the best
  // round(keep[s] * n) go on (ties: lower position); the last token always goes on. The
  // context (a cached prefix) is in every stage and never a candidate: stage_context[s]
  // is the same context, at the same slots.
  std::vector<float> keep;
  // Recomputation of decided tokens: per new token, how many stages it is computed in
  // (1 .. boundaries.size() + 1). Empty with empty `keep`: every new token runs through
  // every stage (a decode step).
  std::vector<int32_t> depth;
  // Decode-time revival (papers.md 2.2; docs/architecture.md "LazyLLM"), when non-empty:
  // per boundary, the fraction of a stage's keys (the query aside) that a decode step's
  // token selects by its attention; selected tokens without K/V in the next stage are
  // revived there from the backend's Aux Cache (the hidden state each pruned token left
  // at its boundary, kept per SeqId until Backend::ReleaseSequence). The deciding prefill
  // (`keep`) fills the Aux Cache; afterwards the stages are described by their entries
  // instead of stage_context and stage_slots (left empty):
  std::vector<float> revive;
  // Per boundary s: the entries of stage s + 1, own tokens [0, recorded) (a replay's
  // rows are its new tokens' entries, in this order; a decode step appends to them).
  std::vector<std::vector<LazyEntry>> entries;
  // Per boundary: how many of entries[s] the deciding prefill made (in own order).
  std::vector<int32_t> prefill_entries;
  std::vector<BlockId> blocks;  // the sequence's blocks: own slot k = (blocks[k / bs], k % bs)
  int32_t own_begin = 0;        // own index of the step's first new token
  // Own tokens whose entries are given: a step of tokens before it replays them; a step
  // starting at it is a decode step (one token, every stage, selecting and reviving).
  int32_t recorded = 0;
  bool active() const { return !boundaries.empty(); }
  bool revives() const { return !revive.empty(); }
  // A revival-mode step after the decision (a replay or a decode step).
  bool by_entries() const { return revives() && keep.empty(); }
};

// One sequence's part of a step. Its new tokens are tokens[token_begin,
// token_begin + num_tokens) of the plan; each attends to every token of `context`
// and to the new tokens of this sequence up to and including itself (causal).
struct SeqPlan {
  SeqId id = 0;
  std::vector<KvSegment> context;
  int32_t token_begin = 0;
  int32_t num_tokens = 0;
  LazyPlan lazy = {};  // backends without SupportsLazy() refuse a plan that sets it
  // The LoRA adapter its rows go through (an id given to Backend::LoadAdapter), 0: none.
  int64_t adapter = 0;
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
  // One per plan sequence whose lazy plan has `keep` or `depth` or is by_entries(), in
  // plan order.
  struct Lazy {
    int32_t seq = 0;                    // index into plan.seqs
    std::vector<int32_t> depth;         // per new token: stages it was computed in
    std::vector<int32_t> layer_tokens;  // per layer: its new tokens computed there
    // Revival mode, decode step: per boundary s, the entries this step appended to stage
    // s + 1 before its own token's (the revived tokens, in own order).
    std::vector<std::vector<LazyEntry>> revived;
  };
  std::vector<Lazy> lazy;
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

// The part of the model a backend's Load reads: rank `rank` of `size`. A backend that
// computes the whole model (tp = 1, or a group behind one Backend: TensorParallelBackend)
// is loaded with Shard{} and rejects any other; a group loads rank r of its n ranks with
// Shard{r, n}, which must match that rank's communicator.
struct Shard {
  int32_t rank = 0;
  int32_t size = 1;
  bool whole() const { return rank == 0 && size == 1; }
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

// Options every backend takes (server flags --threads, --kv_block_size, --kv_blocks,
// --kv_cache_mb, --gpu_memory_fraction, --tp). A backend's own options are a typed struct
// of that backend (engine/cpu/cpu_options.h, cuda/cuda_options.h), parsed from
// BackendFlags by its parser before any weight is read.
struct BackendOptions {
  int32_t num_threads = 0;  // 0: all cores
  int32_t kv_block_size = 16;
  int32_t kv_num_blocks = 0;  // 0: derive from kv_memory_bytes
  int64_t kv_memory_bytes = 256ll << 20;
  // GPU backends: when > 0 and kv_num_blocks is 0, the KV pool takes what is left of
  // this fraction of device memory after the weights and a workspace reserve.
  double device_memory_fraction = 0.0;
  // Tensor-parallel ranks, the one carrier of the degree: a backend's factory
  // (MakeCpuBackend, MakeCudaBackend) builds a group of this many ranks behind one
  // Backend. The ranks themselves learn their place from their communicator and from
  // the Shard their group loads them with (they never read this field).
  int32_t tensor_parallel = 1;
};
// OK, or INVALID_ARGUMENT naming the server flag of the first value out of range.
absl::Status ValidateBackendOptions(const BackendOptions& options);

// A backend's own flags as given on the command line: flag name without dashes -> value
// ({"kv_cache_dtype", "bfloat16"}). Flags not given keep the backend's defaults; a flag
// the backend does not have is an error (never ignored).
using BackendFlags = std::map<std::string, std::string>;

// For backend parsers: INVALID_ARGUMENT "--<name>: not an option of the <backend>
// backend" for the first flag not in `known`.
absl::Status CheckFlagNames(const BackendFlags& flags, absl::string_view backend,
                            std::initializer_list<absl::string_view> known);
// flags[name], when given, into *out: "true"/"false" (or 1/0, yes/no).
absl::Status ParseFlagBool(const BackendFlags& flags, const std::string& name, bool* out);
// flags[name], when given, must be one of the names of `choices`; its value goes to *out.
// Else INVALID_ARGUMENT "--<name>: unknown value '<v>' (<every name>)".
template <typename E>
absl::Status ParseFlagChoice(const BackendFlags& flags, const std::string& name,
                             std::initializer_list<std::pair<absl::string_view, E>> choices,
                             E* out) {
  auto it = flags.find(name);
  if (it == flags.end()) return absl::OkStatus();
  std::string names;
  for (const auto& [n, e] : choices) {
    if (it->second == n) {
      *out = e;
      return absl::OkStatus();
    }
    absl::StrAppend(&names, names.empty() ? "" : ", ", n);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--", name, ": unknown value '", it->second, "' (", names, ")"));
}

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
  // Whether Forward runs plans with SeqPlan::lazy (LazyLLM pruning); else it refuses
  // them with UNIMPLEMENTED.
  virtual bool SupportsLazy() const { return false; }
  // Whether it also runs revival-mode plans (LazyPlan::revive: the Aux Cache, decode-time
  // revival, ReleaseSequence); else the engine never sends them.
  virtual bool SupportsLazyRevival() const { return false; }
  // LoRA adapters (engine/lora_adapter.h): whether Forward applies SeqPlan::adapter.
  // LoadAdapter keeps the part of `adapter` this backend computes under `id` (> 0);
  // UnloadAdapter frees it. Both are thread-safe and may run while a Forward runs (a
  // Forward keeps the adapters its plan names until it returns). A backend without
  // adapters refuses them with UNIMPLEMENTED.
  virtual bool SupportsAdapters() const { return false; }
  virtual absl::Status LoadAdapter(int64_t id, const LoraAdapter& adapter) {
    return absl::UnimplementedError(name() + " backend does not serve LoRA adapters");
  }
  virtual absl::Status UnloadAdapter(int64_t id) {
    return absl::UnimplementedError(name() + " backend does not serve LoRA adapters");
  }
  // Frees what the backend keeps for sequence `id` between steps (LazyLLM's Aux Cache),
  // zeroed first. The engine calls it when the sequence finishes or is preempted, on the
  // thread that runs Forward. No-op for a sequence it keeps nothing for.
  virtual void ReleaseSequence(SeqId id) {}
  // OK while the backend can run steps; else why it cannot any more (a tensor-parallel
  // group aborted after a rank failed). Thread-safe.
  virtual absl::Status Health() const { return absl::OkStatus(); }
  // Private mode (--private): overwrites the keys and values of `blocks` (every layer)
  // with zeros, ordered before any later Forward. The engine calls it when a block's
  // last reference is dropped, on its own thread. UNIMPLEMENTED: the backend cannot.
  virtual absl::Status ZeroKvBlocks(absl::Span<const BlockId> blocks) {
    return absl::UnimplementedError(name() + " backend cannot zero KV blocks");
  }
  // Tests: the bytes of one block's keys and values (every layer; of every rank), as
  // stored. Not while a Forward runs.
  virtual absl::StatusOr<std::vector<uint8_t>> KvBlockBytes(BlockId block) const {
    return absl::UnimplementedError(name() + " backend cannot read KV blocks");
  }
};

// Explicit registration of backends (no static initializers). Each backend registers a
// parser of its own flags into its typed options and a factory taking the common and the
// typed options; Configure parses and checks everything (no weight read, no device
// touched), Create builds the backend.
class BackendRegistry {
 public:
  template <typename Options>
  using Parser = std::function<absl::StatusOr<Options>(const BackendFlags&)>;
  template <typename Options>
  using Factory = std::function<absl::StatusOr<std::unique_ptr<Backend>>(const BackendOptions&,
                                                                         const Options&)>;

  // A backend chosen and its options checked, for Create.
  class Config {
   public:
    const std::string& name() const { return name_; }
    const BackendOptions& options() const { return options_; }

   private:
    friend class BackendRegistry;
    std::string name_;
    BackendOptions options_;
    std::shared_ptr<const void> typed_;  // the backend's Options
  };

  template <typename Options>
  void Register(const std::string& name, Parser<Options> parse, Factory<Options> create) {
    Entry e;
    e.parse = [parse](const BackendFlags& flags) -> absl::StatusOr<std::shared_ptr<const void>> {
      absl::StatusOr<Options> o = parse(flags);
      if (!o.ok()) return o.status();
      return std::shared_ptr<const void>(std::make_shared<const Options>(*std::move(o)));
    };
    e.create = [create](const BackendOptions& common, const void* typed) {
      return create(common, *static_cast<const Options*>(typed));
    };
    entries_[name] = std::move(e);
  }
  bool Has(const std::string& name) const;
  std::vector<std::string> Names() const;
  // ValidateBackendOptions(options), then the backend's parser over `flags`: errors are
  // INVALID_ARGUMENT naming the flag (or the unknown backend).
  absl::StatusOr<Config> Configure(const std::string& name, const BackendOptions& options,
                                   const BackendFlags& flags = {}) const;
  absl::StatusOr<std::unique_ptr<Backend>> Create(const Config& config) const;

 private:
  struct Entry {
    std::function<absl::StatusOr<std::shared_ptr<const void>>(const BackendFlags&)> parse;
    std::function<absl::StatusOr<std::unique_ptr<Backend>>(const BackendOptions&, const void*)>
        create;
  };
  std::map<std::string, Entry> entries_;
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
