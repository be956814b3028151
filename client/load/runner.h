// Runs the levels of a load test over the gRPC callback API: a closed loop keeps N
// calls in flight; an open loop starts calls at Poisson arrival times whatever is in
// flight. Either stops sending after --requests or --duration_s and then waits for the
// calls in flight, so every request sent is measured (and the server's counters agree).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/synchronization/mutex.h"
#include "client/load/settings.h"
#include "client/load/stats.h"
#include "client/load/workload.h"
#include "superpose/v1/superpose.grpc.pb.h"

namespace superpose::load {

struct Phase {
  std::string label;
  bool open_loop = false;
  double level = 0;       // streams (closed) or requests/s (open)
  int64_t requests = 0;   // 0: no count bound
  double duration_s = 0;  // 0: no time bound
};

struct PhaseResult {
  std::vector<Outcome> outcomes;
  double seconds = 0;
};

class Runner {
 public:
  Runner(const Settings& s, std::shared_ptr<grpc::Channel> channel, const Workload& workload);
  PhaseResult Run(const Phase& phase);
  // Called by a finished call.
  void CallDone();

 private:
  using Clock = std::chrono::steady_clock;
  // Blocks until the phase may send its next request at or after `due`; false: stop.
  bool WaitTurn(const Phase& phase, Clock::time_point due, Clock::time_point end);
  void Launch(uint64_t level_index, Recorder* recorder);

  const Settings& s_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<superpose::v1::Superpose::Stub> stub_;
  const Workload& workload_;
  uint64_t next_index_ = 0;  // run-wide request index (the dispatching thread only)
  absl::Mutex mu_;
  int inflight_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace superpose::load
