// What happens to an emitting sequence's logits row: the token is sampled (or taken
// from the backend's draw), detokenized, checked against the stop conditions and
// streamed; and the final event (held-back text, usage) when it finishes.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "engine/backend.h"
#include "engine/model/config.h"
#include "engine/model/tokenizer.h"
#include "engine/runtime/sampler.h"
#include "engine/runtime/stop_checker.h"
#include "engine/sequence/sequence.h"

namespace superpose::engine {

class EngineObserver;

// The per-sequence streaming state (Sequence::stream).
struct StreamState {
  StreamState(const Request& req, const Tokenizer* tokenizer)
      : sampler(req.sampling, req.prompt_ids),
        decoder(tokenizer, req.prompt_ids, req.skip_special_tokens),
        stop(req.stop) {}
  Sampler sampler;
  DecodeStream decoder;
  StopChecker stop;
};

// A sequence's next token and its log-probabilities (when asked for).
struct Sampled {
  int32_t token = -1;
  std::vector<TokenLogprobs> logprobs;
};

class Emitter {
 public:
  Emitter(const ModelConfig& config, const Tokenizer* tokenizer, int32_t max_context)
      : config_(config), tokenizer_(tokenizer), max_context_(max_context) {}
  void SetObserver(EngineObserver* observer) { observer_ = observer; }

  // Makes seq.stream on first use.
  void EnsureStream(Sequence& seq) const;
  // The next token from one logits row: the backend's draw, a compact row or a whole
  // row. Touches only `seq`'s sampler, so rows of different sequences may be sampled
  // on different threads (after EnsureStream). `scratch`: a row's worth of memory.
  Sampled Sample(Sequence& seq, const RowView& row, std::vector<float>* scratch) const;
  // Streams a sampled token; returns why the sequence stops now (kNone: it goes on).
  FinishReason Emit(Sequence& seq, Sampled sampled);
  // The final event of a finished sequence: text held back, usage.
  StreamEvent FinalEvent(Sequence& seq, FinishReason reason, const absl::Status& status) const;

 private:
  const ModelConfig& config_;
  const Tokenizer* tokenizer_;
  int32_t max_context_;
  EngineObserver* observer_ = nullptr;
};

}  // namespace superpose::engine
