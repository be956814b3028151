// superpose-load's settings: every flag, parsed and checked once (settings.cc).
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace superpose::load {

// A length distribution: fixed:N (or N), uniform:LO:HI, normal:MEAN:STDDEV (clamped
// to >= 1). Sample() is deterministic given the generator.
struct Distribution {
  enum class Kind { kFixed, kUniform, kNormal };
  Kind kind = Kind::kFixed;
  double a = 0;  // fixed value, uniform low, normal mean
  double b = 0;  // uniform high, normal standard deviation
  int Sample(std::mt19937_64& rng) const;
  double Mean() const;
  std::string ToString() const;
};

absl::StatusOr<Distribution> ParseDistribution(const std::string& flag, const std::string& text);

struct Tls {
  std::string ca, cert, key, server_name;  // file paths; ca empty: plaintext
};

struct RagSettings {
  int docs = 4;           // documents per request
  int pool = 32;          // documents in the shared pool
  int doc_sets = 8;       // distinct document sets requests draw from
  int doc_tokens = 64;    // tokens per document (approximate: text is re-tokenized)
  int query_tokens = 16;  // tokens per query
  std::string mode = "superposition";
  int top_k = 1;
  bool path_cache = true;
};

struct Settings {
  std::string server;
  Tls tls;
  std::string api_key;  // --api_key or $SUPERPOSE_API_KEY
  std::string tenant;   // affinity namespace: --tenant, else a digest of the key, else "default"
  bool open_loop = false;
  std::vector<int> concurrency;  // closed loop levels
  std::vector<double> rates;     // open loop levels (requests per second)
  double duration_s = 0;         // per level; 0: no time bound
  int64_t requests = 0;          // per level; 0: no count bound
  int requests_per_stream = 2;   // closed loop with neither bound: requests = streams * this
  int warmup_requests = 0;
  int max_inflight = 0;  // open loop: arrivals beyond it wait (0: no bound)
  uint64_t seed = 1;
  std::string workload = "synthetic";  // synthetic | rag | jsonl
  Distribution input_len, output_len;
  std::string prompt_ids = "text";  // text | hash | lcg
  std::string text_file;
  uint32_t vocab = 256;
  uint32_t prompt_seed = 99;
  int shared_prefix_tokens = 0;
  int prefixes = 1;
  RagSettings rag;
  std::string jsonl;
  std::string affinity = "auto";  // auto | none | key:VALUE
  int affinity_prefix_tokens = 64;
  double slo_ttft_ms = 0, slo_itl_ms = 0;  // 0: no objective
  std::string json;
  bool markdown = true;
  bool progress = true;
  double timeout_s = 600;
  float temperature = 0, top_p = 1;
  int top_k = 0;
  bool ignore_eos = true;
};

// Reads and checks the flags; an error names the flag.
absl::StatusOr<Settings> SettingsFromFlags();

}  // namespace superpose::load
