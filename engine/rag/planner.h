// The superposition RAG planner (docs/rag.md): the owner of a RAG request's sequences.
// A request runs a preamble sequence (unless the path cache holds it), then one path
// sequence per document over the preamble's blocks (the document's tokens unless the
// path cache has them, then a copy of the query; every within-segment token is scored),
// then prunes to the top-k paths and decodes an answer sequence whose context is the
// preamble and the kept paths. To the engine each is an ordinary sequence (batched,
// chunked, preemptible); the planner hears of them through SequenceOwner. Naive-mode
// requests run as one flat prompt, reported like superposition ones.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

#include "absl/container/flat_hash_map.h"
#include "engine/model/config.h"
#include "engine/rag/path_cache.h"
#include "engine/rag/rag.h"
#include "engine/rag/validate.h"
#include "engine/sequence/sequence.h"

namespace superpose::engine::rag {

class Planner final : public RequestOwner {
 public:
  Planner(SequenceHost* host, const ModelConfig& config, const Limits& limits);
  ~Planner() override;

  bool Claims(const Request& request) const override { return request.rag != nullptr; }
  bool FlatPrompt(const Request& request) const override {
    return request.rag->options.mode == Mode::kNaive;
  }
  absl::StatusOr<std::unique_ptr<Prepared>> Validate(const Request& request) const override;
  void Start(PendingRequest request) override;
  int64_t cache_hits() const override { return hits_.load(); }
  int64_t cache_misses() const override { return misses_.load(); }

  void OnAdmitted(Sequence& seq) override;
  bool RequestAdmitted(const Sequence& seq) const override;
  void OnScore(Sequence& seq, int32_t target, float logprob) override;
  void OnPreempted(Sequence& seq) override;
  void OnComputed(Sequence& seq, const float* row) override;
  bool OnFinished(Sequence& seq, FinishReason reason, const absl::Status& status,
                  StreamEvent* ev) override;

 private:
  struct Group;
  struct Path;
  enum Role : int32_t { kPreamble = -1, kAnswer = -2, kNaive = -3 };  // else a path index

  void StartNaive(PendingRequest request);
  void StartPaths(Group* g);
  std::unique_ptr<Sequence> NewSequence(Group* g, int32_t role);
  void OnPreambleDone(Group* g, Sequence& seq);
  void OnPathDone(Group* g, Sequence& seq, const float* row);
  void Join(Group* g);
  void Fail(Group* g, FinishReason reason, const absl::Status& status);
  void ReleaseBlocks(Group* g);
  void FillResult(Group* g, const Sequence& answer, StreamEvent* ev);
  void Forget(Group* g, Sequence* seq);  // seq is retired: no longer live

  SequenceHost* host_;
  int32_t vocab_;
  Limits limits_;
  FlopModel flop_model_;
  PathCache path_cache_;
  absl::flat_hash_map<uint64_t, std::unique_ptr<Group>> groups_;  // by client handle
  std::atomic<int64_t> hits_{0};
  std::atomic<int64_t> misses_{0};
};

}  // namespace superpose::engine::rag
