// A real superpose-server on a loopback port, driven through real gRPC clients.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <httplib.h>

#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <thread>

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include "grpc/health/v1/health.grpc.pb.h"
#include "superpose/v1/superpose.grpc.pb.h"
#include "tests/server_process.h"
#include "tests/test_util.h"

namespace superpose {
namespace {

namespace v1 = superpose::v1;
using ::testing::HasSubstr;

class ServerTest : public testing::SharedServerTest<ServerTest> {
 public:
  static std::vector<std::string> ServerArgs() { return {"--model=" + testing::Stories260kDir()}; }

 protected:
  void SetUp() override {
    ASSERT_NE(server_, nullptr);
    channel_ = server_->Channel();
    stub_ = v1::Superpose::NewStub(channel_);
    golden_ = testing::ReadJson(testing::Stories260kDir() + "/golden.json");
  }

  struct Streamed {
    std::string text;
    std::vector<uint32_t> ids;
    v1::GenerateResponse last;
    int responses = 0;
    grpc::Status status;
  };
  Streamed Stream(const v1::GenerateRequest& req) {
    Streamed s;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    auto reader = stub_->Generate(&ctx, req);
    v1::GenerateResponse r;
    while (reader->Read(&r)) {
      s.text += r.text();
      s.ids.insert(s.ids.end(), r.token_ids().begin(), r.token_ids().end());
      ++s.responses;
      s.last = r;
    }
    s.status = reader->Finish();
    return s;
  }
  v1::GenerateRequest GoldenRequest(int i) {
    v1::GenerateRequest req;
    req.set_text(golden_["generation"][i]["prompt"].get<std::string>());
    req.mutable_sampling()->set_temperature(0.0f);
    req.mutable_sampling()->set_max_new_tokens(64);
    req.set_ignore_eos(true);
    return req;
  }

  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Superpose::Stub> stub_;
  nlohmann::json golden_;
};

TEST_F(ServerTest, StreamsTheGoldenGeneration) {
  for (int i = 0; i < 2; ++i) {
    Streamed s = Stream(GoldenRequest(i));
    ASSERT_TRUE(s.status.ok()) << s.status.error_message();
    const auto& g = golden_["generation"][i];
    EXPECT_EQ(s.text, g["completion_text"].get<std::string>());
    std::vector<uint32_t> want = g["completion_ids"].get<std::vector<uint32_t>>();
    EXPECT_EQ(s.ids, want);
    EXPECT_GT(s.responses, 1) << "the answer should stream";
    EXPECT_EQ(s.last.finish_reason(), v1::FINISH_REASON_LENGTH);
    EXPECT_EQ(s.last.usage().generated_tokens(), 64u);
    EXPECT_EQ(s.last.usage().prompt_tokens(), g["prompt_ids"].size());
  }
}

TEST_F(ServerTest, TokenIdsPromptAndLogprobs) {
  v1::GenerateRequest req;
  for (int id : golden_["generation"][0]["prompt_ids"]) req.mutable_token_ids()->add_ids(id);
  req.mutable_sampling()->set_temperature(0.0f);
  req.mutable_sampling()->set_max_new_tokens(8);
  req.set_logprobs(true);
  req.set_top_logprobs(5);
  grpc::ClientContext ctx;
  auto reader = stub_->Generate(&ctx, req);
  v1::GenerateResponse r;
  std::vector<v1::TokenLogprobs> lps;
  std::vector<uint32_t> ids;
  while (reader->Read(&r)) {
    ids.insert(ids.end(), r.token_ids().begin(), r.token_ids().end());
    lps.insert(lps.end(), r.logprobs().begin(), r.logprobs().end());
  }
  ASSERT_TRUE(reader->Finish().ok());
  ASSERT_EQ(ids.size(), 8u);
  ASSERT_EQ(lps.size(), 8u);
  const auto& top5 = golden_["generation"][0]["first_step_top5"];
  ASSERT_EQ(lps[0].top_size(), 5);
  for (int k = 0; k < 5; ++k) EXPECT_EQ(lps[0].top(k).token_id(), top5[k]["id"].get<uint32_t>());
  for (size_t i = 0; i < ids.size(); ++i) {
    EXPECT_EQ(lps[i].chosen().token_id(), ids[i]);
    EXPECT_EQ(lps[i].top(0).token_id(), ids[i]) << "greedy picks the most likely token";
    EXPECT_LE(lps[i].chosen().logprob(), 0.0f);
  }
  // logprob differences equal logit differences.
  EXPECT_NEAR(lps[0].top(0).logprob() - lps[0].top(1).logprob(),
              top5[0]["logit"].get<double>() - top5[1]["logit"].get<double>(), 1e-3);
}

TEST_F(ServerTest, TokenizeDetokenizeAndModelInfo) {
  const auto& g = golden_["generation"][1];
  v1::TokenizeRequest treq;
  treq.set_text(g["prompt"].get<std::string>());
  v1::TokenizeResponse tresp;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub_->Tokenize(&ctx, treq, &tresp).ok());
  }
  std::vector<uint32_t> ids(tresp.token_ids().begin(), tresp.token_ids().end());
  EXPECT_EQ(ids, g["prompt_ids"].get<std::vector<uint32_t>>());
  EXPECT_EQ(tresp.tokens(0), "<s>");

  v1::DetokenizeRequest dreq;
  for (uint32_t id : g["prompt_ids"]) dreq.add_token_ids(id);
  for (uint32_t id : g["completion_ids"]) dreq.add_token_ids(id);
  v1::DetokenizeResponse dresp;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub_->Detokenize(&ctx, dreq, &dresp).ok());
  }
  EXPECT_EQ(dresp.text(), g["full_text"].get<std::string>());

  v1::ModelInfo info;
  grpc::ClientContext ctx;
  ASSERT_TRUE(stub_->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info).ok());
  EXPECT_EQ(info.architecture(), "LlamaForCausalLM");
  EXPECT_EQ(info.vocab_size(), 512u);
  EXPECT_EQ(info.num_layers(), 5u);
  EXPECT_EQ(info.num_attention_heads(), 8u);
  EXPECT_EQ(info.num_kv_heads(), 4u);
  EXPECT_EQ(info.head_dim(), 8u);
  EXPECT_EQ(info.context_length(), 512u);
  EXPECT_EQ(info.dtype(), "float32");
  EXPECT_EQ(info.tokenizer(), "sentencepiece-bpe");
  EXPECT_EQ(info.backend(), "cpu");
  EXPECT_EQ(info.compute_dtype(), "float32");   // auto on a float32 checkpoint
  EXPECT_EQ(info.kv_cache_dtype(), "float32");  // auto follows the weights
  EXPECT_EQ(info.model_name(), "stories260k");
  EXPECT_FALSE(info.builtin());
}

TEST_F(ServerTest, HealthIsServing) {
  auto health = grpc::health::v1::Health::NewStub(channel_);
  for (const char* service : {"", "superpose.v1.Superpose"}) {
    grpc::health::v1::HealthCheckRequest req;
    req.set_service(service);
    grpc::health::v1::HealthCheckResponse resp;
    grpc::ClientContext ctx;
    ASSERT_TRUE(health->Check(&ctx, req, &resp).ok());
    EXPECT_EQ(resp.status(), grpc::health::v1::HealthCheckResponse::SERVING);
  }
}

TEST_F(ServerTest, CancelMidwayThenServesTheNextRequest) {
  v1::GenerateRequest req = GoldenRequest(0);
  req.mutable_sampling()->set_max_new_tokens(450);
  {
    grpc::ClientContext ctx;
    auto reader = stub_->Generate(&ctx, req);
    v1::GenerateResponse r;
    ASSERT_TRUE(reader->Read(&r));
    ctx.TryCancel();
    while (reader->Read(&r)) {
    }
    grpc::Status st = reader->Finish();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::CANCELLED);
  }
  Streamed s = Stream(GoldenRequest(0));
  ASSERT_TRUE(s.status.ok());
  EXPECT_EQ(s.text, golden_["generation"][0]["completion_text"].get<std::string>());
}

// Many short streams finishing, cancelled and timing out at once: the engine thread's
// final event and gRPC's OnDone race for the stream's reactor. Under the sanitizer
// build a use-after-free here fails the server (its exit status is checked at teardown).
TEST_F(ServerTest, ManyStreamsFinishingAndCancellingAtOnceKeepServing) {
  constexpr int kThreads = 8;
  constexpr int kPerThread = 12;
  std::vector<std::thread> threads;
  std::atomic<int> finished_ok{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        v1::GenerateRequest req = GoldenRequest((t + i) % 2);
        req.mutable_sampling()->set_max_new_tokens(1 + (t * 7 + i * 3) % 6);
        grpc::ClientContext ctx;
        const int mode = (t + i) % 3;  // 0: read to the end, 1: cancel, 2: tiny deadline
        if (mode == 2) {
          ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::microseconds(300 * i));
        }
        auto reader = stub_->Generate(&ctx, req);
        v1::GenerateResponse r;
        if (mode == 1) {
          reader->Read(&r);
          ctx.TryCancel();
        }
        while (reader->Read(&r)) {
        }
        grpc::Status st = reader->Finish();
        if (mode == 0 && st.ok()) finished_ok.fetch_add(1);
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(finished_ok.load(), kThreads * kPerThread / 3);
  Streamed s = Stream(GoldenRequest(0));
  ASSERT_TRUE(s.status.ok());
  EXPECT_EQ(s.text, golden_["generation"][0]["completion_text"].get<std::string>());
}

TEST_F(ServerTest, DeadlineExpiresAndServerKeepsServing) {
  v1::GenerateRequest req = GoldenRequest(0);
  req.mutable_sampling()->set_max_new_tokens(450);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(1));
  auto reader = stub_->Generate(&ctx, req);
  v1::GenerateResponse r;
  while (reader->Read(&r)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  Streamed s = Stream(GoldenRequest(1));
  ASSERT_TRUE(s.status.ok());
  EXPECT_EQ(s.text, golden_["generation"][1]["completion_text"].get<std::string>());
}

struct BadCase {
  std::string name;
  std::function<void(v1::GenerateRequest*)> mutate;
  std::string field;
};

TEST_F(ServerTest, BadInputIsInvalidArgumentNamingTheField) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<BadCase> cases = {
      {"no prompt", [](v1::GenerateRequest* r) { r->clear_prompt(); }, "prompt"},
      {"empty ids", [](v1::GenerateRequest* r) { r->mutable_token_ids(); }, "token_ids"},
      {"unknown id",
       [](v1::GenerateRequest* r) {
         r->mutable_token_ids()->add_ids(1);
         r->mutable_token_ids()->add_ids(512);
       },
       "token_ids.ids[1]"},
      {"negative temperature",
       [](v1::GenerateRequest* r) { r->mutable_sampling()->set_temperature(-0.5f); },
       "sampling.temperature"},
      {"nan temperature",
       [nan](v1::GenerateRequest* r) { r->mutable_sampling()->set_temperature(nan); },
       "sampling.temperature"},
      {"top_p zero", [](v1::GenerateRequest* r) { r->mutable_sampling()->set_top_p(0.0f); },
       "sampling.top_p"},
      {"top_p above one", [](v1::GenerateRequest* r) { r->mutable_sampling()->set_top_p(1.5f); },
       "sampling.top_p"},
      {"max_new_tokens beyond context",
       [](v1::GenerateRequest* r) { r->mutable_sampling()->set_max_new_tokens(600); },
       "sampling.max_new_tokens"},
      {"prompt longer than context",
       [](v1::GenerateRequest* r) {
         for (int i = 0; i < 600; ++i) r->mutable_token_ids()->add_ids(300);
       },
       "prompt"},
      {"empty stop string", [](v1::GenerateRequest* r) { r->add_stop(""); }, "stop[0]"},
      {"stop token out of vocab", [](v1::GenerateRequest* r) { r->add_stop_token_ids(9999); },
       "stop_token_ids[0]"},
  };
  for (const BadCase& c : cases) {
    v1::GenerateRequest req = GoldenRequest(0);
    c.mutate(&req);
    Streamed s = Stream(req);
    EXPECT_EQ(s.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.name;
    EXPECT_THAT(s.status.error_message(), HasSubstr(c.field)) << c.name;
    EXPECT_EQ(s.responses, 0) << c.name;
  }
  // Still serving.
  Streamed s = Stream(GoldenRequest(1));
  ASSERT_TRUE(s.status.ok());
  EXPECT_EQ(s.text, golden_["generation"][1]["completion_text"].get<std::string>());
}

// Invalid UTF-8 cannot be built with the generated classes, so this sends raw bytes.
TEST_F(ServerTest, InvalidUtf8IsInvalidArgument) {
  // field 1 (text), wire type 2, length 3: "a\xff\xfe".
  const std::string wire = std::string(
      "\x0a\x03"
      "a\xff\xfe",
      5);
  grpc::GenericStub generic(channel_);
  for (const char* method :
       {"/superpose.v1.Superpose/Generate", "/superpose.v1.Superpose/Tokenize"}) {
    grpc::ClientContext ctx;
    grpc::Slice slice(wire);
    grpc::ByteBuffer request(&slice, 1);
    grpc::CompletionQueue cq;
    auto call = generic.PrepareCall(&ctx, method, &cq);
    call->StartCall(reinterpret_cast<void*>(1));
    void* tag;
    bool ok;
    cq.Next(&tag, &ok);
    call->Write(request, grpc::WriteOptions().set_last_message(), reinterpret_cast<void*>(2));
    cq.Next(&tag, &ok);
    grpc::ByteBuffer response;
    call->Read(&response, reinterpret_cast<void*>(4));
    cq.Next(&tag, &ok);
    grpc::Status st;
    call->Finish(&st, reinterpret_cast<void*>(5));
    cq.Next(&tag, &ok);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << method << ": " << st.error_message();
    EXPECT_THAT(st.error_message(), HasSubstr("text")) << method;
    cq.Shutdown();
    while (cq.Next(&tag, &ok)) {
    }
  }
  Streamed s = Stream(GoldenRequest(0));
  EXPECT_TRUE(s.status.ok());
}

// Reads one unlabelled sample from /metrics, or -1.

TEST_F(ServerTest, MetricsShowNoLeakAfterCancelsDeadlinesAndErrors) {
  const int mport = server_->metrics_port();
  ASSERT_GT(mport, 0);
  const double total = testing::MetricValue(mport, "superpose_kv_blocks_total");
  ASSERT_GT(total, 0);
  // A mix: completions, client cancels, expired deadlines, bad requests, concurrently.
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([this, i] {
      v1::GenerateRequest req = GoldenRequest(i % 2);
      // 100000 does not fit the context window: invalid.
      req.mutable_sampling()->set_max_new_tokens(i % 4 == 3 ? 100000 : 300);
      grpc::ClientContext ctx;
      if (i % 4 == 1) {
        ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(30));
      }
      auto reader = stub_->Generate(&ctx, req);
      v1::GenerateResponse r;
      int n = 0;
      while (reader->Read(&r)) {
        if (i % 4 == 2 && ++n == 3) ctx.TryCancel();
      }
      reader->Finish();
    });
  }
  for (auto& t : threads) t.join();
  double used = -1, running = -1;
  for (int i = 0; i < 200; ++i) {
    used = testing::MetricValue(mport, "superpose_kv_blocks_used");
    running = testing::MetricValue(mport, "superpose_running_sequences");
    if (used == 0 && running == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(used, 0);
  EXPECT_EQ(running, 0);
  EXPECT_EQ(testing::MetricValue(mport, "superpose_kv_blocks_free"), total);
  EXPECT_GT(testing::MetricValue(mport, "superpose_generated_tokens_total"), 0);
}

// --kv_cache_dtype reaches the backend and GetModelInfo; a bad value stops startup.
TEST(ServerFlagsTest, KvCacheDtypeIsAppliedAndReported) {
  testing::ServerProcess server(
      {"--model=" + testing::Stories260kDir(), "--kv_cache_dtype=bfloat16"});
  ASSERT_TRUE(server.ok());
  {  // the client's connection closes before the server stops
    auto stub = v1::Superpose::NewStub(server.Channel());
    v1::ModelInfo info;
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info).ok());
    EXPECT_EQ(info.compute_dtype(), "float32");
    EXPECT_EQ(info.kv_cache_dtype(), "bfloat16");
    v1::GenerateRequest req;
    req.set_text("Once upon a time");
    req.mutable_sampling()->set_max_new_tokens(8);
    req.set_ignore_eos(true);
    grpc::ClientContext gctx;
    auto reader = stub->Generate(&gctx, req);
    v1::GenerateResponse r;
    uint32_t generated = 0;
    while (reader->Read(&r)) generated += static_cast<uint32_t>(r.token_ids_size());
    EXPECT_TRUE(reader->Finish().ok());
    EXPECT_EQ(generated, 8u);
  }
  EXPECT_EQ(server.Stop(), 0);

  testing::ServerProcess bad({"--model=" + testing::Stories260kDir(), "--kv_cache_dtype=fp8"});
  EXPECT_FALSE(bad.ok());
}

// Runs superpose-server with `args` (after --backend=cpu; a later --backend wins) until
// it exits; returns its exit status and its output (the log).
std::pair<int, std::string> RunServerToExit(const std::vector<std::string>& args) {
  const std::string log =
      ::testing::TempDir() + "/superpose-startup-" + std::to_string(getpid()) + ".log";
  std::string cmd = "timeout 120 " + std::string(SP_BINARY_DIR) +
                    "/superpose-server --listen=127.0.0.1:0 --metrics_listen= --backend=cpu";
  for (const std::string& a : args) cmd += " '" + a + "'";
  cmd += " >'" + log + "' 2>&1";
  const int status = std::system(cmd.c_str());
  std::ifstream in(log);
  std::stringstream out;
  out << in.rdbuf();
  std::remove(log.c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out.str()};
}

// A bad backend option stops startup before the model is read, naming the flag: the
// model directory does not exist, and the error is the flag's, not the model's.
TEST(ServerFlagsTest, BadBackendOptionsFailStartupBeforeTheModelIsRead) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"--kv_cache_dtype=bf17", "--kv_cache_dtype: unknown value 'bf17' (auto, float32, bfloat16)"},
      {"--cpu_dtype=float16",
       "--cpu_dtype: unknown value 'float16' (auto, float32, bfloat16, int8, q4)"},
      {"--cuda_graphs=false", "--cuda_graphs: not an option of the cpu backend"},
      {"--tp=0", "--tp: must be >= 1"},
      {"--simd=avx9", "--simd: unknown or unsupported SIMD target 'avx9' (this CPU: auto, "},
  };
  for (const auto& [flag, message] : cases) {
    const auto [status, output] = RunServerToExit({"--model=/nonexistent/model", flag});
    EXPECT_NE(status, 0) << flag;
    EXPECT_THAT(output, HasSubstr(message)) << flag;
    EXPECT_THAT(output, ::testing::Not(HasSubstr("cannot load model"))) << flag;
  }
}

}  // namespace
}  // namespace superpose
