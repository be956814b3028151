// Private mode (--private) of a real superpose-server on stories260k: the startup line,
// no core dumps, no prefix- or path-cache hits, request ids hashed in the log (one hash
// per request, on every line of it) and echoed unchanged to the client. The same run
// without --private is the control: the caches hit and the ids are logged as sent.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include <grpcpp/grpcpp.h>

#include "superpose/v1/superpose.grpc.pb.h"
#include "tests/server_process.h"
#include "tests/test_util.h"

namespace superpose {
namespace {

namespace v1 = superpose::v1;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

struct Streamed {
  v1::GenerateResponse last;
  std::set<std::string> ids;  // request_id of every response
  grpc::Status status;
};

template <typename Req, typename Call>
Streamed Run(const Req& req, Call call) {
  Streamed s;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto reader = call(&ctx, req);
  v1::GenerateResponse r;
  while (reader->Read(&r)) {
    s.ids.insert(r.request_id());
    s.last = r;
  }
  s.status = reader->Finish();
  return s;
}

v1::GenerateRequest Plain(const std::string& id) {
  v1::GenerateRequest req;
  req.set_text(
      "Once upon a time, there was a little girl named Lily. She loved to play outside in "
      "the park with her friends. One day, she saw a big red ball.");
  req.set_request_id(id);
  req.mutable_sampling()->set_temperature(0.0f);
  req.mutable_sampling()->set_max_new_tokens(4);
  return req;
}

v1::GenerateRagRequest Rag(const std::string& id) {
  v1::GenerateRagRequest req;
  req.set_preamble("Read the stories and answer the question.");
  for (const char* t : {"Lily went to the park with her mom. She saw a big red ball.",
                        "Tom had a little dog named Max. Max liked to run and jump."}) {
    req.add_documents()->set_text(t);
  }
  req.set_query("What did Lily see at the park?");
  req.set_request_id(id);
  req.mutable_rag()->set_path_cache(true);
  req.mutable_sampling()->set_temperature(0.0f);
  req.mutable_sampling()->set_max_new_tokens(4);
  return req;
}

struct Run2 {
  uint32_t cached_prompt_tokens = 0;  // over every call
  uint32_t path_cache_tokens = 0;     // over both GenerateRag calls
  double path_cache_hits = -1;        // /metrics
  std::string log;
  std::string limits;  // /proc/<pid>/limits
};

// Each request twice (the second could hit a cache), then SIGTERM.
Run2 RunTwice(bool private_mode) {
  Run2 out;
  const std::string log = "/tmp/superpose-private-test-" + std::to_string(getpid()) + ".log";
  std::vector<std::string> args = {"--model=" + testing::Stories260kDir(), "--log_level=info"};
  if (private_mode) args.push_back("--private");
  testing::ServerProcess server(args, log);
  EXPECT_TRUE(server.ok()) << ReadFile(log);
  if (!server.ok()) return out;
  out.limits = ReadFile("/proc/" + std::to_string(server.pid()) + "/limits");
  auto stub = v1::Superpose::NewStub(server.Channel());
  for (int i = 0; i < 2; ++i) {
    const std::string id = "lc-secret-id-" + std::to_string(i);
    Streamed g = Run(Plain(id), [&](grpc::ClientContext* c, const v1::GenerateRequest& r) {
      return stub->Generate(c, r);
    });
    EXPECT_TRUE(g.status.ok()) << g.status.error_message();
    EXPECT_EQ(g.ids, std::set<std::string>{id}) << "responses echo the id as sent";
    out.cached_prompt_tokens += g.last.usage().cached_prompt_tokens();
    Streamed r = Run(Rag("lc-secret-rag-" + std::to_string(i)),
                     [&](grpc::ClientContext* c, const v1::GenerateRagRequest& q) {
                       return stub->GenerateRag(c, q);
                     });
    EXPECT_TRUE(r.status.ok()) << r.status.error_message();
    out.path_cache_tokens += r.last.rag().path_cache_tokens();
    out.cached_prompt_tokens += r.last.usage().cached_prompt_tokens();
  }
  out.path_cache_hits =
      testing::MetricValue(server.metrics_port(), "superpose_rag_path_cache_hits_total");
  EXPECT_EQ(server.Stop(), 0);
  out.log = ReadFile(log);
  std::remove(log.c_str());
  return out;
}

TEST(ServerPrivateTest, PrivateModeAsDocumented) {
  const Run2 r = RunTwice(/*private_mode=*/true);
  EXPECT_NE(r.log.find("private mode: prefix cache off, RAG path cache off, KV blocks zeroed "
                       "when freed, request ids hashed in logs, core dumps off"),
            std::string::npos)
      << r.log;
  EXPECT_EQ(r.cached_prompt_tokens, 0u);
  EXPECT_EQ(r.path_cache_tokens, 0u);
  EXPECT_EQ(r.path_cache_hits, 0);
  // /proc/<pid>/limits: "Max core file size  0  0  bytes" (soft, hard). No <regex>:
  // GCC 12 warns inside it under the sanitizer build.
  const size_t core = r.limits.find("Max core file size");
  ASSERT_NE(core, std::string::npos) << r.limits;
  std::istringstream fields(r.limits.substr(core + std::strlen("Max core file size")));
  std::string soft, hard;
  fields >> soft >> hard;
  EXPECT_EQ(soft, "0") << r.limits;
  EXPECT_EQ(hard, "0") << r.limits;
  // No id as sent; each request's lines share one hash, and requests differ.
  EXPECT_EQ(r.log.find("lc-secret"), std::string::npos) << r.log;
  std::map<std::string, int> lines;
  // Every "req=h<16 hex digits> " in the log.
  for (size_t at = r.log.find("req=h"); at != std::string::npos; at = r.log.find("req=h", at + 1)) {
    const std::string id = r.log.substr(at + 4, 17);
    const bool hex =
        id.size() == 17 && id.find_first_not_of("0123456789abcdef", 1) == std::string::npos;
    if (hex && r.log.compare(at + 21, 1, " ") == 0) ++lines[id];
  }
  EXPECT_EQ(lines.size(), 4u) << r.log;  // 2 Generate + 2 GenerateRag
  for (const auto& [hash, n] : lines) EXPECT_GE(n, 2) << hash << " in\n" << r.log;
}

// The control: without --private the same requests hit the caches and the ids are
// logged as sent (so that the test above can fail).
TEST(ServerPrivateTest, WithoutPrivateModeTheCachesHit) {
  const Run2 r = RunTwice(/*private_mode=*/false);
  EXPECT_EQ(r.log.find("private mode:"), std::string::npos);
  EXPECT_GT(r.cached_prompt_tokens, 0u);
  EXPECT_GT(r.path_cache_tokens, 0u);
  EXPECT_GT(r.path_cache_hits, 0);
  EXPECT_NE(r.log.find("req=lc-secret-id-1 "), std::string::npos) << r.log;
}

}  // namespace
}  // namespace superpose
