// Shutdown of a real superpose-server (docs/operations.md "Shutdown"): SIGTERM while
// streams run and requests queue, with an idle client connection open. Health turns
// NOT_SERVING at once and stays reachable; new and queued requests get UNAVAILABLE at
// once; running streams cut at the end of the grace get a final message with usage and
// finish_reason CANCELLED before an OK status; the process exits soon after the grace
// with every KV block free.
#include <gtest/gtest.h>

#include <signal.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "grpc/health/v1/health.grpc.pb.h"
#include "superpose/v1/superpose.grpc.pb.h"
#include "tests/server_process.h"

namespace superpose {
namespace {

namespace v1 = superpose::v1;
using Clock = std::chrono::steady_clock;
using HealthResponse = grpc::health::v1::HealthCheckResponse;

constexpr int kMaxNewTokens = 2000;  // the built-in model's context is 2048

// One Generate call on its own thread.
class Stream {
 public:
  Stream(v1::Superpose::Stub* stub, const std::string& id) {
    v1::GenerateRequest req;
    req.set_text("Once upon a time");
    req.set_request_id(id);
    req.set_ignore_eos(true);
    req.mutable_sampling()->set_temperature(0.0f);
    req.mutable_sampling()->set_max_new_tokens(kMaxNewTokens);
    ctx_.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    thread_ = std::thread([this, stub, req] {
      auto reader = stub->Generate(&ctx_, req);
      v1::GenerateResponse r;
      while (reader->Read(&r)) {
        last_ = r;
        responses_.fetch_add(1);
      }
      status_ = reader->Finish();
      done_at_ = Clock::now();
    });
  }
  ~Stream() { Join(); }
  void Join() {
    if (thread_.joinable()) thread_.join();
  }
  int responses() const { return responses_.load(); }
  // After Join().
  const v1::GenerateResponse& last() const { return last_; }
  const grpc::Status& status() const { return status_; }
  Clock::time_point done_at() const { return done_at_; }

 private:
  grpc::ClientContext ctx_;
  std::thread thread_;
  std::atomic<int> responses_{0};
  v1::GenerateResponse last_;
  grpc::Status status_;
  Clock::time_point done_at_;
};

template <typename Pred>
bool WaitUntil(Pred pred, std::chrono::seconds timeout) {
  const auto end = Clock::now() + timeout;
  while (!pred()) {
    if (Clock::now() > end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

// The health status, or UNKNOWN when the call itself failed (server unreachable).
HealthResponse::ServingStatus Health(grpc::health::v1::Health::Stub* stub, grpc::Status* st) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  grpc::health::v1::HealthCheckRequest req;
  req.set_service("superpose.v1.Superpose");
  HealthResponse resp;
  *st = stub->Check(&ctx, req, &resp);
  return st->ok() ? resp.status() : HealthResponse::UNKNOWN;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST(ServerShutdownTest, DrainsAsDocumented) {
  const std::string log = "/tmp/superpose-shutdown-test-" + std::to_string(getpid()) + ".log";
  // The built-in model (fast to load, context 2048); two tokens per step and two running
  // sequences: the long streams are still running when the grace ends.
  testing::ServerProcess server(
      {"--shutdown_grace_s=1", "--max_running=2", "--max_batch_tokens=2", "--log_level=info"}, log);
  ASSERT_TRUE(server.ok()) << ReadFile(log);
  auto channel = server.Channel();
  auto stub = v1::Superpose::NewStub(channel);
  auto health = grpc::health::v1::Health::NewStub(channel);

  std::vector<std::unique_ptr<Stream>> running, queued;
  for (int i = 0; i < 2; ++i)
    running.push_back(std::make_unique<Stream>(stub.get(), "run-" + std::to_string(i)));
  for (auto& s : running) {
    ASSERT_TRUE(WaitUntil([&] { return s->responses() > 0; }, std::chrono::seconds(60)));
  }
  for (int i = 0; i < 2; ++i)
    queued.push_back(std::make_unique<Stream>(stub.get(), "queued-" + std::to_string(i)));
  ASSERT_TRUE(WaitUntil(
      [&] {
        return testing::MetricValue(server.metrics_port(), "superpose_waiting_sequences") == 2;
      },
      std::chrono::seconds(60)));
  // A second client with an open, idle connection.
  auto idle = grpc::CreateChannel(server.address(), grpc::InsecureChannelCredentials());
  ASSERT_TRUE(idle->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10)));
  grpc::Status st;
  ASSERT_EQ(Health(health.get(), &st), HealthResponse::SERVING) << st.error_message();

  server.Signal(SIGTERM);
  const auto signalled = Clock::now();
  // Health: NOT_SERVING soon, answered (the health service stays up during the drain).
  HealthResponse::ServingStatus h = HealthResponse::SERVING;
  ASSERT_TRUE(WaitUntil([&] { return (h = Health(health.get(), &st)) != HealthResponse::SERVING; },
                        std::chrono::seconds(10)));
  EXPECT_EQ(h, HealthResponse::NOT_SERVING) << st.error_code() << " " << st.error_message();
  EXPECT_TRUE(st.ok()) << st.error_message();
  const auto not_serving_at = Clock::now();
  // A new request is refused at once.
  Stream late(stub.get(), "late");
  late.Join();
  EXPECT_EQ(late.status().error_code(), grpc::StatusCode::UNAVAILABLE)
      << late.status().error_message();
  EXPECT_EQ(late.responses(), 0);

  for (auto& s : queued) s->Join();
  for (auto& s : running) s->Join();
  for (auto& s : queued) {
    EXPECT_EQ(s->status().error_code(), grpc::StatusCode::UNAVAILABLE)
        << s->status().error_message();
    EXPECT_EQ(s->responses(), 0);
    // Refused at once, not held for the grace: before any running stream ended.
    for (auto& r : running) EXPECT_LT(s->done_at(), r->done_at());
  }
  // Orderings, not timings: NOT_SERVING and the refusals came while the running
  // streams still ran (they end at the end of the grace).
  for (auto& r : running) {
    EXPECT_LT(not_serving_at, r->done_at());
    EXPECT_LT(late.done_at(), r->done_at());
  }
  for (auto& s : running) {
    EXPECT_TRUE(s->status().ok()) << s->status().error_code() << " " << s->status().error_message();
    EXPECT_EQ(s->last().finish_reason(), v1::FINISH_REASON_CANCELLED);
    ASSERT_TRUE(s->last().has_usage());
    EXPECT_GT(s->last().usage().generated_tokens(), 0u);
    EXPECT_LT(s->last().usage().generated_tokens(), static_cast<uint32_t>(kMaxNewTokens));
    EXPECT_GT(s->last().usage().prompt_tokens(), 0u);
  }
  // Exits soon after the grace (generous bound: not a timing assertion), idle
  // connection and all.
  EXPECT_EQ(server.WaitExit(std::chrono::seconds(30)), 0);
  EXPECT_LT(Clock::now() - signalled, std::chrono::seconds(30));

  const std::string text = ReadFile(log);
  // "drained: ... kv_blocks_free=FREE/TOTAL" (no <regex>: GCC 12 warns inside it
  // under the sanitizer build).
  const size_t drained = text.find("drained: ");
  ASSERT_NE(drained, std::string::npos) << text;
  const size_t at = text.find("kv_blocks_free=", drained);
  ASSERT_NE(at, std::string::npos) << text;
  long free_blocks = -1, total_blocks = -2;
  ASSERT_EQ(std::sscanf(text.c_str() + at, "kv_blocks_free=%ld/%ld", &free_blocks, &total_blocks),
            2)
      << text;
  EXPECT_EQ(free_blocks, total_blocks) << "KV blocks leaked";
  EXPECT_NE(text.find("streams all closed"), std::string::npos) << text;
  std::remove(log.c_str());
}

// With nothing running, an idle client connection does not hold the exit: gRPC's own
// graceful shutdown waited about 5 s for such a connection (measured: 5.1 s before the
// fix, 0.1 s after); the server now closes it. The time is printed; the bound (4 s) is
// far above the 0.1 s it takes and below the 5 s it used to.
TEST(ServerShutdownTest, IdleConnectionDoesNotHoldTheExit) {
  testing::ServerProcess server({"--shutdown_grace_s=10"});
  ASSERT_TRUE(server.ok());
  auto idle = server.Channel();
  ASSERT_TRUE(idle->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10)));
  grpc::Status st;
  auto health = grpc::health::v1::Health::NewStub(idle);
  ASSERT_EQ(Health(health.get(), &st), HealthResponse::SERVING) << st.error_message();
  const auto signalled = Clock::now();
  server.Signal(SIGTERM);
  EXPECT_EQ(server.WaitExit(std::chrono::seconds(30)), 0);
  const double s = std::chrono::duration<double>(Clock::now() - signalled).count();
  std::printf("exit %.2f s after SIGTERM with an idle connection open (grace 10 s)\n", s);
  EXPECT_LT(s, 4.0) << "an idle connection held the exit";
}

}  // namespace
}  // namespace superpose
