// Engine-private state: sequences and RAG request groups. Only engine*.cc include this.
#pragma once

#include <memory>
#include <vector>

#include "engine/model/tokenizer.h"
#include "engine/rag/rag.h"
#include "engine/runtime/engine.h"
#include "engine/runtime/sampler.h"
#include "engine/runtime/stop_checker.h"

namespace superpose::engine {

// What a sequence is for. Plain requests are kGenerate. A superposition RAG request
// runs a kPreamble sequence, then one kPath sequence per document (document tokens
// unless cached, then the query copy, scored), then one kAnswer sequence over the
// preamble and the kept paths.
enum class SeqRole { kGenerate, kPreamble, kPath, kAnswer };

struct Engine::Sequence {
  uint64_t handle = 0;
  LogId log_id;  // what log lines print of the request
  Request req;
  StreamCallback callback;
  std::vector<int32_t> tokens;  // prompt, then generated tokens
  int32_t prompt_len = 0;
  int32_t computed = 0;  // tokens whose K/V are in `blocks`
  int32_t generated = 0;
  int32_t cached_prompt_tokens = 0;
  std::vector<BlockId> blocks;
  std::vector<uint64_t> block_hashes;  // chained hashes of the full blocks published so far
  bool prefix_checked = false;
  std::unique_ptr<Sampler> sampler;
  std::unique_ptr<DecodeStream> decoder;
  std::unique_ptr<StopChecker> stop;
  absl::Time arrival;
  absl::Time scheduled = absl::InfinitePast();
  absl::Time first_token = absl::InfinitePast();
  absl::Time last_token = absl::InfinitePast();
  bool finished = false;  // done: removed from the lists at the next sweep

  // RAG.
  SeqRole role = SeqRole::kGenerate;
  RagGroup* group = nullptr;  // owned by Engine::groups_
  int32_t path = -1;
  std::vector<KvSegment> ctx;  // ancestor segments (blocks held by the group)
  int64_t ctx_tokens = 0;
  std::vector<float> pos;  // explicit positions of tokens[0, pos.size())
  float pos_base = 0.0f;   // position of tokens[pos.size()]; +1 per later token
  int32_t gap_at = -1;     // own tokens from here on start on a fresh block
  int32_t doc_len = 0;     // kPath: leading own tokens that are the document
  rag::PathLikelihood ll;  // kPath: accumulated log-likelihoods
  double flops = 0;        // FLOPs spent on this sequence (recomputation included)

  float PositionOf(int32_t i) const {
    return i < static_cast<int32_t>(pos.size())
               ? pos[i]
               : pos_base + static_cast<float>(i - static_cast<int32_t>(pos.size()));
  }
  uint64_t client_handle() const;
  bool internal() const { return role == SeqRole::kPreamble || role == SeqRole::kPath; }
};

struct Engine::RagGroup {
  uint64_t handle = 0;
  LogId log_id;  // what log lines print of the request
  Request req;   // req.rag holds the spec
  StreamCallback callback;
  rag::Layout layout;
  absl::Time arrival;
  absl::Time scheduled = absl::InfinitePast();
  bool done = false;

  std::vector<BlockId> preamble_blocks;
  int32_t preamble_len = 0;
  int32_t prefix_cached = 0;
  double preamble_flops = 0;

  struct Path {
    uint64_t key = 0;
    bool cached = false;
    std::vector<BlockId> doc_blocks;
    std::vector<BlockId> query_blocks;
    rag::PathLikelihood ll;
    double score = 0;
    bool done = false;
    bool kept = false;
    double flops = 0;
    std::vector<float> last_logits;  // without a postamble: the first answer token
  };
  std::vector<Path> paths;
  int32_t pending = 0;
  std::shared_ptr<rag::Result> result;

  const rag::Spec& spec() const { return *req.rag; }
};

inline uint64_t Engine::Sequence::client_handle() const {
  return group != nullptr ? group->handle : handle;
}

}  // namespace superpose::engine
