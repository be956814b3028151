// LazyLLM through the real server over gRPC (stories260k): the request option, usage's
// per-stage report, keep 1.0 answering like no pruning, field-naming errors with the
// server still serving, the /metrics counters, and --lazy_default.
#include <gtest/gtest.h>

#include "superpose/v1/superpose.grpc.pb.h"
#include "tests/server_process.h"
#include "tests/test_util.h"

namespace superpose {
namespace {

namespace v1 = superpose::v1;

struct Result {
  grpc::Status status;
  std::vector<uint32_t> tokens;
  v1::Usage usage;
};

Result Generate(v1::Superpose::Stub& stub, const v1::GenerateRequest& req) {
  grpc::ClientContext ctx;
  auto reader = stub.Generate(&ctx, req);
  Result r;
  v1::GenerateResponse resp;
  while (reader->Read(&resp)) {
    r.tokens.insert(r.tokens.end(), resp.token_ids().begin(), resp.token_ids().end());
    if (resp.has_usage()) r.usage = resp.usage();
  }
  r.status = reader->Finish();
  return r;
}

v1::GenerateRequest Prompt(int n, int new_tokens) {
  v1::GenerateRequest req;
  req.mutable_token_ids()->add_ids(1);
  for (int i = 1; i < n; ++i) req.mutable_token_ids()->add_ids(3 + (i * 37) % 490);
  req.mutable_sampling()->set_max_new_tokens(new_tokens);
  req.mutable_sampling()->set_temperature(0);
  req.set_ignore_eos(true);
  return req;
}

class ServerLazyTest : public testing::SharedServerTest<ServerLazyTest> {
 public:
  static std::vector<std::string> ServerArgs() {
    return {"--model=" + testing::Stories260kDir(), "--lazy_min_prompt=16"};
  }
};

TEST_F(ServerLazyTest, PrunesAndReportsEachStage) {
  auto stub = v1::Superpose::NewStub(server_->Channel());
  const double before =
      testing::MetricValue(server_->metrics_port(), "superpose_lazy_pruned_tokens_total");
  v1::GenerateRequest req = Prompt(120, 8);
  req.mutable_lazy();  // present: on, with the paper's schedule
  const Result r = Generate(*stub, req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.tokens.size(), 8u);
  const v1::LazyUsage& z = r.usage.lazy();
  // 5 layers: after layers round(0.29*5), round(0.6*5), round(0.88*5) (1-based).
  EXPECT_EQ(std::vector<uint32_t>(z.boundary_layers().begin(), z.boundary_layers().end()),
            (std::vector<uint32_t>{0, 2, 3}));
  ASSERT_EQ(z.stage_tokens_size(), 4);
  EXPECT_EQ(z.stage_tokens(0), 120u);
  // 1 + round(0.7 * 119) = 84, then 1 + round(0.7 * 83) = 59, then 1 + round(0.7 * 58) = 42.
  EXPECT_EQ(z.stage_tokens(1), 84u);
  EXPECT_EQ(z.stage_tokens(2), 59u);
  EXPECT_EQ(z.stage_tokens(3), 42u);
  EXPECT_FLOAT_EQ(z.stage_share(3), 42.0f / 120.0f);
  EXPECT_FALSE(z.has_skipped());
  EXPECT_EQ(testing::MetricValue(server_->metrics_port(), "superpose_lazy_pruned_tokens_total"),
            before + 78);
  EXPECT_GE(testing::MetricValue(server_->metrics_port(), "superpose_lazy_prefills_total"), 1);
}

TEST_F(ServerLazyTest, KeepOneAnswersLikeNoPruning) {
  auto stub = v1::Superpose::NewStub(server_->Channel());
  const Result plain = Generate(*stub, Prompt(90, 12));
  ASSERT_TRUE(plain.status.ok());
  EXPECT_FALSE(plain.usage.has_lazy());
  v1::GenerateRequest req = Prompt(90, 12);
  for (uint32_t b : {0, 2, 3}) req.mutable_lazy()->add_boundary_layers(b);
  for (int i = 0; i < 3; ++i) req.mutable_lazy()->add_keep_fractions(1.0f);
  const Result lazy = Generate(*stub, req);
  ASSERT_TRUE(lazy.status.ok()) << lazy.status.error_message();
  EXPECT_EQ(lazy.tokens, plain.tokens);
  // The plain request's prompt blocks are reused as computed; the rest runs every stage.
  EXPECT_EQ(lazy.usage.cached_prompt_tokens(), 80u);
  EXPECT_EQ(lazy.usage.lazy().stage_tokens(3), 10u);
  EXPECT_FLOAT_EQ(lazy.usage.lazy().stage_share(3), 1.0f);
}

// Decode-time revival over gRPC (lazy.revive): usage reports the revived tokens (and the
// stage counts include them), /metrics counts them; without it usage has no count.
TEST_F(ServerLazyTest, ReviveReportsRevivedTokens) {
  auto stub = v1::Superpose::NewStub(server_->Channel());
  const double before =
      testing::MetricValue(server_->metrics_port(), "superpose_lazy_revived_tokens_total");
  v1::GenerateRequest req = Prompt(120, 24);
  for (uint32_t b : {0, 2}) req.mutable_lazy()->add_boundary_layers(b);
  for (int i = 0; i < 2; ++i) req.mutable_lazy()->add_keep_fractions(0.5f);
  const Result ttft = Generate(*stub, req);
  req.mutable_lazy()->set_revive(true);
  const Result rev = Generate(*stub, req);
  ASSERT_TRUE(ttft.status.ok() && rev.status.ok()) << rev.status.error_message();
  EXPECT_EQ(rev.tokens.size(), 24u);
  EXPECT_FALSE(ttft.usage.lazy().has_revived_tokens());
  const v1::LazyUsage& z = rev.usage.lazy();
  ASSERT_TRUE(z.has_revived_tokens());
  EXPECT_GT(z.revived_tokens(), 0u);
  uint64_t grown = 0;
  for (int s = 0; s < 3; ++s) grown += z.stage_tokens(s) - ttft.usage.lazy().stage_tokens(s);
  EXPECT_EQ(grown, z.revived_tokens());
  EXPECT_EQ(testing::MetricValue(server_->metrics_port(), "superpose_lazy_revived_tokens_total"),
            before + static_cast<double>(z.revived_tokens()));
}

// GenerateRag's naive mode is one flat prompt: LazyLLM prunes it and reports it in usage;
// the superposition mode refuses the option, naming it.
TEST_F(ServerLazyTest, NaiveRagPrunesAndSuperpositionRefuses) {
  auto stub = v1::Superpose::NewStub(server_->Channel());
  v1::GenerateRagRequest req;
  req.set_preamble("A story.");
  for (const char* text : {"Tom had a big red ball. He liked to play with it in the park.",
                           "Lily saw a cat in the garden. The cat was soft and white.",
                           "The sun was hot, so Sam went to swim in the lake with his dad."}) {
    v1::RagDocument* d = req.add_documents();
    d->set_text(text);
  }
  req.set_query("Who had a ball?");
  req.mutable_rag()->set_mode(v1::RAG_MODE_NAIVE);
  req.mutable_sampling()->set_max_new_tokens(4);
  req.mutable_sampling()->set_temperature(0);
  req.set_ignore_eos(true);
  for (uint32_t b : {0, 2}) req.mutable_lazy()->add_boundary_layers(b);
  for (int i = 0; i < 2; ++i) req.mutable_lazy()->add_keep_fractions(0.5f);
  auto run = [&](const v1::GenerateRagRequest& r, v1::Usage* usage) {
    grpc::ClientContext ctx;
    auto reader = stub->GenerateRag(&ctx, r);
    v1::GenerateResponse resp;
    while (reader->Read(&resp)) {
      if (resp.has_usage()) *usage = resp.usage();
    }
    return reader->Finish();
  };
  v1::Usage usage;
  grpc::Status st = run(req, &usage);
  ASSERT_TRUE(st.ok()) << st.error_message();
  ASSERT_TRUE(usage.has_lazy());
  const v1::LazyUsage& z = usage.lazy();
  ASSERT_EQ(z.stage_tokens_size(), 3);
  EXPECT_EQ(z.stage_tokens(0), usage.prompt_tokens() - usage.cached_prompt_tokens());
  EXPECT_LT(z.stage_tokens(2), z.stage_tokens(0));
  req.mutable_rag()->set_mode(v1::RAG_MODE_SUPERPOSITION);
  st = run(req, &usage);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("lazy"), std::string::npos) << st.error_message();
  req.clear_lazy();  // the server default (off here) is not an error
  EXPECT_TRUE(run(req, &usage).ok());
}

TEST_F(ServerLazyTest, BadOptionsNameTheFieldAndTheServerKeepsServing) {
  auto stub = v1::Superpose::NewStub(server_->Channel());
  auto expect_bad = [&](std::vector<uint32_t> layers, std::vector<float> keep,
                        const std::string& field) {
    v1::GenerateRequest req = Prompt(40, 2);
    for (uint32_t b : layers) req.mutable_lazy()->add_boundary_layers(b);
    for (float k : keep) req.mutable_lazy()->add_keep_fractions(k);
    const Result r = Generate(*stub, req);
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(r.status.error_message().find(field), std::string::npos) << r.status.error_message();
  };
  expect_bad({1, 5}, {0.5f, 0.5f}, "lazy.boundary_layers[1]");
  expect_bad({3, 2}, {0.5f, 0.5f}, "lazy.boundary_layers[1]");
  expect_bad({1}, {1.25f}, "lazy.keep_fractions[0]");
  expect_bad({1, 2}, {0.5f}, "lazy.keep_fractions");
  // Short prompts and disabled requests run without pruning.
  v1::GenerateRequest short_req = Prompt(10, 2);
  short_req.mutable_lazy();
  const Result s = Generate(*stub, short_req);
  ASSERT_TRUE(s.status.ok());
  EXPECT_NE(s.usage.lazy().skipped().find("lazy_min_prompt"), std::string::npos);
  v1::GenerateRequest off = Prompt(40, 2);
  off.mutable_lazy()->set_enabled(false);
  const Result o = Generate(*stub, off);
  ASSERT_TRUE(o.status.ok());
  EXPECT_FALSE(o.usage.has_lazy());
}

TEST(ServerLazyDefaultTest, DefaultScheduleAndBadFlag) {
  testing::ServerProcess bad({"--model=" + testing::Stories260kDir(), "--lazy_default=7:0.5"});
  EXPECT_FALSE(bad.ok());  // stories260k has 5 layers
  testing::ServerProcess server(
      {"--model=" + testing::Stories260kDir(), "--lazy_default=1:0.5", "--lazy_min_prompt=16"});
  ASSERT_TRUE(server.ok());
  auto stub = v1::Superpose::NewStub(server.Channel());
  const Result r = Generate(*stub, Prompt(41, 2));
  ASSERT_TRUE(r.status.ok());
  ASSERT_EQ(r.usage.lazy().stage_tokens_size(), 2);
  EXPECT_EQ(r.usage.lazy().stage_tokens(1), 21u);  // 1 + round(0.5 * 40)
}

}  // namespace
}  // namespace superpose
