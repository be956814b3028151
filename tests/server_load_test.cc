// superpose-load against a real server: its counts (requests, prompt and generated
// tokens, warm-up included) agree exactly with the server's /metrics for the same run,
// in both loops and for Generate and GenerateRag workloads; bad flags exit 2 naming
// the flag; it speaks TLS with an API key.
#include <gtest/gtest.h>

#include "tests/load_process.h"
#include "tests/server_process.h"
#include "tests/test_certs.h"

namespace superpose::testing {
namespace {

class LoadTest : public SharedServerTest<LoadTest> {
 public:
  static std::vector<std::string> ServerArgs() { return {}; }

 protected:
  // Runs superpose-load with `args` and checks its totals against the server's deltas.
  nlohmann::json RunAndCompare(const std::vector<std::string>& args) {
    const ServerCounts before = Scrape(server_->metrics_port());
    LoadProcess load(server_->address(), args, dir_.path());
    EXPECT_EQ(load.Wait(), 0) << load.Log();
    const ServerCounts after = Scrape(server_->metrics_port());
    const nlohmann::json j = load.Json();
    EXPECT_FALSE(j.is_discarded()) << load.Log();
    if (j.is_discarded()) return j;
    const auto total = [&](const char* field) {
      return j["totals"][field].get<double>() + j["warmup"][field].get<double>();
    };
    EXPECT_GT(j["totals"]["requests"].get<int>(), 0);
    EXPECT_EQ(total("requests"), after.requests - before.requests);
    EXPECT_EQ(total("input_tokens"), after.prompt_tokens - before.prompt_tokens);
    EXPECT_EQ(total("output_tokens"), after.generated_tokens - before.generated_tokens);
    int64_t level_requests = 0;
    for (const auto& level : j["levels"]) {
      EXPECT_EQ(level["errors"].get<int>(), 0);
      level_requests += level["requests"].get<int64_t>();
    }
    EXPECT_EQ(level_requests, j["totals"]["requests"].get<int64_t>());
    return j;
  }

  TempDir dir_;
};

TEST_F(LoadTest, ClosedLoopCountsMatchServerMetrics) {
  const nlohmann::json j =
      RunAndCompare({"--concurrency=1,3", "--requests=9", "--warmup_requests=2",
                     "--input_len=uniform:8:40", "--output_len=normal:12:4", "--seed=7"});
  ASSERT_EQ(j["levels"].size(), 2u);
  EXPECT_EQ(j["warmup"]["requests"].get<int>(), 2);
  EXPECT_EQ(j["levels"][1]["streams"].get<int>(), 3);
  const auto& l = j["levels"][1];
  EXPECT_EQ(l["ok"].get<int>(), 9);
  EXPECT_GT(l["ttft_ms"]["p50"].get<double>(), 0);
  EXPECT_LE(l["ttft_ms"]["p50"].get<double>(), l["ttft_ms"]["p99"].get<double>());
  EXPECT_GT(l["output_tok_s"].get<double>(), 0);
  EXPECT_EQ(l["good"].get<int>(), 9);  // no objectives: every success is good
}

TEST_F(LoadTest, OpenLoopRagCountsMatchServerMetrics) {
  const nlohmann::json j = RunAndCompare(
      {"--workload=rag", "--rates=40", "--requests=10", "--rag_docs=3", "--rag_pool=6",
       "--rag_doc_sets=2", "--rag_doc_tokens=24", "--output_len=6", "--slo_ttft_ms=60000"});
  ASSERT_EQ(j["levels"].size(), 1u);
  EXPECT_EQ(j["levels"][0]["loop"], "open");
  EXPECT_EQ(j["levels"][0]["good"].get<int>(), 10);
  EXPECT_EQ(j["settings"]["workload"], "rag");
}

TEST_F(LoadTest, JsonlRequestsCountsMatchServerMetrics) {
  const std::string file = dir_.path() + "/requests.jsonl";
  std::ofstream(file) << "{\"prompt\": \"Once upon a time\", \"max_new_tokens\": 5}\n\n"
                      << "{\"token_ids\": [5, 6, 7, 8], \"max_new_tokens\": 3}\n"
                      << "{\"rag\": {\"preamble\": \"Answer.\", \"documents\": [\"one doc\", "
                         "{\"text\": \"two doc\", \"id\": \"b\"}], \"query\": \"which?\"}}\n";
  const nlohmann::json j = RunAndCompare(
      {"--workload=jsonl", "--jsonl=" + file, "--concurrency=2", "--requests=6", "--output_len=4"});
  EXPECT_EQ(j["totals"]["output_tokens"].get<int>(), 2 * (5 + 3 + 4));
}

TEST_F(LoadTest, BadFlagsExitTwoNamingTheFlag) {
  const std::string file = dir_.path() + "/bad.jsonl";
  std::ofstream(file) << "{\"prompt\": 3}\n";
  const std::pair<std::vector<std::string>, std::string> cases[] = {
      {{"--input_len=uniform:9"}, "--input_len"},
      {{"--rates=2"}, "--rates"},
      {{"--concurrency=0"}, "--concurrency"},
      {{"--workload=jsonl", "--jsonl=" + file}, "bad.jsonl:1: 'prompt'"},
      {{"--affinity=key:"}, "--affinity"}};
  for (const auto& [args, want] : cases) {
    LoadProcess load(server_->address(), args, dir_.path());
    EXPECT_EQ(load.Wait(), 2) << want;
    EXPECT_NE(load.Log().find(want), std::string::npos) << load.Log();
  }
}

// --tls_ca / --tls_server_name and --api_key against a TLS server with API keys: the
// run succeeds; a wrong key or plaintext fails before the first level (exit status 2).
TEST(LoadTlsTest, TlsAndApiKey) {
  TempDir dir;
  const std::string d = dir.path();
  const Pem ca = MakeCert("test-ca", nullptr);
  const Pem server_pem = MakeCert("server", &ca, true);
  WriteFile(d + "/ca.pem", ca.cert);
  WriteFile(d + "/server.pem", server_pem.cert);
  WriteFile(d + "/server.key", server_pem.key);
  std::ofstream(d + "/keys.txt") << "key-load tenant-load\n";
  ServerProcess server({"--tls_cert=" + d + "/server.pem", "--tls_key=" + d + "/server.key",
                        "--api_keys_file=" + d + "/keys.txt"});
  ASSERT_TRUE(server.ok());
  const std::vector<std::string> tls = {"--tls_ca=" + d + "/ca.pem", "--tls_server_name=localhost",
                                        "--concurrency=2", "--requests=4", "--output_len=4"};
  auto with = [&](std::vector<std::string> extra) {
    extra.insert(extra.begin(), tls.begin(), tls.end());
    return extra;
  };
  LoadProcess ok(server.address(), with({"--api_key=key-load"}), d);
  ASSERT_EQ(ok.Wait(), 0) << ok.Log();
  EXPECT_EQ(ok.Json()["levels"][0]["ok"].get<int>(), 4);
  EXPECT_EQ(ok.Json()["settings"].dump().find("key-load"), std::string::npos);  // never the key
  LoadProcess bad_key(server.address(), with({"--api_key=wrong"}), d);
  EXPECT_EQ(bad_key.Wait(), 2);
  EXPECT_NE(bad_key.Log().find("code 16"), std::string::npos) << bad_key.Log();  // UNAUTHENTICATED
  LoadProcess plain(server.address(), {"--api_key=key-load", "--requests=1", "--timeout_s=5"}, d);
  EXPECT_EQ(plain.Wait(), 2);
}

}  // namespace
}  // namespace superpose::testing
