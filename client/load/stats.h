// What superpose-load measures: one Outcome per finished request, summarized per level.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/synchronization/mutex.h"
#include "client/load/settings.h"

namespace superpose::load {

struct Outcome {
  grpc::StatusCode code = grpc::StatusCode::OK;
  double ttft_ms = -1;         // request sent to its first token (-1: none came)
  double e2e_ms = 0;           // request sent to the end of the call
  double decode_ms = 0;        // first token to last token
  int64_t input_tokens = 0;    // the server's usage.prompt_tokens (else the ids sent)
  int64_t output_tokens = 0;   // token ids received
  std::vector<double> itl_ms;  // gaps between consecutive tokens
};

// Collects the outcomes of one phase (a level or the warm-up); thread-safe.
class Recorder {
 public:
  void Add(Outcome o);
  std::vector<Outcome> Take();
  // Progress counters (read without the lock).
  std::atomic<int64_t> sent{0}, done{0}, errors{0}, output_tokens{0};

 private:
  absl::Mutex mu_;
  std::vector<Outcome> outcomes_ ABSL_GUARDED_BY(mu_);
};

struct Latency {
  double mean = 0, p50 = 0, p90 = 0, p99 = 0, max = 0;
  int64_t count = 0;
};

Latency Summarize(std::vector<double> v);

// One level of a run, summarized.
struct LevelReport {
  std::string loop;    // "closed" | "open"
  double level = 0;    // streams, or requests/s
  double seconds = 0;  // first request sent to last request finished
  int64_t requests = 0, ok = 0, errors = 0, good = 0;
  int64_t input_tokens = 0, output_tokens = 0;      // of successful requests
  std::map<std::string, int64_t> errors_by_status;  // gRPC code name -> count
  Latency ttft, itl, e2e, tpot;                     // tpot: a request's mean inter-token latency
  double RequestsPerSecond() const { return seconds > 0 ? ok / seconds : 0; }
  double InputTokensPerSecond() const { return seconds > 0 ? input_tokens / seconds : 0; }
  double OutputTokensPerSecond() const { return seconds > 0 ? output_tokens / seconds : 0; }
  double Goodput() const { return seconds > 0 ? good / seconds : 0; }
  std::string Label() const;
};

// `good`: successful requests that met --slo_ttft_ms and --slo_itl_ms (those set).
LevelReport Summarize(const Settings& s, const std::string& loop, double level, double seconds,
                      const std::vector<Outcome>& outcomes);

// Totals over every request of a phase, failed ones too: what the server counted.
struct Totals {
  int64_t requests = 0, input_tokens = 0, output_tokens = 0;
};
Totals Count(const std::vector<Outcome>& outcomes);

std::string StatusName(grpc::StatusCode code);

}  // namespace superpose::load
