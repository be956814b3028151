#include "client/load/settings.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"

ABSL_FLAG(std::string, server, "127.0.0.1:50051", "superpose-server (or balancer) address");
ABSL_FLAG(std::string, tls_ca, "", "PEM CA certificate(s) to verify the server by; enables TLS");
ABSL_FLAG(std::string, tls_cert, "", "PEM client certificate (mutual TLS; with --tls_key)");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert");
ABSL_FLAG(std::string, tls_server_name, "",
          "Name to verify the server's certificate against instead of --server's host");
ABSL_FLAG(std::string, api_key, "",
          "API key sent as 'authorization: Bearer <key>' (default: $SUPERPOSE_API_KEY)");
ABSL_FLAG(std::string, tenant, "",
          "Tenant label of the affinity key (default: a digest of the API key, or 'default')");
ABSL_FLAG(std::string, concurrency, "1,4,16,64",
          "Closed loop: comma-separated numbers of concurrent streams, one level each");
ABSL_FLAG(std::string, rates, "",
          "Open loop: comma-separated request rates (requests/s, Poisson arrivals), one level "
          "each; replaces --concurrency");
ABSL_FLAG(double, duration_s, 0, "Seconds each level sends requests (0: bounded by --requests)");
ABSL_FLAG(int64_t, requests, 0, "Requests each level sends (0: bounded by --duration_s)");
ABSL_FLAG(int32_t, requests_per_stream, 2,
          "Closed loop without --requests or --duration_s: each stream sends this many");
ABSL_FLAG(int32_t, warmup_requests, 0,
          "Requests sent before the first level, not measured (reported apart in --json)");
ABSL_FLAG(int32_t, max_inflight, 0,
          "Open loop: at most this many requests in flight (0: no bound)");
ABSL_FLAG(uint64_t, seed, 1, "Seed of the workload and the arrival process");
ABSL_FLAG(std::string, workload, "synthetic", "synthetic | rag | jsonl");
ABSL_FLAG(std::string, input_len, "",
          "Prompt length in tokens: N, fixed:N, uniform:LO:HI, normal:MEAN:STDDEV (default: "
          "--prompt_tokens)");
ABSL_FLAG(std::string, output_len, "",
          "Generated tokens per request, same forms (default: --max_new_tokens)");
ABSL_FLAG(int32_t, prompt_tokens, 16, "Fixed prompt length (shorthand of --input_len)");
ABSL_FLAG(int32_t, max_new_tokens, 64, "Fixed output length (shorthand of --output_len)");
ABSL_FLAG(std::string, prompt_ids, "text",
          "text: windows of real text tokenized by the server (Tokenize); hash: pseudo-random ids "
          "below --vocab; lcg: the peer benchmark's ids (bench/peer_compare.sh)");
ABSL_FLAG(std::string, text_file, "",
          "UTF-8 text the prompts, documents and queries are cut from (default: a built-in text)");
ABSL_FLAG(int32_t, vocab, 256, "--prompt_ids=hash: prompt ids are drawn from [0, vocab)");
ABSL_FLAG(uint32_t, prompt_seed, 99, "--prompt_ids=lcg: seed of stream 0's first request");
ABSL_FLAG(int32_t, shared_prefix_tokens, 0,
          "synthetic: every prompt starts with one of --prefixes shared prefixes of this length");
ABSL_FLAG(int32_t, prefixes, 1, "synthetic: number of distinct shared prefixes");
ABSL_FLAG(int32_t, rag_docs, 4, "rag: documents per request");
ABSL_FLAG(int32_t, rag_pool, 32, "rag: documents in the pool shared by all requests");
ABSL_FLAG(int32_t, rag_doc_sets, 8, "rag: distinct document sets the requests draw from");
ABSL_FLAG(int32_t, rag_doc_tokens, 64, "rag: tokens per document");
ABSL_FLAG(int32_t, rag_query_tokens, 16, "rag: tokens per query");
ABSL_FLAG(std::string, rag_mode, "superposition", "rag: superposition | naive");
ABSL_FLAG(int32_t, rag_top_k, 1, "rag: paths kept after scoring");
ABSL_FLAG(bool, rag_path_cache, true, "rag: let the server reuse document KV across requests");
ABSL_FLAG(std::string, jsonl, "", "jsonl: file of requests, one JSON object a line (docs)");
ABSL_FLAG(std::string, affinity, "auto",
          "x-superpose-affinity header: auto (tenant + document-set or prompt-prefix hash), none, "
          "or key:VALUE (one key for every request)");
ABSL_FLAG(int32_t, affinity_prefix_tokens, 64,
          "auto affinity of a prompt: the hash of its first this many tokens");
ABSL_FLAG(double, slo_ttft_ms, 0, "Goodput: a request's TTFT objective (0: none)");
ABSL_FLAG(double, slo_itl_ms, 0,
          "Goodput: a request's mean inter-token latency objective (0: none)");
ABSL_FLAG(std::string, json, "", "Also write every figure and the settings to this file as JSON");
ABSL_FLAG(bool, markdown, true, "Print the result tables (markdown) on stdout");
ABSL_FLAG(bool, progress, true, "Print a live progress line on stderr");
ABSL_FLAG(double, timeout_s, 600, "Deadline of each request in seconds");
ABSL_FLAG(float, temperature, 0.0f, "Sampling temperature of every request (0: greedy)");
ABSL_FLAG(int32_t, top_k, 0, "top_k of every request (0: off)");
ABSL_FLAG(float, top_p, 1.0f, "top_p of every request (1: off)");
ABSL_FLAG(bool, ignore_eos, true, "Generate the full output length (EOS ignored)");

namespace superpose::load {
namespace {

absl::Status Bad(const std::string& flag, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", why));
}

template <typename T>
absl::StatusOr<std::vector<T>> ParseList(const std::string& flag, const std::string& text) {
  std::vector<T> out;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    T v;
    bool ok;
    if constexpr (std::is_same_v<T, int>) {
      ok = absl::SimpleAtoi(part, &v);
    } else {
      ok = absl::SimpleAtod(part, &v);
    }
    if (!ok || !(v > 0)) return Bad(flag, absl::StrCat("'", part, "' is not a positive number"));
    out.push_back(v);
  }
  if (out.empty()) return Bad(flag, "empty list");
  return out;
}

std::string DefaultTenant(const std::string& api_key) {
  if (api_key.empty()) return "default";
  uint64_t h = 1469598103934665603ull;  // FNV-1a: a label, not a secret-preserving digest
  for (unsigned char c : api_key) h = (h ^ c) * 1099511628211ull;
  return absl::StrFormat("key-%08x", static_cast<uint32_t>(h >> 32));
}

absl::Status CheckPositive(const Settings& s) {
  const std::pair<const char*, int> ints[] = {{"rag_docs", s.rag.docs},
                                              {"rag_pool", s.rag.pool},
                                              {"rag_doc_sets", s.rag.doc_sets},
                                              {"rag_doc_tokens", s.rag.doc_tokens},
                                              {"rag_query_tokens", s.rag.query_tokens},
                                              {"rag_top_k", s.rag.top_k},
                                              {"prefixes", s.prefixes},
                                              {"vocab", static_cast<int>(s.vocab)},
                                              {"affinity_prefix_tokens", s.affinity_prefix_tokens}};
  for (const auto& [flag, v] : ints) {
    if (v <= 0) return Bad(flag, "must be > 0");
  }
  if (s.rag.docs > s.rag.pool) return Bad("rag_docs", "more than --rag_pool");
  if (s.rag.mode != "superposition" && s.rag.mode != "naive") {
    return Bad("rag_mode", "superposition or naive");
  }
  if (s.duration_s < 0 || s.requests < 0 || s.warmup_requests < 0 || s.max_inflight < 0 ||
      s.shared_prefix_tokens < 0 || s.requests_per_stream <= 0) {
    return absl::InvalidArgumentError(
        "--duration_s, --requests, --warmup_requests, --max_inflight, --shared_prefix_tokens "
        "must be >= 0 and --requests_per_stream > 0");
  }
  if (s.timeout_s <= 0) return Bad("timeout_s", "must be > 0");
  return absl::OkStatus();
}

absl::Status CheckModes(const Settings& s) {
  if (s.workload != "synthetic" && s.workload != "rag" && s.workload != "jsonl") {
    return Bad("workload", "synthetic, rag or jsonl");
  }
  if (s.workload == "jsonl" && s.jsonl.empty()) return Bad("jsonl", "needed by --workload=jsonl");
  if (s.prompt_ids != "text" && s.prompt_ids != "hash" && s.prompt_ids != "lcg") {
    return Bad("prompt_ids", "text, hash or lcg");
  }
  if (s.workload == "rag" && s.prompt_ids != "text") {
    return Bad("prompt_ids", "--workload=rag cuts its documents from text (--prompt_ids=text)");
  }
  if (s.affinity != "auto" && s.affinity != "none" &&
      (s.affinity.rfind("key:", 0) != 0 || s.affinity.size() == 4)) {
    return Bad("affinity", "auto, none or key:VALUE");
  }
  if (s.open_loop && s.duration_s == 0 && s.requests == 0) {
    return Bad("rates", "an open loop needs --duration_s or --requests");
  }
  if (s.slo_ttft_ms < 0 || s.slo_itl_ms < 0) return Bad("slo_ttft_ms", "must be >= 0");
  return absl::OkStatus();
}

absl::Status ReadLevels(Settings& s) {
  if (const std::string rates = absl::GetFlag(FLAGS_rates); !rates.empty()) {
    s.open_loop = true;
    auto r = ParseList<double>("rates", rates);
    if (!r.ok()) return r.status();
    s.rates = *r;
    return absl::OkStatus();
  }
  auto c = ParseList<int>("concurrency", absl::GetFlag(FLAGS_concurrency));
  if (!c.ok()) return c.status();
  s.concurrency = *c;
  return absl::OkStatus();
}

absl::Status ReadLengths(Settings& s) {
  std::string in = absl::GetFlag(FLAGS_input_len);
  if (in.empty()) in = absl::StrCat(absl::GetFlag(FLAGS_prompt_tokens));
  std::string out = absl::GetFlag(FLAGS_output_len);
  if (out.empty()) out = absl::StrCat(absl::GetFlag(FLAGS_max_new_tokens));
  auto i = ParseDistribution("input_len", in);
  if (!i.ok()) return i.status();
  auto o = ParseDistribution("output_len", out);
  if (!o.ok()) return o.status();
  s.input_len = *i;
  s.output_len = *o;
  return absl::OkStatus();
}

void ReadRag(RagSettings& r) {
  r.docs = absl::GetFlag(FLAGS_rag_docs);
  r.pool = absl::GetFlag(FLAGS_rag_pool);
  r.doc_sets = absl::GetFlag(FLAGS_rag_doc_sets);
  r.doc_tokens = absl::GetFlag(FLAGS_rag_doc_tokens);
  r.query_tokens = absl::GetFlag(FLAGS_rag_query_tokens);
  r.mode = absl::GetFlag(FLAGS_rag_mode);
  r.top_k = absl::GetFlag(FLAGS_rag_top_k);
  r.path_cache = absl::GetFlag(FLAGS_rag_path_cache);
}

void ReadConnection(Settings& s) {
  s.server = absl::GetFlag(FLAGS_server);
  s.tls = {absl::GetFlag(FLAGS_tls_ca), absl::GetFlag(FLAGS_tls_cert), absl::GetFlag(FLAGS_tls_key),
           absl::GetFlag(FLAGS_tls_server_name)};
  s.api_key = absl::GetFlag(FLAGS_api_key);
  if (const char* env = std::getenv("SUPERPOSE_API_KEY"); s.api_key.empty() && env != nullptr) {
    s.api_key = env;
  }
  s.tenant = absl::GetFlag(FLAGS_tenant);
  if (s.tenant.empty()) s.tenant = DefaultTenant(s.api_key);
}

void ReadRest(Settings& s) {
  s.duration_s = absl::GetFlag(FLAGS_duration_s);
  s.requests = absl::GetFlag(FLAGS_requests);
  s.requests_per_stream = absl::GetFlag(FLAGS_requests_per_stream);
  s.warmup_requests = absl::GetFlag(FLAGS_warmup_requests);
  s.max_inflight = absl::GetFlag(FLAGS_max_inflight);
  s.seed = absl::GetFlag(FLAGS_seed);
  s.workload = absl::GetFlag(FLAGS_workload);
  s.prompt_ids = absl::GetFlag(FLAGS_prompt_ids);
  s.text_file = absl::GetFlag(FLAGS_text_file);
  s.vocab = static_cast<uint32_t>(std::max(0, absl::GetFlag(FLAGS_vocab)));
  s.prompt_seed = absl::GetFlag(FLAGS_prompt_seed);
  s.shared_prefix_tokens = absl::GetFlag(FLAGS_shared_prefix_tokens);
  s.prefixes = absl::GetFlag(FLAGS_prefixes);
  s.jsonl = absl::GetFlag(FLAGS_jsonl);
  s.affinity = absl::GetFlag(FLAGS_affinity);
  s.affinity_prefix_tokens = absl::GetFlag(FLAGS_affinity_prefix_tokens);
  s.slo_ttft_ms = absl::GetFlag(FLAGS_slo_ttft_ms);
  s.slo_itl_ms = absl::GetFlag(FLAGS_slo_itl_ms);
  s.json = absl::GetFlag(FLAGS_json);
  s.markdown = absl::GetFlag(FLAGS_markdown);
  s.progress = absl::GetFlag(FLAGS_progress);
  s.timeout_s = absl::GetFlag(FLAGS_timeout_s);
  s.temperature = absl::GetFlag(FLAGS_temperature);
  s.top_k = absl::GetFlag(FLAGS_top_k);
  s.top_p = absl::GetFlag(FLAGS_top_p);
  s.ignore_eos = absl::GetFlag(FLAGS_ignore_eos);
}

}  // namespace

int Distribution::Sample(std::mt19937_64& rng) const {
  double v = a;
  if (kind == Kind::kUniform) {
    v = std::uniform_int_distribution<int>(static_cast<int>(a), static_cast<int>(b))(rng);
  } else if (kind == Kind::kNormal) {
    v = std::round(std::normal_distribution<double>(a, b)(rng));
  }
  return std::max(1, static_cast<int>(v));
}

double Distribution::Mean() const { return kind == Kind::kUniform ? (a + b) / 2 : a; }

std::string Distribution::ToString() const {
  switch (kind) {
    case Kind::kUniform:
      return absl::StrCat("uniform:", a, ":", b);
    case Kind::kNormal:
      return absl::StrCat("normal:", a, ":", b);
    default:
      return absl::StrCat("fixed:", a);
  }
}

absl::StatusOr<Distribution> ParseDistribution(const std::string& flag, const std::string& text) {
  std::vector<std::string> parts = absl::StrSplit(text, ':');
  Distribution d;
  if (parts.size() == 1) parts.insert(parts.begin(), "fixed");
  const std::string& kind = parts[0];
  const size_t want = kind == "fixed" ? 2 : 3;
  if ((kind != "fixed" && kind != "uniform" && kind != "normal") || parts.size() != want) {
    return Bad(flag, "N, fixed:N, uniform:LO:HI or normal:MEAN:STDDEV");
  }
  d.kind = kind == "fixed"     ? Distribution::Kind::kFixed
           : kind == "uniform" ? Distribution::Kind::kUniform
                               : Distribution::Kind::kNormal;
  if (!absl::SimpleAtod(parts[1], &d.a) || (want == 3 && !absl::SimpleAtod(parts[2], &d.b))) {
    return Bad(flag, absl::StrCat("'", text, "' has a value that is not a number"));
  }
  if (d.a < 1 || (d.kind == Distribution::Kind::kUniform && d.b < d.a) || d.b < 0 || d.a > 1e6 ||
      d.b > 1e6) {
    return Bad(flag, absl::StrCat("'", text, "' is out of range (lengths >= 1, LO <= HI)"));
  }
  return d;
}

absl::StatusOr<Settings> SettingsFromFlags() {
  Settings s;
  ReadConnection(s);
  ReadRest(s);
  ReadRag(s.rag);
  if (absl::Status st = ReadLevels(s); !st.ok()) return st;
  if (absl::Status st = ReadLengths(s); !st.ok()) return st;
  if (absl::Status st = CheckPositive(s); !st.ok()) return st;
  if (absl::Status st = CheckModes(s); !st.ok()) return st;
  return s;
}

}  // namespace superpose::load
