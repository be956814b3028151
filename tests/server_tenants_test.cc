// Tenants through the real server over gRPC: per-tenant limits from the key file, a
// flood by one tenant refused at its queue bound (with a retry hint) while another
// tenant is served correctly, --max_queue_ms, and per-tenant metrics (names, never keys).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <fstream>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "server/auth.h"
#include "server/tenant_limits.h"
#include "superpose/v1/superpose.grpc.pb.h"
#include "tests/server_process.h"
#include "tests/test_util.h"

namespace superpose {
namespace {

namespace v1 = superpose::v1;
using ::testing::HasSubstr;
using ::testing::Not;

struct Call {
  grpc::Status status;
  std::vector<uint32_t> tokens;
  std::string retry_after_ms;  // the trailing metadata, if any
  absl::Time done;
};

Call Generate(v1::Superpose::Stub& stub, const std::string& key, const v1::GenerateRequest& req) {
  grpc::ClientContext ctx;
  ctx.AddMetadata("authorization", "Bearer " + key);
  auto reader = stub.Generate(&ctx, req);
  Call c;
  v1::GenerateResponse r;
  while (reader->Read(&r))
    c.tokens.insert(c.tokens.end(), r.token_ids().begin(), r.token_ids().end());
  c.status = reader->Finish();
  c.done = absl::Now();
  const auto& md = ctx.GetServerTrailingMetadata();
  if (auto it = md.find("retry-after-ms"); it != md.end()) {
    c.retry_after_ms.assign(it->second.data(), it->second.size());
  }
  return c;
}

v1::GenerateRequest Greedy(int first_token, int new_tokens) {
  v1::GenerateRequest req;
  for (int i = 0; i < 20; ++i) req.mutable_token_ids()->add_ids(first_token + i);
  req.mutable_sampling()->set_max_new_tokens(new_tokens);
  req.mutable_sampling()->set_temperature(0);
  req.set_ignore_eos(true);
  return req;
}

std::string Metrics(int port) {
  httplib::Client cli("127.0.0.1", port);
  auto res = cli.Get("/metrics");
  return res && res->status == 200 ? res->body : "";
}

std::string WriteKeys(const std::string& name, const std::string& text) {
  const std::string path = "/tmp/superpose-test-" + name + "-" + std::to_string(getpid());
  std::ofstream(path) << text;
  return path;
}

TEST(ServerTenantsTest, AFloodIsBoundedWhileAnotherTenantIsServed) {
  const std::string keys = WriteKeys("tenants",
                                     "secret-key-a1 tenant-a max_queued=2 max_priority=10\n"
                                     "secret-key-b1 tenant-b weight=2\n"
                                     "secret-key-a2 tenant-a\n");
  testing::ServerProcess server({"--model=" + testing::Stories260kDir(), "--api_keys_file=" + keys,
                                 "--max_running=1", "--max_waiting=64"});
  ASSERT_TRUE(server.ok());
  auto stub = v1::Superpose::NewStub(server.Channel());
  const v1::GenerateRequest b_req = Greedy(400, 8);
  const Call solo = Generate(*stub, "secret-key-b1", b_req);
  ASSERT_TRUE(solo.status.ok()) << solo.status.error_message();
  ASSERT_EQ(solo.tokens.size(), 8u);

  // Tenant A floods (high priority, both of its keys): once its first request runs,
  // two more may queue.
  constexpr int kFlood = 8;
  std::vector<Call> flood(kFlood);
  std::atomic<int> refused{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kFlood; ++i) {
    if (i == 1) {
      for (int k = 0; k < 3000 && testing::MetricValue(server.metrics_port(),
                                                       "superpose_running_sequences") < 1;
           ++k) {
        absl::SleepFor(absl::Milliseconds(2));
      }
    }
    threads.emplace_back([&, i] {
      v1::GenerateRequest req = Greedy(300 + i, 150);
      req.set_priority(100);
      flood[i] = Generate(*stub, i % 2 ? "secret-key-a2" : "secret-key-a1", req);
      if (flood[i].status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) ++refused;
    });
  }
  for (int i = 0; i < 3000 && refused.load() == 0; ++i) absl::SleepFor(absl::Milliseconds(2));
  ASSERT_GT(refused.load(), 0);
  // Tenant B still gets in, and its answer is the one it gets alone.
  const Call b = Generate(*stub, "secret-key-b1", b_req);
  for (auto& t : threads) t.join();
  ASSERT_TRUE(b.status.ok()) << b.status.error_message();
  EXPECT_EQ(b.tokens, solo.tokens);

  int accepted = 0, after_b = 0;
  for (const Call& c : flood) {
    if (c.status.ok()) {
      ++accepted;
      EXPECT_EQ(c.tokens.size(), 150u);
      after_b += c.done > b.done;
      continue;
    }
    ASSERT_EQ(c.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    EXPECT_THAT(c.status.error_message(), HasSubstr("tenant 'tenant-a'"));
    EXPECT_THAT(c.status.error_message(), HasSubstr("max_queued is 2"));
    EXPECT_THAT(c.status.error_message(), Not(HasSubstr("secret")));
    EXPECT_FALSE(c.retry_after_ms.empty());
  }
  EXPECT_EQ(accepted + refused.load(), kFlood);
  EXPECT_EQ(accepted, 3);
  // B was admitted at its fair share, not after the whole (higher-priority) flood: it
  // ties with A's first queued request (A's clock; the earlier head goes), then A's
  // clock is ahead.
  EXPECT_GT(after_b, 0) << accepted << " accepted";

  const std::string m = Metrics(server.metrics_port());
  EXPECT_THAT(m, HasSubstr("superpose_tenant_requests_rejected_total{tenant=\"tenant-a\","
                           "code=\"RESOURCE_EXHAUSTED\"} " +
                           std::to_string(refused.load())));
  EXPECT_THAT(m, HasSubstr("superpose_tenant_requests_finished_total{tenant=\"tenant-b\","
                           "reason=\"length\"} 2"));
  EXPECT_THAT(m, HasSubstr("superpose_tenant_requests_finished_total{tenant=\"tenant-a\","
                           "reason=\"length\"} " +
                           std::to_string(accepted)));
  EXPECT_THAT(m, HasSubstr("superpose_tenant_generated_tokens_total{tenant=\"tenant-b\"} 16"));
  EXPECT_THAT(m, HasSubstr("superpose_tenant_queue_time_seconds_count{tenant=\"tenant-b\"} 2"));
  EXPECT_THAT(m, Not(HasSubstr("secret-key")));
  std::remove(keys.c_str());
}

TEST(ServerTenantsTest, MaxQueueMsRefusesWithARetryHint) {
  testing::ServerProcess server(
      {"--model=" + testing::Stories260kDir(), "--max_running=1", "--max_queue_ms=40"});
  ASSERT_TRUE(server.ok());
  auto stub = v1::Superpose::NewStub(server.Channel());
  // One runs at a time; the backlog of eight long requests takes far longer than 40 ms,
  // so those at its back are refused.
  constexpr int kCalls = 8;
  std::vector<Call> calls(kCalls);
  std::vector<std::thread> threads;
  for (int i = 0; i < kCalls; ++i) {
    threads.emplace_back([&, i] { calls[i] = Generate(*stub, "", Greedy(300 + 10 * i, 450)); });
  }
  for (auto& t : threads) t.join();
  int refused = 0;
  for (const Call& c : calls) {
    if (c.status.ok()) {
      EXPECT_EQ(c.tokens.size(), 450u);
      continue;
    }
    ++refused;
    ASSERT_EQ(c.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
        << c.status.error_message();
    EXPECT_THAT(c.status.error_message(), HasSubstr("not admitted within 40 ms"));
    EXPECT_EQ(c.retry_after_ms, "40");
    EXPECT_TRUE(c.tokens.empty());
  }
  EXPECT_GT(refused, 0);
  EXPECT_LT(refused, kCalls);
  const std::string m = Metrics(server.metrics_port());
  EXPECT_THAT(m, HasSubstr("superpose_tenant_requests_rejected_total{tenant=\"default\","
                           "code=\"RESOURCE_EXHAUSTED\"} " +
                           std::to_string(refused)));
  // Nothing leaked: the KV pool is free again once idle.
  EXPECT_EQ(testing::MetricValue(server.metrics_port(), "superpose_kv_blocks_used"), 0);
  EXPECT_EQ(testing::MetricValue(server.metrics_port(), "superpose_waiting_sequences"), 0);
}

TEST(ServerTenantsTest, KeyFileLimitErrorsNameFileLineAndField) {
  struct Case {
    std::string text;
    std::string error;
  };
  const std::vector<Case> cases = {
      {"k1 t max_running=0\n", ":1: max_running: expected an integer in [1, "},
      {"k1 t\nk2 t weight=x\n", ":2: weight: expected an integer"},
      {"k1 t colour=red\n", ":1: unknown field 'colour'"},
      {"k1 t max_queued\n", ":1: expected name=value after the tenant"},
      {"k1 t max_queued=3\nk2 u max_queued=4\nk3 t max_queued=5\n",
       ":3: max_queued=5 conflicts with max_queued=3 on line 1"},
      {"k1 t max_priority=101\n", ":1: max_priority: expected an integer in [-100, 100]"},
  };
  for (const Case& c : cases) {
    const std::string path = WriteKeys("badlimits", c.text);
    auto a = server::Authenticator::FromFile(path);
    ASSERT_FALSE(a.ok()) << c.text;
    EXPECT_THAT(std::string(a.status().message()), HasSubstr(path + c.error)) << c.text;
    EXPECT_THAT(std::string(a.status().message()), Not(HasSubstr("k1"))) << c.text;
    std::remove(path.c_str());
  }
  // Several keys of one tenant: the limits belong to the tenant.
  const std::string path =
      WriteKeys("limits", "k1 t max_queued=3 weight=2\nk2 t max_queued=3\nk3 u\n");
  auto a = server::Authenticator::FromFile(path);
  ASSERT_TRUE(a.ok()) << a.status();
  const engine::TenantPolicies& p = a->tenant_policies();
  ASSERT_EQ(p.tenants.size(), 2u);
  EXPECT_EQ(p.For("t").max_queued, 3);
  EXPECT_EQ(p.For("t").weight, 2);
  EXPECT_EQ(p.For("u").max_queued, 0);
  std::remove(path.c_str());
  // The queue bound of tenants without max_queued (--tenant_max_waiting).
  EXPECT_EQ(server::EnginePolicies(p, -1, 64).default_max_queued, 32);  // automatic: half
  EXPECT_EQ(server::EnginePolicies(p, 5, 64).default_max_queued, 5);
  EXPECT_EQ(server::EnginePolicies(p, 0, 64).default_max_queued, 0);
  engine::TenantPolicies one;
  one.tenants["t"];
  EXPECT_EQ(server::EnginePolicies(one, -1, 64).default_max_queued, 0);  // a single tenant
  EXPECT_EQ(server::EnginePolicies(engine::TenantPolicies(), -1, 64).default_max_queued, 0);
  // A bad limit stops the server.
  const std::string bad = WriteKeys("badserver", "k1 t weight=0\n");
  testing::ServerProcess server({"--api_keys_file=" + bad});
  EXPECT_FALSE(server.ok());
  std::remove(bad.c_str());
}

}  // namespace
}  // namespace superpose
