// What superpose-load sends: synthetic prompts of given token lengths, RAG requests over
// a shared document pool, or the requests of a JSONL file (docs/operations.md). Each
// request is a pure function of the seed and its index, so a run is reproducible
// whatever the timing.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "client/load/settings.h"
#include "superpose/v1/superpose.grpc.pb.h"

namespace superpose::load {

struct CallSpec {
  bool rag = false;
  superpose::v1::GenerateRequest generate;        // !rag
  superpose::v1::GenerateRagRequest rag_request;  // rag
  std::string affinity;                           // x-superpose-affinity value; empty: not sent
  int64_t prompt_ids = 0;                         // token ids sent (0 for text prompts)
};

class Workload {
 public:
  virtual ~Workload() = default;
  // Request `index` of the run (`level_index`: its index within the level, used by the
  // legacy id modes that send the same prompts at every level). Thread-safe.
  virtual CallSpec Make(uint64_t index, uint64_t level_index) const = 0;
};

// Builds the workload; the text modes tokenize their text with the server's Tokenize
// (and Detokenize for documents), so lengths are in the served model's tokens.
absl::StatusOr<std::unique_ptr<Workload>> MakeWorkload(
    const Settings& s, const std::shared_ptr<grpc::Channel>& channel);

// "<tenant>/<16 hex digits>": the affinity key of `bytes` under --affinity=auto.
std::string AffinityKey(const Settings& s, const std::string& bytes);

}  // namespace superpose::load
