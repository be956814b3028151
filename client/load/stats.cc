#include "client/load/stats.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_format.h"

namespace superpose::load {
namespace {

// Linear interpolation between closest ranks (numpy's default).
double Percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0;
  const double rank = p / 100.0 * static_cast<double>(sorted.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(rank));
  const size_t hi = std::min(sorted.size() - 1, lo + 1);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - static_cast<double>(lo));
}

bool MeetsSlo(const Settings& s, const Outcome& o) {
  if (o.code != grpc::StatusCode::OK) return false;
  if (s.slo_ttft_ms > 0 && (o.ttft_ms < 0 || o.ttft_ms > s.slo_ttft_ms)) return false;
  if (s.slo_itl_ms > 0 && o.output_tokens > 1 &&
      o.decode_ms / static_cast<double>(o.output_tokens - 1) > s.slo_itl_ms) {
    return false;
  }
  return true;
}

}  // namespace

void Recorder::Add(Outcome o) {
  if (o.code != grpc::StatusCode::OK) errors.fetch_add(1);
  output_tokens.fetch_add(o.output_tokens);
  {
    absl::MutexLock lock(&mu_);
    outcomes_.push_back(std::move(o));
  }
  done.fetch_add(1);
}

std::vector<Outcome> Recorder::Take() {
  absl::MutexLock lock(&mu_);
  return std::move(outcomes_);
}

Latency Summarize(std::vector<double> v) {
  Latency l;
  if (v.empty()) return l;
  std::sort(v.begin(), v.end());
  l.count = static_cast<int64_t>(v.size());
  l.mean = std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
  l.p50 = Percentile(v, 50);
  l.p90 = Percentile(v, 90);
  l.p99 = Percentile(v, 99);
  l.max = v.back();
  return l;
}

std::string LevelReport::Label() const {
  if (loop == "open") return absl::StrFormat("%g req/s", level);
  return absl::StrFormat("%g stream%s", level, level == 1 ? "" : "s");
}

LevelReport Summarize(const Settings& s, const std::string& loop, double level, double seconds,
                      const std::vector<Outcome>& outcomes) {
  LevelReport r;
  r.loop = loop;
  r.level = level;
  r.seconds = seconds;
  std::vector<double> ttft, itl, e2e, tpot;
  for (const Outcome& o : outcomes) {
    ++r.requests;
    if (o.code != grpc::StatusCode::OK) {
      ++r.errors;
      ++r.errors_by_status[StatusName(o.code)];
      continue;
    }
    ++r.ok;
    r.good += MeetsSlo(s, o) ? 1 : 0;
    r.input_tokens += o.input_tokens;
    r.output_tokens += o.output_tokens;
    if (o.ttft_ms >= 0) ttft.push_back(o.ttft_ms);
    e2e.push_back(o.e2e_ms);
    itl.insert(itl.end(), o.itl_ms.begin(), o.itl_ms.end());
    if (o.output_tokens > 1) tpot.push_back(o.decode_ms / static_cast<double>(o.output_tokens - 1));
  }
  r.ttft = Summarize(std::move(ttft));
  r.itl = Summarize(std::move(itl));
  r.e2e = Summarize(std::move(e2e));
  r.tpot = Summarize(std::move(tpot));
  return r;
}

Totals Count(const std::vector<Outcome>& outcomes) {
  Totals t;
  for (const Outcome& o : outcomes) {
    ++t.requests;
    t.input_tokens += o.input_tokens;
    t.output_tokens += o.output_tokens;
  }
  return t;
}

std::string StatusName(grpc::StatusCode code) {
  static const char* const kNames[] = {"OK",
                                       "CANCELLED",
                                       "UNKNOWN",
                                       "INVALID_ARGUMENT",
                                       "DEADLINE_EXCEEDED",
                                       "NOT_FOUND",
                                       "ALREADY_EXISTS",
                                       "PERMISSION_DENIED",
                                       "RESOURCE_EXHAUSTED",
                                       "FAILED_PRECONDITION",
                                       "ABORTED",
                                       "OUT_OF_RANGE",
                                       "UNIMPLEMENTED",
                                       "INTERNAL",
                                       "UNAVAILABLE",
                                       "DATA_LOSS",
                                       "UNAUTHENTICATED"};
  const int c = static_cast<int>(code);
  return c >= 0 && c < 17 ? kNames[c] : absl::StrFormat("CODE_%d", c);
}

}  // namespace superpose::load
