// A quantized model directory served over gRPC (superpose-quantize's output of
// stories260k): GetModelInfo reports the quantized compute_dtype, a streamed greedy
// Generate answers with the requested tokens, and the same request against the float
// directory quantized at load (--cpu_dtype=q4) gives the same tokens; a bad --cpu_dtype
// stops startup.
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>

#include "engine/model/quant_checkpoint.h"
#include "superpose/v1/superpose.grpc.pb.h"
#include "tests/server_process.h"
#include "tests/test_util.h"

namespace superpose {
namespace {

namespace v1 = superpose::v1;
namespace fs = std::filesystem;

struct Streamed {
  grpc::Status status;
  std::vector<uint32_t> tokens;
  int messages = 0;
  uint32_t generated = 0;
};

Streamed Generate(const testing::ServerProcess& server) {
  auto stub = v1::Superpose::NewStub(server.Channel());
  v1::GenerateRequest req;
  req.set_text("Once upon a time");
  req.mutable_sampling()->set_max_new_tokens(24);
  req.mutable_sampling()->set_temperature(0);
  req.set_ignore_eos(true);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto reader = stub->Generate(&ctx, req);
  Streamed r;
  v1::GenerateResponse resp;
  while (reader->Read(&resp)) {
    ++r.messages;
    r.tokens.insert(r.tokens.end(), resp.token_ids().begin(), resp.token_ids().end());
    if (resp.has_usage()) r.generated = resp.usage().generated_tokens();
  }
  r.status = reader->Finish();
  return r;
}

std::string ComputeDtype(const testing::ServerProcess& server) {
  auto stub = v1::Superpose::NewStub(server.Channel());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::ModelInfo info;
  const grpc::Status s = stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info);
  EXPECT_TRUE(s.ok()) << s.error_message();
  return info.compute_dtype();
}

// Removes the directory when the test ends, also on a failed assertion.
struct TempDir {
  std::string path;
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

TEST(ServerQuantTest, ServesAQuantizedDirectory) {
  const TempDir tmp{fs::temp_directory_path() /
                    ("superpose-server-quant-" + std::to_string(::getpid()))};
  const std::string& dir = tmp.path;
  auto converted =
      engine::QuantizeCheckpoint(testing::Stories260kDir(), dir, engine::WeightQuant::kQ4);
  ASSERT_TRUE(converted.ok()) << converted.status();
  Streamed a;
  {
    testing::ServerProcess server({"--model=" + dir});
    ASSERT_TRUE(server.ok());
    EXPECT_EQ(ComputeDtype(server), "q4");
    a = Generate(server);
    ASSERT_TRUE(a.status.ok()) << a.status.error_message();
    EXPECT_EQ(a.tokens.size(), 24u);
    EXPECT_EQ(a.generated, 24u);
    EXPECT_GT(a.messages, 1);  // streamed, not one reply
  }
  {
    testing::ServerProcess server({"--model=" + testing::Stories260kDir(), "--cpu_dtype=q4"});
    ASSERT_TRUE(server.ok());
    EXPECT_EQ(ComputeDtype(server), "q4");
    const Streamed b = Generate(server);
    ASSERT_TRUE(b.status.ok()) << b.status.error_message();
    EXPECT_EQ(b.tokens, a.tokens);
  }
  testing::ServerProcess bad({"--model=" + dir, "--cpu_dtype=int4"});
  EXPECT_FALSE(bad.ok());
  testing::ServerProcess other({"--model=" + dir, "--cpu_dtype=int8"});  // already q4
  EXPECT_FALSE(other.ok());
}

}  // namespace
}  // namespace superpose
