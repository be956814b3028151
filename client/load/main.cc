// superpose-load: a load generator for superpose-server (or a balancer in front of
// several). Closed loop (--concurrency=1,4,16: N streams each sending back to back) or
// open loop (--rates=1,2,4: Poisson arrivals), synthetic / RAG / JSONL workloads;
// reports throughput, TTFT, ITL, E2E latency and goodput per level (docs/operations.md).
//   superpose-load --server=127.0.0.1:50051 --rates=1,2,4 --duration_s=30
//     --input_len=uniform:64:256 --output_len=64 --slo_ttft_ms=500 --json=out.json
// Exit status: 0 all requests succeeded, 1 some failed (see errors by status), 2 bad flags
// or the server could not be reached to prepare the workload.
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "client/load/connection.h"
#include "client/load/report.h"
#include "client/load/runner.h"
#include "client/load/settings.h"
#include "client/load/workload.h"

namespace superpose::load {
namespace {

std::vector<Phase> Levels(const Settings& s) {
  std::vector<Phase> phases;
  if (s.open_loop) {
    for (double rate : s.rates) {
      phases.push_back({absl::StrFormat("%g req/s", rate), true, rate, s.requests, s.duration_s});
    }
    return phases;
  }
  for (int n : s.concurrency) {
    int64_t requests = s.requests;
    if (requests == 0 && s.duration_s == 0)
      requests = static_cast<int64_t>(n) * s.requests_per_stream;
    phases.push_back({absl::StrFormat("%d stream%s", n, n == 1 ? "" : "s"), false,
                      static_cast<double>(n), requests, s.duration_s});
  }
  return phases;
}

int Run(const Settings& s) {
  auto channel = MakeChannel(s);
  if (!channel.ok()) {
    std::fprintf(stderr, "%s\n", std::string(channel.status().message()).c_str());
    return 2;
  }
  auto workload = MakeWorkload(s, *channel);
  if (!workload.ok()) {
    std::fprintf(stderr, "%s\n", std::string(workload.status().message()).c_str());
    return 2;
  }
  Runner runner(s, *channel, **workload);
  Totals warmup;
  if (s.warmup_requests > 0) {
    const int streams = s.open_loop ? 1 : s.concurrency.front();
    warmup =
        Count(runner.Run({"warm-up", false, static_cast<double>(streams), s.warmup_requests, 0})
                  .outcomes);
  }
  std::vector<LevelReport> levels;
  Totals measured;
  for (const Phase& phase : Levels(s)) {
    PhaseResult r = runner.Run(phase);
    const Totals t = Count(r.outcomes);
    measured.requests += t.requests;
    measured.input_tokens += t.input_tokens;
    measured.output_tokens += t.output_tokens;
    levels.push_back(
        Summarize(s, phase.open_loop ? "open" : "closed", phase.level, r.seconds, r.outcomes));
  }
  if (s.markdown) PrintTables(s, levels);
  if (!s.json.empty()) {
    if (absl::Status st = WriteJson(s, levels, warmup, measured); !st.ok()) {
      std::fprintf(stderr, "%s\n", std::string(st.message()).c_str());
      return 2;
    }
  }
  int64_t errors = 0;
  for (const LevelReport& r : levels) errors += r.errors;
  return errors == 0 ? 0 : 1;
}

}  // namespace
}  // namespace superpose::load

int main(int argc, char** argv) {
  absl::FlagsUsageConfig usage;
  usage.contains_help_flags = [](absl::string_view f) {
    return absl::StrContains(f, "client/load");
  };
  usage.contains_helpshort_flags = usage.contains_help_flags;
  absl::SetFlagsUsageConfig(usage);
  absl::SetProgramUsageMessage("superpose-load: load-test a superpose-server (docs/operations.md)");
  absl::ParseCommandLine(argc, argv);
  auto settings = superpose::load::SettingsFromFlags();
  if (!settings.ok()) {
    std::fprintf(stderr, "%s\n", std::string(settings.status().message()).c_str());
    return 2;
  }
  return superpose::load::Run(*settings);
}
