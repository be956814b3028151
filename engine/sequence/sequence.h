// A sequence: what the scheduler and the step planner know of one stream of tokens,
// and the owner it reports to. Plain requests are one sequence owned by the engine;
// a superposition RAG request (engine/rag/planner.h) owns several (a preamble, one
// path per document, an answer) through the same interface. The engine core never
// looks at what a sequence is for: only at the fields below.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/backend.h"
#include "engine/sequence/request.h"

namespace superpose::engine {

class KvBlockManager;
class SequenceOwner;
struct StreamState;  // the sampler, detokenizer and stop checker (runtime/emitter.h)

// Slot index at which own token `i` is stored in a sequence's blocks: in order, except
// that tokens from `gap_at` on (when >= 0) start on a fresh block (a RAG path's query
// after its document, so that the document's blocks hold nothing else and can be
// cached).
inline int32_t StorageIndex(int32_t gap_at, int32_t block_size, int32_t i) {
  if (gap_at < 0 || i < gap_at) return i;
  const int32_t fresh = (gap_at + block_size - 1) / block_size * block_size;
  return fresh + (i - gap_at);
}
// Blocks a sequence needs to hold its first `tokens` own tokens.
inline int32_t BlocksFor(int32_t gap_at, int32_t block_size, int32_t tokens) {
  return tokens == 0 ? 0 : StorageIndex(gap_at, block_size, tokens - 1) / block_size + 1;
}

// A sequence's LazyLLM pruning (engine/lazy.h, docs/architecture.md "LazyLLM").
struct LazyState {
  std::vector<int32_t> boundaries;  // empty: not lazy
  std::vector<float> keep;
  // Decided by its prefill: per prompt token, the stages it is computed in (later
  // tokens are in every stage). Kept over preemption, so that recomputation replays it.
  std::vector<int32_t> depth;
  std::vector<int32_t> stage_tokens;  // prompt tokens per stage, once decided
  // Own tokens computed before the deciding step (a cached prefix, in every stage): a
  // recomputation matches no more of the prefix cache than this.
  int32_t decided_at = 0;
  // Decode-time revival (LazyOptions::revive): per boundary s, the entries of stage s + 1
  // in their compact order (LazyPlan::entries) and how many the prefill made; the own
  // tokens they account for; the tokens revived so far.
  bool revive = false;
  std::vector<std::vector<LazyEntry>> entries;
  std::vector<int32_t> prefill_entries;
  int32_t recorded = 0;
  int64_t revived = 0;
  int64_t aux_reserved = 0;  // bytes of the engine's Aux Cache budget it holds
  std::string skipped;  // asked for, but not applied: why
  bool active() const { return !boundaries.empty(); }
  bool decided() const { return !depth.empty(); }
  int32_t stages() const { return static_cast<int32_t>(boundaries.size()) + 1; }
  // Stages own token i is computed in.
  int32_t DepthOf(int32_t i) const {
    return i < static_cast<int32_t>(depth.size()) ? depth[i] : stages();
  }
};

struct Sequence {
  uint64_t handle = 0;         // engine-wide unique; the SeqId of plans
  uint64_t client_handle = 0;  // the request it serves: what Engine::Cancel names
  LogId log_id;                // what log lines print of the request
  Request req;                 // sampling, stops, tenant, priority, deadline
  StreamCallback callback;     // set on sequences that stream to a client
  SequenceOwner* owner = nullptr;
  uint64_t owner_key = 0;  // the owner's own bookkeeping (e.g. a RAG group and path)
  int32_t owner_index = -1;

  // What the sequence asks of the engine.
  bool emits = false;             // samples and streams tokens (a client's output)
  bool wants_last_row = false;    // not emitting: its last logits row goes to the owner
  bool prefix_cache = false;      // matches and publishes prefix-cache blocks
  bool publishes_prefix = true;   // with prefix_cache: false matches only (LazyLLM)
  bool scored = false;            // the owner gets the log-probability of each own token
  int32_t segment_start = -1;     // scored: own token here starts a segment (not predicted)
  bool counts_as_request = true;  // counts toward the waiting-queue bound while waiting

  std::vector<int32_t> tokens;  // prompt, then generated tokens
  int32_t prompt_len = 0;
  int32_t computed = 0;  // tokens whose K/V are in `blocks`
  int32_t generated = 0;
  int32_t cached_prompt_tokens = 0;
  std::vector<BlockId> blocks;
  // Chained content hashes of its full blocks of tokens (tenant, then every token before),
  // extended as needed: prefix lookups and publishing both read it. Tokens only grow,
  // so it stays valid when the blocks are freed.
  std::vector<uint64_t> block_chain;
  int32_t published_blocks = 0;         // of `blocks`, how many are published under the chain
  std::shared_ptr<StreamState> stream;  // emitting sequences, made on their first token

  absl::Time arrival;
  absl::Time scheduled = absl::InfinitePast();
  absl::Time first_token = absl::InfinitePast();
  absl::Time last_token = absl::InfinitePast();
  bool finished = false;  // done: removed from the engine's lists at the next sweep

  // Where it sits: ancestor segments (blocks held by the owner), positions.
  std::vector<KvSegment> ctx;
  int64_t ctx_tokens = 0;
  std::vector<float> pos;  // explicit positions of tokens[0, pos.size())
  float pos_base = 0.0f;   // position of tokens[pos.size()]; +1 per later token
  int32_t gap_at = -1;     // see StorageIndex
  double flops = 0;        // FLOPs spent on this sequence (recomputation included)
  LazyState lazy;

  float PositionOf(int32_t i) const {
    return i < static_cast<int32_t>(pos.size())
               ? pos[i]
               : pos_base + static_cast<float>(i - static_cast<int32_t>(pos.size()));
  }
  int32_t remaining() const { return static_cast<int32_t>(tokens.size()) - computed; }
};

// What an owner hears of its sequences (on the engine thread). After OnComputed or
// OnFinished the engine never calls the owner about that sequence again.
class SequenceOwner {
 public:
  virtual ~SequenceOwner() = default;
  // First admitted to the running batch.
  virtual void OnAdmitted(Sequence& seq) {}
  // Whether the request `seq` serves has been admitted (any of its sequences, ever): a
  // shutdown refuses the requests that have not, at once (UNAVAILABLE).
  virtual bool RequestAdmitted(const Sequence& seq) const {
    return seq.scheduled != absl::InfinitePast();
  }
  // A scored sequence: log p(tokens[target] | tokens[0, target)).
  virtual void OnScore(Sequence& seq, int32_t target, float logprob) {}
  // Lost its KV (preempted): it will be computed again from its first token.
  virtual void OnPreempted(Sequence& seq) {}
  // A sequence that does not emit has computed every token; `row` is its last logits
  // row (wants_last_row) or null. The owner may take its blocks; the engine retires it.
  virtual void OnComputed(Sequence& seq, const float* row) {}
  // The sequence finished (its blocks are released): `ev` is its final event as the
  // engine built it (flushed text, usage). The owner may complete it; it is delivered
  // to seq.callback (logged, counted) when this returns true.
  virtual bool OnFinished(Sequence& seq, FinishReason reason, const absl::Status& status,
                          StreamEvent* ev) = 0;
};

// What the engine offers owners that run several sequences (engine thread only).
class SequenceHost {
 public:
  virtual ~SequenceHost() = default;
  virtual KvBlockManager& blocks() = 0;
  virtual int32_t block_size() const = 0;
  // A handle for a sequence of the owner's (never a client's).
  virtual uint64_t NewHandle() = 0;
  // Queues sequences: in priority order among the waiting (FCFS within a priority), or
  // ahead of every waiting sequence (`front`), keeping their order.
  virtual void Enqueue(std::vector<std::unique_ptr<Sequence>> seqs, bool front) = 0;
  // Ends a sequence without an event (a sibling of a failed request); frees its blocks.
  virtual void Drop(Sequence& seq) = 0;
  // Samples and streams an emitting sequence's next token from a row computed
  // elsewhere (it may finish the sequence).
  virtual void EmitFromRow(Sequence& seq, const float* row) = 0;
  // Delivers the final event of a request that has no sequence left to finish it
  // (counted like any finished request).
  virtual void Deliver(StreamCallback& callback, StreamEvent ev) = 0;
  // Applies seq->req.lazy (resolved at Submit) to a sequence whose prompt is one flat
  // prompt, under the engine's limits (StartLazySequence).
  virtual void StartLazy(Sequence* seq) = 0;
};

// What a request owner's Validate prepared for its Start (e.g. a RAG layout).
struct Prepared {
  virtual ~Prepared() = default;
};

// A request the engine hands to an owner whole (see RequestOwner).
struct PendingRequest {
  uint64_t handle = 0;
  LogId log_id;
  Request req;
  StreamCallback callback;
  absl::Time arrival;
  std::unique_ptr<Prepared> prepared;
};

// An owner that turns a kind of client request into its own sequences (the RAG
// planner). The engine offers every submitted request to its request owners in turn;
// a request no owner claims runs as one plain sequence.
class RequestOwner : public SequenceOwner {
 public:
  virtual bool Claims(const Request& request) const = 0;
  // Checks the request on the submitting thread (INVALID_ARGUMENT naming the field);
  // what it returns reaches Start with the request.
  virtual absl::StatusOr<std::unique_ptr<Prepared>> Validate(const Request& request) const = 0;
  // Starts it on the engine thread: makes and queues its first sequences.
  virtual void Start(PendingRequest request) = 0;
  // Whether the request runs as one flat prompt (then LazyLLM may prune it, the owner
  // calling SequenceHost::StartLazy); else a request asking for pruning is refused.
  virtual bool FlatPrompt(const Request&) const { return false; }
  // Metrics counters that may be read from any thread.
  virtual int64_t cache_hits() const { return 0; }
  virtual int64_t cache_misses() const { return 0; }
};

}  // namespace superpose::engine
