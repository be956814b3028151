// superpose-load: a load-testing client. Runs `--concurrency` streams (one thread each)
// against a server, each sending `--requests_per_stream` Generate calls back to back,
// and prints aggregate generated tokens/s, TTFT and inter-token latency percentiles.
//   superpose-load --server=127.0.0.1:50051 --concurrency=1,4,16,64 --max_new_tokens=64
// --prompt_ids=lcg sends the prompts of the llama.cpp peer benchmark (bench/peer_compare.sh);
// --json writes the results for scripts.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "superpose/v1/superpose.grpc.pb.h"

ABSL_FLAG(std::string, server, "127.0.0.1:50051", "superpose-server address");
ABSL_FLAG(std::string, concurrency, "1,4,16,64", "Comma-separated numbers of concurrent streams");
ABSL_FLAG(std::string, api_key, "",
          "API key sent as 'authorization: Bearer <key>' (default: $SUPERPOSE_API_KEY)");
ABSL_FLAG(int32_t, requests_per_stream, 2, "Requests each stream sends, back to back");
ABSL_FLAG(int32_t, prompt_tokens, 16, "Prompt length in tokens (random ids)");
ABSL_FLAG(int32_t, max_new_tokens, 64, "Tokens generated per request (EOS ignored)");
ABSL_FLAG(int32_t, vocab, 256, "--prompt_ids=hash: prompt ids are drawn from [0, vocab)");
ABSL_FLAG(std::string, prompt_ids, "hash",
          "hash: pseudo-random ids below --vocab; lcg: the peer benchmark's ids (llama.cpp, "
          "bench/peer_compare.sh): 259 + s mod (n_vocab - 259), s = (1664525 s + 1013904223) "
          "mod 2^32, n_vocab from GetModelInfo, s seeded per request with --prompt_seed + 131 "
          "stream + 7 request");
ABSL_FLAG(uint32_t, prompt_seed, 99, "--prompt_ids=lcg: seed of stream 0's first request");
ABSL_FLAG(std::string, json, "", "Also write the results to this file as JSON");
ABSL_FLAG(bool, markdown, true, "Print a markdown table");
ABSL_FLAG(float, temperature, 0.0f, "Sampling temperature of every request (0: greedy)");
ABSL_FLAG(int32_t, top_k, 0, "top_k of every request (0: off)");
ABSL_FLAG(float, top_p, 1.0f, "top_p of every request (1: off)");

namespace v1 = superpose::v1;
using Clock = std::chrono::steady_clock;

namespace {

double Pct(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p / 100.0 * (v.size() - 1) + 0.5))];
}

struct Result {
  int concurrency;
  int requests = 0;
  int errors = 0;
  int64_t tokens = 0;
  double seconds = 0;
  std::vector<double> ttft_ms, itl_ms, e2e_ms;  // e2e: request sent to stream end
};

std::string ApiKey() {
  std::string api_key = absl::GetFlag(FLAGS_api_key);
  if (const char* env = std::getenv("SUPERPOSE_API_KEY"); api_key.empty() && env != nullptr) {
    api_key = env;
  }
  return api_key;
}

// The model's vocabulary size (GetModelInfo), or 0 with a message on failure.
uint32_t ModelVocab(const std::shared_ptr<grpc::Channel>& channel) {
  auto stub = v1::Superpose::NewStub(channel);
  grpc::ClientContext ctx;
  if (const std::string key = ApiKey(); !key.empty()) {
    ctx.AddMetadata("authorization", "Bearer " + key);
  }
  v1::ModelInfo info;
  grpc::Status st = stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info);
  if (!st.ok()) {
    std::fprintf(stderr, "GetModelInfo: %s\n", st.error_message().c_str());
    return 0;
  }
  return info.vocab_size();
}

void WriteJson(const std::string& path, const std::vector<Result>& results) {
  std::ofstream f(path);
  f << "{\"prompt_tokens\": " << absl::GetFlag(FLAGS_prompt_tokens)
    << ", \"max_new_tokens\": " << absl::GetFlag(FLAGS_max_new_tokens) << ", \"levels\": [";
  for (size_t i = 0; i < results.size(); ++i) {
    const Result& r = results[i];
    f << (i ? ", " : "") << "{\"streams\": " << r.concurrency << ", \"requests\": " << r.requests
      << ", \"errors\": " << r.errors << ", \"tokens\": " << r.tokens
      << ", \"seconds\": " << r.seconds << ", \"tok_s\": " << r.tokens / r.seconds
      << ", \"ttft_ms_p50\": " << Pct(r.ttft_ms, 50) << ", \"ttft_ms_p99\": " << Pct(r.ttft_ms, 99)
      << ", \"itl_ms_p50\": " << Pct(r.itl_ms, 50) << ", \"itl_ms_p99\": " << Pct(r.itl_ms, 99)
      << ", \"e2e_ms_p50\": " << Pct(r.e2e_ms, 50) << ", \"e2e_ms_max\": " << Pct(r.e2e_ms, 100)
      << "}";
  }
  f << "]}\n";
}

// Stream s's request r. n_vocab: the model's vocabulary (--prompt_ids=lcg).
std::vector<uint32_t> PromptIds(int s, int r, uint32_t n_vocab) {
  std::vector<uint32_t> ids;
  const int n = absl::GetFlag(FLAGS_prompt_tokens);
  if (absl::GetFlag(FLAGS_prompt_ids) == "lcg") {
    // The peer's makeTokens (shared/tools/peers/bench_llamacpp.mjs): ordinary pieces.
    uint32_t x = absl::GetFlag(FLAGS_prompt_seed) + 131u * s + 7u * r;
    for (int i = 0; i < n; ++i) {
      x = x * 1664525u + 1013904223u;
      ids.push_back(259 + x % (n_vocab > 260 ? n_vocab - 259 : 1));
    }
    return ids;
  }
  uint32_t x = 2654435761u * static_cast<uint32_t>(s * 977 + r * 131 + 1);
  for (int i = 0; i < n; ++i) {
    x = x * 1664525u + 1013904223u;
    ids.push_back((x >> 8) % absl::GetFlag(FLAGS_vocab));
  }
  return ids;
}

Result RunLevel(const std::shared_ptr<grpc::Channel>& channel, int n, uint32_t n_vocab) {
  Result res;
  res.concurrency = n;
  std::mutex mu;
  const auto t0 = Clock::now();
  const std::string api_key = ApiKey();
  std::vector<std::thread> threads;
  for (int s = 0; s < n; ++s) {
    threads.emplace_back([&, s] {
      auto stub = v1::Superpose::NewStub(channel);
      for (int r = 0; r < absl::GetFlag(FLAGS_requests_per_stream); ++r) {
        v1::GenerateRequest req;
        for (uint32_t id : PromptIds(s, r, n_vocab)) req.mutable_token_ids()->add_ids(id);
        req.mutable_sampling()->set_max_new_tokens(absl::GetFlag(FLAGS_max_new_tokens));
        req.mutable_sampling()->set_temperature(absl::GetFlag(FLAGS_temperature));
        req.mutable_sampling()->set_top_k(absl::GetFlag(FLAGS_top_k));
        req.mutable_sampling()->set_top_p(absl::GetFlag(FLAGS_top_p));
        req.mutable_sampling()->set_seed(static_cast<uint64_t>(s * 1000 + r));
        req.set_ignore_eos(true);
        grpc::ClientContext ctx;
        if (!api_key.empty()) ctx.AddMetadata("authorization", "Bearer " + api_key);
        const auto start = Clock::now();
        auto reader = stub->Generate(&ctx, req);
        v1::GenerateResponse resp;
        std::vector<double> itl;
        double ttft = -1;
        auto last = start;
        int64_t toks = 0;
        while (reader->Read(&resp)) {
          const auto now = Clock::now();
          const int k = resp.token_ids_size();
          if (k == 0) continue;
          if (ttft < 0) {
            ttft = std::chrono::duration<double, std::milli>(now - start).count();
            // Further tokens merged into the first response arrived at the same time.
            for (int i = 1; i < k; ++i) itl.push_back(0);
          } else {
            const double gap = std::chrono::duration<double, std::milli>(now - last).count();
            for (int i = 0; i < k; ++i) itl.push_back(gap / k);
          }
          last = now;
          toks += k;
        }
        grpc::Status st = reader->Finish();
        const double e2e = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
        std::lock_guard<std::mutex> lock(mu);
        ++res.requests;
        if (!st.ok()) {
          ++res.errors;
          continue;
        }
        res.tokens += toks;
        res.ttft_ms.push_back(ttft);
        res.e2e_ms.push_back(e2e);
        res.itl_ms.insert(res.itl_ms.end(), itl.begin(), itl.end());
      }
    });
  }
  for (auto& t : threads) t.join();
  res.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return res;
}

}  // namespace

int main(int argc, char** argv) {
  absl::FlagsUsageConfig usage;
  usage.contains_help_flags = [](absl::string_view f) {
    return absl::StrContains(f, "superpose_load");
  };
  usage.contains_helpshort_flags = usage.contains_help_flags;
  absl::SetFlagsUsageConfig(usage);
  absl::SetProgramUsageMessage("superpose-load: load-test a superpose-server");
  absl::ParseCommandLine(argc, argv);
  grpc::ChannelArguments args;  // one HTTP/2 connection shared by all streams
  auto channel = grpc::CreateCustomChannel(absl::GetFlag(FLAGS_server),
                                           grpc::InsecureChannelCredentials(), args);
  uint32_t n_vocab = 0;
  if (const std::string mode = absl::GetFlag(FLAGS_prompt_ids); mode == "lcg") {
    if ((n_vocab = ModelVocab(channel)) == 0) return 1;
  } else if (mode != "hash") {
    std::fprintf(stderr, "--prompt_ids: hash or lcg\n");
    return 2;
  }
  std::vector<Result> results;
  for (absl::string_view c : absl::StrSplit(absl::GetFlag(FLAGS_concurrency), ',')) {
    int n;
    if (!absl::SimpleAtoi(c, &n) || n <= 0) {
      std::fprintf(stderr, "--concurrency: bad value\n");
      return 2;
    }
    results.push_back(RunLevel(channel, n, n_vocab));
    const Result& r = results.back();
    std::fprintf(stderr, "concurrency %d: %d requests, %d errors, %.1fs\n", n, r.requests, r.errors,
                 r.seconds);
  }
  const double base = results.empty() ? 0 : results[0].tokens / results[0].seconds;
  std::printf(
      "| streams | requests | errors | generated tok/s | vs %d stream(s) | TTFT p50 ms | TTFT p99 "
      "ms | ITL p50 ms | ITL p99 ms |\n",
      results.empty() ? 0 : results[0].concurrency);
  std::printf("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const Result& r : results) {
    const double tps = r.tokens / r.seconds;
    std::printf("| %d | %d | %d | %.1f | %.2fx | %.1f | %.1f | %.1f | %.1f |\n", r.concurrency,
                r.requests, r.errors, tps, base > 0 ? tps / base : 0, Pct(r.ttft_ms, 50),
                Pct(r.ttft_ms, 99), Pct(r.itl_ms, 50), Pct(r.itl_ms, 99));
  }
  if (const std::string path = absl::GetFlag(FLAGS_json); !path.empty()) WriteJson(path, results);
  int errors = 0;
  for (const Result& r : results) errors += r.errors;
  return errors == 0 ? 0 : 1;
}
