// LoRA adapters through the real server (stories260k, random PEFT adapters written to
// a temporary directory): a request per adapter over gRPC, unknown adapters refused
// naming adapter_id while the server keeps serving, GenerateRag with an adapter, the
// SuperposeAdmin rpcs (list, load, unload; LRU eviction and reload at --max_adapters),
// admin keys, and the OpenAI HTTP API's `model` naming an adapter.
#include <gtest/gtest.h>
#include <httplib.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "engine/lora_adapter.h"
#include "engine/runtime/model_bundle.h"
#include "nlohmann/json.hpp"
#include "superpose/v1/superpose.grpc.pb.h"
#include "tests/server_process.h"
#include "tests/test_util.h"

namespace superpose {
namespace {

namespace v1 = superpose::v1;
using nlohmann::json;

std::string Root() {
  return (std::filesystem::temp_directory_path() / ("server_lora_" + std::to_string(getpid())))
      .string();
}

// Random adapters a1..a3 (rank 8, 16, 8) under Root().
void WriteAdapters() {
  auto m = engine::LoadModelBundle(testing::Stories260kDir());
  ASSERT_TRUE(m.ok()) << m.status();
  const std::vector<int32_t> all = {0, 1, 2, 3, 4, 5, 6};
  const int ranks[] = {8, 16, 8};
  for (int i = 0; i < 3; ++i) {
    engine::LoraAdapter a =
        engine::RandomLoraAdapter(m->config, ranks[i], 16.0f, all, 500 + i, 0.15f);
    a.base_model = "stories260k";
    ASSERT_TRUE(
        engine::WritePeftAdapter(Root() + "/a" + std::to_string(i + 1), a, engine::DType::kBF16)
            .ok());
  }
}

struct Result {
  grpc::Status status;
  std::vector<uint32_t> tokens;
  std::vector<float> logprobs;
};

template <typename Req>
Result Call(v1::Superpose::Stub& stub, const Req& req) {
  grpc::ClientContext ctx;
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader;
  if constexpr (std::is_same_v<Req, v1::GenerateRequest>) {
    reader = stub.Generate(&ctx, req);
  } else {
    reader = stub.GenerateRag(&ctx, req);
  }
  Result r;
  v1::GenerateResponse resp;
  while (reader->Read(&resp)) {
    r.tokens.insert(r.tokens.end(), resp.token_ids().begin(), resp.token_ids().end());
    for (const auto& lp : resp.logprobs()) r.logprobs.push_back(lp.chosen().logprob());
  }
  r.status = reader->Finish();
  return r;
}

v1::GenerateRequest Prompt(const std::string& adapter) {
  v1::GenerateRequest req;
  req.set_text("Once upon a time, there was a little girl");
  req.mutable_sampling()->set_max_new_tokens(10);
  req.mutable_sampling()->set_temperature(0);
  req.set_ignore_eos(true);
  req.set_logprobs(true);
  if (!adapter.empty()) req.set_adapter_id(adapter);
  return req;
}

class ServerLoraTest : public ::testing::Test {
 public:
  static void SetUpTestSuite() {
    std::filesystem::remove_all(Root());
    WriteAdapters();
    http_port_file_ = Root() + "/http-port";
    server_ = new testing::ServerProcess({"--model=" + testing::Stories260kDir(),
                                          "--adapters=a1=" + Root() + "/a1,a2=" + Root() + "/a2",
                                          "--max_adapters=2", "--http_listen=127.0.0.1:0",
                                          "--http_port_file=" + http_port_file_});
    ASSERT_TRUE(server_->ok()) << "superpose-server with --adapters did not start";
    for (int i = 0; i < 100 && http_port_ == 0; ++i) {
      std::ifstream(http_port_file_) >> http_port_;
      if (http_port_ == 0) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
  static void TearDownTestSuite() {
    EXPECT_EQ(server_->Stop(), 0);
    delete server_;
    server_ = nullptr;
    std::filesystem::remove_all(Root());
  }

 protected:
  void SetUp() override {
    stub_ = v1::Superpose::NewStub(server_->Channel());
    admin_ = v1::SuperposeAdmin::NewStub(server_->Channel());
  }
  v1::ListAdaptersResponse List() {
    grpc::ClientContext ctx;
    v1::ListAdaptersResponse r;
    EXPECT_TRUE(admin_->ListAdapters(&ctx, {}, &r).ok());
    return r;
  }
  static inline testing::ServerProcess* server_ = nullptr;
  static inline std::string http_port_file_;
  static inline int http_port_ = 0;
  std::unique_ptr<v1::Superpose::Stub> stub_;
  std::unique_ptr<v1::SuperposeAdmin::Stub> admin_;
};

TEST_F(ServerLoraTest, EachAdapterAnswersItsOwnWay) {
  const Result base = Call(*stub_, Prompt(""));
  const Result a1 = Call(*stub_, Prompt("a1"));
  const Result a2 = Call(*stub_, Prompt("a2"));
  ASSERT_TRUE(base.status.ok()) << base.status.error_message();
  ASSERT_TRUE(a1.status.ok()) << a1.status.error_message();
  ASSERT_TRUE(a2.status.ok()) << a2.status.error_message();
  EXPECT_EQ(a1.tokens.size(), 10u);
  EXPECT_NE(a1.logprobs, base.logprobs);
  EXPECT_NE(a1.logprobs, a2.logprobs);
  // Deterministic per adapter (the second run may read its own prefix-cache blocks).
  const Result again = Call(*stub_, Prompt("a1"));
  EXPECT_EQ(again.tokens, a1.tokens);
  EXPECT_EQ(again.logprobs, a1.logprobs);
}

TEST_F(ServerLoraTest, UnknownOrMalformedAdapterIsRefusedNamingTheField) {
  for (const std::string& bad : {std::string("nope"), std::string("bad name!")}) {
    const Result r = Call(*stub_, Prompt(bad));
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << bad;
    EXPECT_NE(r.status.error_message().find("adapter_id"), std::string::npos)
        << r.status.error_message();
  }
  EXPECT_TRUE(Call(*stub_, Prompt("a2")).status.ok());  // still serving
}

TEST_F(ServerLoraTest, GenerateRagRunsWithTheAdapter) {
  v1::GenerateRagRequest req;
  req.set_preamble("Read the stories and answer.");
  req.add_documents()->set_text("Lily went to the park with her mom. She saw a big red ball.\n");
  req.add_documents()->set_text("Tom had a little dog named Max.\n");
  req.set_query("What did Lily see?");
  req.mutable_sampling()->set_max_new_tokens(6);
  req.mutable_sampling()->set_temperature(0);
  req.set_adapter_id("a1");
  const Result a1 = Call(*stub_, req);
  ASSERT_TRUE(a1.status.ok()) << a1.status.error_message();
  req.set_adapter_id("missing");
  const Result bad = Call(*stub_, req);
  EXPECT_EQ(bad.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(bad.status.error_message().find("adapter_id"), std::string::npos);
}

TEST_F(ServerLoraTest, AdminLoadListUnloadWithLruEviction) {
  v1::ListAdaptersResponse list = List();
  EXPECT_EQ(list.max_adapters(), 2u);
  ASSERT_GE(list.adapters_size(), 2);
  EXPECT_EQ(list.adapters(0).name(), "a1");
  EXPECT_EQ(list.adapters(0).rank(), 8u);
  EXPECT_EQ(list.adapters(0).target_modules_size(), 7);
  EXPECT_EQ(list.adapters(0).base_model(), "stories260k");
  // Before the third adapter: a1's answer, to compare with after its eviction.
  const Result a1 = Call(*stub_, Prompt("a1"));
  ASSERT_TRUE(a1.status.ok());
  Call(*stub_, Prompt("a2"));  // a2 is now the most recently used
  {
    grpc::ClientContext ctx;
    v1::LoadAdapterRequest req;
    req.set_name("a3");
    req.set_path(Root() + "/a3");
    v1::LoadAdapterResponse resp;
    const grpc::Status st = admin_->LoadAdapter(&ctx, req, &resp);
    ASSERT_TRUE(st.ok()) << st.error_message();
    EXPECT_EQ(resp.adapter().name(), "a3");
    EXPECT_TRUE(resp.adapter().resident());
  }
  list = List();
  ASSERT_EQ(list.adapters_size(), 3);
  EXPECT_FALSE(list.adapters(0).resident()) << "a1 (least recently used) was not evicted";
  EXPECT_TRUE(list.adapters(1).resident());
  EXPECT_TRUE(list.adapters(2).resident());
  // a1 comes back from its directory with the same answer.
  const Result reloaded = Call(*stub_, Prompt("a1"));
  ASSERT_TRUE(reloaded.status.ok()) << reloaded.status.error_message();
  EXPECT_EQ(reloaded.tokens, a1.tokens);
  EXPECT_EQ(reloaded.logprobs, a1.logprobs);
  EXPECT_TRUE(List().adapters(0).resident());
  EXPECT_TRUE(Call(*stub_, Prompt("a3")).status.ok());
  // Errors: duplicate name, bad directory, unknown name on unload.
  {
    grpc::ClientContext ctx;
    v1::LoadAdapterRequest req;
    req.set_name("a3");
    req.set_path(Root() + "/a3");
    v1::LoadAdapterResponse resp;
    EXPECT_EQ(admin_->LoadAdapter(&ctx, req, &resp).error_code(), grpc::StatusCode::ALREADY_EXISTS);
  }
  {
    grpc::ClientContext ctx;
    v1::LoadAdapterRequest req;
    req.set_name("a4");
    req.set_path(Root() + "/none");
    v1::LoadAdapterResponse resp;
    const grpc::Status st = admin_->LoadAdapter(&ctx, req, &resp);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::NOT_FOUND);
    EXPECT_NE(st.error_message().find("adapter_config.json"), std::string::npos);
  }
  {
    grpc::ClientContext ctx;
    v1::UnloadAdapterRequest req;
    req.set_name("a3");
    v1::UnloadAdapterResponse resp;
    ASSERT_TRUE(admin_->UnloadAdapter(&ctx, req, &resp).ok());
  }
  const Result gone = Call(*stub_, Prompt("a3"));
  EXPECT_EQ(gone.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  {
    grpc::ClientContext ctx;
    v1::UnloadAdapterRequest req;
    req.set_name("a3");
    v1::UnloadAdapterResponse resp;
    EXPECT_EQ(admin_->UnloadAdapter(&ctx, req, &resp).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  EXPECT_EQ(List().adapters_size(), 2);
  const int port = server_->metrics_port();
  EXPECT_GE(testing::MetricValue(port, "superpose_adapter_evictions_total"), 2);
  EXPECT_GE(testing::MetricValue(port, "superpose_adapter_loads_total"), 4);
  EXPECT_EQ(testing::MetricValue(port, "superpose_adapters_resident"), 1);
  EXPECT_GT(testing::MetricValue(port, "superpose_adapters_resident_bytes"), 0);
}

TEST_F(ServerLoraTest, OpenAiModelNamesAnAdapter) {
  ASSERT_GT(http_port_, 0);
  httplib::Client cli("127.0.0.1", http_port_);
  cli.set_read_timeout(60, 0);
  auto models = cli.Get("/v1/models");
  ASSERT_TRUE(models);
  ASSERT_EQ(models->status, 200);
  const json m = json::parse(models->body);
  std::vector<std::string> ids;
  for (const json& d : m["data"]) ids.push_back(d["id"]);
  EXPECT_NE(std::find(ids.begin(), ids.end(), "stories260k"), ids.end());
  EXPECT_NE(std::find(ids.begin(), ids.end(), "a2"), ids.end());
  auto one = cli.Get("/v1/models/a2");
  ASSERT_TRUE(one);
  EXPECT_EQ(one->status, 200);
  EXPECT_EQ(json::parse(one->body)["parent"], "stories260k");

  auto post = [&](const std::string& model) {
    const json body = {{"model", model},
                       {"prompt", "Once upon a time, there was a little girl"},
                       {"max_tokens", 10},
                       {"temperature", 0}};
    return cli.Post("/v1/completions", body.dump(), "application/json");
  };
  auto r = post("a2");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  const json j = json::parse(r->body);
  EXPECT_EQ(j["model"], "a2");
  // The same text as gRPC with adapter_id a2 (same prompt, BOS added by both).
  v1::GenerateRequest g = Prompt("a2");
  g.set_logprobs(false);
  g.set_ignore_eos(false);
  grpc::ClientContext ctx;
  auto reader = stub_->Generate(&ctx, g);
  std::string text;
  v1::GenerateResponse resp;
  while (reader->Read(&resp)) text += resp.text();
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(j["choices"][0]["text"], text);

  auto missing = post("nope");
  ASSERT_TRUE(missing);
  EXPECT_EQ(missing->status, 404);
  EXPECT_EQ(json::parse(missing->body)["error"]["param"], "model");
}

TEST(ServerLoraAuthTest, AdminRpcsNeedAnAdminTenantsKey) {
  const std::string keys = "/tmp/superpose-lora-keys-" + std::to_string(getpid());
  std::ofstream(keys) << "key-admin ops\nkey-user tenant-u\n";
  testing::ServerProcess server({"--model=" + testing::Stories260kDir(), "--api_keys_file=" + keys,
                                 "--admin_tenants=ops,root"});
  ASSERT_TRUE(server.ok());
  auto admin = v1::SuperposeAdmin::NewStub(server.Channel());
  auto list = [&](const std::string& key) {
    grpc::ClientContext ctx;
    if (!key.empty()) ctx.AddMetadata("authorization", "Bearer " + key);
    v1::ListAdaptersResponse r;
    return admin->ListAdapters(&ctx, {}, &r).error_code();
  };
  EXPECT_EQ(list(""), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(list("key-user"), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(list("key-admin"), grpc::StatusCode::OK);
  grpc::ClientContext ctx;
  ctx.AddMetadata("authorization", "Bearer key-user");
  v1::LoadAdapterRequest req;
  req.set_name("x");
  req.set_path("/tmp");
  v1::LoadAdapterResponse resp;
  EXPECT_EQ(admin->LoadAdapter(&ctx, req, &resp).error_code(), grpc::StatusCode::PERMISSION_DENIED);
  std::remove(keys.c_str());
}

TEST(ServerLoraStartTest, BadAdapterFlagFailsAtStart) {
  testing::ServerProcess server(
      {"--model=" + testing::Stories260kDir(), "--adapters=x=/nonexistent/adapter"});
  EXPECT_FALSE(server.ok());
  EXPECT_NE(server.WaitExit(std::chrono::seconds(10)), 0);
}

}  // namespace
}  // namespace superpose
